"""Layer and tensor sensitivities: variants with only some tensors quantized, KLD against the
base on real text, weight errors at every type, and the proxies. (The in-memory probes against
the files they stand for: tests/test_memory_probe.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.choose.file_probes import build_mixed
from pipeline.choose.groups import group_of, low_type_for, low_types
from pipeline.choose.sensitivity import LayerRow, imatrix_layer_stats, proxy_correlations, spearman
from pipeline.choose.weight_errors import (BLOCK_ROWS, MIN_ROWS_PER_MATRIX, VOCAB_ROWS, row_limit, sampled_rows,
                                           tensor_errors)
from pipeline.formats.imatrix_file import Imatrix, ImatrixEntry
from pipeline.formats.tensor_names import ATTN_KINDS
from pipeline.report.sensitivity import plot_heatmap
from tests.conftest import gguf_tensor_types


def test_groups_and_low_types():
    assert group_of("blk.3.attn_v.weight") == "3.attn"
    assert group_of("blk.12.ffn_down.weight") == "12.mlp"
    assert group_of("token_embd.weight") == "token_embd"
    assert group_of("blk.3.attn_norm.weight") is None
    assert low_type_for((640, 1024)) == "Q4_0"  # 640-wide rows reject 256-blocks
    assert low_type_for((2048, 640)) == "Q2_K"


def test_spearman_matches_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert math.isnan(spearman([1, 2], [1, 2]))
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, rel=1e-6)  # ties: average ranks


def test_imatrix_layer_proxies_on_known_vectors():
    """CosSim with the block above and ZD per layer (pipeline.measure.statistics computes them, as
    test_statistics checks against llama-imatrix): parallel importance vectors give 1, orthogonal 0."""
    im = Imatrix(datasets=["x"], chunk_count=1, chunk_size=1)
    for layer, values in ((0, [1, 0, 0, 0]), (1, [2, 0, 0, 0]), (2, [0, 1, 0, 0])):
        im.entries[f"blk.{layer}.attn_q.weight"] = ImatrixEntry(np.array([values], dtype=np.float32), np.array([1]))
    stats = imatrix_layer_stats(im)
    assert sorted(stats) == [0, 1, 2]
    assert stats[0]["cossim"] == 0.0  # no block above
    assert stats[1]["cossim"] == pytest.approx(1.0)
    assert stats[2]["cossim"] == pytest.approx(0.0)
    # one of four columns lies more than one sd above the mean: ZD 1/4
    assert stats[0]["zd"] == pytest.approx(0.25) and stats[2]["zd"] == pytest.approx(0.25)


def test_heatmap_and_correlations(tmp_path):
    rows = [LayerRow(i, 0.1 * (i + 1), 0.01 * (5 - i), 0.02, "a", "m", cossim=1 - 0.1 * i, zd=0.1,
                     block_influence=0.05 * (i + 1)) for i in range(5)]
    corr = proxy_correlations(rows)
    assert corr["block_influence vs kld_removed"] == pytest.approx(1.0)
    assert corr["cossim vs kld_removed"] == pytest.approx(-1.0)
    assert math.isnan(corr["zd vs kld_removed"])  # constant proxy: undefined
    plot_heatmap(tmp_path / "s.png", rows)
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the real model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def info(base_f16):
    from pipeline.formats.model_info import read_model_info

    return read_model_info(base_f16)


@pytest.fixture(scope="module")
def probe(base_f16):
    import os
    from pathlib import Path

    from pipeline.choose.file_probes import KLDProbe
    from pipeline.fsutil import read_text

    text = read_text(Path(os.environ["SQUEEZE_DATA"]) / "imatrix-calibration" / "groups_merged.txt")
    return KLDProbe(base_f16, text, 256, 2)


@pytest.mark.slow
def test_only_the_named_tensors_are_quantized_and_cost_kld(base_f16, info, probe, tmp_path):
    types = low_types(info, 3, ATTN_KINDS)
    assert types == {"blk.3.attn_q.weight": "Q4_0", "blk.3.attn_k.weight": "Q4_0",
                     "blk.3.attn_v.weight": "Q4_0", "blk.3.attn_output.weight": "Q2_K"}
    path = tmp_path / "attn3.gguf"
    build_mixed(base_f16, path, types, None)
    got = gguf_tensor_types(path)
    for name, qtype in types.items():
        assert got[name] == qtype
    others = {n: t for n, t in got.items() if n not in types}
    assert others["token_embd.weight"] == "F16" and others["blk.4.attn_q.weight"] == "F16"
    assert others["blk.3.attn_norm.weight"] == "F32"
    assert probe.kld(base_f16) < 1e-6  # the base against itself
    assert probe.kld(path) > 1e-4


@pytest.mark.slow
def test_weight_errors_shrink_with_more_bits(base_dithered, info, tmp_path):
    # On the dithered base: the plain one holds this tensor on its source's Q4_K grid, where Q4_K
    # is nearly lossless and beats Q6_K (the requantization artifact of shared/FINDINGS.md).
    only = {"blk.3.attn_output.weight", "blk.3.attn_q.weight"}
    rows = tensor_errors(base_dithered, None, info, ("Q2_K", "Q4_K", "Q6_K", "Q4_0"), group_of, only=only)
    err = {(r.tensor, r.type): r.error for r in rows}
    out = "blk.3.attn_output.weight"
    assert err[(out, "Q2_K")] > err[(out, "Q4_0")] > err[(out, "Q4_K")] > err[(out, "Q6_K")] > 0
    assert ("blk.3.attn_q.weight", "Q2_K") not in err  # 640-wide rows: K-quants fall back, not a choice
    assert err[("blk.3.attn_q.weight", "Q4_0")] > 0
    sizes = {(r.tensor, r.type): r.bytes for r in rows}
    assert sizes[(out, "Q2_K")] == 640 * 1024 // 256 * 84  # 84 bytes per 256-block


def test_the_sampling_rule_reads_at_most_its_rows_from_every_matrix():
    # a block tensor's matrix: at most BLOCK_ROWS; an expert tensor shares them (not below the floor)
    assert row_limit("blk.3.ffn_up.weight", 1) == BLOCK_ROWS
    assert row_limit("blk.3.ffn_up_exps.weight", 4) == BLOCK_ROWS // 4
    assert row_limit("blk.3.ffn_up_exps.weight", 128) == MIN_ROWS_PER_MATRIX
    assert row_limit("token_embd.weight", 1) == VOCAB_ROWS
    assert list(sampled_rows(2048, 512)) == list(range(0, 2048, 4))
    assert len(sampled_rows(640, 512)) == 320 and len(sampled_rows(256, 512)) == 256


@pytest.mark.slow
def test_sampled_errors_rank_every_type_as_every_row_does(base_dithered, info):
    # Measured on the dithered base, layers 5 and 11 (every kind), 8 types: the sampled estimate is
    # off by up to 10 % of a tensor's error (rows differ), but every type sits in the same order, and
    # the alphas are made from the same sampled errors, so the bias cancels in a group's prediction.
    only = {t.name for t in info.quantizable() if t.name.startswith(("blk.5.", "blk.11."))}
    types = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q8_0", "IQ3_S")
    sampled = {(r.tensor, r.type): r.error for r in tensor_errors(base_dithered, None, info, types, group_of, only=only)}
    full = {(r.tensor, r.type): r.error for r in tensor_errors(base_dithered, None, info, types, group_of, only=only,
                                                               sample=False)}
    assert set(sampled) == set(full)
    assert max(abs(sampled[k] / full[k] - 1) for k in full) < 0.15
    assert any(sampled[k] != full[k] for k in full)  # something was sampled (ffn_up: 1 row in 4)
    for name in only:
        ours = sorted((t for n, t in full if n == name), key=lambda t: sampled[(name, t)])
        assert ours == sorted((t for n, t in full if n == name), key=lambda t: full[(name, t)]), name
