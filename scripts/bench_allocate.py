"""Benchmark: types chosen for a size budget against llama.cpp's stock mixes, on an honest base.

    flock /tmp/squeeze-heavy.lock .venv/bin/python scripts/bench_allocate.py [--chunks 20]
        [--budgets Q2_K,Q3_K_S,Q3_K_M,Q4_K_M] [--sizes "150 MiB,170 MiB"] [--rounds 3]

The base is Gemma 3 270M's F16 base dithered off its Q4_K_M grid (model.dither; FINDINGS.md
"An off-grid base"): on the plain base, requantizing onto the source grid is nearly free and any
"quality per byte" rewards landing on it. Every file is quantized with the same imatrix (20
chunks of groups_merged on this base). The sensitivity map is measured in memory on calibration
text (pipeline.choose.sensitivity); each allocation is refined by measuring its mix in memory on
the same calibration chunks (pipeline.choose.measured_allocation); then the real file is built
and, like the stock file of the same budget, scored on held-out wikitext-2 (20 x 512 tokens).

The prediction for the scoring text carries the chosen mix's KLD measured on the calibration
chunks to wikitext-2 by per-class factors (pipeline.choose.text_transfer): two reference changes,
the blocks at 4 bits and the embedding alone at 4 bits, measured in memory on both texts. No
chosen file is ever scored to make a prediction.

Two regimes:
- free: every tensor is the allocator's to choose (in this model the 262k-token embedding holds
  ~63 % of the parameters, so a good deal of the gain is in choosing its type);
- blocks: token_embd (and output, when the model has one) stay at the stock mix's types; the
  blocks share what is left. This is the layer-wise skill that decides a 12B model, where the
  embedding is under 10 % of the parameters.

Writes results/bench/allocate.json (rows: regime, budget, stock_bytes, stock_kld, auto_bytes,
auto_kld, predicted_kld, ...) and allocate.md; each choice's explanation under
results/bench/variants/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (OUT, ROOT, WORK, dataset, dithered_base, log, probe, provenance, read_text,  # noqa: E402
                          verdict, write_json, write_text)

sys.path.insert(0, str(ROOT))

from pipeline.choose.allocate import explain_markdown  # noqa: E402
from pipeline.choose.budget import layout  # noqa: E402
from pipeline.choose.groups import CANDIDATE_TYPES  # noqa: E402
from pipeline.choose.measured_allocation import choose_types  # noqa: E402
from pipeline.choose.memory_probe import PROBE_CHUNKS  # noqa: E402
from pipeline.choose.memory_probe import MemoryProbe  # noqa: E402
from pipeline.choose.sensitivity import Sensitivity, load_sensitivity, run_sensitivity  # noqa: E402
from pipeline.choose.text_transfer import EMBEDDING, FACTOR_CHUNKS, class_shares, measure_transfer  # noqa: E402
from pipeline.engine.backend import default_threads, engine_versions  # noqa: E402
from pipeline.engine.quantize import quantize_file  # noqa: E402
from pipeline.formats.gguf_index import read_index  # noqa: E402
from pipeline.formats.model_info import read_model_info  # noqa: E402
from pipeline.formats.tensor_names import OUTPUT, TOKEN_EMBD, exact_pattern  # noqa: E402
from pipeline.recipe.rules import tensor_type_file_lines  # noqa: E402
from pipeline.report.sensitivity import save_sensitivity  # noqa: E402
from pipeline.units import MiB, parse_size  # noqa: E402

VARIANTS = OUT / "variants"
TARGET_RATIO = 0.7  # blocks regime, Q2_K and Q3_K_M: auto_kld <= 0.7 x stock_kld
PREDICTION_TOLERANCE = 0.15


def sensitivities(base: Path, imatrix: Path, layers_csv: Path, cal: MemoryProbe) -> Sensitivity:
    """The map on the dithered base, kept in results/bench/work while its inputs are unchanged."""
    from pipeline.cache import MadeFrom, cached

    json_path = WORK / "sensitivity-dithered.json"
    made_from = MadeFrom({"model": base, "imatrix": imatrix}, engine_versions(),
                         {"chunks": PROBE_CHUNKS, "ctx": cal.ctx, "probes": "in memory, kinds", "types": list(CANDIDATE_TYPES)})

    def build() -> None:
        result = run_sensitivity(cal, read_model_info(base), imatrix, layers_csv, log_path=WORK / "sensitivity.probes.jsonl")
        save_sensitivity(result, WORK / "sensitivity-dithered.csv", json_path, WORK / "sensitivity-dithered.png",
                         WORK / "sensitivity-dithered.md")

    cached([json_path], made_from, build, lambda why: log(f"sensitivity map: measuring ({why})"))
    return load_sensitivity(json_path)


def held_types(path: Path) -> dict[str, str]:
    return {n: e.type.name for n, e in read_index(path).items()}


def build_file(base: Path, imatrix: Path, types: dict[str, str], dst: Path) -> int:
    types = dict(types)
    embd = types.pop(TOKEN_EMBD, None)
    quantize_file(base, dst, "Q8_0", imatrix_path=imatrix, overrides=[(exact_pattern(n), t) for n, t in types.items()],
                  token_embedding_type=embd)
    return dst.stat().st_size


def auto_row(args, regime: str, label: str, budget: int, stock: dict | None, ctx: dict) -> dict:
    """Allocate for `budget`, refine in memory, build the file (shrinking the target if the file
    came out larger than the budget), score it on wikitext-2."""
    base, imatrix, sens, cal, wiki, info = (ctx[k] for k in ("base", "imatrix", "sens", "cal", "wiki", "info"))
    lay = layout(info, (), base)
    frozen = None
    if regime == "blocks":
        frozen = {n: t for n, t in stock["types"].items() if n in (TOKEN_EMBD, OUTPUT)
                  and any(e.tensor == n for e in sens.errors)}
    start = None
    if stock is not None:
        measured = {(e.tensor, e.type) for e in sens.errors}
        start = {n: t for n, t in stock["types"].items() if (n, t) in measured}
    dst = VARIANTS / f"auto-{regime}-{label.replace(' ', '')}.gguf"
    target = budget
    started = time.perf_counter()
    for _ in range(4):
        choice = choose_types(sens, target, lay.fixed, probe=cal, frozen=frozen, start=start, rounds=args.rounds,
                              budget_label=label, echo=log)
        size = build_file(base, imatrix, choice.allocation.types, dst)
        if size <= budget:
            break
        target -= size - budget + 4096
    else:
        raise SystemExit(f"{regime} {label}: could not fit {budget} bytes")
    seconds = time.perf_counter() - started
    score = wiki.measure(dst)
    dst.unlink()
    stem = f"auto-{regime}-{label.replace(' ', '')}"
    title = f"{regime} regime, budget {label} ({budget / MiB:.2f} MiB)"
    write_text(VARIANTS / f"{stem}.allocation.md", explain_markdown(choice.allocation, title, history=choice.history))
    write_text(VARIANTS / f"{stem}.tensor-types.txt",
                      "\n".join(tensor_type_file_lines(choice.allocation.types)) + "\n")
    transfer, groups = ctx["transfer"], choice.allocation.group_kld()
    # what squeeze knows of the mix before any file is scored: its KLD measured in memory on the
    # calibration chunks (the prediction made before that measurement when refinement is off)
    known = choice.measured_kld if choice.measured_kld is not None else choice.predicted_kld
    predicted = transfer.carry(known, groups)
    row = {"regime": regime, "budget": label, "budget_bytes": budget,
           "stock_bytes": stock["bytes"] if stock else None, "stock_kld": stock["kld"] if stock else None,
           "stock_calibration_kld": stock["calibration_kld"] if stock else None,
           "auto_bytes": size, "auto_kld": score["mean_kld"], "predicted_kld": predicted,
           "prediction_error": predicted / score["mean_kld"] - 1,
           "calibration_predicted_kld": choice.predicted_kld, "unrefined_calibration_predicted_kld": choice.unrefined_kld,
           "calibration_measured_kld": choice.measured_kld,
           "embedding_share": class_shares(groups).get(EMBEDDING, 0.0), "text_factor": transfer.factor(groups),
           "carried_calibration_prediction": transfer.carry(choice.predicted_kld, groups),
           "single_ratio_prediction": ctx["stock_ratio"] * known,
           "refinement": choice.history, "allocation_seconds": round(seconds, 1),
           "stock_same_top_pct": stock["same_top_pct"] if stock else None, "auto_same_top_pct": score["same_top_pct"],
           "frozen": frozen or {}, "tokens": score["tokens"]}
    if stock:
        row["auto_vs_stock"] = score["mean_kld"] / stock["kld"]
    log(f"{regime} {label}: stock {stock['kld'] if stock else float('nan'):.4f}, auto {score['mean_kld']:.4f} "
        f"(predicted {predicted:.4f}; on calibration {choice.predicted_kld:.4f} predicted, "
        f"{known:.4f} measured) at {size / MiB:.2f} MiB")
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    md = ["# Types for a size budget against llama.cpp's stock mixes", "",
          f"{meta['date']}. Base: {meta['base']}. Every file quantized with the same imatrix; KLD against the "
          f"base on {meta['score']}. Types chosen from the sensitivity map measured in memory on calibration text "
          "and refined by measuring the chosen mix in memory; the predicted KLD is that measured calibration KLD "
          "carried to the scoring text by per-class factors (blocks "
          f"{meta['transfer']['factors']['blocks']:.3f}, embedding {meta['transfer']['factors'].get('embedding', float('nan')):.3f}: "
          "two reference changes, the blocks at 4 bits and the embedding alone at 4 bits, measured in memory on "
          "both texts), split by the allocator's per-group predictions. No chosen file is scored to predict. "
          f"The single ratio the stock files show ({meta['stock_ratio']:.3f}) is the last column, for comparison.", "",
          "| regime | budget | stock MiB | stock KLD | auto MiB | auto KLD | auto / stock | embedding share | "
          "predicted KLD | prediction error | single-ratio error |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        stock_mib = f"{r['stock_bytes'] / MiB:.2f}" if r["stock_bytes"] else "-"
        stock_kld = f"{r['stock_kld']:.4f}" if r["stock_kld"] is not None else "-"
        ratio = f"{r['auto_vs_stock']:.2f}" if r.get("auto_vs_stock") is not None else "-"
        md.append(f"| {r['regime']} | {r['budget']} | {stock_mib} | {stock_kld} | {r['auto_bytes'] / MiB:.2f} | "
                  f"{r['auto_kld']:.4f} | {ratio} | {r['embedding_share']:.2f} | {r['predicted_kld']:.4f} | "
                  f"{r['prediction_error']:+.0%} | {r['single_ratio_prediction'] / r['auto_kld'] - 1:+.0%} |")
    md += ["", f"Targets: blocks regime, Q2_K and Q3_K_M: auto KLD ≤ {TARGET_RATIO} × stock at no more bytes; "
               f"predicted within {PREDICTION_TOLERANCE:.0%} of measured on every row.", ""]
    md += [f"- {line}" for line in meta["verdicts"]]
    e = meta["prediction_errors"]
    md += ["", f"The factors were measured on {meta['factor_text']}; the predictions are judged on "
               f"{meta['scored_text']}. Prediction errors range {e['min']:+.1%} to {e['max']:+.1%} ({e['lean']}).",
           "", f"Verdict: **{meta['verdict']}**."]
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=20, help="wikitext-2 chunks of 512 every file is scored on")
    ap.add_argument("--budgets", default="Q2_K,Q3_K_S,Q3_K_M,Q4_K_M")
    ap.add_argument("--sizes", default="150 MiB,170 MiB", help="free-regime budgets without a stock twin")
    ap.add_argument("--regimes", default="free,blocks")
    ap.add_argument("--rounds", type=int, default=3, help="refinement rounds (1: measure once, no correction)")
    args = ap.parse_args()
    dithered = dithered_base()
    base, info, imatrix, layers_csv = dithered.path, dithered.info, dithered.imatrix, dithered.layers_csv
    VARIANTS.mkdir(parents=True, exist_ok=True)
    cal = dithered.calibration_probe()
    sens = sensitivities(base, imatrix, layers_csv, cal)
    wiki = probe(base, "wikitext-2", 512, args.chunks)
    ctx = {"base": base, "imatrix": imatrix, "sens": sens, "cal": cal, "wiki": wiki, "info": info}
    stocks = {}
    for name in [x.strip() for x in args.budgets.split(",") if x.strip()]:
        path = VARIANTS / f"stock-{name}.gguf"
        log(f"stock {name} (imatrix)")
        quantize_file(base, path, name, imatrix_path=imatrix)
        score = wiki.measure(path)
        types = held_types(path)
        # the stock mix on the calibration chunks the predictions are made on (in memory)
        quantized = {n: t for n, t in types.items() if t not in ("F16", "F32", "BF16")}
        stocks[name] = {"bytes": path.stat().st_size, "kld": score["mean_kld"], "same_top_pct": score["same_top_pct"],
                        "types": types, "calibration_kld": cal.kld(quantized)}
        log(f"stock {name}: KLD {score['mean_kld']:.4f} held out, {stocks[name]['calibration_kld']:.4f} on calibration")
        path.unlink()
    # The predictions are made on calibration text (groups_merged) and the scores on wikitext-2,
    # where every mix's KLD is lower: the stock files, measured on both, give one ratio between the
    # two texts, kept for comparison; the predictions use the per-class factors below. (No auto
    # file is ever scored to make a prediction.)
    ctx["stock_ratio"] = statistics.median(s["kld"] / s["calibration_kld"] for s in stocks.values())
    log(f"scoring text / calibration text KLD, stock files: {ctx['stock_ratio']:.3f}")
    # the per-class factors the predictions use, from reference changes in memory (not the files)
    # measured on wikitext-2 chunks after the scored ones: the predictions are judged on chunks the
    # factors never saw (as the score stage's transfer step does)
    with MemoryProbe(base, read_text(dataset("wikitext-2")), 512, FACTOR_CHUNKS, imatrix_path=imatrix,
                     skip_chunks=args.chunks) as wiki_memory:
        ctx["transfer"] = measure_transfer(info, cal, wiki_memory,
                                           f"wikitext-2 test, chunks {args.chunks + 1}-{args.chunks + FACTOR_CHUNKS} "
                                           f"of 512 tokens (held out: not scored)", held_out=True)
    log(f"scoring text / calibration text KLD by class: {ctx['transfer'].factors}")
    rows = []
    regimes = [x.strip() for x in args.regimes.split(",") if x.strip()]
    for regime in regimes:
        for name, stock in stocks.items():
            rows.append(auto_row(args, regime, name, stock["bytes"], stock, ctx))
        if regime == "free":
            for label in [x.strip() for x in args.sizes.split(",") if x.strip()]:
                rows.append(auto_row(args, regime, label, parse_size(label, "--sizes: "), None, ctx))
    verdicts = []
    for r in rows:
        if r["regime"] == "blocks" and r["budget"] in ("Q2_K", "Q3_K_M"):
            ok = r["auto_vs_stock"] <= TARGET_RATIO and r["auto_bytes"] <= r["stock_bytes"]
            verdicts.append(f"blocks {r['budget']}: auto/stock {r['auto_vs_stock']:.2f} "
                            f"({'meets' if ok else 'misses'} ≤ {TARGET_RATIO})")
    bad = [f"{r['regime']} {r['budget']} {r['prediction_error']:+.0%}" for r in rows
           if abs(r["prediction_error"]) > PREDICTION_TOLERANCE]
    verdicts.append(f"predicted within {PREDICTION_TOLERANCE:.0%} on every row" if not bad
                    else f"prediction off by more than {PREDICTION_TOLERANCE:.0%}: {', '.join(bad)}")
    errors = [r["prediction_error"] for r in rows]
    lean = ("every error below zero (predicted low)" if all(e < 0 for e in errors) else
            "every error above zero (predicted high)" if all(e > 0 for e in errors) else "errors of both signs")
    met_ratio = all(r["auto_vs_stock"] <= TARGET_RATIO and r["auto_bytes"] <= r["stock_bytes"] for r in rows
                    if r["regime"] == "blocks" and r["budget"] in ("Q2_K", "Q3_K_M"))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "base": f"{base.name} (Gemma 3 270M F16 base dithered off its Q4_K_M grid, {base.stat().st_size} bytes)",
            "score": f"wikitext-2 test, {args.chunks} x 512 tokens", "verdicts": verdicts,
            "stock_ratio": ctx["stock_ratio"], "transfer": ctx["transfer"].as_dict(),
            "factor_text": ctx["transfer"].text, "scored_text": f"wikitext-2 test, chunks 1-{args.chunks} of 512 tokens",
            "prediction_errors": {"signed": [round(e, 4) for e in errors], "min": round(min(errors), 4),
                                  "max": round(max(errors), 4), "lean": lean},
            "target": f"blocks regime at the Q2_K and Q3_K_M sizes: auto KLD <= {TARGET_RATIO} x stock at no more "
                      f"bytes; the held-out prediction within {PREDICTION_TOLERANCE:.0%} of the scored KLD on every row",
            "verdict": verdict(met_ratio and not bad)}
    write_json(OUT / "allocate.json", {**provenance(default_threads()), "benchmark": "allocate", **meta,
                                       "imatrix": str(imatrix),
                                              "calibration_probe": f"groups_merged, {PROBE_CHUNKS} x 512 tokens, in memory",
                                              "transfer_note": "predicted_kld = calibration_measured_kld x text_factor, "
                                                               "text_factor = the per-class factors weighted by the "
                                                               "allocator's per-group predictions "
                                                               "(pipeline.choose.text_transfer); stock_ratio = median "
                                                               "over the stock files of scoring / calibration KLD, "
                                                               "single_ratio_prediction = stock_ratio x "
                                                               "calibration_measured_kld",
                                              "versions": engine_versions(), "rows": rows,
                                              "columns": "regime, budget, stock_bytes, stock_kld, auto_bytes, auto_kld, "
                                                         "predicted_kld"})
    write_text(OUT / "allocate.md", markdown(rows, meta))
    cal.close()
    print(json.dumps(verdicts, indent=1))


if __name__ == "__main__":
    main()
