"""The tables a model card shows, as CSV and Markdown, and the size/KLD plot (the report stage,
pipeline.stages.report, writes them after every score).

Tables (results/<recipe>/): sizes.csv (with shrinkage against a reference variant),
ppl-kld.csv (PPL, KLD, Δp, same top p, each ± its uncertainty, as llama-perplexity prints them),
kld-percentiles.csv, tasks.csv (accuracy ± standard error per benchmark, average column),
speed.csv (tokens/s mean ± sd), drift.csv (first diverging token per prompt); scores.md holds
them all, kld-vs-size.png plots mean KLD against file size with the Pareto front, and
scores.csv keeps one row per variant with every number.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.errors import SqueezeError
from pipeline.formats.task_data import LABELS
from pipeline.fsutil import atomic_path
from pipeline.report.plotting import pyplot
from pipeline.run.layout import BASE, RunContext
from pipeline.sources.model_source import BaseInfo

TABLE_FILES = ("sizes.csv", "ppl-kld.csv", "kld-percentiles.csv", "tasks.csv", "speed.csv", "drift.csv")
PLOT_FILE = "kld-vs-size.png"
_SIDE_FILES = (".tasks", ".speed", ".drift")  # scores/<name>.tasks.json etc. beside <name>.json


@dataclass
class RunTables:
    """Everything scored in one results folder, as DataFrames (empty when not scored)."""

    folder: Path
    scores: pd.DataFrame
    tasks: pd.DataFrame = field(default_factory=pd.DataFrame)
    speed: pd.DataFrame = field(default_factory=pd.DataFrame)
    drift: pd.DataFrame = field(default_factory=pd.DataFrame)


# ---- loading --------------------------------------------------------------------------------

def _read_json(path: Path):
    return json.loads(Path(path).read_text())


def load_run(folder: Path, variants: list[str] | None = None) -> RunTables:
    """Read a results folder's scores/*.json (every variant found, or `variants` in that order)."""
    folder = Path(folder)
    sdir = folder / "scores"
    discovered = variants is None
    if discovered:
        variants = sorted(p.stem for p in sdir.glob("*.json") if not p.stem.endswith(_SIDE_FILES))
    rows = [_read_json(sdir / f"{v}.json") for v in variants if (sdir / f"{v}.json").exists()]
    scores = pd.DataFrame(rows)
    if discovered and not scores.empty:  # largest file first, as a size table reads
        scores = scores.sort_values("file_bytes", ascending=False, kind="stable").reset_index(drop=True)
        variants = list(scores["variant"])
    if not scores.empty:
        for col in ("ftype", "pruned_layers"):
            if col not in scores:
                scores[col] = ""
        scores["pruned_layers"] = scores["pruned_layers"].fillna("")
    task_rows, speed_rows, drift_rows = [], [], []
    for name in [BASE] + list(variants):
        p = sdir / f"{name}.tasks.json"
        if p.exists():
            for r in _read_json(p)["results"]:
                task_rows.append({"model": name, **r})
        p = sdir / f"{name}.speed.json"
        if p.exists():
            d = _read_json(p)
            for test, r in d["tests"].items():
                speed_rows.append({"model": name, "test": test, "threads": d["threads"],
                                   "tokens_per_s": r["mean"], "sd": r["sd"], "repetitions": d["repetitions"]})
        p = sdir / f"{name}.drift.json"
        if p.exists() and name != BASE:
            for r in _read_json(p).get("comparison", []):
                drift_rows.append({"model": name, **r})
    return RunTables(folder, scores, pd.DataFrame(task_rows), pd.DataFrame(speed_rows), pd.DataFrame(drift_rows))


# ---- tables ---------------------------------------------------------------------------------

def _pm(value: float, err: float, digits: int, suffix: str = "") -> str:
    return f"{value:.{digits}f} ± {err:.{digits}f}{suffix}"


def size_table(df: pd.DataFrame, reference: str | None) -> pd.DataFrame:
    ref = reference if reference in set(df["variant"]) else df.loc[df["file_bytes"].idxmax(), "variant"]
    ref_bytes = float(df.loc[df["variant"] == ref, "file_bytes"].iloc[0])
    return pd.DataFrame({
        "Variant": df["variant"],
        "Type": df["ftype"],
        "Pruned layers": df["pruned_layers"].replace("", "-"),
        "Size (MiB)": (df["file_bytes"] / 2**20).round(1),
        "BPW": df["bpw"].round(2),
        f"Shrinkage vs {ref}": [f"{(1 - b / ref_bytes) * 100:.1f}%" for b in df["file_bytes"]],
    })


def error_table(df: pd.DataFrame) -> pd.DataFrame:
    def col(key, digits, suffix=""):
        errs = df[f"{key}_err"] if f"{key}_err" in df else [0.0] * len(df)
        return [_pm(v, e, digits, suffix) for v, e in zip(df[key], errs)]

    return pd.DataFrame({
        "Variant": df["variant"],
        "PPL ↓": col("ppl", 4),
        "PPL ratio ↓": col("ppl_ratio", 4),
        "Mean KLD ↓": col("mean_kld", 5),
        "99% KLD ↓": df["kld_p99"].round(4) if "kld_p99" in df else "",
        "Same top p ↑": col("same_top_pct", 2, "%"),
        "RMS Δp ↓": col("rms_dp_pct", 2, "%"),
        "Mean Δp": col("mean_dp_pct", 3, "%") if "mean_dp_pct_err" in df else df["mean_dp_pct"].round(3),
    })


def percentile_table(df: pd.DataFrame) -> pd.DataFrame:
    """KLD and Δp distribution, the percentile blocks of llama-perplexity's output."""
    out = {"Variant": df["variant"]}
    for label, key in (("KLD max", "max_kld"), ("KLD 99.9%", "kld_p99_9"), ("KLD 99%", "kld_p99"),
                       ("KLD 95%", "kld_p95"), ("KLD 90%", "kld_p90"), ("KLD median", "median_kld"),
                       ("KLD 10%", "kld_p10"), ("KLD 5%", "kld_p5"), ("KLD 1%", "kld_p1"), ("KLD min", "min_kld")):
        if key in df:
            out[label] = df[key].map(lambda x: f"{x:.6f}")
    for label, key in (("Δp max", "max_dp_pct"), ("Δp 99%", "dp_p99_pct"), ("Δp 95%", "dp_p95_pct"),
                       ("Δp median", "median_dp_pct"), ("Δp 5%", "dp_p5_pct"), ("Δp 1%", "dp_p1_pct"),
                       ("Δp min", "min_dp_pct")):
        if key in df:
            out[label] = df[key].map(lambda x: f"{x:.3f}%")
    return pd.DataFrame(out)


def task_table(tasks: pd.DataFrame) -> pd.DataFrame:
    """One row per model, one column per benchmark (accuracy ± standard error, %), Average."""
    if tasks.empty:
        return pd.DataFrame()
    rows = []
    for model, g in tasks.groupby("model", sort=False):
        row = {"Model": model}
        for _, r in g.iterrows():
            row[f"{LABELS.get(r['benchmark'], r['benchmark'])} ↑"] = _pm(r["accuracy_pct"], r["stderr_pct"], 2)
        row["Average ↑"] = f"{g['accuracy_pct'].mean():.2f}"
        rows.append(row)
    return pd.DataFrame(rows)


def speed_table(speed: pd.DataFrame) -> pd.DataFrame:
    if speed.empty:
        return pd.DataFrame()
    rows = []
    for model, g in speed.groupby("model", sort=False):
        row = {"Variant": model}
        for _, r in g.iterrows():
            row[f"{r['test']} t/s ↑"] = _pm(r["tokens_per_s"], r["sd"], 2)
        row["Threads"] = int(g["threads"].iloc[0])
        rows.append(row)
    return pd.DataFrame(rows)


def drift_table(drift: pd.DataFrame) -> pd.DataFrame:
    if drift.empty:
        return pd.DataFrame()

    def where(x, n):
        return "same" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{int(x)} / {n}"

    return pd.DataFrame({
        "Variant": drift["model"], "Prompt": drift["prompt"],
        "First diverging token ↑": [where(x, n) for x, n in zip(drift["first_divergence"], drift["n_tokens"])],
        "Base": drift["base"].map(_md_cell), "Variant output": drift["variant"].map(_md_cell),
    })


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# ---- plot -----------------------------------------------------------------------------------

def pareto_front(df: pd.DataFrame) -> pd.DataFrame:
    """Variants no other variant beats on both file size and mean KLD, by size."""
    d = df.sort_values(["file_bytes", "mean_kld"])
    best, keep = math.inf, []
    for i, r in d.iterrows():
        if r["mean_kld"] < best:
            keep.append(i)
            best = r["mean_kld"]
    return d.loc[keep]


def plot_kld_vs_size(df: pd.DataFrame, path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    mib = df["file_bytes"] / 2**20
    ax.scatter(mib, df["mean_kld"], color="tab:blue", zorder=3)
    for x, y, name in zip(mib, df["mean_kld"], df["variant"]):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = pareto_front(df)
    ax.step(front["file_bytes"] / 2**20, front["mean_kld"], where="post", color="tab:red", lw=1.5,
            label="Pareto front", zorder=2)
    if (df["mean_kld"] > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("mean KLD vs base (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


# ---- writing --------------------------------------------------------------------------------

def tables_of(tables: RunTables, reference: str | None, stale: set[str] = frozenset()) -> dict[str, pd.DataFrame]:
    df = tables.scores
    t = {"sizes.csv": size_table(df, reference), "ppl-kld.csv": error_table(df),
         "kld-percentiles.csv": percentile_table(df), "tasks.csv": task_table(tables.tasks),
         "speed.csv": speed_table(tables.speed), "drift.csv": drift_table(tables.drift)}
    return mark_stale(t, stale)


STALE_MARK = " (stale)"


def mark_stale(t: dict[str, pd.DataFrame], stale: set[str]) -> dict[str, pd.DataFrame]:
    """Every row of a stale variant labelled as such (output made with --allow-stale): its numbers
    come from an earlier state of the recipe than the one the rest of the page describes."""
    if not stale:
        return t
    out = {}
    for name, table in t.items():
        if table.empty:
            out[name] = table
            continue
        col = table.columns[0]  # "Variant" or "Model"
        out[name] = table.assign(**{col: [f"{x}{STALE_MARK}" if x in stale else x for x in table[col]]})
    return out


def stale_banner(stale: set[str]) -> str:
    """The warning at the top of a page made from results that are not current."""
    return (f"> **Stale results.** The recipe changed after {', '.join(sorted(stale))} "
            f"{'was' if len(stale) == 1 else 'were'} last scored: rows marked \"{STALE_MARK.strip()}\" show "
            "numbers from an earlier version of the recipe. Run `squeeze run` to bring them up to date.")


def requant_caveat(base: BaseInfo, df: pd.DataFrame) -> str | None:
    """The warning a table needs when its base was dequantized from a quantized file and some
    variant is at or above that file's coarsest grid: requantizing lands back on the grid and
    looks nearly lossless, so such rows say little about the type's quality."""
    if base.grid_bpw is None or not bool((df["bpw"] >= base.grid_bpw).any()):
        return None
    return (f"This model's base was dequantized from a {base.dequantized_from} file ({base.source}), so its "
            f"weights lie on that file's quantization grids: variants at about "
            f"{base.grid_bpw:g} bits per weight and above land back on them and look nearly lossless. "
            "Compare quality below that and for pruning.")


def write_report(ctx: RunContext, tables: RunTables, out=None) -> None:
    """Write every table, scores.md and the plot; `out(final) -> temporary path` (a step's io.out),
    else each file is written atomically in place."""
    def write(name: str, writer) -> None:
        final = ctx.report_path(name)
        if out is not None:
            writer(out(final))
        else:
            with atomic_path(final) as tmp:
                writer(tmp)

    r = ctx.recipe
    t = tables_of(tables, r.report.reference)
    write("scores.csv", lambda p: tables.scores.to_csv(p, index=False))
    for name, table in t.items():
        write(name, lambda p, table=table: table.to_csv(p, index=False))
    write("scores.md", lambda p: p.write_text(render_markdown(ctx, tables, t), encoding="utf-8"))
    write(PLOT_FILE, lambda p: plot_kld_vs_size(tables.scores, p, f"{r.name}: mean KLD vs file size"))


def render_markdown(ctx: RunContext, tables: RunTables, t: dict[str, pd.DataFrame] | None = None,
                    heading: str = "#", stale: set[str] = frozenset()) -> str:
    r = ctx.recipe
    df = tables.scores
    t = t or tables_of(tables, r.report.reference, stale)
    title = r.report.title or f"{r.name}: score tables"
    h2 = heading + "#"
    parts = [f"{heading} {title}", ""]
    if stale:
        parts += [stale_banner(stale), ""]
    parts += [
             f"Model: `{r.model.source}` (base {r.model.base_type.upper()}). Scored on {r.score.dataset}, "
             f"{int(df['tokens'].iloc[0])} tokens ({int(df['chunks'].iloc[0]) if 'chunks' in df else r.score.chunks} "
             f"chunks of {r.score.ctx}, second half of each chunk), against the base. "
             f"PPL of the base: {_pm(df['ppl_base'].iloc[0], df['ppl_base_err'].iloc[0], 4) if 'ppl_base_err' in df else round(df['ppl_base'].iloc[0], 4)}.",
             "", f"{h2} Sizes", "", t["sizes.csv"].to_markdown(index=False, disable_numparse=True), "",
             f"{h2} Perplexity and KL divergence", "", t["ppl-kld.csv"].to_markdown(index=False, disable_numparse=True), "",
             "KLD and Δp distribution (as `llama-perplexity --kl-divergence` prints it):", "",
             t["kld-percentiles.csv"].to_markdown(index=False, disable_numparse=True), "",
             f"![mean KLD against file size]({PLOT_FILE})", ""]
    if not t["tasks.csv"].empty:
        s = r.score.tasks
        parts += [f"{h2} Tasks", "",
                  f"Accuracy (%) ± standard error on {s.count} tasks per benchmark (the tasks "
                  f"`llama-perplexity --*-tasks {s.count}` picks), context {s.ctx}.", "",
                  t["tasks.csv"].to_markdown(index=False, disable_numparse=True), ""]
    if not t["speed.csv"].empty:
        parts += [f"{h2} Speed", "", "Tokens per second, mean ± sd over repetitions after a warm-up run "
                  "(llama-bench's pp/tg tests, CPU).", "", t["speed.csv"].to_markdown(index=False, disable_numparse=True), ""]
    if not t["drift.csv"].empty:
        parts += [f"{h2} Behaviour drift", "",
                  f"Greedy continuations ({r.score.drift.tokens} tokens) of base and variant: the first token "
                  "where they differ (`same`: identical), and the text from just before it.", "",
                  t["drift.csv"].to_markdown(index=False, disable_numparse=True), ""]
    parts += _choices_section(ctx, h2)
    caveat = requant_caveat(BaseInfo.load(ctx.base_info_path), df)
    if caveat:
        parts += [f"> Note: {caveat}", ""]
    return "\n".join(parts)


def report_markdown(ctx: RunContext, stale: set[str] = frozenset()) -> str:
    """scores.md as the run's scores stand now (what `squeeze report` prints)."""
    tables = load_run(ctx.folder, [v.name for v in ctx.recipe.variants])
    if tables.scores.empty:
        raise SqueezeError(f"{ctx.folder}: no scores yet; run `squeeze run {ctx.recipe.path or ctx.recipe.name}` first")
    return render_markdown(ctx, tables, stale=stale)


def scored_variants(folder: Path) -> set[str]:
    """The variants a results folder holds scores for."""
    scores = load_run(folder).scores
    return set() if scores.empty else set(scores["variant"])


def _choices_section(ctx: RunContext, h2: str) -> list[str]:
    """Links to the explanation of every automatic choice (types for a budget, layers to drop)."""
    lines = []
    for v in ctx.recipe.variants:
        explained = ctx.allocation_md_path(v.name)
        if explained.exists():
            lines.append(f"- {v.name}: every tensor's type and why, in "
                         f"[{explained.relative_to(ctx.folder)}]({explained.relative_to(ctx.folder)})")
        k = ctx.recipe.prune_auto_for(v)
        choice = ctx.prune_choice_path(f"auto{k}") if k is not None else None
        if choice is not None and choice.exists():
            picked = json.loads(choice.read_text())
            lines.append(f"- {v.name}: layers {picked['layers']} dropped, picked greedily by measured KLD "
                         f"({choice.relative_to(ctx.folder)})")
    return [f"{h2} Automatic choices", "", *lines, ""] if lines else []
