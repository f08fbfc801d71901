"""Benchmark: writing a variant with quantize-once assembly against llama_model_quantize.

On the dithered Gemma 3 270M F16 base with its imatrix (20 x 512 tokens of groups_merged), the same
files three ways, in one process, 3 repetitions with the order of the first two alternating:

  llama     pipeline.engine.quantize.quantize_file (llama_model_quantize in-process: what the
            quantize stage called before)
  cold      pipeline.engine.assemble.assemble_file with an empty cache (every pair quantized)
  warm      assemble_file again after the run already holds the pairs (what a budgeted variant
            finds after its refinement measured the mix, or a second variant sharing types)

and llama.cpp's own `llama-quantize --imatrix ... Q4_K_M` as a child process for reference (it also
loads, which the in-process sides do not). Every assembled file is checked byte-identical to
llama_model_quantize's. Same thread count everywhere (--threads, default 2).

Writes results/bench/assemble.json and .md.
Usage: python scripts/bench_assemble.py [--threads 2] [--ftype Q4_K_M]
"""

from __future__ import annotations

import argparse
import filecmp
import tempfile
import time
from pathlib import Path

from bench_common import OUT, dithered_base, log, portable, run_child, spread, write_json, write_text

from pipeline.engine.assemble import assemble_file
from pipeline.engine.backend import engine_versions
from pipeline.engine.quantize import quantize_file
from pipeline.engine.quantized_tensors import QuantizedCache
from pipeline.build.toolchain import reference_bin_dir

REPETITIONS = 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ftype", default="Q4_K_M")
    args = ap.parse_args()
    base = dithered_base()
    tools = reference_bin_dir()
    if tools is None:
        raise SystemExit("the reference llama.cpp tools are not built: run `squeeze toolchain --build`")
    times: dict[str, list[float]] = {"llama": [], "cold": [], "warm": [], "cli": []}
    cli_argv = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ref = tmp / "llama.gguf"
        for rep in range(REPETITIONS):
            cache = QuantizedCache(4 << 30)
            sides = {"llama": lambda: quantize_file(base.path, ref, args.ftype, imatrix_path=base.imatrix,
                                                    threads=args.threads),
                     "cold": lambda: assemble_file(base.path, tmp / "cold.gguf", args.ftype, imatrix_path=base.imatrix,
                                                   threads=args.threads, cache=cache)}
            for side in (["llama", "cold"] if rep % 2 == 0 else ["cold", "llama"]):
                start = time.perf_counter()
                sides[side]()
                times[side].append(time.perf_counter() - start)
                log(f"{side}, repetition {rep + 1}: {times[side][-1]:.1f} s")
            start = time.perf_counter()
            made = assemble_file(base.path, tmp / "warm.gguf", args.ftype, imatrix_path=base.imatrix,
                                 threads=args.threads, cache=cache)
            times["warm"].append(time.perf_counter() - start)
            log(f"warm, repetition {rep + 1}: {times['warm'][-1]:.1f} s ({made.reused} pairs reused)")
            for f in ("cold.gguf", "warm.gguf"):
                assert filecmp.cmp(ref, tmp / f, shallow=False), f"{f} differs from llama_model_quantize's file"
            cli_argv = [str(tools / "llama-quantize"), "--imatrix", str(base.imatrix), str(base.path),
                        str(tmp / "cli.gguf"), args.ftype, str(args.threads)]
            seconds, _, _ = run_child(cli_argv)
            times["cli"].append(seconds)
            log(f"llama-quantize, repetition {rep + 1}: {seconds:.1f} s")
    result = {
        "benchmark": "assemble",
        "title": f"{args.ftype} of the dithered Gemma 3 270M F16 base: quantize-once assembly against "
                 "llama_model_quantize",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "versions": engine_versions(),
        "threads": args.threads,
        "repetitions": REPETITIONS,
        "byte_identical": True,
        "seconds": {k: spread(v) for k, v in times.items()},
        "ratios": {"llama_over_cold": round(spread(times["llama"])["median"] / spread(times["cold"])["median"], 2),
                   "llama_over_warm": round(spread(times["llama"])["median"] / spread(times["warm"])["median"], 2),
                   "cli_over_cold": round(spread(times["cli"])["median"] / spread(times["cold"])["median"], 2)},
        "commands": {"llama": "quantize_file(base, out, FTYPE, imatrix_path=imatrix, threads=T)",
                     "cold": "assemble_file(base, out, FTYPE, imatrix_path=imatrix, threads=T, cache=QuantizedCache())",
                     "warm": "the same call again with that cache", "cli": portable(cli_argv)},
        "structural_differences": [
            "llama, cold and warm run in this process with the model file already in the page cache; the CLI is "
            "a child process timed end to end (start, load, quantize, write)",
            "assembly runs llama_model_quantize's dry run first (types, no quantizing), then quantizes with "
            "ggml_quantize_chunk on Python threads (one per core, 256 rows a job); llama_model_quantize "
            "uses its own worker threads per tensor",
        ],
    }
    write_json(OUT / "assemble.json", result)
    s = result["seconds"]
    md = [f"# {result['title']}", "", f"{result['date']}, {args.threads} threads, {REPETITIONS} repetitions; "
          "every assembled file byte-identical to llama_model_quantize's.", "",
          "| side | median s | min | max |", "|---|---:|---:|---:|"]
    md += [f"| {k} | {v['median']} | {v['min']} | {v['max']} |" for k, v in s.items()]
    md += ["", f"llama_model_quantize / assembly: {result['ratios']['llama_over_cold']} (nothing cached), "
               f"{result['ratios']['llama_over_warm']} (the run already holds the pairs); llama-quantize CLI / "
               f"assembly: {result['ratios']['cli_over_cold']}.", "",
           "Commands:", *[f"- {k}: `{v}`" for k, v in result["commands"].items()], "",
           "What still differs:", *[f"- {d}" for d in result["structural_differences"]], ""]
    write_text(OUT / "assemble.md", "\n".join(md))


if __name__ == "__main__":
    main()
