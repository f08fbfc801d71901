"""Benchmark: what correct pruning is worth, and which layers to prune.

1. Pattern fix: layers 13 and 15 of Gemma 3 270M pruned from the F16 base, once with the
   sliding-window pattern of the survivors kept (squeeze) and once re-derived from the new
   indices (what llama.cpp's own pruning does), scored against the base on wikitext-2 at a
   context longer than the 512-token window (old layer 17, global, becomes local without it).
2. K = 2: the layers `prune: {auto: 2}` picks (greedy on KLD measured on calibration text,
   proxies limiting the candidates) against the two layers with the highest imatrix CosSim and
   the fixed pair 13, 15 (the default recipe's, chosen up front), all scored on wikitext-2.

Writes results/bench/prune.json. Timings on a loaded machine mean little; the figures are KLDs.
Usage: python scripts/bench_prune.py [--ctx 1024] [--chunks 8] [--k-chunks 10]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from bench_common import ROOT, WORK, base_f16, calibration, log, probe

from pipeline.formats.imatrix_file import read_imatrix
from pipeline.formats.layers_csv import block_influence
from pipeline.formats.model_info import read_model_info
from pipeline.formats.prune import prune_gguf
from pipeline.fsutil import write_json_atomic
from pipeline.measure.prune_auto import choose_layers, default_candidates, proxy_ranking
from pipeline.measure.sensitivity import imatrix_layer_stats


def kld_of_pruned(base, layers, p, keep_pattern=True) -> dict:
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        path = Path(tmp) / "pruned.gguf"
        prune_gguf(base, path, layers, keep_swa_pattern=keep_pattern)
        s = p.measure(path)
    return {"layers": sorted(layers), "mean_kld": s["mean_kld"], "same_top_pct": s["same_top_pct"],
            "ppl_ratio": s["ppl_ratio"], "tokens": s["tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=1024, help="context for the pattern-fix comparison (> 512)")
    ap.add_argument("--chunks", type=int, default=8, help="wikitext-2 chunks for the pattern-fix comparison")
    ap.add_argument("--k-ctx", type=int, default=512, help="context for the K=2 comparison")
    ap.add_argument("--k-chunks", type=int, default=10, help="wikitext-2 chunks for the K=2 comparison")
    ap.add_argument("--probe-chunks", type=int, default=4, help="calibration chunks the auto choice measures on")
    ap.add_argument("--fixed", default="13,15", help="the pair chosen up front")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-pattern", action="store_true")
    ap.add_argument("--skip-k", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench" / "prune.json"))
    args = ap.parse_args()

    base = base_f16()
    n_layers = read_model_info(base).n_layers
    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    fixed = [int(x) for x in args.fixed.split(",")]

    if not args.skip_pattern:
        log(f"pattern fix: layers {fixed} pruned, wikitext-2, {args.chunks} chunks of {args.ctx}")
        p = probe(base, "wikitext-2", args.ctx, args.chunks, args.threads)
        with_fix = kld_of_pruned(base, fixed, p, keep_pattern=True)
        without = kld_of_pruned(base, fixed, p, keep_pattern=False)
        result["pattern_fix"] = {"ctx": args.ctx, "chunks": args.chunks, "with_fix": with_fix, "without_fix": without}
        print(f"\npruned {fixed}, ctx {args.ctx}:  KLD with pattern kept {with_fix['mean_kld']:.4f}   "
              f"re-derived (llama.cpp) {without['mean_kld']:.4f}\n")
        write_json_atomic(out_path, result)

    if not args.skip_k:
        im_path, layers_csv = calibration(base, threads=args.threads)
        stats = imatrix_layer_stats(read_imatrix(im_path))
        cossim = {k: v["cossim"] for k, v in stats.items()}
        bi = block_influence(layers_csv)
        top_cos = sorted(sorted(cossim, key=lambda layer: -cossim[layer])[:2])
        log(f"auto K=2: greedy on {args.probe_chunks} calibration chunks")
        cal_probe = probe(base, "groups_merged", 512, args.probe_chunks, args.threads)
        ranking = proxy_ranking(n_layers, cossim, bi)
        choice = choose_layers(base, 2, n_layers, cal_probe, ranking, default_candidates(2, n_layers), WORK,
                               echo=log)
        log(f"scoring on wikitext-2, {args.k_chunks} chunks of {args.k_ctx}")
        p = probe(base, "wikitext-2", args.k_ctx, args.k_chunks, args.threads)
        rows = {"auto": kld_of_pruned(base, choice.layers, p),
                "highest_cossim": kld_of_pruned(base, top_cos, p),
                "fixed": kld_of_pruned(base, fixed, p)}
        result["k2"] = {"ctx": args.k_ctx, "chunks": args.k_chunks, "probe_chunks": args.probe_chunks,
                        "auto_choice": asdict(choice), "cossim": cossim, "block_influence": bi, **rows}
        print(f"\nK=2, wikitext-2 {args.k_chunks}x{args.k_ctx} (F16, pattern kept):")
        print(f"{'choice':<16} {'layers':<10} {'mean KLD':>9} {'same top':>9}")
        for name, r in rows.items():
            print(f"{name:<16} {str(r['layers']):<10} {r['mean_kld']:>9.4f} {r['same_top_pct']:>8.2f}%")
        write_json_atomic(out_path, result)
    log(f"wrote {out_path}")


if __name__ == "__main__":
    main()
