"""Benchmark the scorer against llama-perplexity on one variant, 40 chunks of wikitext-2 (ctx 512).

Prints and writes results/bench/score.json (+ .md):
- squeeze_tokens_per_s vs llama_cpp_tokens_per_s: evaluated tokens (chunks x ctx) per second of
  wall time for scoring the variant against an existing base distribution, model load included,
  for both (target ratio >= 0.9);
- base_bytes vs llama_cpp_base_bytes: squeeze's base distribution file against the
  `--kl-divergence-base` file of llama-perplexity for the same chunks (target <= 2 %);
- mean_kld vs llama_cpp_mean_kld, and the peak resident memory of each scoring process.

Each phase runs in its own process so its peak memory (ru_maxrss from wait4) is its own. The
numbers are only meaningful on an otherwise idle machine.

    .venv/bin/python scripts/bench_score.py [--chunks 40] [--variant Q3_K_M] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = ROOT / "results" / "bench"


def run_measured(cmd: list[str], log: Path | None = None) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes) and output of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if log:
        log.write_text(out)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return seconds, usage.ru_maxrss * 1024, out


def phase(args) -> None:
    """Child process: one squeeze phase (base distribution or variant scoring)."""
    from pipeline.engine.context import Context
    from pipeline.engine.model import Model
    from pipeline.fsutil import read_text
    from pipeline.measure import perplexity
    from pipeline.sources.datasets import resolve_dataset

    work = Path(args.work)
    if args.phase == "base":
        with Model(work / "base-f16.gguf") as model:
            chunks = perplexity.make_chunks(model, read_text(resolve_dataset("wikitext-2")), args.ctx, args.chunks)
            with Context(model, args.ctx, perplexity.seqs_per_batch(args.ctx)) as c:
                dist = perplexity.base_distribution(model, c, chunks)
        perplexity.save_base(work / "base-topk.npz", dist)
    else:
        base = perplexity.load_base(work / "base-topk.npz")
        with Model(work / f"{args.variant}.gguf") as model, Context(model, args.ctx, perplexity.seqs_per_batch(args.ctx)) as c:
            per_token = perplexity.score_against_base(model, c, base)
        (work / "squeeze-summary.json").write_text(json.dumps(perplexity.summarize(base, per_token)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--variant", default="Q3_K_M")
    ap.add_argument("--keep", action="store_true", help="keep llama.cpp's (large) base file")
    ap.add_argument("--phase", choices=["base", "variant"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        return phase(args)

    os.environ.setdefault("SQUEEZE_DATA", str(ROOT.parent / "shared" / "datasets"))
    os.environ.setdefault("SQUEEZE_PROGRESS", "0")
    from pipeline.engine.quantize import quantize_file
    from pipeline.engine.toolchain import reference_bin_dir
    from pipeline.fsutil import atomic_path, write_json_atomic, write_text_atomic
    from pipeline.sources.datasets import resolve_dataset
    from tests.example_model import example_base_f16

    tools = reference_bin_dir()
    if tools is None:
        sys.exit("reference llama.cpp tools are not built: squeeze toolchain --build")
    work = OUT / "work" / "score"  # ignored by git: models, base files, logs
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base-f16.gguf"
    if not base.exists():
        os.symlink(example_base_f16(), base)
    variant = work / f"{args.variant}.gguf"
    if not variant.exists():
        with atomic_path(variant) as tmp:
            quantize_file(base, tmp, args.variant)
    wiki = resolve_dataset("wikitext-2")
    me = [sys.executable, __file__, "--work", str(work), "--chunks", str(args.chunks), "--ctx", str(args.ctx),
          "--variant", args.variant]
    tokens = args.chunks * args.ctx

    print(f"squeeze: base distribution, {args.chunks} chunks of {args.ctx} ...", flush=True)
    t_base, rss_base, _ = run_measured(me + ["--phase", "base"])
    print(f"squeeze: scoring {args.variant} ...", flush=True)
    t_sq, rss_sq, _ = run_measured(me + ["--phase", "variant"])
    squeeze = json.loads((work / "squeeze-summary.json").read_text())

    cli = str(tools / "llama-perplexity")
    kld_file = work / "llama-base.kld"
    common = ["-f", str(wiki), "-c", str(args.ctx), "--chunks", str(args.chunks)]
    print("llama-perplexity: --kl-divergence-base ...", flush=True)
    t_cli_base, _, _ = run_measured([cli, "-m", str(base), "--kl-divergence-base", str(kld_file), *common],
                                    work / "llama-base.log")
    cli_base_bytes = kld_file.stat().st_size
    print(f"llama-perplexity: --kl-divergence on {args.variant} ...", flush=True)
    t_cli, rss_cli, out = run_measured([cli, "-m", str(variant), "--kl-divergence-base", str(kld_file),
                                        "--kl-divergence", *common], work / "llama-kld.log")
    m = re.search(r"Mean\s+KLD:\s+([-\d.]+)", out)
    cli_kld = float(m.group(1)) if m else None
    if not args.keep:
        kld_file.unlink()

    base_bytes = (work / "base-topk.npz").stat().st_size
    result = {
        "variant": args.variant, "chunks": args.chunks, "ctx": args.ctx, "tokens": tokens,
        "threads": os.cpu_count(),
        "squeeze_seconds": round(t_sq, 2), "llama_cpp_seconds": round(t_cli, 2),
        "squeeze_tokens_per_s": round(tokens / t_sq, 1), "llama_cpp_tokens_per_s": round(tokens / t_cli, 1),
        "ratio": round(t_cli / t_sq, 3),
        "squeeze_base_seconds": round(t_base, 2), "llama_cpp_base_seconds": round(t_cli_base, 2),
        "base_bytes": base_bytes, "llama_cpp_base_bytes": cli_base_bytes,
        "base_bytes_pct": round(100 * base_bytes / cli_base_bytes, 3),
        "mean_kld": squeeze["mean_kld"], "llama_cpp_mean_kld": cli_kld,
        "kld_rel_diff_pct": round(100 * (squeeze["mean_kld"] / cli_kld - 1), 3) if cli_kld else None,
        "squeeze_peak_rss_bytes": rss_sq, "squeeze_base_peak_rss_bytes": rss_base,
        "llama_cpp_peak_rss_bytes": rss_cli,
    }
    write_json_atomic(OUT / "score.json", result)
    md = ["# Scoring benchmark: squeeze vs llama-perplexity", "",
          f"{args.variant} against the F16 base of Gemma 3 270M, wikitext-2, {args.chunks} chunks of {args.ctx} "
          f"({tokens} tokens evaluated), {result['threads']} threads. Timings need an idle machine.", "",
          "| | squeeze | llama-perplexity | ratio / share |", "|---|---|---|---|",
          f"| tokens/s (variant scoring) | {result['squeeze_tokens_per_s']} | {result['llama_cpp_tokens_per_s']} "
          f"| {result['ratio']}x (target >= 0.9x) |",
          f"| base distribution bytes | {base_bytes:,} | {cli_base_bytes:,} | {result['base_bytes_pct']} % (target <= 2 %) |",
          f"| mean KLD | {squeeze['mean_kld']:.6f} | {cli_kld} | {result['kld_rel_diff_pct']} % apart |",
          f"| peak RSS, scoring (MiB) | {rss_sq / 2**20:.0f} | {rss_cli / 2**20:.0f} | |", ""]
    write_text_atomic(OUT / "score.md", "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
