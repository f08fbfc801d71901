"""Benchmark: which layers `prune: {auto: K}` drops, what its search is worth, what it costs.

All on the dithered F16 base of Gemma 3 270M (off its Q4_K_M grid, FINDINGS.md), for K = 2 and 4:

1. Selection, on calibration text: pipeline.choose.prune_auto.choose_layers with the in-memory
   probe the prune stage uses (MemoryProbe, groups_merged, `--probe-chunks` chunks of 512):
   SLEB-style greedy over all layers, every window of K consecutive layers, and the proxies'
   sets (lowest Block Influence and highest imatrix CosSim from a calibration pass over
   groups_merged, the last K layers), each with its calibration KLD, probes and wall seconds.
2. Evaluation, held out: every set cut from the base file (pipeline.formats.prune, the
   sliding-window pattern kept) and scored against the base on wikitext-2 test text, `--chunks`
   chunks of `--ctx` tokens (above the 512-token sliding window): mean KLD, same top %, PPL ratio.
3. The pattern fix: layers 13 and 15 pruned with the survivors' sliding-window pattern kept
   (squeeze) and re-derived from the new indices (llama.cpp's own pruning), on the same text.

Writes results/bench/prune.json and prune.md. Timings on a loaded 2-core machine are rough;
the load average is recorded beside them.
Usage: python scripts/bench_prune.py [--ks 2,4] [--ctx 1024] [--chunks 6] [--probe-chunks 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench_common import OUT, WORK, calibration, dataset, log, probe, write_json, write_text

from pipeline.cache import MadeFrom, cached
from pipeline.choose.memory_probe import PROBE_CHUNKS, MemoryProbe
from pipeline.choose.prune_auto import choose_layers
from pipeline.choose.sensitivity import imatrix_layer_stats
from pipeline.engine.backend import engine_versions
from pipeline.engine.layer_kinds import sliding_window_layers
from pipeline.formats.imatrix_file import read_imatrix
from pipeline.formats.layers_csv import block_influence
from pipeline.formats.model_info import read_model_info
from pipeline.formats.prune import prune_gguf
from pipeline.fsutil import read_text, sha256_file

DITHERED_WORK = WORK / "dithered"  # apart from the plain base's cached files, which share their names


def dithered_base() -> Path:
    from tests.example_model import example_base_dithered

    return example_base_dithered()


def memory_probe(base: Path, name: str, ctx: int, chunks: int, threads: int | None) -> MemoryProbe:
    """The stage's in-memory probe on `chunks` chunks of dataset `name`, its base distribution
    kept in DITHERED_WORK (keyed like bench_common.probe)."""
    text = dataset(name)
    npz = DITHERED_WORK / f"memory-base-{name}-ctx{ctx}-c{chunks}.npz"
    made_from = MadeFrom({"model": base, "text": text}, engine_versions(), {"ctx": ctx, "chunks": chunks})

    def build() -> None:
        npz.unlink(missing_ok=True)
        MemoryProbe(base, read_text(text), ctx, chunks, threads, cache=npz)

    DITHERED_WORK.mkdir(parents=True, exist_ok=True)
    cached(npz, made_from, build, lambda why: log(f"{npz.name}: rebuilding ({why})"))
    return MemoryProbe(base, read_text(text), ctx, chunks, threads, cache=npz)


def held_out(base: Path, layers, p, keep_pattern: bool = True) -> dict:
    """The pruned FILE scored against the base: what a user of the pruned model gets."""
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        path = Path(tmp) / "pruned.gguf"
        prune_gguf(base, path, list(layers), swa_layers=sliding_window_layers(base), keep_swa_pattern=keep_pattern)
        s = p.measure(path)
    return {"layers": sorted(layers), "mean_kld": s["mean_kld"], "same_top_pct": s["same_top_pct"],
            "ppl_ratio": s["ppl_ratio"], "tokens": s["tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="2,4", help="the K values to choose for")
    ap.add_argument("--ctx", type=int, default=1024, help="held-out context (above the 512-token window)")
    ap.add_argument("--chunks", type=int, default=6, help="held-out wikitext-2 chunks")
    ap.add_argument("--probe-ctx", type=int, default=512, help="calibration context the selection measures on")
    ap.add_argument("--probe-chunks", type=int, default=PROBE_CHUNKS,
                    help="calibration chunks the selection measures on (the prune stage's count)")
    ap.add_argument("--calibration-chunks", type=int, default=20, help="chunks of the imatrix/layers.csv pass")
    ap.add_argument("--fixed", default="13,15", help="the pair of the pattern-fix comparison")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(OUT / "prune.json"))
    ap.add_argument("--markdown-only", action="store_true", help="rewrite prune.md from prune.json, measure nothing")
    args = ap.parse_args()
    if args.markdown_only:
        out = Path(args.out)
        write_text(out.with_suffix(".md"), markdown(json.loads(out.read_text())))
        return
    started, load_start = time.monotonic(), os.getloadavg()

    base = dithered_base()
    n_layers = read_model_info(base).n_layers
    log(f"base {base} ({base.stat().st_size:,} bytes), {n_layers} layers; hashing it")
    base_record = {"what": "Gemma 3 270M, F16 base dequantized from the PyPI Q4_K_M file and dithered off its grid "
                           "(tests/example_model.example_base_dithered; FINDINGS.md)",
                   "path": str(base), "bytes": base.stat().st_size, "sha256": sha256_file(base)}

    im_path, layers_csv = calibration(base, args.calibration_chunks, threads=args.threads, work=DITHERED_WORK)
    cossim = {k: v["cossim"] for k, v in imatrix_layer_stats(read_imatrix(im_path)).items()}
    bi = block_influence(layers_csv)

    log(f"held-out probe: wikitext-2, {args.chunks} chunks of {args.ctx}")
    eval_probe = probe(base, "wikitext-2", args.ctx, args.chunks, args.threads, work=DITHERED_WORK)
    scored: dict[tuple, dict] = {}

    def evaluate(layers) -> dict:
        key = tuple(sorted(layers))
        if key not in scored:
            log(f"  scoring layers {list(key)} dropped (pruned file)")
            scored[key] = held_out(base, key, eval_probe)
        return scored[key]

    fixed = [int(x) for x in args.fixed.split(",")]
    log(f"pattern fix: layers {fixed}")
    pattern_fix = {"with_fix": evaluate(fixed), "without_fix": held_out(base, fixed, eval_probe, keep_pattern=False)}

    per_k = {}
    for k in [int(x) for x in args.ks.split(",")]:
        log(f"K={k}: choosing on groups_merged, {args.probe_chunks} chunks of {args.probe_ctx} (in memory)")
        load_before = os.getloadavg()
        with memory_probe(base, "groups_merged", args.probe_ctx, args.probe_chunks, args.threads) as sel:
            choice = choose_layers(sel, k, n_layers, cossim, bi, echo=log)
            choice.probe = {"text": "groups_merged", "ctx": args.probe_ctx, "chunks": args.probe_chunks,
                            "removal": "residual outputs zeroed in memory (MemoryProbe)"}
        rows = {}
        for name, m in choice.methods.items():
            rows[name] = {"layers": m.layers, "calibration_kld": m.kld, "probes": m.probes,
                          "search_seconds": m.seconds, "held_out": evaluate(m.layers)}
        best_held_out = min(rows, key=lambda n: rows[n]["held_out"]["mean_kld"])
        per_k[f"k{k}"] = {"k": k, "chosen": {"method": choice.method, "layers": choice.layers},
                          "best_held_out": best_held_out, "search_wall_seconds": choice.seconds,
                          "probes": choice.probes,
                          "load_average": {"before": [round(x, 2) for x in load_before],
                                           "after": [round(x, 2) for x in os.getloadavg()]},
                          "methods": rows, "choice": asdict(choice)}
        print(f"\nK={k}: chosen {choice.layers} ({choice.method}); search {choice.seconds:.0f} s, "
              f"{choice.probes} probes")
        print(f"{'method':<16} {'layers':<16} {'cal KLD':>8} {'held-out KLD':>13} {'same top':>9}")
        for name, r in rows.items():
            print(f"{name:<16} {str(r['layers']):<16} {r['calibration_kld']:>8.4f} "
                  f"{r['held_out']['mean_kld']:>13.4f} {r['held_out']['same_top_pct']:>8.2f}%")

    result = {
        "benchmark": "prune",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "versions": engine_versions(),
        "base": base_record,
        "selection": {"text": "groups_merged (calibration)", "ctx": args.probe_ctx, "chunks": args.probe_chunks,
                      "how": "pipeline.choose.prune_auto.choose_layers on a MemoryProbe (layers removed in memory)",
                      "proxies_from": {"imatrix": f"{args.calibration_chunks} chunks of 512 of groups_merged",
                                       "layers_csv": "the same pass"}},
        "held_out": {"text": "wikitext-2 test (held out)", "ctx": args.ctx, "chunks": args.chunks,
                     "how": "each set cut from the base file (pipeline.formats.prune, sliding-window pattern kept), "
                            "loaded, scored against the base; positions ctx/2 to ctx-1 of each chunk are scored, "
                            "so at ctx 1024 every scored token has more context than the 512-token sliding "
                            "window and the local and global layers differ"},
        "threads": args.threads,
        "pattern_fix": {"layers": fixed, **pattern_fix},
        **per_k,
        "total_wall_seconds": round(time.monotonic() - started, 1),
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
    }
    out = Path(args.out)
    write_json(out, result)
    write_text(out.with_suffix(".md"), markdown(result))
    log(f"wrote {out} and {out.with_suffix('.md').name}")


def markdown(r: dict) -> str:
    sel, ho, b = r["selection"], r["held_out"], r["base"]
    md = ["# Automatic pruning: which layers, found how", "",
          f"{r['date']}, {r['machine']}. Base: {b['what']}; `{Path(b['path']).name}`, {b['bytes']:,} bytes, "
          f"sha256 `{b['sha256'][:16]}…`.", "",
          f"Selection on {sel['text']}, {sel['chunks']} chunks of {sel['ctx']}, layers removed in memory. "
          f"Evaluation on {ho['text']}, {ho['chunks']} chunks of {ho['ctx']} tokens (above the 512-token sliding "
          "window), each set cut from the file. KLD against the base: lower is better (↓); same top: higher "
          "is better (↑). Probes: the sets a method measured that no method before it had (0: all measured "
          "already). Search seconds are wall time on a shared 2-core machine (load average in the JSON).", ""]
    for key in [k for k in r if k.startswith("k") and isinstance(r[k], dict) and "methods" in r[k]]:
        kk = r[key]
        md += [f"## K = {kk['k']}: chose {kk['chosen']['layers']} ({kk['chosen']['method']}), "
               f"search {kk['search_wall_seconds']:.0f} s, {kk['probes']} probes", "",
               "| method | layers | calibration KLD ↓ | probes | search s | held-out KLD ↓ | same top % ↑ | PPL ratio ↓ |",
               "|---|---|---:|---:|---:|---:|---:|---:|"]
        for name, m in kk["methods"].items():
            h = m["held_out"]
            mark = " **(chosen)**" if name == kk["chosen"]["method"] else ""
            md.append(f"| {name}{mark} | {m['layers']} | {m['calibration_kld']:.4f} | {m['probes']} | "
                      f"{m['search_seconds']:.1f} | {h['mean_kld']:.4f} | {h['same_top_pct']:.2f} | "
                      f"{h['ppl_ratio']:.3f} |")
        md += ["", f"Lowest held-out KLD: {kk['best_held_out']}.", ""]
    pf = r["pattern_fix"]
    md += [f"## Pattern fix: layers {pf['layers']} pruned", "",
           "| sliding-window pattern | held-out KLD ↓ | same top % ↑ | PPL ratio ↓ |", "|---|---:|---:|---:|"]
    for label, row in (("kept (squeeze)", pf["with_fix"]), ("re-derived from new indices (llama.cpp)",
                                                             pf["without_fix"])):
        md.append(f"| {label} | {row['mean_kld']:.4f} | {row['same_top_pct']:.2f} | {row['ppl_ratio']:.3f} |")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
