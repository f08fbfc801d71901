"""A model whose rows do not fit K-quants: a tiny Gemma 3 with an embedding width of 576 (as
SmolLM2-135M has), converted from a Hugging Face folder and taken through the whole budgeted
path: in-memory sensitivity probes, weight errors, the allocator with measured refinement,
automatic pruning, quantizing. 576 is a multiple of 32 but not of 256, so every tensor that
reads the residual stream (attention q/k/v, FFN gate/up) and the embedding can only take 32-block
types, while the FFN down projection (1536 wide) and the attention output (256 wide) can take
K-quants. Nothing in the probes or the allocator may assume otherwise."""

from __future__ import annotations

import json
import textwrap

import pytest

from pipeline.formats.ggml_types import fits
from pipeline.formats.gguf_index import read_index
from tests.conftest import run_squeeze
from tests.tiny_gemma import build_tiny_gemma3, calibration_text

WIDTH, FFN, LAYERS = 576, 1536, 4
K_QUANTS = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


@pytest.fixture(scope="module")
def narrow_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("narrow")
    hf = build_tiny_gemma3(folder / "tiny-576", calibration_text(), hidden=WIDTH, intermediate=FFN,
                           n_layers=LAYERS, n_heads=2, n_kv_heads=1, head_dim=128)
    recipe = folder / "narrow.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        model: {{source: {hf}, base_type: F16}}
        calibration: {{datasets: [groups_merged], ctx: 128, chunks: 4}}
        select: {{target_bpw: 5.5, refine_rounds: 2}}
        variants:
          auto: {{ftype: Q4_0}}
          auto-pruned: {{ftype: Q4_0, prune: {{auto: 1}}}}
          prune-or-bits: {{ftype: Q4_0, prune: {{up_to: 1}}}}
        score:
          ctx: 128
          chunks: 2
          tasks: {{benchmarks: [], count: 0}}
          speed: {{repetitions: 0}}
          drift: {{tokens: 0}}
        report: {{reference: auto}}
        """))
    results = folder / "results"
    proc = run_squeeze("run", str(recipe), "--results", str(results))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return results


@pytest.mark.slow
def test_rows_of_576_get_only_types_they_fit_and_the_budget_holds(narrow_run):
    results = narrow_run
    sens = json.loads((results / "sensitivity.json").read_text())
    for e in sens["errors"]:  # every (tensor, type) measured is one the rows fit
        width = WIDTH if e["tensor"].split(".")[-2] in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up",
                                                          "token_embd") else None
        if width:
            assert e["type"] not in K_QUANTS, e
    low = sens["group_kld"]["1.attn"]["types"]
    assert low["blk.1.attn_q.weight"] == "Q4_0" and low["blk.1.attn_output.weight"] == "Q2_K"
    assert sens["group_kld"]["1.mlp"]["types"]["blk.1.ffn_down.weight"] == "Q2_K"
    steps = json.loads((results / "manifest.json").read_text())["steps"]
    extra = steps["quantize auto"]["extra"]
    held = read_index(results / "variants" / "auto.gguf")
    assert (results / "variants" / "auto.gguf").stat().st_size <= extra["budget_bytes"]
    for name, entry in held.items():
        if len(entry.shape) >= 2:
            assert fits(entry.shape, entry.type.name), name
            if entry.shape[0] == WIDTH:
                assert entry.type.name not in K_QUANTS, name
    # the allocation was measured in memory and the explanation says how the prediction held
    assert extra["refinement"] and extra["calibration_kld"] > 0
    assert "refine" in (results / "variants" / "auto.allocation.md").read_text().lower()


@pytest.mark.slow
def test_automatic_pruning_works_on_the_narrow_model(narrow_run):
    results = narrow_run
    pruned = read_index(results / "variants" / "auto-pruned.gguf")
    layers = {int(n.split(".")[1]) for n in pruned if n.startswith("blk.")}
    assert layers == set(range(LAYERS - 1))
    choice = json.loads((results / "pruned" / "auto1.json").read_text())
    assert len(choice["layers"]) == 1


@pytest.mark.slow
def test_removing_a_layer_is_weighed_against_spending_the_bytes_on_bits(narrow_run):
    results = narrow_run
    choice = json.loads((results / "pruned" / "upto1-prune-or-bits.json").read_text())
    weighed = choice["prune_or_bits"]
    labels = [c["label"] for c in weighed["candidates"]]
    assert labels == ["keep every layer", "remove 1 layer"]
    measured = {c["label"]: c["measured_kld"] for c in weighed["candidates"]}
    best = min(measured, key=measured.get)
    assert choice["layers"] == next(c["layers"] for c in weighed["candidates"] if c["label"] == best)
    # the same bytes for both: the budget of the whole model, whatever was removed
    assert all(c["bytes"] <= weighed["budget_bytes"] for c in weighed["candidates"])
    held = read_index(results / "variants" / "prune-or-bits.gguf")
    assert len({n.split(".")[1] for n in held if n.startswith("blk.")}) == LAYERS - len(choice["layers"])
    assert (results / "variants" / "prune-or-bits.gguf").stat().st_size <= weighed["budget_bytes"]
    explained = (results / "variants" / "prune-or-bits.allocation.md").read_text()
    assert "**Prune or bits.**" in explained and f"measures the lowest KLD, {measured[best]:.4f}" in explained
