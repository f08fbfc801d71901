"""`squeeze plan --estimate`: a prediction per step (seconds, bytes written, peak memory), checked
against a real run of a small recipe. Disk sizes are deterministic and must match closely;
seconds are printed beside the measured ones and held only to a generous bound."""

from __future__ import annotations

import json
import textwrap

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.engine.quantize import quantize_file
from pipeline.fsutil import read_text
from pipeline.cost.gpu_rates import GPUS, gpu
from pipeline.cost.rates import machine_rates, write_probe_model
from pipeline.sources.datasets import resolve_dataset
from pipeline.cost.run_estimate import estimate_run, parse_count
from pipeline.stages.registry import build_steps, open_run

TINY = {"n_embd": 256, "n_ff": 768, "n_layers": 4, "n_head": 4, "n_head_kv": 2, "n_vocab": 4096}


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    """A small llama-architecture model (random weights, byte-level vocabulary) as a Q8_0 GGUF, and a
    recipe using every stage but sensitivity: convert dequantizes it, one layer is pruned."""
    folder = tmp_path_factory.mktemp("estimate")
    f16 = folder / "tiny-f16.gguf"
    write_probe_model(f16, TINY)
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
    estimate = estimate_run(ctx, steps, machine_rates(ctx.threads))
    out = CliRunner().invoke(main, ["run", str(tiny_recipe), "--results", str(results)])
    assert out.exit_code == 0, out.output
    manifest = json.loads((results / "manifest.json").read_text())
    return estimate, manifest, results


def test_plan_estimate_prints_every_step_and_the_totals(tiny_recipe, tmp_path):
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
    h100 = estimate_run(ctx, steps, rates, gpu("h100"))
    t4 = estimate_run(ctx, steps, rates, gpu("T4"))
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
