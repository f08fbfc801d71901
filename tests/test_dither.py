"""An off-grid base (model.dither): a base dequantized from a quantized file, each block moved off
its grid by ±half the grid step. On it, stock-quant KLD falls strictly with bits, as for a model
that was never quantized; on the plain base Q4_K_M beats Q5_K_M (shared/FINDINGS.md)."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.engine.context import Context
from pipeline.engine.model import Model
from pipeline.engine.quantize import quantize_file
from pipeline.formats.dither import block_steps, dither_values
from pipeline.formats.gguf_index import read_index, tensor_values
from pipeline.formats.imatrix_file import write_imatrix
from pipeline.fsutil import read_text
from pipeline.measure import perplexity
from pipeline.measure.calibration import calibration_tokens, collect, to_imatrix
from pipeline.sources.datasets import resolve_dataset
from tests.conftest import gguf_tensor_types
from tests.tiny_gemma import build_tiny_gemma3, calibration_text


def test_each_block_moves_by_at_most_half_its_grid_step():
    rng = np.random.default_rng(0)
    grid = np.concatenate([np.arange(32) * 0.5 - 8, np.full(32, 3.0), np.arange(32) * 0.01]).astype(np.float32)
    assert list(block_steps(grid.reshape(-1, 32))) == pytest.approx([0.5, 0.0, 0.01])
    out = dither_values(grid, rng)
    moved = np.abs(out - grid).reshape(-1, 32).max(axis=1)
    assert moved[0] <= 0.25 and moved[0] > 0.1  # off the grid, within half a step
    assert moved[1] == 0.0  # a constant block has no grid to leave
    assert moved[2] <= 0.005


def _tensors(path) -> dict[str, np.ndarray]:
    """Each tensor as float32 (exact for the F16/F32 bases compared here)."""
    return {name: tensor_values(path, e) for name, e in read_index(path).items()}


def test_a_recipe_dithers_only_what_its_quantized_source_held(tmp_path):
    hf = build_tiny_gemma3(tmp_path / "tiny-gemma3", calibration_text(), n_layers=2)
    recipe = tmp_path / "q8.yaml"
    recipe.write_text(f"model: {{source: {hf}, base_type: F16}}\nvariants: {{Q8_0: Q8_0}}\nscore: {{ctx: 128, chunks: 2}}\n")
    assert CliRunner().invoke(main, ["run", str(recipe), "--results", str(tmp_path / "q8")]).exit_code == 0
    quantized_source = tmp_path / "q8" / "variants" / "Q8_0.gguf"
    for dither in ("false", "true"):
        (tmp_path / f"d-{dither}.yaml").write_text(textwrap.dedent(f"""\
            model: {{source: {quantized_source}, base_type: F16, dither: {dither}}}
            variants: {{Q4_0: Q4_0}}
            score: {{ctx: 128, chunks: 2}}
            """))
        r = CliRunner().invoke(main, ["run", str(tmp_path / f"d-{dither}.yaml"), "--results", str(tmp_path / dither)])
        assert r.exit_code == 0, r.output
    plain, dithered = _tensors(tmp_path / "false" / "base-f16.gguf"), _tensors(tmp_path / "true" / "base-f16.gguf")
    held = gguf_tensor_types(quantized_source)
    for name, kind in held.items():
        if kind == "Q8_0":  # was on a grid: moved, by less than one Q8_0 step of its block
            assert not np.array_equal(plain[name], dithered[name]), name
            step = block_steps(plain[name].astype(np.float32).reshape(-1, 32)).max()
            assert np.abs(dithered[name].astype(np.float32) - plain[name].astype(np.float32)).max() <= step, name
        else:  # norms kept in F32 by the quantizer: never on a grid, never touched
            assert np.array_equal(plain[name], dithered[name]), name
    info = json.loads((tmp_path / "true" / "base-f16.json").read_text())
    assert info["dithered"] is True and info["grid_bpw"] is None and info["dequantized_from"] == "Q8_0"


def test_dither_on_a_source_that_was_never_quantized_is_refused_in_one_line(tmp_path):
    hf = build_tiny_gemma3(tmp_path / "tiny-gemma3", calibration_text(), n_layers=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{source: {hf}, base_type: F16, dither: true}}\nvariants: {{Q8_0: Q8_0}}\n")
    r = CliRunner().invoke(main, ["run", str(recipe), "--results", str(tmp_path / "r")])
    assert r.exit_code == 1
    assert r.output.splitlines()[-1] == (f"Error: {recipe}:1: model.dither: Hugging Face folder {hf} is not a "
                                         "quantized GGUF, so there is no grid to take its base off; drop model.dither")


# the types around the Q4_K_M grid the source was on, where an artifact would break the order
LADDER = ("Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K")


@pytest.mark.slow
def test_on_the_dithered_base_kld_falls_strictly_with_bits(base_dithered, tmp_path):
    """With the imatrix of the dithered base, as a new user would quantize it (2 x 512 tokens of
    calibration text; KLD on 4 x 256 tokens of wikitext-2)."""
    tokens = calibration_tokens(base_dithered, [resolve_dataset("groups_merged")])
    totals, _ = collect(base_dithered, tokens, 512, 2)
    imatrix = tmp_path / "imatrix.gguf"
    write_imatrix(imatrix, to_imatrix(totals, 512, ["groups_merged.txt"]))
    with Model(base_dithered) as model:
        chunks = perplexity.make_chunks(model, read_text(resolve_dataset("wikitext-2")), 256, 4)
        with Context(model, 256, 4) as c:
            base = perplexity.base_distribution(model, c, chunks)
    kld = {}
    for ftype in LADDER:
        path = tmp_path / f"{ftype}.gguf"
        quantize_file(base_dithered, path, ftype, imatrix_path=imatrix)
        with Model(path) as model, Context(model, 256, 4) as c:
            kld[ftype] = perplexity.summarize(base, perplexity.score_against_base(model, c, base))["mean_kld"]
        path.unlink()
    values = [kld[t] for t in LADDER]
    assert all(a > b for a, b in zip(values, values[1:])), kld
