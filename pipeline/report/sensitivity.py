"""The sensitivity map as files: sensitivity.csv (one row per layer), sensitivity.json (everything
allocation reads), sensitivity.png (heatmap) and sensitivity.md (table and proxy correlations)."""

from __future__ import annotations

import csv
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.choose.groups import LOW_FALLBACK, LOW_TYPE
from pipeline.choose.sensitivity import LayerRow, Sensitivity
from pipeline.fsutil import atomic_path, write_text_atomic
from pipeline.report.plotting import pyplot


def write_layer_csv(path: Path, rows: list[LayerRow]) -> None:
    with atomic_path(Path(path)) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))


def plot_heatmap(path: Path, rows: list[LayerRow]) -> None:
    """Layers x {removed, attention low, MLP low}, log-scaled KLD, values written in the cells."""
    plt = pyplot()
    from matplotlib.colors import LogNorm
    cols = [("kld_removed", "layer removed"), ("kld_attn_low", "attention low"), ("kld_mlp_low", "MLP low")]
    data = np.array([[max(getattr(r, c), 1e-6) for c, _ in cols] for r in rows])
    fig, ax = plt.subplots(figsize=(4.8, 0.32 * len(rows) + 1.4))
    im = ax.imshow(data, aspect="auto", cmap="magma_r", norm=LogNorm(vmin=data.min(), vmax=data.max()))
    ax.set_xticks(range(len(cols)), [label for _, label in cols])
    ax.set_yticks(range(len(rows)), [str(r.layer) for r in rows])
    ax.set_ylabel("layer")
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            v = data[i, j]
            ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7,
                    color="white" if v > math.sqrt(data.min() * data.max()) else "black")
    fig.colorbar(im, ax=ax, label="mean KLD vs base")
    ax.set_title("Layer sensitivity (KLD, log scale)", fontsize=9)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def save_sensitivity(result: Sensitivity, csv_path: Path, json_path: Path, png_path: Path | None,
                     md_path: Path | None = None) -> None:
    write_layer_csv(csv_path, result.rows)
    write_text_atomic(Path(json_path), result.to_json())
    if png_path is not None:
        plot_heatmap(png_path, result.rows)
    if md_path is not None:
        write_text_atomic(Path(md_path), sensitivity_markdown(result))


def sensitivity_markdown(result: Sensitivity) -> str:
    """The layer map as a table, and how well each proxy ranks the layers (Spearman)."""
    rows = result.rows
    lines = ["## Layer sensitivity", "",
             "Mean KLD against the base on calibration chunks when the layer is removed, or when only its "
             f"attention / MLP tensors are quantized to {LOW_TYPE} ({LOW_FALLBACK} for rows K-quants cannot "
             "hold), everything else at the base. ↓ = less sensitive.", "",
             "| Layer | Removed ↓ | Attention low ↓ | MLP low ↓ | imatrix CosSim | ZD | Block Influence |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.layer} | {r.kld_removed:.4f} | {r.kld_attn_low:.5f} | {r.kld_mlp_low:.5f} | "
                     f"{r.cossim:.4f} | {r.zd:.4f} | {r.block_influence:.4f} |")
    if "token_embd" in result.group_kld:
        g = result.group_kld["token_embd"]
        lines += ["", f"Token embedding (tied output) at {', '.join(g.types.values())}: KLD {g.kld:.5f}."]
    lines += ["", "### Proxies against measured KLD (Spearman ρ over layers)", "",
              "| Proxy vs measured | ρ |", "|---|---|"]
    for name, rho in result.correlations.items():
        lines.append(f"| {name} | {'n/a' if rho != rho else f'{rho:+.2f}'} |")
    lines += ["", "A useful pruning proxy ranks layers like `kld_removed`: Block Influence with ρ > 0, "
              "CosSim with ρ < 0 (a layer like its predecessor is redundant)."]
    return "\n".join(lines) + "\n"
