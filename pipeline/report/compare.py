"""`squeeze compare`: variants of one run, or the same variants across runs and recipes, side by
side with the change against a reference and whether that change is better or worse.

Each value cell reads `0.1090 (+0.0042 ▲ worse)`: the arrow is the direction the number moved,
the word says what that means for this metric (size, PPL, KLD: lower is better; same top p,
task average, tokens/s: higher is better).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from pipeline.errors import SqueezeError, did_you_mean
from pipeline.formats.score_table import read_score_table
from pipeline.recipe.load import load_recipe
from pipeline.report.metrics import COMPARED, Metric
from pipeline.report.tables import STALE_MARK, load_run, variant_metrics
from pipeline.run.layout import results_root


TABLE_SUFFIXES = (".md", ".csv")  # a published score table (pipeline.formats.score_table)


def is_published_table(path: str | Path) -> bool:
    return Path(path).is_file() and Path(path).suffix.lower() in TABLE_SUFFIXES


def run_folder(path: str | Path) -> Path:
    """A results folder, the folder a recipe's results go to, or a published score table."""
    p = Path(path)
    if is_published_table(p):
        return p
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        p = results_root() / load_recipe(p).name
    if not (p / "scores").is_dir():
        raise SqueezeError(f"{path}: no scores found (expected a results folder with scores/, a recipe "
                           f"whose run has been scored, or a published table, .md or .csv)")
    return p


def published_metrics(path: Path) -> pd.DataFrame:
    """A card's table as compared rows: what it gives, NaN for the rest."""
    rows = read_score_table(path)
    df = pd.DataFrame([vars(r) for r in rows])
    df["size_mib"] = df.pop("size_bytes") / 2**20
    # a card's Average is the mean of its own task columns: squeeze's like figure is card_average_pct
    df["card_average_pct"] = df.pop("task_average_pct")
    for m in COMPARED:
        if m.key not in df:
            df[m.key] = math.nan
    return df


def metrics_of(folder: Path) -> pd.DataFrame:
    """One row per variant of a run (or of a published table) with the compared metrics (NaN
    where not scored)."""
    if is_published_table(folder):
        return published_metrics(folder)
    t = load_run(folder)
    if t.scores.empty:
        raise SqueezeError(f"{folder}: no variant scores in {folder / 'scores'}")
    df = variant_metrics(t)
    for m in COMPARED:  # a record from before a metric existed
        if m.key not in df:
            df[m.key] = math.nan
    return df


def _cell(value: float, ref: float | None, m: Metric, is_ref: bool) -> str:
    text = m.text(value)
    if text == "-" or is_ref or ref is None or (isinstance(ref, float) and math.isnan(ref)):
        return text
    delta = value - ref
    if round(delta, m.digits) == 0:
        return f"{text} (=)"
    better = (delta < 0) == m.lower_is_better
    return f"{text} ({delta:+.{m.digits}f} {'▲' if delta > 0 else '▼'} {'better' if better else 'worse'})"


def compare(paths: list[str | Path], variants: tuple[str, ...] = (), reference: str | None = None,
            stale: dict[Path, set[str]] | None = None) -> pd.DataFrame:
    """One run: its variants against `reference` (default: the first). Several runs: each
    variant found in them, every run against the first run's value of the same variant.
    `stale` maps a results folder to its variants whose rows are marked stale (--allow-stale)."""
    folders = [run_folder(p) for p in paths]
    stale = stale or {}
    frames = []
    for f in folders:
        df = metrics_of(f)
        df.insert(0, "run", f.name if len(set(x.name for x in folders)) == len(folders) else str(f))
        marked = stale.get(f.resolve(), set())
        df.insert(1, "mark", [STALE_MARK if v in marked else "" for v in df["variant"]])
        frames.append(df)
    allv = [v for df in frames for v in df["variant"]]
    for v in variants:
        if v not in allv:
            raise SqueezeError(f"--variant: '{v}' is not scored in {', '.join(str(f) for f in folders)}"
                               f"{did_you_mean(v, set(allv))}")
    data = pd.concat(frames, ignore_index=True)
    if variants:
        data = data[data["variant"].isin(variants)]
    rows = []
    if len(folders) == 1:
        ref_name = reference or data["variant"].iloc[0]
        if ref_name not in set(data["variant"]):
            raise SqueezeError(f"--reference: '{ref_name}' is not among the compared variants"
                               f"{did_you_mean(ref_name, set(data['variant']))}")
        ref = data[data["variant"] == ref_name].iloc[0]
        for _, r in data.iterrows():
            is_ref = r["variant"] == ref_name
            rows.append({"Variant": r["variant"] + r["mark"] + (" (reference)" if is_ref else ""),
                         **{m.label: _cell(r[m.key], ref[m.key], m, is_ref) for m in COMPARED}})
    else:
        first_run = data["run"].iloc[0]
        for v in dict.fromkeys(data["variant"]):
            g = data[data["variant"] == v]
            ref_rows = g[g["run"] == first_run]
            ref = ref_rows.iloc[0] if len(ref_rows) else None
            for _, r in g.iterrows():
                is_ref = ref is not None and r["run"] == first_run
                rows.append({"Variant": v + r["mark"], "Run": r["run"] + (" (reference)" if is_ref else ""),
                             **{m.label: _cell(r[m.key], None if ref is None else ref[m.key], m, is_ref)
                                for m in COMPARED}})
    out = pd.DataFrame(rows)
    # Drop metrics no compared run has (e.g. speed not measured).
    keep = [c for c in out.columns if not (out[c] == "-").all()]
    return out[keep]
