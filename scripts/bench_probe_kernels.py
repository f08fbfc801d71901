"""Benchmark: does an in-memory probe measure what the file it stands for measures, and which of
llama.cpp's CPU kernels does that depend on?

    flock /tmp/squeeze-heavy.lock .venv/bin/python scripts/bench_probe_kernels.py

A probe (pipeline.choose.memory_probe) retypes the base's tensors in place, so ggml multiplies
with its plain quantized kernels. A file loaded by llama.cpp's CPU backend is, by default,
repacked into interleaved layouts with kernels of their own (the tools' --no-repack turns that
off); those round differently. On Gemma 3 270M's dithered base (the base quality claims are made
on), for Q4_K_M and Q3_K_M, each with llama.cpp's rounding and with `rounding: gptq`, this
measures the KLD against the base on the probes' calibration chunks (2 x 512 tokens of
groups_merged) three ways: the probe; the file with repacking off; the file as llama.cpp loads it
by default. The second moments gptq rounds with come from 8 x 512 tokens of the same text, so
gptq's own figures are in-sample here; what this record judges is the probe against the file.

Target: the probe within 1 % of the file scored with the same kernels (repacking off), for every
row. The repacking effect is reported with its sign, not judged.

Writes results/bench/probe-kernels.json and probe-kernels.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (OUT, WORK, dataset, dithered_base, log, moments, provenance, verdict,  # noqa: E402
                          write_json, write_text)

from pipeline.choose.file_probes import KLDProbe  # noqa: E402
from pipeline.choose.gptq_rounding import GptqRounder  # noqa: E402
from pipeline.choose.memory_probe import PROBE_CHUNKS, MemoryProbe  # noqa: E402
from pipeline.engine.assemble import assemble_file  # noqa: E402
from pipeline.engine.quantized_tensors import file_identity  # noqa: E402
from pipeline.formats.gguf_index import read_index  # noqa: E402
from pipeline.formats.moments_file import read_moments  # noqa: E402
from pipeline.fsutil import atomic_path, read_text  # noqa: E402

THREADS = 2
CTX, MOMENT_CHUNKS = 512, 8
FTYPES = ("Q4_K_M", "Q3_K_M")
TOLERANCE = 0.01


def main() -> None:
    base = dithered_base()
    moments_path = moments(base.path, MOMENT_CHUNKS, CTX, THREADS)
    text = read_text(dataset("groups_merged"))
    files = WORK / "probe-kernels"
    files.mkdir(parents=True, exist_ok=True)
    plain = KLDProbe(base.path, text, CTX, PROBE_CHUNKS, THREADS, repack=False)
    repacked = KLDProbe(base.path, text, CTX, PROBE_CHUNKS, THREADS)
    rows = []
    for ftype in FTYPES:
        for rounding in ("llama.cpp", "gptq"):
            rounder = (GptqRounder(read_moments(moments_path), file_identity(moments_path))
                       if rounding == "gptq" else None)
            path = files / f"{ftype}-{rounding}.gguf"
            start = time.monotonic()
            with atomic_path(path) as tmp:
                assemble_file(base.path, tmp, ftype, imatrix_path=base.imatrix, rounder=rounder, threads=THREADS)
            made_s = time.monotonic() - start
            types = {n: e.type.name for n, e in read_index(path).items() if e.type.name not in ("F32", "F16")}
            with MemoryProbe(base.path, text, CTX, PROBE_CHUNKS, THREADS, imatrix_path=base.imatrix,
                             rounder=rounder) as probe:
                in_memory = probe.kld(types)
            no_repack, default = plain.kld(path), repacked.kld(path)
            error = in_memory / no_repack - 1
            rows.append({"ftype": ftype, "rounding": rounding, "file_bytes": path.stat().st_size,
                         "assemble_s": round(made_s, 1), "probe_kld": in_memory, "file_kld_no_repack": no_repack,
                         "file_kld_repacked": default, "probe_error_pct": round(100 * error, 2),
                         "repacking_effect_pct": round(100 * (default / no_repack - 1), 2),
                         "verdict": verdict(abs(error) <= TOLERANCE)})
            log(f"{ftype} {rounding}: probe {in_memory:.5f}, file {no_repack:.5f} without repacking, "
                f"{default:.5f} repacked")
            path.unlink()
    result = {
        **provenance(THREADS),
        "benchmark": "probe-kernels",
        "title": "In-memory probes against the files they stand for, with and without llama.cpp's repacked CPU kernels",
        "what": f"Gemma 3 270M dithered base; KLD against the base on {PROBE_CHUNKS} x {CTX} tokens of groups_merged "
                f"(the probes' calibration chunks); gptq's second moments from {MOMENT_CHUNKS} x {CTX} tokens of the "
                "same text (in-sample for gptq's own figures; the record judges the probe against the file)",
        "commands": ["python scripts/bench_probe_kernels.py"],
        "rows": rows,
        "target": f"the probe within {TOLERANCE:.0%} of the file scored with the same kernels (repacking off), "
                  "every row; the repacking effect is reported, not judged",
        "verdict": verdict(all(r["verdict"] == "met" for r in rows)),
    }
    write_json(OUT / "probe-kernels.json", result)
    write_text(OUT / "probe-kernels.md", markdown(result))


def markdown(r: dict) -> str:
    md = [f"# {r['title']}", "", f"{r['date']}, {r['machine']}, {r['threads']} threads, commit {r['commit']}.", "",
          r["what"] + ".", "",
          "| ftype | rounding | probe KLD | file, no repacking | file, repacked (default) | probe error % | "
          "repacking effect % | verdict |",
          "|---|---|---:|---:|---:|---:|---:|---|"]
    md += [f"| {x['ftype']} | {x['rounding']} | {x['probe_kld']:.5f} | {x['file_kld_no_repack']:.5f} | "
           f"{x['file_kld_repacked']:.5f} | {x['probe_error_pct']:+.2f} | {x['repacking_effect_pct']:+.2f} | "
           f"{x['verdict']} |" for x in r["rows"]]
    md += ["", f"Target: {r['target']}. Verdict: **{r['verdict']}**.", ""]
    return "\n".join(md)


if __name__ == "__main__":
    main()
