"""Imatrix statistics against `llama-imatrix --in-file X --show-statistics` (its table parsed)."""

from __future__ import annotations

import math
import re
import subprocess

import numpy as np
import pytest

from pipeline.formats.imatrix_file import Imatrix, ImatrixEntry, read_imatrix
from pipeline.measure.statistics import layer_statistics, split_name, tensor_statistics

# (column in squeeze's rows, decimals the CLI prints) in the CLI's column order after Layer, Tensor
TENSOR_COLUMNS = [("sum_act2", 2), ("min", 4), ("max", 4), ("mean", 2), ("stddev", 2), ("active_pct", 2),
                  ("n", 0), ("entropy", 4), ("entropy_norm_pct", 2), ("zd_pct", 2), ("cossim", 4)]
LAYER_COLUMNS = [("mean_sum_act2", 2), ("mean_zd_pct", 4), ("mean_cossim", 4)]
LOG_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ [A-Z] ")  # llama.cpp's log: time stamp and level


def parse_show_statistics(text: str):
    """The two tables llama-imatrix prints: {(layer, tensor): [11 numbers]}, {layer: [3 numbers]}."""
    tensors, layers = {}, {}
    part = None
    for line in text.splitlines():
        if "Computing statistics for" in line:
            part = tensors
        elif "Computing weighted average statistics per layer" in line:
            part = layers
        line = LOG_PREFIX.sub("", line)
        fields = [f.strip().rstrip("%") for f in line.split("\t")]
        if part is tensors and len(fields) == 13 and fields[0] != "Layer":
            tensors[(fields[0], fields[1])] = [float(f) for f in fields[2:]]
        elif part is layers and len(fields) == 4 and fields[0] != "Layer":
            layers[int(fields[0])] = [float(f) for f in fields[1:]]
    return tensors, layers


def close_to_printed(ours: float, printed: float, decimals: int) -> bool:
    # The CLI rounds to `decimals` when printing and adds up to 2048 float32 terms one by one
    # (relative error up to n * 2^-24 = 1.2e-4 in the worst case, far less in practice); squeeze
    # adds in float64. So: half a printed unit, plus 1e-4 relative.
    return abs(ours - printed) <= 0.5 * 10 ** -decimals + 1e-4 * abs(printed) + 1e-12


@pytest.mark.slow
@pytest.mark.reference
def test_statistics_match_llama_imatrix_show_statistics(base_f16, squeeze_imatrix, llama_tools):
    path = squeeze_imatrix[0]
    # -m is required by the argument parser; no model is loaded for --show-statistics
    cmd = [str(llama_tools / "llama-imatrix"), "-m", str(base_f16), "--in-file", str(path), "--show-statistics"]
    # llama.cpp's logger writes from a worker thread that is not drained at exit (its log.cpp
    # says so, llama.cpp issue 22142), so now and then the tail of the table is lost: rerun then.
    for _ in range(6):
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL)
        cli_tensors, cli_layers = parse_show_statistics(proc.stdout + proc.stderr)
        if len(cli_layers) == 18:
            break
    rows = tensor_statistics(read_imatrix(path))
    assert len(cli_tensors) == len(rows) == 18 * 7
    # the CLI's row order: by tensor family, then Σ(Act²) from high to low
    cli_order = list(cli_tensors)
    assert [(r["layer"], r["tensor"]) for r in rows] == cli_order
    bad = []
    for r in rows:
        for (col, dec), printed in zip(TENSOR_COLUMNS, cli_tensors[(r["layer"], r["tensor"])]):
            if not close_to_printed(r[col], printed, dec):
                bad.append(f"{r['name']} {col}: squeeze {r[col]!r}, llama-imatrix {printed}")
    layers = layer_statistics(rows)
    assert [r["layer"] for r in layers] == sorted(cli_layers) == list(range(18))
    for r in layers:
        for (col, dec), printed in zip(LAYER_COLUMNS, cli_layers[r["layer"]]):
            if not close_to_printed(r[col], printed, dec):
                bad.append(f"layer {r['layer']} {col}: squeeze {r[col]!r}, llama-imatrix {printed}")
    assert not bad, "\n".join(bad[:20])


def test_statistics_by_hand():
    # two blocks of one tensor, 4 columns, 2 tokens each: every formula checked on numbers
    im = Imatrix(entries={
        "blk.0.ffn_down.weight": ImatrixEntry(np.array([[2.0, 4.0, 0.0, 10.0]], np.float32), np.array([2])),
        "blk.1.ffn_down.weight": ImatrixEntry(np.array([[2.0, 4.0, 6.0, 8.0]], np.float32), np.array([2])),
        "output.weight": ImatrixEntry(np.array([[1.0, 1.0]], np.float32), np.array([1])),
    })
    rows = {r["name"]: r for r in tensor_statistics(im)}
    r0 = rows["blk.0.ffn_down.weight"]
    act = np.array([1.0, 2.0, 0.0, 5.0])
    assert (r0["layer"], r0["tensor"], r0["n"]) == ("0", "ffn_down", 4)
    assert r0["sum_act2"] == 8.0 and r0["min"] == 0.0 and r0["max"] == 5.0 and r0["mean"] == 2.0
    assert r0["stddev"] == pytest.approx(act.std())
    assert r0["active_pct"] == 75.0
    p = act[act > 0] / 8.0
    assert r0["entropy"] == pytest.approx(-(p * np.log2(p)).sum())
    assert r0["entropy_norm_pct"] == pytest.approx(100 * r0["entropy"] / 2.0)
    assert r0["zd_pct"] == 25.0  # only 5 is more than one σ above μ
    assert r0["cossim"] == 0.0  # no block before
    r1 = rows["blk.1.ffn_down.weight"]
    a, b = np.array([2.0, 4.0, 6.0, 8.0]), np.array([2.0, 4.0, 0.0, 10.0])
    assert r1["cossim"] == pytest.approx(a @ b / math.sqrt((a @ a) * (b @ b)))
    assert split_name("output.weight") == ("-", "output") and rows["output.weight"]["cossim"] == 0.0
    layers = layer_statistics(list(rows.values()))
    assert [l["layer"] for l in layers] == [0, 1]  # `output.weight` belongs to no layer
    assert layers[1]["mean_sum_act2"] == pytest.approx(10.0)
