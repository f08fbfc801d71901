"""The imatrix statistics as files: stats.csv (per tensor), stats-layers.csv (per layer), stats.md,
the heatmap stats.png, and layers.png (Block Influence per layer from layers.csv)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline.errors import SqueezeError
from pipeline.formats.imatrix_file import Imatrix
from pipeline.formats.layers_csv import LayerSimilarity
from pipeline.formats.tensor_names import FAMILY_ORDER
from pipeline.measure.statistics import LAYER_COLUMNS, TENSOR_COLUMNS, layer_statistics, tensor_statistics
from pipeline.report.plotting import pyplot


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
    present = {r["tensor"] for r in rows if r["layer"] != "-"}
    return [f for f in FAMILY_ORDER if f in present] + sorted(present - set(FAMILY_ORDER))


def write_heatmap(path: Path, rows: list[dict], title: str) -> None:
    """Three panels, layers down, tensor families across: how much signal each tensor sees
    (log10 of μ, the mean squared input), how concentrated it is (ZD), and how it differs from
    the block before (1 - CosSim)."""
    plt = pyplot()
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


def write_layers_plot(path: Path, layer_rows: list[LayerSimilarity], title: str) -> None:
    """Block Influence (1 - cos(input, output)) per layer: low bars are the layers to prune first."""
    plt = pyplot()
    layers = [r.layer for r in layer_rows]
    bi = [r.block_influence for r in layer_rows]
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


