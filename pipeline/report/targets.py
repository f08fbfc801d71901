"""The report's account of quality targets: for each variant chosen for `target_kld`, whether the
target held on the calibration text (where it was measured while choosing) and on the scoring
text (a different text: the claim a reader cares about), with both KLDs."""

from __future__ import annotations

import json

import pandas as pd

from pipeline.run.layout import RunContext


def target_rows(ctx: RunContext, scores: pd.DataFrame) -> list[dict]:
    """One row per KLD-targeted variant that has a target record."""
    scored = {} if scores.empty else dict(zip(scores["variant"], scores["mean_kld"]))
    rows = []
    for v in ctx.recipe.variants:
        path = ctx.target_path(v.name)
        if not path.exists():
            continue
        t = json.loads(path.read_text())
        cal, score = t.get("calibration_kld"), scored.get(v.name)
        rows.append({"variant": v.name, "target_kld": t["target_kld"], "calibration_kld": cal, "scored_kld": score,
                     "calibration": _verdict(cal, t["target_kld"]), "scoring": _verdict(score, t["target_kld"])})
    return rows


def _verdict(kld, target) -> str:
    if kld is None or kld != kld:
        return "not measured"
    return "met" if kld <= target else "missed"


def targets_section(ctx: RunContext, scores: pd.DataFrame, h2: str) -> list[str]:
    rows = target_rows(ctx, scores)
    if not rows:
        return []
    lines = [f"{h2} Quality targets", "",
             "Variants whose types were chosen as the smallest mix meeting a mean KLD (`target_kld`): measured "
             "in memory on calibration text while choosing, then scored on the scoring text above.", "",
             "| Variant | Target KLD | KLD, calibration | Target on calibration | KLD, scoring | Target on scoring |",
             "|---|---:|---:|---|---:|---|"]
    for r in rows:
        cal = "-" if r["calibration_kld"] is None else f"{r['calibration_kld']:.4f}"
        score = "-" if r["scored_kld"] is None else f"{r['scored_kld']:.4f}"
        lines.append(f"| {r['variant']} | {r['target_kld']:g} | {cal} | {r['calibration']} | {score} | "
                     f"{r['scoring']} |")
    return lines + [""]
