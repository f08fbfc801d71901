"""The tables a model card shows, as CSV and Markdown, and the size/KLD plot (the report stage,
pipeline.stages.report, writes them after every score).

Tables (results/<recipe>/): sizes.csv (with shrinkage against a reference variant),
ppl-kld.csv (PPL, KLD, Δp, same top p, each ± its uncertainty, as llama-perplexity prints them),
kld-percentiles.csv, tasks.csv (accuracy ± standard error per benchmark, average column),
speed.csv (tokens/s mean ± sd), drift.csv (per prompt: first diverging token of free generation,
top-1 agreement and mean KLD along the base's continuation); scores.md holds them all,
kld-vs-size.png plots mean KLD against file size with the Pareto front, drift-kld-by-position.png
the drift KLD at each position of the base's continuation, and scores.csv keeps one row per
variant with every number (the drift summary in its drift_* columns).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import SqueezeError
from pipeline.formats.score_table import read_score_table
from pipeline.formats.task_data import LABELS
from pipeline.fsutil import atomic_path
from pipeline.report.metrics import PUBLISHED, QUALITY, metric
from pipeline.report.plotting import plot_kld_by_position, pyplot
from pipeline.report.targets import targets_section
from pipeline.run.layout import BASE, RunContext
from pipeline.sources.model_source import BaseInfo

TABLE_FILES = ("sizes.csv", "ppl-kld.csv", "kld-percentiles.csv", "tasks.csv", "speed.csv", "drift.csv")
PLOT_FILE = "kld-vs-size.png"
DRIFT_PLOT_FILE = "drift-kld-by-position.png"  # written when the recipe measures drift
PUBLISHED_FILE = "published.csv"  # written when the recipe names published figures (report.published)
# scores.csv columns from a variant's drift summary (pipeline.measure.drift.DriftSummary)
DRIFT_COLUMNS = {"top1_agreement_pct": "drift_top1_agreement_pct", "mean_kld": "drift_mean_kld",
                 "median_first_divergence": "drift_median_first_divergence", "positions": "drift_positions"}
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
    drift_summary: dict[str, dict] = {}
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
            d = _read_json(p)
            for r in d.get("comparison", []):
                drift_rows.append({"model": name, **r})
            if "summary" in d:
                drift_summary[name] = {**d["summary"], "tokens": d.get("tokens")}
    if drift_summary and not scores.empty:  # NaN for a variant without one
        for key, col in {**DRIFT_COLUMNS, "tokens": "drift_tokens"}.items():
            scores[col] = [drift_summary.get(v, {}).get(key, math.nan) for v in scores["variant"]]
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
    """The quality table (pipeline.report.metrics.QUALITY): each figure with its ± error where the
    score records one."""
    def col(m):
        if m.key not in df:
            return ["-"] * len(df)
        if f"{m.key}_err" not in df:
            return [m.text(v) for v in df[m.key]]
        return [_pm(v, e, m.digits) for v, e in zip(df[m.key], df[f"{m.key}_err"])]

    table = pd.DataFrame({"Variant": df["variant"], **{m.heading: col(m) for m in QUALITY}})
    if "drift_top1_agreement_pct" in df:  # the recipe measures drift (score.drift.tokens > 0)
        table[DRIFT_TOP1] = [_or_dash(x, lambda v: f"{v:.2f}%") for x in df["drift_top1_agreement_pct"]]
        table[DRIFT_FIRST] = [_or_dash(x, lambda v: f"{v:g}") for x in df["drift_median_first_divergence"]]
    return table


DRIFT_TOP1 = "Drift top-1 agree ↑"
DRIFT_FIRST = "Drift median first divergence ↑"


def _or_dash(x, fmt) -> str:
    """A number formatted, or '-' where there is none (NaN: not measured for this row)."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt(x)


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

    table = pd.DataFrame({
        "Variant": drift["model"], "Prompt": drift["prompt"],
        "First diverging token ↑": [where(x, n) for x, n in zip(drift["first_divergence"], drift["n_tokens"])],
    })
    if "top1_agreement_pct" in drift:  # teacher forcing (drift files before it have none)
        table["Top-1 agree ↑"] = [_or_dash(x, lambda v: f"{v:.1f}%") for x in drift["top1_agreement_pct"]]
        kld = metric("mean_kld")
        table[kld.heading] = [kld.text(x) for x in drift["mean_kld"]]
    table["Base"] = drift["base"].map(_md_cell)
    table["Variant output"] = drift["variant"].map(_md_cell)
    return table


def kld_by_position(drift: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per variant, the teacher-forced KLD at each position of the base's continuation, mean
    over the prompts that reach it (a continuation may end early at an end-of-generation token)."""
    if drift.empty or "kld" not in drift:
        return {}
    out = {}
    for model, g in drift.groupby("model", sort=False):
        rows = [r for r in g["kld"] if isinstance(r, list) and r]
        if not rows:
            continue
        grid = np.full((len(rows), max(len(r) for r in rows)), np.nan)
        for i, r in enumerate(rows):
            grid[i, :len(r)] = r
        out[model] = np.nanmean(grid, axis=0)
    return out


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


# ---- one row of figures per model, for comparisons -------------------------------------------

# squeeze's benchmarks as a card's task columns: a card's one ARC column is ARC-Easy and
# ARC-Challenge pooled task by task (llama.cpp's ARC set is both).
CARD_TASKS = {"arc_pct": ("arc-easy", "arc-challenge"), "hellaswag_pct": ("hellaswag",), "mmlu_pct": ("mmlu",),
              "truthfulqa_pct": ("truthfulqa",), "winogrande_pct": ("winogrande",)}


def task_metrics(tasks: pd.DataFrame) -> pd.DataFrame:
    """Per model (index): the mean accuracy over its benchmarks (task_average_pct), each card task
    column of CARD_TASKS, and their mean when all are measured (card_average_pct, as a card's
    Average is the mean of its columns)."""
    cols = ["task_average_pct", *CARD_TASKS, "card_average_pct"]
    if tasks.empty:
        return pd.DataFrame(columns=cols, dtype=float)
    out = pd.DataFrame({"task_average_pct": tasks.groupby("model", sort=False)["accuracy_pct"].mean()})
    for col, names in CARD_TASKS.items():
        sets = tasks[tasks["benchmark"].isin(names)].groupby("model")[["correct", "tasks"]].sum()
        out[col] = 100 * sets["correct"] / sets["tasks"]
    out["card_average_pct"] = out[list(CARD_TASKS)].mean(axis=1, skipna=False)
    return out[cols]


def variant_metrics(tables: RunTables) -> pd.DataFrame:
    """One row per scored variant: its score record, size in MiB, `task_metrics` and pp/tg
    tokens/s; NaN where not measured."""
    df = tables.scores.copy()
    df["size_mib"] = df["file_bytes"] / 2**20
    tasks = task_metrics(tables.tasks)
    for col in tasks.columns:
        df[col] = df["variant"].map(tasks[col]).astype(float)
    df["pp_tps"] = df["tg_tps"] = math.nan
    if not tables.speed.empty:
        for col, prefix in (("pp_tps", "pp"), ("tg_tps", "tg")):
            sp = tables.speed[tables.speed["test"].str.match(rf"{prefix}\d+$")].set_index("model")["tokens_per_s"]
            df[col] = df["variant"].map(sp)
    return df


# ---- writing --------------------------------------------------------------------------------

def published_path(run: RunContext) -> Path | None:
    spec = run.recipe.report.published
    if spec is None:
        return None
    return run.recipe.beside(spec.table)


def _num(x, digits) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def published_table(run: RunContext, tables: RunTables) -> pd.DataFrame:
    """squeeze's figures beside the published ones, variant by variant: size and every figure of
    pipeline.report.metrics.PUBLISHED that both the card and the run give, and the base's row (its PPL and task
    scores) beside the published base row; empty when the recipe names no published table."""
    path = published_path(run)
    df = tables.scores
    if path is None or df.empty:
        return pd.DataFrame()
    spec = run.recipe.report.published
    card = {r.variant: r for r in read_score_table(path)}
    ours = variant_metrics(tables).set_index("variant")
    base_tasks = task_metrics(tables.tasks)
    shown = [m for m in PUBLISHED
             if any(not math.isnan(getattr(c, m.published_key)) for c in card.values()) and m.key in ours
             and ours[m.key].notna().any()]

    def row(name: str, mine, c, size_bytes) -> dict:
        out = {"Variant": name, "Size (GB)": _num(size_bytes / 1e9, 2),
               "Published size (GB)": _num(c.size_bytes / 1e9 if c else None, 2)}
        for m in shown:
            out[m.label] = m.text(mine.get(m.key, math.nan))
            out[f"Published {m.label}"] = m.text(getattr(c, m.published_key) if c else None)
        return out

    rows = [row(v, ours.loc[v], card.get(v), ours.loc[v, "file_bytes"]) for v in df["variant"]]
    base = card.get(spec.base) if spec.base else None
    mine = {"ppl": float(df["ppl_base"].iloc[0]),  # the base's own tasks, scored as the variants' are
            **(base_tasks.loc[BASE].to_dict() if BASE in base_tasks.index else {})}
    rows.append(row(f"Base ({run.recipe.model.base_type.upper()})", mine, base, math.nan))
    return pd.DataFrame(rows)


def published_section(run: RunContext, tables: RunTables, h2: str) -> list[str]:
    table = published_table(run, tables)
    if table.empty:
        return []
    spec = run.recipe.report.published
    source = f" ({spec.source})" if spec.source else ""
    return [f"{h2} Against the published figures", "",
            f"The figures of `{spec.table}`{source} beside squeeze's. The published KLDs are measured against "
            f"their own base (the row '{spec.base or 'base'}'), on their own text and chunks: compare the "
            "ranking and the gaps, not the decimals. Task scores depend on how many tasks each side ran, and "
            "speed on the machine it was measured on.", "",
            table.to_markdown(index=False, disable_numparse=True), ""]


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


GRID_MARK = " †"


def grid_flattered(base: BaseInfo, df: pd.DataFrame) -> list[str]:
    """The variants whose quality figures the base's grid flatters: at or above the bits per weight
    of the coarsest grid of the quantized file the base was dequantized from (base-<type>.json
    records it). None on a base that was never quantized or was dithered off its grid."""
    if base.grid_bpw is None or df.empty:
        return []
    return [v for v, bpw in zip(df["variant"], df["bpw"]) if bpw >= base.grid_bpw]


def requant_caveat(base: BaseInfo, df: pd.DataFrame) -> str | None:
    """The warning a table needs when its base was dequantized from a quantized file and some
    variant is at or above that file's coarsest grid: requantizing lands back on the grid and
    looks nearly lossless, so such rows say little about the type's quality. It goes above the
    tables, whose rows for those variants carry GRID_MARK (`mark_grid`): a reader who looks only
    at the first table must not take the artifact for a result."""
    flattered = grid_flattered(base, df)
    if not flattered:
        return None
    return (f"This model's base was dequantized from a {base.dequantized_from} file ({base.source}), so its "
            f"weights lie on that file's quantization grids: variants at about "
            f"{base.grid_bpw:g} bits per weight and above (marked{GRID_MARK}: {', '.join(flattered)}) land back "
            "on them and look nearly lossless, which says little about their type. Compare quality below "
            "that and for pruning; `model.dither: true` takes the base off the grid.")


def mark_grid(t: dict[str, pd.DataFrame], flattered: list[str]) -> dict[str, pd.DataFrame]:
    """Every row of a variant the grid flatters (`grid_flattered`) labelled with GRID_MARK, in
    every table whose first column names variants (a stale row keeps its mark after the name)."""
    if not flattered:
        return t
    names = set(flattered)

    def mark(x):
        name = str(x).removesuffix(STALE_MARK)
        return f"{name}{GRID_MARK}{str(x)[len(name):]}" if name in names else x

    out = {}
    for key, table in t.items():
        col = table.columns[0] if not table.empty else None  # "Variant" or "Model"
        out[key] = table if col is None else table.assign(**{col: [mark(x) for x in table[col]]})
    return out


def write_report(run: RunContext, tables: RunTables, out=None, failed: dict[str, str] | None = None) -> None:
    """Write every table, scores.md and the plot; `out(final) -> temporary path` (a step's io.out),
    else each file is written atomically in place. `failed` (variant -> reason) are listed in
    scores.md (a --keep-going run)."""
    def write(name: str, writer) -> None:
        final = run.report_path(name)
        if out is not None:
            writer(out(final))
        else:
            with atomic_path(final) as tmp:
                writer(tmp)

    r = run.recipe
    t = tables_of(tables, r.report.reference)
    write("scores.csv", lambda p: tables.scores.to_csv(p, index=False))
    for name, table in t.items():
        write(name, lambda p, table=table: table.to_csv(p, index=False))
    write("scores.md", lambda p: p.write_text(render_markdown(run, tables, t, failed=failed), encoding="utf-8"))
    write(PLOT_FILE, lambda p: plot_kld_vs_size(tables.scores, p, f"{r.name}: mean KLD vs file size"))
    if r.report.published is not None:
        write(PUBLISHED_FILE, lambda p: published_table(run, tables).to_csv(p, index=False))
    if r.score.drift.tokens > 0:
        write(DRIFT_PLOT_FILE, lambda p: plot_kld_by_position(
            kld_by_position(tables.drift), p, f"{r.name}: drift KLD along the base's greedy continuation"))


def render_markdown(run: RunContext, tables: RunTables, t: dict[str, pd.DataFrame] | None = None,
                    heading: str = "#", stale: set[str] = frozenset(), failed: dict[str, str] | None = None) -> str:
    r = run.recipe
    df = tables.scores
    t = t or tables_of(tables, r.report.reference, stale)
    title = r.report.title or f"{r.name}: score tables"
    h2 = heading + "#"
    parts = [f"{heading} {title}", ""]
    if stale:
        parts += [stale_banner(stale), ""]
    base = BaseInfo.load(run.base_info_path)
    t = mark_grid(t, grid_flattered(base, df))
    parts += [
             f"Model: `{r.model.source}` (base {r.model.base_type.upper()}). Scored on {r.score.dataset}, "
             f"{int(df['tokens'].iloc[0])} tokens ({int(df['chunks'].iloc[0]) if 'chunks' in df else r.score.chunks} "
             f"chunks of {r.score.ctx}, second half of each chunk), against the base. "
             f"PPL of the base: {_pm(df['ppl_base'].iloc[0], df['ppl_base_err'].iloc[0], 4) if 'ppl_base_err' in df else round(df['ppl_base'].iloc[0], 4)}.",
             ""]
    caveat = requant_caveat(base, df)
    if caveat:  # above the first table, where its marks are
        parts += [f"> {GRID_MARK.strip()} **Caveat**: {caveat}", ""]
    parts += [f"{h2} Sizes", "", t["sizes.csv"].to_markdown(index=False, disable_numparse=True), "",
             f"{h2} Perplexity and KL divergence", "", t["ppl-kld.csv"].to_markdown(index=False, disable_numparse=True), "",
             "KLD and Δp distribution (as `llama-perplexity --kl-divergence` prints it):", "",
             t["kld-percentiles.csv"].to_markdown(index=False, disable_numparse=True), "",
             f"![mean KLD against file size]({PLOT_FILE})", ""]
    parts += published_section(run, tables, h2)
    parts += targets_section(run, df, h2)
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
        n = r.score.drift.tokens
        parts += [f"{h2} Behaviour drift", "",
                  f"Greedy continuations ({n} tokens) of base and variant: the first token "
                  "where they differ (`same`: identical), and the text from just before it. "
                  "Top-1 agree and mean KLD: the base's continuation fed to both models, the share of its "
                  "positions where both pick the same top token and the mean KLD(base || variant) there. "
                  f"In the table above, {DRIFT_TOP1.rstrip(' ↑')} pools every position of every prompt and "
                  f"{DRIFT_FIRST.rstrip(' ↑')} is the median over prompts of the first diverging token, "
                  f"a prompt whose continuations never part counting as its full length ({n}).", "",
                  t["drift.csv"].to_markdown(index=False, disable_numparse=True), ""]
        if kld_by_position(tables.drift):
            parts += [f"![drift KLD by position]({DRIFT_PLOT_FILE})", ""]
    if failed:
        parts += [f"{h2} Failed variants", "", "Not in the tables above: these variants failed "
                  "(`squeeze run --keep-going`).", "",
                  *(f"- {name}: {reason}" for name, reason in failed.items()), ""]
    parts += _choices_section(run, h2)
    return "\n".join(parts)


def report_markdown(run: RunContext, stale: set[str] = frozenset()) -> str:
    """scores.md as the run's scores stand now (what `squeeze report` prints)."""
    tables = load_run(run.folder, [v.name for v in run.recipe.plans])
    if tables.scores.empty:
        raise SqueezeError(f"{run.folder}: no scores yet; run `squeeze run {run.recipe.path or run.recipe.name}` first")
    return render_markdown(run, tables, stale=stale)


def scored_variants(folder: Path) -> set[str]:
    """The variants a results folder holds scores for."""
    scores = load_run(folder).scores
    return set() if scores.empty else set(scores["variant"])


def _choices_section(run: RunContext, h2: str) -> list[str]:
    """Links to the explanation of every automatic choice (types for a budget, layers to drop)."""
    lines = []
    for v in run.recipe.plans:
        explained = run.allocation_md_path(v.name)
        if explained.exists():
            lines.append(f"- {v.name}: every tensor's type and why, in "
                         f"[{explained.relative_to(run.folder)}]({explained.relative_to(run.folder)})")
        tag = run.prune_choice_tag(v)
        choice = run.prune_choice_path(tag) if tag is not None else None
        if choice is not None and choice.exists():
            picked = json.loads(choice.read_text())
            how = f" ({picked['method']} search)" if picked.get("method") else ""
            if "prune_or_bits" in picked:
                how += ", weighed against spending the bytes on bits"
            lines.append(f"- {v.name}: layers {picked['layers']} dropped, picked by measured KLD{how}, every "
                         f"method's set and KLD in {choice.relative_to(run.folder)}")
    return [f"{h2} Automatic choices", "", *lines, ""] if lines else []
