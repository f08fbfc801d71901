"""What the importance matrix says about each tensor and layer: every column
`llama-imatrix --in-file X --show-statistics` prints (tools/imatrix/imatrix.cpp,
compute_statistics / compute_cossim / show_statistics), per tensor and per layer.
(pipeline.report.statistics writes them; pipeline.stages.statistics is the step.)
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.formats.imatrix_file import Imatrix
from pipeline.formats.tensor_names import layer_of, parse, with_layer

TENSOR_COLUMNS = ("layer", "tensor", "name", "sum_act2", "min", "max", "mean", "stddev", "active_pct",
                  "n", "entropy", "entropy_norm_pct", "zd_pct", "cossim")
LAYER_COLUMNS = ("layer", "mean_sum_act2", "mean_zd_pct", "mean_cossim")
_ACTIVE_THRESHOLD = 1e-5  # |mean squared activation| at or below this counts as inactive (as the CLI)


def split_name(full: str) -> tuple[str, str]:
    """(layer, tensor) as the CLI shows them: `blk.3.ffn_down.weight` -> ('3', 'ffn_down'), '-' for no block."""
    n = parse(full)
    return ("-" if n.layer is None else str(n.layer)), n.kind


def tensor_statistics(im: Imatrix) -> list[dict]:
    """One row per imatrix entry, sorted as the CLI prints them (by tensor family, then Σ(Act²) down)."""
    rows, raw, order = [], {}, {}
    for name, e in im.entries.items():
        counts = e.counts.astype(np.float64)
        sums = e.sums.reshape(len(e.counts), -1).astype(np.float64)
        if im.legacy:  # legacy sums are per-call means times ncall: the same ratio as raw sums / rows
            counts = np.full(1, float(e.counts[0]))
            sums = sums.reshape(1, -1)
        keep = counts > 0
        if not keep.any():
            continue
        act = (sums[keep] / counts[keep][:, None]).ravel()
        total = float(act.sum())
        order[name] = _cli_total(sums[keep], counts[keep])
        mean = total / act.size
        var = float(np.square(act).sum()) / act.size - mean * mean
        dev = math.sqrt(max(0.0, var))
        active = 1.0 - float(np.count_nonzero(np.abs(act) <= _ACTIVE_THRESHOLD)) / act.size
        entropy = 0.0
        if total > 0:
            p = act / total
            p = p[p > 0]
            entropy = float(-(p * np.log2(p)).sum())
        zd = float(np.count_nonzero((act - mean) / dev > 1)) / act.size if dev > 0 else 0.0
        layer, tensor = split_name(name)
        rows.append({"layer": layer, "tensor": tensor, "name": name, "sum_act2": total, "min": float(act.min()),
                     "max": float(act.max()), "mean": mean, "stddev": dev, "active_pct": 100.0 * active,
                     "n": int(act.size), "entropy": entropy,
                     "entropy_norm_pct": 100.0 * entropy / math.log2(act.size) if act.size > 1 else 0.0,
                     "zd_pct": 100.0 * zd, "cossim": 0.0})
        # CosSim compares the raw sums (not the per-token means) with the same tensor one block up
        raw[name] = e.sums.astype(np.float64).ravel()
    for row in rows:
        layer = layer_of(row["name"])
        if layer is None:
            continue
        prev = with_layer(row["name"], layer - 1)
        if prev in raw and raw[prev].size == raw[row["name"]].size:
            a, b = raw[row["name"]], raw[prev]
            denom = math.sqrt(float(a @ a)) * math.sqrt(float(b @ b))
            row["cossim"] = float(a @ b) / denom if denom > 0 else float("nan")
    rows.sort(key=lambda r: (r["tensor"], -order[r["name"]]))
    return rows


def _cli_total(sums: np.ndarray, counts: np.ndarray) -> float:
    """Σ(Act²) as the CLI sorts by it: float32 means added one by one in float32. After an RMS
    norm every token's squares add up to about the width, so the totals of one tensor kind in
    different layers can agree to 1e-6 and only the CLI's own rounding orders them the same way."""
    act = (sums.astype(np.float32) / counts.astype(np.float32)[:, None]).ravel()
    return float(np.add.accumulate(act, dtype=np.float32)[-1]) if act.size else 0.0


def layer_statistics(rows: list[dict]) -> list[dict]:
    """Per block: Σ(Act²), ZD and CosSim of its tensors, averaged with weights N (as the CLI)."""
    acc: dict[int, list[float]] = {}
    for r in rows:
        if r["layer"] == "-":
            continue
        a = acc.setdefault(int(r["layer"]), [0.0, 0.0, 0.0, 0])
        a[0] += r["n"] * r["sum_act2"]
        a[1] += r["n"] * r["zd_pct"]
        a[2] += r["n"] * r["cossim"]
        a[3] += r["n"]
    return [{"layer": il, "mean_sum_act2": a[0] / a[3], "mean_zd_pct": a[1] / a[3], "mean_cossim": a[2] / a[3]}
            for il, a in sorted(acc.items()) if a[3] > 0]
