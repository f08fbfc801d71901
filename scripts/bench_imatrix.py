"""Importance-matrix speed: squeeze's in-process calibration pass against llama.cpp's
llama-imatrix, on the same F16 Gemma 3 270M base, text (groups_merged), ctx and chunks.

    .venv/bin/python scripts/bench_imatrix.py [--chunks 20] [--ctx 512] [--no-ppl]

Both are timed end to end as a user runs them (load, tokenize, the pass, write the file), one
after the other, never at the same time. Writes results/bench/imatrix.json and imatrix.md.
Timings mean something only on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def base_model() -> Path:
    """The F16 base the tests use (dequantized once from the PyPI Q4_K_M file into the cache)."""
    from tests.example_model import example_base_f16

    return example_base_f16()


def run_squeeze(model: Path, text: Path, ctx: int, chunks: int, out: Path) -> float:
    from pipeline.formats.imatrix_file import write_imatrix
    from pipeline.measure.calibration import calibration_tokens, collect, to_imatrix

    start = time.monotonic()
    tokens = calibration_tokens(model, [text])
    totals, _ = collect(model, tokens, ctx, chunks)
    write_imatrix(out, to_imatrix(totals, ctx, [str(text)]))
    return time.monotonic() - start


def run_cli(tool: Path, model: Path, text: Path, ctx: int, chunks: int, out: Path, no_ppl: bool) -> float:
    cmd = [str(tool), "-m", str(model), "-f", str(text), "-c", str(ctx), "--chunks", str(chunks), "-o", str(out)]
    if no_ppl:
        cmd.append("--no-ppl")
    start = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.monotonic() - start


def same_imatrix(a: Path, b: Path) -> bool:
    import numpy as np

    from pipeline.formats.imatrix_file import read_imatrix

    x, y = read_imatrix(a), read_imatrix(b)
    return sorted(x.entries) == sorted(y.entries) and all(
        np.array_equal(e.sums, y.entries[n].sums) and np.array_equal(e.counts, y.entries[n].counts)
        for n, e in x.entries.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--no-ppl", action="store_true",
                    help="run llama-imatrix with --no-ppl (it still computes every logit)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = ap.parse_args()
    os.environ.setdefault("SQUEEZE_PROGRESS", "0")
    os.environ.setdefault("SQUEEZE_DATA", str(ROOT.parent / "shared" / "datasets"))

    from pipeline.engine.backend import default_threads
    from pipeline.engine.toolchain import reference_bin_dir
    from pipeline.fsutil import write_json_atomic, write_text_atomic
    from pipeline.sources.datasets import resolve_dataset

    tools = reference_bin_dir()
    if tools is None:
        print("the reference llama.cpp tools are not built: run `squeeze toolchain --build`", file=sys.stderr)
        return 1
    model, text = base_model(), resolve_dataset("groups_merged")
    tokens = args.chunks * args.ctx
    with tempfile.TemporaryDirectory() as tmp:
        cli_out, sq_out = Path(tmp) / "cli.gguf", Path(tmp) / "squeeze.gguf"
        cli_s = run_cli(tools / "llama-imatrix", model, text, args.ctx, args.chunks, cli_out, args.no_ppl)
        sq_s = run_squeeze(model, text, args.ctx, args.chunks, sq_out)
        identical = same_imatrix(sq_out, cli_out)
    result = {
        "squeeze_tokens_per_s": round(tokens / sq_s, 1),
        "llama_cpp_tokens_per_s": round(tokens / cli_s, 1),
        "ratio": round(cli_s / sq_s, 3),
        "target_ratio": 0.85,
        "squeeze_seconds": round(sq_s, 2),
        "llama_cpp_seconds": round(cli_s, 2),
        "imatrix_bit_identical": identical,
        "chunks": args.chunks, "ctx": args.ctx, "tokens": tokens, "dataset": "groups_merged",
        "model": "Gemma 3 270M, F16 base", "threads": default_threads(),
        "llama_imatrix_flags": "--no-ppl" if args.no_ppl else "defaults (perplexity printout on)",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_average": os.getloadavg()[0],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "imatrix.json", result)
    md = ["# Importance matrix: squeeze vs llama-imatrix", "",
          f"{args.chunks} chunks of {args.ctx} tokens of groups_merged on the F16 Gemma 3 270M base, "
          f"{result['threads']} threads, end to end (load, tokenize, pass, write); llama-imatrix with "
          f"{result['llama_imatrix_flags']}. 1-minute load average at the end: {result['load_average']:.2f} "
          f"(timings mean something only on an idle machine).", "",
          "| | seconds ↓ | tokens/s ↑ |", "|---|---:|---:|",
          f"| llama-imatrix | {cli_s:.1f} | {result['llama_cpp_tokens_per_s']} |",
          f"| squeeze | {sq_s:.1f} | {result['squeeze_tokens_per_s']} |", "",
          f"Ratio squeeze / llama-imatrix: **{result['ratio']}** (target ≥ 0.85). The two imatrix files are "
          f"{'bit-identical' if identical else 'NOT bit-identical'}.", ""]
    write_text_atomic(args.out / "imatrix.md", "\n".join(md))
    print(f"llama-imatrix  {cli_s:7.1f} s  {result['llama_cpp_tokens_per_s']:7.1f} tokens/s")
    print(f"squeeze        {sq_s:7.1f} s  {result['squeeze_tokens_per_s']:7.1f} tokens/s")
    print(f"ratio {result['ratio']} (target >= 0.85); imatrix bit-identical: {identical}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
