"""matplotlib, loaded on first use with a file backend: plots are written, never shown, and the
import costs most of a second that `squeeze plan` and `status` should not pay. Also the plots
that are not tied to one table (the drift KLD by position)."""

from __future__ import annotations


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kld_by_position(curves: dict, path, title: str) -> None:
    """KLD(base || variant) at each position of the base's greedy continuation, one line per
    variant (`curves`: name -> mean KLD per position); a note instead when there is none."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for name, kld in curves.items():
        ax.plot(range(1, len(kld) + 1), kld, marker="o", markersize=2.5, lw=1.2, label=name)
    if curves:
        if all((k > 0).all() for k in curves.values()):
            ax.set_yscale("log")
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no teacher-forced drift measured yet", ha="center", va="center",
                transform=ax.transAxes, fontsize=9, color="0.4")
    ax.set_xlabel("token of the base's continuation")
    ax.set_ylabel("KLD vs base, mean over prompts (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
