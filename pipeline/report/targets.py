"""The report's account of quality targets: for each variant chosen for `target_kld`, whether the
target held on the calibration text (where it was measured while choosing) and on the scoring
text (a different text: the claim a reader cares about), with both KLDs, and between them the
scoring KLD predicted from the calibration one (pipeline.choose.text_transfer), so every run
shows how far that prediction carries."""

from __future__ import annotations

import json

import pandas as pd

from pipeline.choose.text_transfer import TextTransfer
from pipeline.run.layout import RunContext


def target_rows(run: RunContext, scores: pd.DataFrame) -> list[dict]:
    """One row per KLD-targeted variant that has a target record."""
    scored = {} if scores.empty else dict(zip(scores["variant"], scores["mean_kld"]))
    transfer = (TextTransfer.from_dict(json.loads(run.text_transfer_path.read_text()))
                if run.text_transfer_path.exists() else None)
    rows = []
    for v in run.recipe.plans:
        path = run.target_path(v.name)
        if not path.exists():
            continue
        t = json.loads(path.read_text())
        cal, score = t.get("calibration_kld"), scored.get(v.name)
        predicted = None
        if transfer is not None and cal is not None and t.get("class_shares"):
            predicted = cal * transfer.factor_for(t["class_shares"])
        rows.append({"variant": v.name, "target_kld": t["target_kld"], "calibration_kld": cal,
                     "predicted_scored_kld": predicted, "scored_kld": score,
                     "calibration": _verdict(cal, t["target_kld"]), "scoring": _verdict(score, t["target_kld"])})
    return rows


def _kld(value) -> str:
    return "-" if value is None or value != value else f"{value:.4f}"


def _verdict(kld, target) -> str:
    if kld is None or kld != kld:
        return "not measured"
    return "met" if kld <= target else "missed"


def targets_section(run: RunContext, scores: pd.DataFrame, h2: str) -> list[str]:
    rows = target_rows(run, scores)
    if not rows:
        return []
    transfer = (TextTransfer.from_dict(json.loads(run.text_transfer_path.read_text()))
                if run.text_transfer_path.exists() else None)
    factor_text = ""
    if transfer is not None:
        factor_text = (f" The factors were measured on {transfer.text}"
                       + ("; the prediction is judged on chunks they never saw." if transfer.held_out else
                          "; the prediction is **in-sample**: judged on the chunks the factors were measured on."
                          if transfer.held_out is False else "."))
    lines = [f"{h2} Quality targets", "",
             "Variants whose types were chosen as the smallest mix meeting a mean KLD (`target_kld`): measured "
             "in memory on calibration text while choosing, then scored on the scoring text above. The predicted "
             "scoring KLD carries the calibration one by the factors in scores/text-transfer.json (the blocks' and "
             "the embedding's errors move differently between texts), before the variant was scored." + factor_text,
             "",
             "| Variant | Target KLD | KLD, calibration | Target on calibration | KLD, scoring (predicted) | "
             "KLD, scoring | Prediction error | Target on scoring |",
             "|---|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        cal, predicted, score = (_kld(r[k]) for k in ("calibration_kld", "predicted_scored_kld", "scored_kld"))
        error = ("-" if r["predicted_scored_kld"] is None or not r["scored_kld"]
                 else f"{r['predicted_scored_kld'] / r['scored_kld'] - 1:+.0%}")
        lines.append(f"| {r['variant']} | {r['target_kld']:g} | {cal} | {r['calibration']} | {predicted} | {score} | "
                     f"{error} | {r['scoring']} |")
    return lines + [""]
