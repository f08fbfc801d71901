"""Stage statistics: what the importance matrix says about each tensor and layer.

Every column `llama-imatrix --in-file X --show-statistics` prints (tools/imatrix/imatrix.cpp,
compute_statistics / compute_cossim / show_statistics), per tensor and per layer, written to
stats.csv, stats-layers.csv and stats.md, plus a heatmap (layers x tensor families) and a plot of
layers.csv (the block similarity the pruning stage ranks layers by).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from pipeline.context import RunContext
from pipeline.engine import engine_versions
from pipeline.errors import SqueezeError
from pipeline.imatrix_file import Imatrix, check_against_model, read_imatrix
from pipeline.runner import Step

_BLOCK = re.compile(r"blk\.(\d+)\.")
TENSOR_COLUMNS = ("layer", "tensor", "name", "sum_act2", "min", "max", "mean", "stddev", "active_pct",
                  "n", "entropy", "entropy_norm_pct", "zd_pct", "cossim")
LAYER_COLUMNS = ("layer", "mean_sum_act2", "mean_zd_pct", "mean_cossim")
_ACTIVE_THRESHOLD = 1e-5  # |mean squared activation| at or below this counts as inactive (as the CLI)


def split_name(full: str) -> tuple[str, str]:
    """(layer, tensor) as the CLI shows them: `blk.3.ffn_down.weight` -> ('3', 'ffn_down'), '-' for no block."""
    parts = full.split(".")
    layer = next((parts[i + 1] for i in range(len(parts) - 1) if parts[i] == "blk"), "-")
    tensor = next((parts[i - 1] for i in range(1, len(parts)) if parts[i] == "weight"), full)
    return layer, tensor


def tensor_statistics(im: Imatrix) -> list[dict]:
    """One row per imatrix entry, sorted as the CLI prints them (by tensor family, then Σ(Act²) down)."""
    rows, raw = [], {}
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
        m = _BLOCK.search(row["name"])
        if not m:
            continue
        prev = row["name"][:m.start(1)] + str(int(m.group(1)) - 1) + row["name"][m.end(1):]
        if prev in raw and raw[prev].size == raw[row["name"]].size:
            a, b = raw[row["name"]], raw[prev]
            denom = math.sqrt(float(a @ a)) * math.sqrt(float(b @ b))
            row["cossim"] = float(a @ b) / denom if denom > 0 else float("nan")
    rows.sort(key=lambda r: (r["tensor"], -r["sum_act2"]))
    return rows


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


# ---- writing ------------------------------------------------------------------------------------

def _csv(path: Path, columns, rows) -> None:
    def fmt(v):
        return f"{v:.9g}" if isinstance(v, float) else str(v)
    lines = [",".join(columns)] + [",".join(fmt(r[c]) for c in columns) for r in rows]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def stats_markdown(source: str, rows: list[dict], layers: list[dict]) -> str:
    out = ["# Importance-matrix statistics", "",
           f"From `{source}`, computed as `llama-imatrix --show-statistics` computes them. Per tensor: "
           "Σ(Act²) is the sum over input columns of the mean squared activation; μ, σ, min and max are "
           "over those columns; % Active counts columns above 1e-5; entropy (bits) and its normalized "
           "form describe how evenly the importance spreads; ZD is the share of columns more than one σ "
           "above μ; CosSim compares the tensor's importance vector with the same tensor one block "
           "earlier (1 = the same direction).", "",
           "| Layer | Tensor | Σ(Act²) | Min | Max | μ | σ | % Active | N | Entropy | E (norm) | ZD | CosSim |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['layer']} | {r['tensor']} | {r['sum_act2']:.2f} | {r['min']:.4f} | {r['max']:.4f} | "
                   f"{r['mean']:.2f} | {r['stddev']:.2f} | {r['active_pct']:.2f}% | {r['n']} | "
                   f"{r['entropy']:.4f} | {r['entropy_norm_pct']:.2f}% | {r['zd_pct']:.2f}% | {r['cossim']:.4f} |")
    out += ["", "## Per layer (averages weighted by N)", "",
            "| Layer | μΣ(Act²) | μZD | μCosSim |", "|---:|---:|---:|---:|"]
    for r in layers:
        out.append(f"| {r['layer']} | {r['mean_sum_act2']:.2f} | {r['mean_zd_pct']:.4f}% | {r['mean_cossim']:.4f} |")
    return "\n".join(out) + "\n"


def _family_order(rows: list[dict]) -> list[str]:
    preferred = ["attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
                 "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]
    present = {r["tensor"] for r in rows if r["layer"] != "-"}
    return [f for f in preferred if f in present] + sorted(present - set(preferred))


def write_heatmap(path: Path, rows: list[dict], title: str) -> None:
    """Three panels, layers down, tensor families across: how much signal each tensor sees
    (log10 of μ, the mean squared input), how concentrated it is (ZD), and how it differs from
    the block before (1 - CosSim)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = _family_order(rows)
    layers = sorted({int(r["layer"]) for r in rows if r["layer"] != "-"})
    if not families or not layers:
        raise SqueezeError(f"{title}: the imatrix has no per-block tensors to draw")
    li = {l: i for i, l in enumerate(layers)}
    fi = {f: j for j, f in enumerate(families)}
    panels = [("log10 μ(Act²)", lambda r: math.log10(r["mean"]) if r["mean"] > 0 else np.nan, "viridis"),
              ("ZD %: columns > μ + σ", lambda r: r["zd_pct"], "magma"),
              ("1 − CosSim with block above", lambda r: (1 - r["cossim"]) if r["layer"] != "0" else np.nan, "cividis")]
    fig, axes = plt.subplots(1, 3, figsize=(3 * (2.2 + 0.5 * len(families)), 1.8 + 0.3 * len(layers)), squeeze=False)
    for ax, (label, value, cmap) in zip(axes[0], panels):
        grid = np.full((len(layers), len(families)), np.nan)
        for r in rows:
            if r["layer"] != "-":
                grid[li[int(r["layer"])], fi[r["tensor"]]] = value(r)
        im = ax.imshow(grid, aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_title(label, fontsize=10)
        ax.set_xticks(range(len(families)), families, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), layers, fontsize=8)
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def write_layers_plot(path: Path, layer_rows: list[dict], title: str) -> None:
    """Block Influence (1 - cos(input, output)) per layer: low bars are the layers to prune first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in layer_rows]
    bi = [r["block_influence"] for r in layer_rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(layers) + 2), 3.6))
    order = np.argsort(bi)
    colors = ["#d95f02" if i in set(order[:2]) else "#1b9e77" for i in range(len(layers))]
    ax.bar(layers, bi, color=colors)
    ax.set_xlabel("layer")
    ax.set_ylabel("block influence = 1 − mean cos(in, out)")
    ax.set_xticks(layers)
    ax.set_title(f"{title} (orange: the two least influential)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def write_statistics(imatrix_path: Path, im: Imatrix, stats_csv: Path, layers_csv: Path, md: Path,
                     heatmap: Path | None) -> tuple[list[dict], list[dict]]:
    rows = tensor_statistics(im)
    if not rows:
        raise SqueezeError(f"{imatrix_path}: no imatrix entry has activations (all counts are zero)")
    layers = layer_statistics(rows)
    _csv(stats_csv, TENSOR_COLUMNS, rows)
    _csv(layers_csv, LAYER_COLUMNS, layers)
    md.write_text(stats_markdown(imatrix_path.name, rows, layers), encoding="utf-8")
    if heatmap is not None:
        write_heatmap(heatmap, rows, f"imatrix statistics ({imatrix_path.name})")
    return rows, layers


# ---- the stage ----------------------------------------------------------------------------------

def steps(ctx: RunContext) -> list[Step]:
    from pipeline.imatrix import imatrix_input

    cal = ctx.recipe.calibration
    if cal is None:
        return []
    source = imatrix_input(ctx)
    has_layers = not cal.imatrix  # layers.csv comes from squeeze's own calibration pass only
    inputs = [source] + ([ctx.layers_path] if has_layers else [])
    outputs = [ctx.stats_csv_path, ctx.stats_layers_csv_path, ctx.stats_md_path, ctx.stats_heatmap_path]
    if has_layers:
        outputs.append(ctx.layers_plot_path)

    def action(io):
        from pipeline.activations import read_layers_csv

        im = read_imatrix(source)
        check_against_model(im, source, ctx.model_info)
        rows, layers = write_statistics(source, im, io.out(ctx.stats_csv_path), io.out(ctx.stats_layers_csv_path),
                                        io.out(ctx.stats_md_path), io.out(ctx.stats_heatmap_path))
        extra = {"tensors": len(rows), "layers": len(layers)}
        if has_layers:
            layer_rows = read_layers_csv(ctx.layers_path)
            write_layers_plot(io.out(ctx.layers_plot_path), layer_rows, "Layer similarity")
            ranked = sorted(layer_rows, key=lambda r: r["block_influence"])
            extra["least_influential_layers"] = [r["layer"] for r in ranked[:4]]
        return extra

    return [Step("statistics", "statistics", {}, inputs, outputs, action, versions=engine_versions(),
                 produces="stats.csv + stats.md + stats.png" + (" + layers.png" if has_layers else ""))]
