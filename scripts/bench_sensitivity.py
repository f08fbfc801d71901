"""Sensitivity map speed: squeeze's in-memory probes against the file-based way it replaced, on
the same Gemma 3 270M base (dithered, see FINDINGS.md), imatrix, text, chunks and thread count.

    flock /tmp/squeeze-heavy.lock .venv/bin/python scripts/bench_sensitivity.py [--chunks 2]
        [--ctx 512] [--threads N] [--repetitions 3]

The full map both ways: every layer removed, its attention and its MLP at the low type, the
embedding at the low type, each tensor kind at the low type in every layer (3 x 18 + 1 + 7 = 62
KLD probes), and per-tensor weight errors for every candidate type. In memory: the base loaded once, each probe's tensors overwritten in place,
measured, restored; weight errors from ggml's quantize in-process. From files (squeeze before
this change, pipeline.choose.file_probes): every probe writes a variant GGUF and loads it, and
the weight errors come from one whole-model quantization per candidate type. Both sides run as child processes,
alternately, through the harness in bench_common. The two maps' KLDs are compared unit by unit.

Also predicts the step for Gemma 3 12B on one H100 (pipeline.cost.run_estimate, from this
machine's measured rates and the GPU's spec rates). Writes results/bench/sensitivity.json/.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import OUT, ROOT, Harness, Side, calibration, dataset, log  # noqa: E402

TARGET_S = 180


def side_main(args) -> None:
    """Child process: the whole map one way, its KLDs and counts written to args.output."""
    from pipeline.choose.groups import CANDIDATE_TYPES, probe_types
    from pipeline.choose.sensitivity import probe_units, unit_key
    from pipeline.formats.model_info import read_model_info
    from pipeline.fsutil import read_text, write_json_atomic

    info = read_model_info(args.model)
    text = read_text(args.text)
    units = probe_units(info)
    start = time.perf_counter()
    if args.side == "memory":
        from pipeline.choose.memory_probe import MemoryProbe
        from pipeline.choose.sensitivity import run_sensitivity

        with MemoryProbe(args.model, text, args.ctx, args.chunks, args.threads, imatrix_path=args.imatrix) as probe:
            result = run_sensitivity(probe, info, args.imatrix, args.layers_csv)
        klds = {}
        for r in result.rows:
            klds.update({f"{r.layer}.removed": r.kld_removed, f"{r.layer}.attn": r.kld_attn_low,
                         f"{r.layer}.mlp": r.kld_mlp_low})
        if "token_embd" in result.group_kld:
            klds["token_embd"] = result.group_kld["token_embd"].kld
        n_errors = len(result.errors)
    else:
        from pipeline.choose.file_probes import KLDProbe, file_kld, file_tensor_errors

        with tempfile.TemporaryDirectory(dir=args.work) as work:
            probe = KLDProbe(args.model, text, args.ctx, args.chunks, args.threads)
            klds = {}
            for unit in units:
                removed = [unit[0]] if unit[1] == "removed" else []
                klds[unit_key(unit)] = file_kld(probe, args.model, args.imatrix, Path(work), args.threads,
                                                probe_types(info, unit), removed)
            n_errors = len(file_tensor_errors(args.model, args.imatrix, info, Path(work), CANDIDATE_TYPES,
                                              args.threads))
    write_json_atomic(args.output, {"side": args.side, "probes": len(units), "weight_errors": n_errors,
                                    "seconds_inside": round(time.perf_counter() - start, 2), "kld": klds})


def agreement(a: dict, b: dict) -> dict:
    """How closely the two maps agree, unit by unit (relative differences of the KLDs)."""
    import numpy as np

    from pipeline.choose.sensitivity import spearman

    keys = sorted(a)
    rel = np.array([abs(a[k] - b[k]) / b[k] for k in keys if b[k] > 0])
    worst = max(keys, key=lambda k: abs(a[k] - b[k]) / b[k] if b[k] > 0 else 0)
    return {"units": len(keys), "median_rel_diff": round(float(np.median(rel)), 6),
            "max_rel_diff": round(float(rel.max()), 6), "max_rel_diff_unit": worst,
            "within_1pct": int((rel <= 0.01).sum()),
            "spearman": round(spearman([a[k] for k in keys], [b[k] for k in keys]), 6)}


def gpu_prediction() -> dict:
    """The sensitivity step of recipes/gemma3-12b-pruned.yaml on one H100, as `squeeze plan
    --estimate --gpu H100` predicts it (the model's shape from its parameter count and vocabulary)."""
    from pipeline.cost.gpu_rates import gpu
    from pipeline.cost.rates import machine_rates
    from pipeline.cost.run_estimate import estimate_run
    from pipeline.stages.registry import build_steps, open_run

    os.chdir(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = open_run("recipes/gemma3-12b-pruned.yaml", Path(tmp) / "results")
        rates = machine_rates(ctx.threads, echo=log)
        params, vocab = 12_187_325_040, 262_144
        on_gpu = estimate_run(ctx, build_steps(ctx), rates, gpu("H100"), params, vocab)
        on_cpu = estimate_run(ctx, build_steps(ctx), rates, None, params, vocab)

    def step(e):
        c = next(c for c in e.costs if c.stage == "sensitivity")
        return {"seconds": round(c.seconds), "note": c.note}

    return {"model": "Gemma 3 12B (48 layers, 12.19B parameters, vocabulary 262,144)",
            "h100": step(on_gpu), "this_cpu": step(on_cpu),
            "method": "the sensitivity step's declared work (pipeline.stages.sensitivity._work): 3 x 48 + 1 + 7 = 152 probes, each a forward pass over "
                      "2 x 512 tokens at the GPU's spec FLOP rate (pipeline.cost.gpu_rates: 35 % of dense "
                      "FP16 peak, an assumption) plus the KLD over 262k logits for 511 scored tokens at this "
                      "machine's measured numpy rate; the base distribution once; every tensor quantized once "
                      "for its probe and once per candidate type for its weight error, at this machine's "
                      "measured ggml quantize rate (quantizing stays on the CPU). Predicted, not measured: "
                      "no GPU was lent to this task."}


STRUCTURAL_DIFFERENCES = [
    "Same work on both sides: the same KLD probes on the same 2 x 512 calibration tokens against the same base "
    "distribution, and weight errors for the same candidate types; the same imatrix, thread count and "
    "llama.cpp build.",
    "In memory, a quantized probe tensor takes its type in place in the loaded model's buffer; from files, "
    "llama.cpp loads a quantized file, where Q4_0 and Q4_K weights are repacked for the CPU's interleaved "
    "kernels. The KLDs agree to the figures below, not bit for bit.",
    "The embedding's weight errors are estimated from 1 row in 16 in memory (the rest are exact sums); the "
    "file side quantizes all 262k rows for each type.",
    "Each side starts its own Python interpreter and loads the model; the file side loads it once per probe and once more per type for the weight errors.",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=2, help="calibration chunks per probe (the stage's default)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--side", choices=["memory", "files"], help=argparse.SUPPRESS)
    for hidden in ("--model", "--text", "--imatrix", "--layers-csv", "--output", "--work"):
        ap.add_argument(hidden, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        side_main(args)
        return 0

    os.environ.setdefault("SQUEEZE_PROGRESS", "0")
    sys.path.insert(0, str(ROOT))
    from tests.example_model import example_base_dithered

    threads = args.threads or os.cpu_count() or 1
    model, text = example_base_dithered(), dataset("groups_merged")
    imatrix, layers_csv = calibration(model, threads=threads)
    harness = Harness("sensitivity", "Sensitivity map: in-memory probes vs files (squeeze before)", threads,
                      args.repetitions)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        outputs = {s: Path(tmp) / f"{s}.json" for s in ("memory", "files")}

        def side(name: str) -> list[str]:
            return [sys.executable, str(Path(__file__).resolve()), "--side", name, "--model", str(model),
                    "--text", str(text), "--imatrix", str(imatrix), "--layers-csv", str(layers_csv),
                    "--ctx", str(args.ctx), "--chunks", str(args.chunks), "--threads", str(threads),
                    "--output", str(outputs[name]), "--work", tmp]

        memory = Side("squeeze in memory", side("memory"),
                      "pipeline.choose.sensitivity.run_sensitivity(MemoryProbe(base, text, ctx, chunks, imatrix_path=...), "
                      "info, imatrix, layers_csv)")
        files = Side("squeeze from files", side("files"),
                     "pipeline.choose.file_probes.file_kld for each probe, then file_tensor_errors")
        comp = harness.compare(f"the full map: every probe on {args.chunks} x {args.ctx} tokens + weight errors",
                               memory, files)
        mem, fil = (json.loads(outputs[s].read_text()) for s in ("memory", "files"))
    agree = agreement(mem["kld"], fil["kld"])
    log(f"KLD agreement, in memory vs files: {agree}")
    median = comp.ratios()
    predicted = gpu_prediction()
    mem_median = sorted(comp.seconds(memory.name))[len(comp.seconds(memory.name)) // 2]
    harness.write(
        settings={"model": "Gemma 3 270M, F16 base dithered off its Q4_K_M grid (model.dither)",
                  "model_path": str(model), "imatrix": str(imatrix), "dataset": "groups_merged",
                  "ctx": args.ctx, "chunks": args.chunks},
        sizes_note=f"{mem['probes']} KLD probes and {mem['weight_errors']} (tensor, type) weight errors a run.",
        structural_differences=STRUCTURAL_DIFFERENCES,
        extra={"probes": mem["probes"], "weight_errors": {"memory": mem["weight_errors"], "files": fil["weight_errors"]},
               "kld_agreement": agree, "target_seconds": TARGET_S, "meets_target": mem_median <= TARGET_S,
               "ratio": median, "gemma3_12b_prediction": predicted,
               "kld": {"memory": mem["kld"], "files": fil["kld"]}},
        extra_md=[f"Target: the full map in ≤ {TARGET_S} s on 2 cores; median {mem_median:.0f} s "
                  f"({'met' if mem_median <= TARGET_S else 'NOT met'}).", "",
                  f"KLD agreement over {agree['units']} probes: median relative difference {agree['median_rel_diff']:.2%}, "
                  f"largest {agree['max_rel_diff']:.2%} ({agree['max_rel_diff_unit']}); {agree['within_1pct']} within 1 %; "
                  f"Spearman {agree['spearman']}.", "",
                  f"Gemma 3 12B, predicted: {predicted['h100']['seconds'] / 60:.0f} min on one H100, "
                  f"{predicted['this_cpu']['seconds'] / 3600:.1f} h on this CPU. {predicted['method']}"],
        out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
