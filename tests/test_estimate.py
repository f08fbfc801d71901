"""`squeeze plan --estimate`: a prediction per step (seconds, bytes written, peak memory), checked
against a real run of a small recipe. Disk sizes are deterministic and must match closely;
seconds are printed beside the measured ones and held only to a generous bound."""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.cost import rates as rates_module
from pipeline.cost.estimate import Pricer, Shape, shape_from_size
from pipeline.cost.gpu_rates import GPUS, gpu
from pipeline.cost.rates import (Rates, amdahl_speedup, bad_rates, cached_rates, is_busy, machine_rates, other_cpus,
                                 other_load, parallel_fraction, rates_key, rates_path, write_bench_model)
from pipeline.cost import estimate as est
from pipeline.cost.run_estimate import _Pricing, estimate_run, model_shape, parse_count
from pipeline.stages.quantize import REFINE_GROUP_FRACTION
from pipeline.engine.backend import supports_gpu_offload
from pipeline.engine.quantize import quantize_file
from pipeline.errors import SqueezeError
from pipeline.formats.model_info import TensorInfo
from pipeline.fsutil import read_text, write_json_atomic
from pipeline.sources.datasets import resolve_dataset
from pipeline.stages.estimate import gptq_work, largest_probe, moment_inputs, moments_work, probe_resident
from pipeline.stages.registry import build_steps, open_run
from pipeline.work import Dense, GptqColumns, Quantize, Roundtrip

TINY = {"n_embd": 256, "n_ff": 768, "n_layers": 4, "n_head": 4, "n_head_kv": 2, "n_vocab": 4096}


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    """A small llama-architecture model (random weights, byte-level vocabulary) as a Q8_0 GGUF, and a
    recipe using every stage but sensitivity: convert dequantizes it, one layer is pruned."""
    folder = tmp_path_factory.mktemp("estimate")
    f16 = folder / "tiny-f16.gguf"
    write_bench_model(f16, TINY)
    source = folder / "tiny-q8_0.gguf"
    quantize_file(f16, source, "Q8_0")
    # the vocabulary is bytes: short texts (llama.cpp tokenizes a long text of bytes slowly)
    for name, dataset in (("calibration.txt", "groups_merged"), ("evaluation.txt", "wikitext-2")):
        (folder / name).write_text(read_text(resolve_dataset(dataset))[:20000], encoding="utf-8")
    recipe = folder / "tiny-estimate.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        model: {{source: {source}, base_type: F16}}
        calibration: {{datasets: [calibration.txt], ctx: 128, chunks: 4}}
        variants:
          Q4_K_M: Q4_K_M
          Q8_0: Q8_0
          Q3_K_M-pruned: {{ftype: Q3_K_M, prune: [2]}}
        score:
          dataset: evaluation.txt
          ctx: 128
          chunks: 4
          tasks: {{benchmarks: [arc-easy, winogrande], count: 4, ctx: 512}}
          speed: {{pp: 64, tg: 8, repetitions: 1}}
          drift: {{tokens: 4}}
        """))
    return recipe


@pytest.fixture(scope="module")
def predicted_and_measured(tiny_recipe, tmp_path_factory):
    results = tmp_path_factory.mktemp("estimate-results") / "results"
    ctx = open_run(tiny_recipe, results)
    steps = build_steps(ctx)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rates_module, "MAX_TRIES", 1)  # as in test_plan_estimate_prints_every_step_and_the_totals
        estimate = estimate_run(ctx, steps, machine_rates(ctx.threads))
    out = CliRunner().invoke(main, ["run", str(tiny_recipe), "--results", str(results)])
    assert out.exit_code == 0, out.output
    manifest = json.loads((results / "manifest.json").read_text())
    return estimate, manifest, results


def test_plan_estimate_prints_every_step_and_the_totals(tiny_recipe, tmp_path, monkeypatch):
    # the suite's last test still weighs in the 1-minute load: one probe, cached with its load noted
    monkeypatch.setattr(rates_module, "MAX_TRIES", 1)
    out = CliRunner().invoke(main, ["plan", str(tiny_recipe), "--results", str(tmp_path / "r"), "--estimate"])
    assert out.exit_code == 0, out.output
    ctx = open_run(tiny_recipe, tmp_path / "r")
    for step in build_steps(ctx):
        assert any(line.strip().startswith(step.key + " ") for line in out.output.splitlines()), step.key
    total = [line for line in out.output.splitlines() if line.startswith("total: ")]
    assert len(total) == 1 and "results folder" in total[0] and "peak memory" in total[0]
    assert not (tmp_path / "r").exists()  # planning writes nothing into the results folder


def test_estimate_covers_every_step_and_output(predicted_and_measured):
    estimate, manifest, results = predicted_and_measured
    assert {c.key for c in estimate.costs} == set(manifest["steps"])
    for c in estimate.costs:
        assert c.seconds > 0 and c.memory_bytes > 0, c.key
        assert {str(p.relative_to(results)) for p in c.writes} == set(manifest["steps"][c.key]["outputs"]), c.key
    assert estimate.peak_memory == max(c.memory_bytes for c in estimate.costs)
    assert estimate.folder_bytes == sum(c.bytes_written for c in estimate.costs)


def _measured_sizes(manifest) -> dict[str, int]:
    return {rel: d["size"] for s in manifest["steps"].values() for rel, d in s["outputs"].items()}


def test_predicted_disk_bytes_match_what_the_run_wrote(predicted_and_measured):
    estimate, manifest, results = predicted_and_measured
    measured = _measured_sizes(manifest)
    predicted = {str(p.relative_to(results)): b for c in estimate.costs for p, b in c.writes.items()}
    assert set(predicted) == set(measured)
    print()
    for rel in sorted(measured, key=lambda r: -measured[r])[:12]:
        print(f"{rel:<40} predicted {predicted[rel]:>12,}  written {measured[rel]:>12,}")
    # the large files: the base, the pruned base and every variant, within 1 %
    for rel in ("base-f16.gguf", "pruned/base-f16-p2.gguf", "variants/Q4_K_M.gguf", "variants/Q8_0.gguf",
                "variants/Q3_K_M-pruned.gguf", "imatrix.gguf"):
        assert predicted[rel] == pytest.approx(measured[rel], rel=0.01), rel
    assert sum(predicted.values()) == pytest.approx(sum(measured.values()), rel=0.03)


def test_predicted_seconds_are_in_the_measured_range(predicted_and_measured):
    """Wall time depends on the machine's load: printed per stage, held to a factor of 5 in total."""
    estimate, manifest, _ = predicted_and_measured
    measured: dict[str, float] = {}
    for s in manifest["steps"].values():
        measured[s["stage"]] = measured.get(s["stage"], 0.0) + s["seconds"]
    print()
    for c in estimate.costs:
        print(f"  {c.key:<24} predicted {c.seconds:7.2f} s  measured {manifest['steps'][c.key]['seconds']:7.2f} s")
    for stage, p in estimate.by_stage().items():
        print(f"{stage:<12} predicted {p['seconds']:7.2f} s  measured {measured[stage]:7.2f} s")
    total = sum(measured.values())
    print(f"{'total':<12} predicted {estimate.seconds:7.2f} s  measured {total:7.2f} s")
    assert total / 5 < estimate.seconds < total * 5


def test_gpu_estimates_use_the_table_and_say_so(tiny_recipe, tmp_path):
    ctx = open_run(tiny_recipe, tmp_path / "r")
    steps = build_steps(ctx)
    rates = machine_rates(ctx.threads)
    cpu = estimate_run(ctx, steps, rates)
    # the host held at this machine's threads: only model evaluation moves
    h100 = estimate_run(ctx, steps, rates, gpu("h100"), cpu_threads=rates.threads)
    t4 = estimate_run(ctx, steps, rates, gpu("T4"), cpu_threads=rates.threads)
    by_key = {c.key: c for c in cpu.costs}
    for c in h100.costs:  # model evaluation is faster; CPU work (quantize) is the same
        if c.stage == "quantize":
            assert c.seconds == pytest.approx(by_key[c.key].seconds)
        assert c.bytes_written == by_key[c.key].bytes_written
    speed = [c for c in h100.costs if c.key.startswith("speed ")]
    assert speed and all(c.gpu_memory_bytes > 0 for c in speed)
    assert all(t.seconds >= h.seconds for t, h in zip(t4.costs, h100.costs))
    assert any("H100" in n for n in h100.notes)
    assert all(g.source and g.bandwidth_gb_s > 0 and g.fp16_tflops > 0 for g in GPUS.values())


def test_unknown_gpu_and_bad_params_are_one_line_errors(tiny_recipe, tmp_path):
    out = CliRunner().invoke(main, ["plan", str(tiny_recipe), "--estimate", "--gpu", "H1000"])
    assert out.exit_code == 1
    assert out.output.startswith("Error: --gpu: no rates for 'H1000'; did you mean 'H100'?")
    assert parse_count("12.2B") == 12_200_000_000 and parse_count("270M") == 270_000_000


def test_a_hub_model_not_downloaded_is_estimated_from_its_size():
    out = CliRunner().invoke(main, ["plan", "recipes/gemma3-12b-pruned.yaml", "--estimate"])
    assert out.exit_code == 1 and "--params" in out.output
    out = CliRunner().invoke(main, ["plan", "recipes/gemma3-12b-pruned.yaml", "--estimate", "--params", "12.2B",
                                    "--vocab", "262144", "--gpu", "H100"])
    assert out.exit_code == 0, out.output
    assert "quantize Q4_K_M" in out.output and "sizes are approximate" in out.output


# ---- the host, thread scaling and the probe's load (pure arithmetic) ------------------------------
def _rates(**over) -> Rates:
    """Rates of a made-up machine of 2 threads: the pricing arithmetic, not a measurement."""
    fields = dict(key={"threads": 2}, pp_flops_f16=1e11, pp_flops_quant=1e11, output_flops=5e10, tg_bytes_per_s=1e10,
                  quantize_weights_per_s={"Q8_0": 1e8, "legacy": 5e7, "K": 2e7},
                  dequantize_values_per_s={"F16": 1e9, "Q8_0": 5e8}, write_bytes_per_s=1e9, hook_values_per_s=1e9,
                  sketch_s_per_entry=2e-9, kld_s_per_entry=1e-9, process_rss_bytes=1 << 28, load_s=0.5,
                  roundtrip_weights_per_s={"Q4_K": 1e7, "Q8_0": 1e8, "IQ2_S": 2e6}, dense_flops=2e10,
                  gptq_s_per_value=2e-8,
                  scaling={"pp": {"seconds_1": 2.0, "seconds_2": 1.1, "parallel_fraction": 0.9},
                           "tg": {"seconds_1": 1.0, "seconds_2": 0.8, "parallel_fraction": 0.4},
                           "quantize": {"seconds_1": 2.0, "seconds_2": 1.0, "parallel_fraction": 1.0},
                           "vocab": {"seconds_1": 1.0, "seconds_2": 1.0, "parallel_fraction": 0.0}})
    fields.update(over)
    return Rates(**fields)


def test_amdahl_fraction_from_two_points_and_its_extrapolation():
    assert parallel_fraction(2.0, 1.0) == pytest.approx(1.0)  # twice as fast on two: all parallel
    assert parallel_fraction(1.0, 1.0) == pytest.approx(0.0)  # no faster: serial
    assert parallel_fraction(2.0, 1.5) == pytest.approx(0.5)
    assert parallel_fraction(1.0, 1.2) == 0.0 and parallel_fraction(2.0, 0.9) == 1.0  # noise is clamped
    assert amdahl_speedup(0.5, 1) == pytest.approx(1.0)
    assert amdahl_speedup(0.5, 2) == pytest.approx(1 / 0.75)
    assert amdahl_speedup(0.9, 32) == pytest.approx(1 / (0.1 + 0.9 / 32))
    assert amdahl_speedup(0.0, 32) == pytest.approx(1.0)
    with pytest.raises(SqueezeError, match="thread scaling"):
        parallel_fraction(0.0, 1.0)


def test_a_host_of_more_threads_scales_each_kind_of_cpu_work_by_its_own_fraction():
    r = _rates()
    here, host = Pricer(r), Pricer(r, threads=32)
    # quantize: all parallel -> 16 x faster than at 2 threads
    assert here.quantize_weights(1e9) / host.quantize_weights(1e9) == pytest.approx(16.0)
    assert here.roundtrip(1e8, "Q4_K") / host.roundtrip(1e8, "Q4_K") == pytest.approx(16.0)
    # prompt processing: p = 0.9
    want = amdahl_speedup(0.9, 32) / amdahl_speedup(0.9, 2)
    assert here.forward(1000, 1e9, True) / host.forward(1000, 1e9, True) == pytest.approx(want)
    # the output layer: only for the tokens with logits, at its own measured rate, scaled like pp
    assert here.forward(1000, 1e9, True, 100, 2e9) == pytest.approx(1000 * 1e9 / 1e11 + 100 * 2e9 / 5e10)
    assert here.forward(1000, 1e9, True, 100, 2e9) / host.forward(1000, 1e9, True, 100, 2e9) == pytest.approx(want)
    # the vocabulary work measured serial here stays as it is; serial kinds are not scaled
    assert host.kld(1000, 262144) == pytest.approx(here.kld(1000, 262144))
    assert host.write(1e9) == here.write(1e9) and host.load() == here.load()
    # fewer threads than measured: slower
    assert Pricer(r, threads=1).quantize_weights(1e9) == pytest.approx(2 * here.quantize_weights(1e9))
    # on a GPU, evaluation ignores the host; quantizing does not
    g = Pricer(r, gpu("H100"), threads=32)
    assert g.forward(1000, 1e9, True) == pytest.approx(Pricer(r, gpu("H100")).forward(1000, 1e9, True))
    assert g.quantize_weights(1e9) == pytest.approx(host.quantize_weights(1e9))
    # no scaling measured (a 1-CPU machine): the host is priced at this machine's speed
    flat = Pricer(_rates(scaling={}), threads=32)
    assert flat.quantize_weights(1e9) == pytest.approx(here.quantize_weights(1e9))


def test_a_type_the_probe_did_not_time_is_priced_at_the_slowest_measured():
    p = Pricer(_rates())
    assert p.roundtrip(2e6, "IQ1_M") == pytest.approx(1.0)  # IQ2_S's 2e6/s, the slowest
    assert p.roundtrip(1e8, "F16") == pytest.approx(1.0)  # a copy: Q8_0's rate


def test_every_gpu_names_its_default_host():
    assert all(g.host_threads >= 1 for g in GPUS.values())
    assert gpu("H100").host_threads == gpu("H200").host_threads == gpu("A100").host_threads == 32


def test_the_probe_calls_a_machine_busy_from_the_load_beyond_its_own_threads():
    # 2 CPUs, a probe of 2 threads: its own load after it ran is not counted
    assert not is_busy(0.2, 2.3, 2, 2)
    assert other_load(0.2, 2.3, 2) == pytest.approx(0.3)
    # another job kept a core busy before the probe started, or more load than its threads after
    assert is_busy(1.5, 1.0, 2, 2) and is_busy(0.1, 3.5, 2, 2)
    assert not is_busy(7.0, 9.0, 16, 2)  # 16 CPUs take 7 others' threads
    # a retry: the load before it is partly the try just before
    assert is_busy(2.4, 2.4, 2, 2) and not is_busy(2.4, 2.4, 2, 2, retry=True)


def test_other_work_is_the_machines_cpu_time_less_the_probes_own():
    # 60 s of probe: the machine busy for 150 CPU-s, 90 of them the probe's: one other core's worth
    assert other_cpus(150.0, 90.0, 60.0) == pytest.approx(1.0)
    assert other_cpus(88.0, 90.0, 60.0) == 0.0  # the clocks' ticks differ a little: never negative


def test_a_zero_or_non_finite_rate_is_found_and_never_used_from_the_cache(tmp_path, monkeypatch):
    good = _rates().to_json()
    assert bad_rates(good) == []
    assert bad_rates({**good, "kld_s_per_entry": 0.0}) == ["kld_s_per_entry"]
    assert bad_rates({**good, "pp_flops_f16": math.inf, "roundtrip_weights_per_s": {"Q4_K": float("nan")}}) == \
        ["pp_flops_f16", "roundtrip_weights_per_s[Q4_K]"]
    assert "quantize_weights_per_s[K]" in bad_rates({**good, "quantize_weights_per_s": {"K": 0}})
    # a cached record with a zero rate (what a busy probe once wrote) is measured again, not used
    monkeypatch.setenv("SQUEEZE_CACHE", str(tmp_path))
    key = rates_key(2)
    write_json_atomic(rates_path(key), {**good, "key": key})
    assert cached_rates(2) is not None
    write_json_atomic(rates_path(key), {**good, "key": key, "kld_s_per_entry": 0.0})
    assert cached_rates(2) is None


def test_rates_a_busy_probe_measured_serve_this_process_but_are_never_cached(tmp_path, monkeypatch):
    # the probe stands in for a machine another job kept busy (the real one takes a minute)
    monkeypatch.setenv("SQUEEZE_CACHE", str(tmp_path))
    monkeypatch.setattr(rates_module, "_busy_rates", {})
    busy = {"before": [1.0] * 3, "after": [2.1] * 3, "nproc": 2, "threads": 2, "other": 1.0, "other_cpus": 0.93,
            "busy": True, "tries": 1}
    probes = []

    def probe(threads, retry=False):
        probes.append(retry)
        return _rates(key=rates_key(threads), load=dict(busy))

    monkeypatch.setattr(rates_module, "benchmark", probe)
    said = []
    first = machine_rates(2, echo=said.append)
    assert probes == [False, True]  # measured again once
    assert "busy machine (other work used 0.93 CPUs" in said[1] and "not cached" in said[-1]
    assert not rates_path(rates_key(2)).exists() and cached_rates(2) is None
    assert machine_rates(2, echo=said.append) is first and len(probes) == 2  # not probed again in this process


def test_the_rate_probe_records_its_load_and_thread_scaling(tiny_recipe, tmp_path):
    rates = machine_rates(open_run(tiny_recipe, tmp_path / "r").threads)
    assert set(rates.load) >= {"before", "after", "nproc", "threads", "other", "other_cpus", "busy", "tries"}
    if rates.load["other_cpus"] is not None:  # Linux: measured from /proc/stat
        assert rates.load["busy"] == (rates.load["other_cpus"] > rates_module.BUSY_CPU_SHARE * rates.load["nproc"])
    assert rates.load["nproc"] >= 1 and len(rates.load["before"]) == 3
    assert bad_rates(rates.to_json()) == []
    if rates.load["nproc"] >= 2:  # Linux pins the probe to 1 and 2 CPUs
        assert set(rates.scaling) == {"pp", "tg", "quantize", "vocab"}
        assert all(0.0 <= v["parallel_fraction"] <= 1.0 for v in rates.scaling.values())


# ---- GPU offload, refinement, prune searches, mixtures of experts ----------------------------------
@pytest.fixture(scope="module")
def offload_recipe(tiny_recipe):
    path = tiny_recipe.parent / "tiny-offload.yaml"
    text = tiny_recipe.read_text().replace("base_type: F16}", "base_type: F16, n_gpu_layers: -1}")
    assert text != tiny_recipe.read_text()
    path.write_text(text)
    return path


def test_a_recipe_that_offloads_is_estimated_for_a_gpu_on_a_build_without_one(offload_recipe, tmp_path):
    out = CliRunner().invoke(main, ["plan", str(offload_recipe), "--results", str(tmp_path / "r"),
                                    "--estimate", "--gpu", "H100"])
    assert out.exit_code == 0, out.output
    assert any(line.startswith("total: ") for line in out.output.splitlines())
    assert "32-thread host" in out.output and "default host for a H100" in out.output
    if not supports_gpu_offload():  # running it is still refused, before any work
        assert "would refuse it" in out.output
        ran = CliRunner().invoke(main, ["run", str(offload_recipe), "--results", str(tmp_path / "r")])
        assert ran.exit_code == 1 and "has no GPU backend" in ran.output
        assert not (tmp_path / "r" / "manifest.json").exists()


@pytest.fixture(scope="module")
def budget_recipe(tiny_recipe):
    """The tiny model with the choices that measure: a sensitivity map, budgeted variants refined
    in memory, an automatic prune and a prune-or-bits search."""
    path = tiny_recipe.parent / "tiny-budget.yaml"
    text = tiny_recipe.read_text().split("variants:")[0] + textwrap.dedent("""\
        select: {refine_rounds: 3}
        variants:
          B4: {ftype: Q4_K_M, target_bpw: 4.5}
          B3-auto1: {ftype: Q3_K_M, target_bpw: 3.8, prune: {auto: 1}}
          B4-upto1: {ftype: Q4_K_M, target_bpw: 4.5, prune: {up_to: 1}}
          Q8_0: Q8_0
        score: {dataset: evaluation.txt, ctx: 128, chunks: 4}
        """)
    path.write_text(text)
    return path


def test_budgeted_variants_price_every_refinement_probe(budget_recipe, tmp_path):
    ctx = open_run(budget_recipe, tmp_path / "r")
    steps = build_steps(ctx)
    rates = machine_rates(ctx.threads)
    e = estimate_run(ctx, steps, rates)
    by_key = {c.key: c for c in e.costs}
    groups = 2 * 4 + 1  # attention and MLP of 4 layers, the embedding
    per_round = math.ceil(REFINE_GROUP_FRACTION * groups)
    assert f"refinement: {3 + 2 * per_round} in-memory KLD probes" in by_key["quantize B4"].note
    assert "refinement" not in by_key["quantize Q8_0"].note
    # the budgeted step is priced far above the plain quantize of a file of the same kind
    assert by_key["quantize B4"].seconds > 5 * by_key["quantize Q8_0"].seconds
    # no refinement rounds: the quantize alone
    no_refine = budget_recipe.parent / "tiny-budget-0.yaml"
    no_refine.write_text(budget_recipe.read_text().replace("refine_rounds: 3", "refine_rounds: 0"))
    ctx0 = open_run(no_refine, tmp_path / "r0")
    e0 = {c.key: c for c in estimate_run(ctx0, build_steps(ctx0), rates).costs}
    assert e0["quantize B4"].seconds < by_key["quantize B4"].seconds
    assert "refinement" not in e0["quantize B4"].note
    # the prune searches: the automatic one probes removals, prune-or-bits measures K + 1 whole mixes too
    auto = next(c for c in e.costs if c.key.startswith("prune auto"))
    upto = next(c for c in e.costs if c.stage == "prune" and c is not auto)
    assert "KLD probes" in auto.note and "2 whole mixes measured" in upto.note
    assert e.costs and any("every refinement round priced in full" in n for n in e.notes)


def test_cpu_threads_prices_the_host_and_bad_values_are_one_line(tmp_path):
    args = ["plan", "recipes/gemma3-12b-pruned.yaml", "--estimate", "--params", "12.2B", "--vocab", "262144"]
    here = CliRunner().invoke(main, args)
    host = CliRunner().invoke(main, args + ["--cpu-threads", "32"])
    assert here.exit_code == 0 and host.exit_code == 0, here.output + host.output
    assert "a host of 32 threads, as given (--cpu-threads)" in host.output
    bad = CliRunner().invoke(main, args + ["--cpu-threads", "0"])
    assert bad.exit_code == 1 and bad.output.startswith("Error: --cpu-threads: expected a thread count")


def _moe_shape(n_expert=8, used=2) -> Shape:
    e, ff, nv = 64, 128, 1000
    tensors = [TensorInfo("token_embd.weight", (e, nv), "F16"), TensorInfo("output_norm.weight", (e,), "F32")]
    for i in range(2):
        tensors += [TensorInfo(f"blk.{i}.attn_q.weight", (e, e), "F16"),
                    TensorInfo(f"blk.{i}.ffn_gate_exps.weight", (e, ff, n_expert), "F16"),
                    TensorInfo(f"blk.{i}.ffn_down_exps.weight", (ff, e, n_expert), "F16")]
    return Shape("qwen3moe", 2, nv, e, tuple(tensors), 1000, n_expert=n_expert, n_expert_used=used)


def test_a_mixture_of_experts_is_evaluated_by_its_active_parameters():
    s = _moe_shape()
    experts = 2 * 2 * 64 * 128 * 8
    assert s.n_params == 64 * 1000 + 64 + 2 * 64 * 64 + experts
    assert s.n_active_params == s.n_params - experts + experts * 2 // 8
    # the blocks' active weights; the output layer (the tied embedding) per token with logits
    assert s.flops_per_token() == pytest.approx(2 * (s.n_active_params - 64 * 1000))
    assert s.output_flops_per_token() == 2 * 64 * 1000
    dense = replace(s, n_expert=0, n_expert_used=0)  # the same tensors, read as a dense model's
    assert dense.n_active_params == dense.n_params
    # dropping a layer drops its active share
    assert s.flops_per_token(drop=[1]) == pytest.approx(2 * (s.n_active_params - 64 * 1000
                                                             - (64 * 64 + 2 * 64 * 128 * 2)))


def test_a_shape_from_a_size_takes_active_parameters_too():
    s = shape_from_size("qwen3moe", 48, 30_000_000_000, 151936, active_params=3_000_000_000)
    assert s.n_active_params == 3_000_000_000 and s.n_params > 29e9
    outside = sum(math.prod(t.shape) for t in s.tensors if t.name in ("token_embd.weight", "output.weight"))
    assert s.flops_per_token() == pytest.approx(2 * (3e9 - outside), rel=1e-6)
    with pytest.raises(SqueezeError, match="--active-params"):
        shape_from_size("qwen3moe", 48, 30_000_000_000, 151936, active_params=40_000_000_000)


def test_the_estimate_header_shows_total_and_active_parameters():
    args = ["plan", "recipes/gemma3-12b-pruned.yaml", "--estimate", "--params", "12.2B", "--vocab", "262144",
            "--gpu", "H100"]
    dense = CliRunner().invoke(main, args)
    moe = CliRunner().invoke(main, args + ["--active-params", "3B"])
    assert dense.exit_code == 0 and moe.exit_code == 0, dense.output + moe.output
    assert "active per token" not in dense.output
    assert "(3,000M active per token)" in moe.output and "mixture of experts" in moe.output
    total = [line for line in moe.output.splitlines() if line.startswith("total: ")]
    assert total and total != [line for line in dense.output.splitlines() if line.startswith("total: ")]
    bad = CliRunner().invoke(main, args + ["--active-params", "lots"])
    assert bad.exit_code == 1 and bad.output.startswith("Error: --active-params: expected a parameter count")


def test_a_new_stage_is_priced_from_the_work_it_declares(tiny_recipe, tmp_path, monkeypatch):
    """A stage the cost model has never heard of: registered, it declares a pass, a probe's worth
    of quantizing and a large file; `plan --estimate` prices exactly that, with no change to
    pipeline/cost/."""
    import types

    from pipeline.run.runner import Step
    from pipeline.stages import registry
    from pipeline.work import Forward, Kld, Load, Memory, Note, Roundtrip, Write

    def declare(shape, ctx):
        mix = {t.name: "Q4_0" for t in shape.tensors if t.shape and len(t.shape) >= 2 and t.shape[0] % 32 == 0}
        return [Load(), Forward(10_000, shape.flops_per_token(), True, 500), Kld(500), Roundtrip(mix),
                Write(ctx.folder / "extra.bin", 50 << 20, timed=True), Memory(300 << 20), Note("an extra pass")]

    def steps(ctx):
        return [Step("extra", "extra", {}, [ctx.base_path], [ctx.folder / "extra.bin", ctx.folder / "extra.json"],
                     lambda io: None, work=lambda shape: declare(shape, ctx))]

    monkeypatch.setitem(registry.STAGES, "extra", types.SimpleNamespace(steps=steps))
    ctx = open_run(tiny_recipe, tmp_path / "r")
    rates = machine_rates(ctx.threads)
    e = estimate_run(ctx, build_steps(ctx), rates)
    extra = next(c for c in e.costs if c.key == "extra")
    shape = e.shape
    p = Pricer(rates)
    mix = {t.name: t for t in shape.tensors if t.shape and len(t.shape) >= 2 and t.shape[0] % 32 == 0}
    expected = (p.load() + p.forward(10_000, shape.flops_per_token(), True, 500, shape.output_flops_per_token())
                + p.kld(500, shape.n_vocab) + p.write(50 << 20)
                + sum(p.roundtrip(math.prod(t.shape), "Q4_0") for t in mix.values()))
    assert extra.seconds == pytest.approx(expected, rel=1e-9) and extra.note == "an extra pass"
    assert extra.writes[ctx.folder / "extra.bin"] == 50 << 20 and ctx.folder / "extra.json" in extra.writes
    assert extra.memory_bytes >= rates.process_rss_bytes + (300 << 20)  # and the quantized-tensor cache
    out = CliRunner().invoke(main, ["plan", str(tiny_recipe), "--results", str(tmp_path / "r"), "--estimate"])
    assert out.exit_code == 0 and any(line.strip().startswith("extra ") for line in out.output.splitlines())


def test_the_process_memory_the_estimate_adds_is_a_fresh_runs_not_the_callers():
    """A caller holding half a GiB (a test session, a benchmark script) does not inflate what
    every step of the estimate adds for squeeze's own process."""
    held = np.ones(512 << 17, dtype=np.float64)  # 512 MiB resident here
    held[::4096] += 1  # touched: resident, not just reserved
    fresh = rates_module.baseline_rss_bytes()
    assert 20 << 20 < fresh < 400 << 20, fresh
    assert rates_module._rss_bytes() > fresh + (400 << 20)  # this process does hold it


def test_the_cache_keeps_a_pruned_bases_tensors_beside_the_bases(tiny_recipe, tmp_path):
    """The quantized-tensor cache keys a tensor by its file: the same types quantized from a pruned
    base are held a second time, and counted in every later step's memory."""
    run = open_run(tiny_recipe, tmp_path / "r")
    shape = model_shape(run)
    pricing = _Pricing(shape, machine_rates(run.threads), None)
    types = {t.name: "Q4_K" for t in shape.tensors if len(t.shape) == 2}
    pricing.seconds(Quantize(types))
    once = pricing.cache_bytes
    assert once == sum(est.tensor_nbytes("Q4_K", t.shape) for t in shape.tensors if t.name in types)
    pricing.seconds(Roundtrip(types))  # the same pairs from the same file: already held
    assert pricing.cache_bytes == once
    pricing.seconds(Quantize(types, source="base-f16-pruned"))
    assert pricing.cache_bytes == 2 * once


def test_a_probe_holds_the_original_bytes_of_what_it_changed(tiny_recipe, tmp_path):
    """While a probe's change is applied, the overwritten tensors' original bytes are kept to
    restore them: a whole-mix probe holds about the base's weights a second time."""
    run = open_run(tiny_recipe, tmp_path / "r")
    shape = model_shape(run)
    weights = [t.name for t in shape.tensors if len(t.shape) == 2]
    none, whole = probe_resident(shape, run), probe_resident(shape, run, weights)
    saved = sum(est.tensor_nbytes("F16", t.shape) for t in shape.tensors if t.name in weights)
    assert whole.extra - none.extra >= saved
    # the sensitivity map's largest probe: one kind in every layer, or the embedding alone
    largest = largest_probe(shape, {n: "Q2_K" for n in weights})
    assert 0 < len(largest) < len(weights)


def test_gptq_is_priced_by_its_columns_and_its_matrix_products():
    """Error-compensated rounding: per distinct input one factor (4/3 n^3), per tensor its columns
    and the feedback past each block (rows x n x (n - block)); the calibration pass's x^T x
    2 x tokens x n^2 per input. i-quants keep llama.cpp's rounding and cost nothing here."""
    shape = shape_from_size("llama", 2, 50_000_000, 32000)
    blocks = {t.name: t.shape for t in shape.tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    inputs = moment_inputs(shape)
    assert len(inputs) == 4 * 2  # q/k/v share one, gate/up one; attn_output and ffn_down their own
    assert inputs["blk.1.attn_q"] == (shape.n_embd, 1) and inputs["blk.1.ffn_down"] == (3 * shape.n_embd, 1)
    work, peak = gptq_work(shape, {n: "Q4_K" for n in blocks})
    columns, dense = work
    assert isinstance(columns, GptqColumns) and isinstance(dense, Dense)
    assert columns.values == sum(n * rows for n, rows in blocks.values())
    assert dense.flops == pytest.approx(sum(rows * n * (n - 256) for n, rows in blocks.values())
                                        + sum(4 / 3 * n ** 3 for n, _ in inputs.values()))
    n_ff = 3 * shape.n_embd
    assert peak == 4 * n_ff ** 2 + 8 * n_ff ** 2 + 16 * n_ff ** 2 + 16 * shape.n_embd * n_ff
    assert gptq_work(shape, {n: "IQ4_XS" for n in blocks}) == ([], 0)
    assert gptq_work(shape, {n: "Q4_K" for n in blocks}, times=2.5)[0][1].flops == pytest.approx(2.5 * dense.flops)
    pricer = Pricer(_rates())
    assert pricer.dense(dense.flops) == pytest.approx(dense.flops / 2e10)
    assert pricer.gptq_columns(columns.values) == pytest.approx(columns.values * 2e-8)
    (moments,) = moments_work(shape, 1000)
    assert moments.flops == 2.0 * 1000 * sum(n * n for n, _ in inputs.values())
