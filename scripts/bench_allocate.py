"""Benchmark: types chosen for a size budget (pipeline.measure.allocate) against llama.cpp's stock mixes.

For each stock type (Q3_K_M, Q2_K) of Gemma 3 270M, quantized from the F16 base with the same
imatrix: squeeze picks a type for every tensor so the file is no larger than the stock file,
with the least predicted KLD (sensitivities measured on calibration text), and both are scored
on the same wikitext-2 chunks against the base. Also writes the layer sensitivity map
(results/bench/sensitivity.{csv,json,png}) and each allocation's explanation (Markdown).

Prints sizes and KLDs side by side and writes results/bench/allocate.json (rows: budget,
stock_bytes, stock_kld, auto_bytes, auto_kld). Timings on a loaded machine mean little.
Usage: python scripts/bench_allocate.py [--chunks 20] [--probe-chunks 4] [--budgets Q3_K_M,Q2_K]
       [--sizes "150 MiB,170 MiB"]   (extra budgets below the stock sizes, no stock twin)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_common import ROOT, WORK, base_f16, calibration, log, probe

from pipeline.engine.quantize import quantize_file
from pipeline.formats.model_info import read_model_info
from pipeline.formats.tensor_names import TOKEN_EMBD, exact_pattern
from pipeline.fsutil import write_json_atomic, write_text_atomic
from pipeline.measure.allocate import allocate, explain_markdown
from pipeline.measure.budget import layout
from pipeline.measure.sensitivity import Sensitivity, run_sensitivity
from pipeline.recipe.rules import tensor_type_file_lines
from pipeline.report.sensitivity import save_sensitivity
from pipeline.units import MiB, parse_size

BENCH = ROOT / "results" / "bench"


def sensitivities(base, im_path, layers_csv, probe_chunks, threads, redo=False) -> Sensitivity:
    json_path = BENCH / "sensitivity.json"
    if json_path.exists() and not redo:
        data = json.loads(json_path.read_text())
        if data.get("probe_chunks") == probe_chunks:
            log(f"sensitivities from {json_path}")
            return Sensitivity.from_json(data)
    log(f"measuring sensitivities on {probe_chunks} calibration chunks (3 runs per layer)")
    cal = probe(base, "groups_merged", 512, probe_chunks, threads)
    result = run_sensitivity(base, im_path, read_model_info(base), cal, WORK, layers_csv, threads)
    save_sensitivity(result, BENCH / "sensitivity.csv", json_path, BENCH / "sensitivity.png",
                     BENCH / "sensitivity.md")
    data = json.loads(json_path.read_text())
    data["probe_chunks"] = probe_chunks  # what the cached map was measured on
    write_json_atomic(json_path, data)
    return result


def build_auto(base, im_path, sens, budget: int, dst: Path, info, threads) -> tuple:
    """Allocate for `budget` bytes and quantize; shrink the budget if the file came out larger."""
    lay = layout(info, (), base)
    target = budget
    for _ in range(4):
        alloc = allocate(sens.errors, sens.alphas, target, lay.fixed)
        types = dict(alloc.types)
        embd = types.pop(TOKEN_EMBD, None)
        quantize_file(base, dst, "Q8_0", imatrix_path=im_path,
                      overrides=[(exact_pattern(n), t) for n, t in types.items()],
                      token_embedding_type=embd, threads=threads)
        size = dst.stat().st_size
        if size <= budget:
            return alloc, size
        target -= size - budget + 4096
    raise RuntimeError(f"could not fit {budget} bytes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=20, help="wikitext-2 chunks of 512 every variant is scored on")
    ap.add_argument("--probe-chunks", type=int, default=4, help="calibration chunks per sensitivity run")
    ap.add_argument("--budgets", default="Q3_K_M,Q2_K")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--redo-sensitivity", action="store_true")
    ap.add_argument("--sizes", default="", help="extra budgets without a stock twin, e.g. '150 MiB,170 MiB' "
                                                "(where the allocator must trade, not only find the original grids)")
    args = ap.parse_args()

    base = base_f16()
    info = read_model_info(base)
    im_path, layers_csv = calibration(base, threads=args.threads)
    sens = sensitivities(base, im_path, layers_csv, args.probe_chunks, args.threads, args.redo_sensitivity)
    corr = sens.correlations
    log("Spearman, proxy vs measured KLD: " + ", ".join(f"{k} {v:.2f}" for k, v in corr.items()
                                                           if v is not None and v == v))
    wiki = probe(base, "wikitext-2", 512, args.chunks, args.threads)
    stocks = [x.strip() for x in args.budgets.split(",") if x.strip()]
    sizes = [x.strip() for x in args.sizes.split(",") if x.strip()]
    # rows of budgets not measured this time are kept (so --budgets '' --sizes ... adds rows)
    old = json.loads((BENCH / "allocate.json").read_text()) if (BENCH / "allocate.json").exists() else []
    rows = [r for r in old if r["budget"] not in stocks + sizes]
    variants = BENCH / "variants"
    variants.mkdir(parents=True, exist_ok=True)
    for stock in stocks:
        stock_path = variants / f"stock-{stock}.gguf"
        log(f"stock {stock} (imatrix)")
        quantize_file(base, stock_path, stock, imatrix_path=im_path, threads=args.threads)
        stock_bytes = stock_path.stat().st_size
        stock_score = wiki.measure(stock_path)
        auto_path = variants / f"auto-at-{stock}.gguf"
        alloc, auto_bytes = build_auto(base, im_path, sens, stock_bytes, auto_path, info, args.threads)
        write_text_atomic(variants / f"auto-at-{stock}.allocation.md",
                          explain_markdown(alloc, f"Types for the size of stock {stock} ({stock_bytes / MiB:.2f} MiB)"))
        write_text_atomic(variants / f"auto-at-{stock}.tensor-types.txt", "\n".join(tensor_type_file_lines(alloc.types)) + "\n")
        auto_score = wiki.measure(auto_path)
        rows.append({"budget": stock, "stock_bytes": stock_bytes, "stock_kld": stock_score["mean_kld"],
                     "auto_bytes": auto_bytes, "auto_kld": auto_score["mean_kld"],
                     "auto_predicted_kld": alloc.predicted_kld,
                     "stock_same_top_pct": stock_score["same_top_pct"], "auto_same_top_pct": auto_score["same_top_pct"],
                     "kld_reduction_pct": 100.0 * (1 - auto_score["mean_kld"] / stock_score["mean_kld"]),
                     "tokens": stock_score["tokens"]})
        for p in (stock_path, auto_path):
            p.unlink()
        write_json_atomic(BENCH / "allocate.json", rows)
    for label in sizes:
        budget = parse_size(label, "--sizes: ")
        auto_path = variants / f"auto-{label.replace(' ', '')}.gguf"
        log(f"auto at {label}")
        alloc, auto_bytes = build_auto(base, im_path, sens, budget, auto_path, info, args.threads)
        write_text_atomic(variants / f"auto-{label.replace(' ', '')}.allocation.md",
                          explain_markdown(alloc, f"Types for {label}"))
        auto_score = wiki.measure(auto_path)
        auto_path.unlink()
        rows.append({"budget": label, "stock_bytes": None, "stock_kld": None, "auto_bytes": auto_bytes,
                     "auto_kld": auto_score["mean_kld"], "auto_predicted_kld": alloc.predicted_kld,
                     "auto_same_top_pct": auto_score["same_top_pct"], "tokens": auto_score["tokens"]})
        write_json_atomic(BENCH / "allocate.json", rows)
    print(f"\nwikitext-2, {args.chunks} chunks of 512, KLD against the F16 base (imatrix for all):")
    print(f"{'budget':<8} {'stock MiB':>10} {'stock KLD':>10} {'auto MiB':>9} {'auto KLD':>9} {'KLD -%':>7}")
    for r in rows:
        if r["stock_bytes"] is None:
            print(f"{r['budget']:<8} {'-':>10} {'-':>10} {r['auto_bytes'] / MiB:>9.2f} {r['auto_kld']:>9.4f} {'-':>7}")
            continue
        print(f"{r['budget']:<8} {r['stock_bytes'] / MiB:>10.2f} {r['stock_kld']:>10.4f} "
              f"{r['auto_bytes'] / MiB:>9.2f} {r['auto_kld']:>9.4f} {r['kld_reduction_pct']:>6.1f}%")
    log(f"wrote {BENCH / 'allocate.json'}")


if __name__ == "__main__":
    main()
