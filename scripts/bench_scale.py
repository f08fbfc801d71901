"""Benchmark: how squeeze's cost grows from 100M to 1B parameters, stage by stage, and what the
estimate predicted for each stage before the run.

The auto recipe's work (recipes/gemma3-270m-auto.yaml: convert, imatrix, the sensitivity map,
prune or bits, three budgeted variants with one refinement round, scoring) runs on three Hugging
Face checkpoints, each converted by squeeze's own convert stage:

  llama-thin   1.3e8 parameters, 32 thin layers, random weights (scripts/scale_models.py)
  gemma3-270m  2.7e8, Gemma 3 270M's real weights rebuilt as a HF folder (tests/real_checkpoint.py)
  gemma3-1b    1.0e9, Gemma 3 1B's shapes, random weights (scripts/scale_models.py)
  llama-wide   1.3e9, 24 layers of 2048, random weights: a shape the estimate was not tuned on

The work per size is the same: calibration 20 x 512 tokens of groups_merged, scoring 10 x 512
tokens of wikitext-2 (the auto recipe scores 20; halved so that the 1B run fits in about an hour
on 2 cores). Costs of random-weight models are real; their quality numbers mean nothing and are
not reported.

For each size: the estimate (the library call behind `squeeze plan RECIPE --estimate`, at this
machine's rates) is made for a fresh results folder first; then `python -m pipeline run RECIPE`
runs as a child process. Per stage it records wall seconds (the runner's own, manifest.json), peak
RSS (the highest of its steps' high-water marks, which the runner records per step), the
prediction and seconds per billion parameters; and the 1B figure per parameter against the 270M
one (linear scaling: ratio 1.0).

Writes results/bench/scale.json and scale.md after every size (a partial run leaves the sizes it
measured; rows are kept from an earlier file only with --resume and only when that same commit wrote it,
so every row is of one commit; each row has its own date and load). Run it on a quiet
machine, nothing else heavy beside it.
Usage: python scripts/bench_scale.py [--sizes llama-thin,gemma3-270m,gemma3-1b,llama-wide] [--keep] [--resume]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench_common import (MEMORY_TARGET_TEXT, OUT, commit, log, memory_error, portable, run_child,
                          uncommitted_changes, verdict, write_json, write_text)
from bench_estimate import compare, load_average, pct
from scale_models import scale_model

from pipeline.cost.rates import cpu_name, cpu_seconds, machine_rates, other_cpus
from pipeline.cost.run_estimate import estimate_run
from pipeline.engine.backend import engine_versions
from pipeline.formats.gguf_index import read_index
from pipeline.stages.registry import build_steps, open_run
from tests.real_checkpoint import example_hf_folder

SIZES = {"llama-thin": lambda: scale_model("llama-thin"), "gemma3-270m": example_hf_folder,
         "gemma3-1b": lambda: scale_model("gemma3-1b"), "llama-wide": lambda: scale_model("llama-wide")}
REFERENCE = "gemma3-270m"  # seconds per parameter are compared with this size's
LINEAR_TARGET = 1.25  # issue 18: each stage's seconds per parameter at 1B <= 1.25 x the 270M figure
CALIBRATION_CHUNKS, SCORE_CHUNKS = 20, 10


def recipe(source: Path, name: str) -> dict:
    """The auto recipe's work on `source` (see recipes/gemma3-270m-auto.yaml for why each setting)."""
    return {
        "version": 1, "description": f"scaling benchmark: the auto recipe's work on {name}",
        "model": {"source": str(source), "base_type": "F16"},
        "calibration": {"datasets": ["groups_merged"], "ctx": 512, "chunks": CALIBRATION_CHUNKS},
        "select": {"target_bpw": 5.5, "refine_rounds": 1},
        "variants": {"auto-5.5bpw": {"ftype": "Q3_K_M"},
                     "auto-4.8bpw": {"ftype": "Q2_K", "target_bpw": 4.8},
                     "auto-5.5bpw-prune-or-bits": {"ftype": "Q3_K_M", "prune": "auto"}},
        "score": {"dataset": "wikitext-2", "ctx": 512, "chunks": SCORE_CHUNKS},
        "report": {"reference": "auto-5.5bpw", "title": f"scaling benchmark, {name}"},
    }


def parameters(results: Path, manifest: dict) -> int:
    """Parameters of the converted base, as llama.cpp counts them (every tensor's elements)."""
    convert = next(rec for rec in manifest["steps"].values() if rec["stage"] == "convert")
    base = next(results / rel for rel in convert["outputs"] if rel.endswith(".gguf"))
    return sum(math.prod(t.shape) for t in read_index(base).values())


def predict(name: str, folder: Path):
    """(source folder, recipe path, results folder, the estimate for that fresh folder, rates) for size `name`."""
    source = SIZES[name]()
    folder.mkdir(parents=True, exist_ok=True)
    recipe_path, results = folder / f"scale-{name}.yaml", folder / "results"
    recipe_path.write_text(yaml.safe_dump(recipe(source, name), sort_keys=False))
    ctx = open_run(str(recipe_path), results)
    rates = machine_rates(ctx.threads, echo=log)
    return source, recipe_path, results, estimate_run(ctx, build_steps(ctx), rates), rates


def _by_stage(costs) -> dict[str, float]:
    out: dict[str, float] = {}
    for c in costs:
        out[c.stage] = out.get(c.stage, 0.0) + c.seconds
    return out


def measure(name: str, tmp: Path) -> dict:
    source, recipe_path, results, estimate, rates = predict(name, tmp / name)
    argv = [sys.executable, "-m", "pipeline", "run", str(recipe_path), "--results", str(results)]
    load_before, busy_before = load_average(), cpu_seconds()
    log(f"{name}: predicted {estimate.seconds:.0f} s; running {subprocess.list2cmdline(argv)}")
    wall, rss, _ = run_child(argv, tmp / name / "run.log")
    load_after, busy_after = load_average(), cpu_seconds()
    other = (round(other_cpus(busy_after[0] - busy_before[0], busy_after[1] - busy_before[1], wall), 2)
             if busy_before and busy_after else None)
    manifest = json.loads((results / "manifest.json").read_text())
    stages, _, _ = compare(estimate.costs, manifest, results)
    for stage, s in stages.items():
        s["peak_rss_bytes"] = max((rec.get("peak_rss_bytes", 0) for rec in manifest["steps"].values()
                                   if rec["stage"] == stage), default=0)
    n_params = parameters(results, manifest)
    for s in stages.values():
        s["s_per_billion_params"] = round(s["measured_s"] / (n_params / 1e9), 1)
    steps_s = sum(rec["seconds"] for rec in manifest["steps"].values())
    rss = max([rss] + [s["peak_rss_bytes"] for s in stages.values()])
    log(f"{name}: {n_params / 1e9:.3f}e9 parameters, {steps_s:.0f} s in steps (predicted {estimate.seconds:.0f} s), "
        f"peak RSS {rss / 2**30:.2f} GiB")
    return {"model": name, "source": portable(source), "parameters": n_params,
            "threads": rates.key.get("threads"), "measured_s": round(steps_s, 1), "wall_s": round(wall, 1),
            "predicted_s": round(estimate.seconds, 1), "time_error_pct": pct(estimate.seconds, steps_s),
            "peak_rss_bytes": rss, "predicted_peak_memory_bytes": estimate.peak_memory,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average": {"before": load_before, "after": load_after},
            "other_cpus": other,  # /proc/stat busy time beside the run, per wall second, over this row
            "command": subprocess.list2cmdline(["squeeze", "run", f"scale-{name}.yaml"]),
            "predicted_when": "before the run", "stages": stages}


def verdicts(rows: dict) -> dict:
    """The record's targets and whether each row meets them (peak memory; seconds per parameter)."""
    per_row = {}
    for name, row in rows.items():
        error, met = memory_error(row["predicted_peak_memory_bytes"], row["peak_rss_bytes"])
        row["memory_error_pct"] = round(100 * error, 1)
        per_row[name] = {"memory": verdict(met)}
    for name, ratios in scaling(rows).items():
        worst = max((v for k, v in ratios.items() if v is not None and k != "total"), default=None)
        per_row.setdefault(name, {})["linear"] = verdict(worst is not None and worst <= LINEAR_TARGET)
    met = all(v == "met" for r in per_row.values() for v in r.values())
    return {"target": f"{MEMORY_TARGET_TEXT}, at every size; each stage's seconds per parameter at most "
                      f"{LINEAR_TARGET} x the {REFERENCE} figure",
            "verdicts": per_row, "verdict": verdict(met and bool(rows))}


def scaling(rows: dict) -> dict:
    """Per stage, seconds per parameter at each size over the reference size's."""
    ref = rows.get(REFERENCE)
    if not ref:
        return {}
    out = {}
    for name, row in rows.items():
        if name == REFERENCE:
            continue
        out[name] = {stage: (round(s["s_per_billion_params"] / ref["stages"][stage]["s_per_billion_params"], 2)
                             if ref["stages"].get(stage, {}).get("s_per_billion_params") else None)
                     for stage, s in row["stages"].items()}
        out[name]["total"] = round((row["measured_s"] / row["parameters"]) / (ref["measured_s"] / ref["parameters"]), 2)
    return out


def markdown(r: dict) -> str:
    md = [f"# {r['title']}", "", f"{r['date']}, {r['machine']}.", "", r["what"], "",
          "| model | parameters | stage | predicted s | measured s | error % | s per 1e9 params | peak RSS MiB |",
          "|---|---:|---|---:|---:|---:|---:|---:|"]
    for name, row in r["rows"].items():
        for stage, s in row["stages"].items():
            md.append(f"| {name} | {row['parameters'] / 1e9:.3f}e9 | {stage} | {s['predicted_s']} | {s['measured_s']} | "
                      f"{s['time_error_pct'] if s['time_error_pct'] is not None else '-'} | "
                      f"{s['s_per_billion_params']} | {s['peak_rss_bytes'] / 2**20:.0f} |")
        md.append(f"| {name} | | **total** | {row['predicted_s']} | {row['measured_s']} | {row['time_error_pct']} | "
                  f"{row['measured_s'] / (row['parameters'] / 1e9):.1f} | {row['peak_rss_bytes'] / 2**20:.0f} |")
    if r["scaling"]:
        md += ["", f"## Seconds per parameter against {REFERENCE} (1.0: linear; target at 1B <= {LINEAR_TARGET})", ""]
        for name, ratios in r["scaling"].items():
            md.append(f"- {name}: " + ", ".join(f"{k} {v if v is not None else '-'}" for k, v in ratios.items()))
    md += ["", "## Peak memory", "", "| model | predicted MiB | peak RSS MiB | error % | verdict |", "|---|---:|---:|---:|---|"]
    md += [f"| {name} | {row['predicted_peak_memory_bytes'] / 2**20:.0f} | {row['peak_rss_bytes'] / 2**20:.0f} | "
           f"{row['memory_error_pct']:+.1f} | {r['verdicts'][name]['memory']} |" for name, row in r["rows"].items()]
    md += ["", f"Target: {r['target']}. Verdict: **{r['verdict']}**.", ""]
    md += ["", "Predicted: " + "; ".join(f"{name} {row['predicted_when']}" for name, row in r["rows"].items()) + "."]
    md += ["", "Costs are real for every size; the random-weight models' quality numbers mean nothing and are "
               "not reported.", ""]
    return "\n".join(md)


def resumed_rows(path: Path) -> dict:
    """The rows of the record at `path`, when it was written by the checked-out commit with no
    change beside it, and the tree is clean now; otherwise the benchmark stops, saying why."""
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    here = commit()
    if old.get("commit") != here or old.get("uncommitted_changes") or uncommitted_changes():
        sys.exit(f"--resume: {path} was written by {old.get('commit')} (uncommitted changes: "
                 f"{old.get('uncommitted_changes')}); this checkout is {here} (uncommitted changes: "
                 f"{uncommitted_changes()}); rows are kept only from this same commit on a clean tree")
    log(f"--resume: keeping {', '.join(old['rows'])} from {path.name} ({here})")
    return old["rows"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=",".join(SIZES), help="comma-separated, from: " + ", ".join(SIZES))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--keep", action="store_true", help="keep the temporary results folders")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows of the existing record when this same commit wrote it on a clean tree, "
                         "and run the other sizes (the four sizes take longer than one sitting)")
    args = ap.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        sys.exit(f"--sizes: unknown {', '.join(unknown)}; one of {', '.join(SIZES)}")
    out_json = args.out / "scale.json"
    # Every row of a record comes from one commit, each predicted before its run by that commit's
    # code: rows are never predicted again after a run, and carried over from an earlier file only
    # with --resume, when that file was written by this very commit on a clean tree.
    rows = resumed_rows(out_json) if args.resume else {}
    sizes = [s for s in sizes if s not in rows]
    tmp = Path(tempfile.mkdtemp(prefix="squeeze-scale-"))
    try:
        for name in sizes:
            rows[name] = measure(name, tmp)
            rows = {k: rows[k] for k in SIZES if k in rows}
            result = {
                "benchmark": "scale",
                "title": "The auto recipe's work at each size: measured and predicted seconds, peak RSS, per stage",
                "what": f"convert, imatrix ({CALIBRATION_CHUNKS} x 512 tokens), sensitivity, prune or bits, three "
                        f"budgeted variants (one refinement round), scoring ({SCORE_CHUNKS} x 512 tokens of wikitext-2); "
                        "every row predicted by the estimate for a fresh folder before its run, on this record's commit.",
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "machine": f"{cpu_name()}, {platform.machine()}, {os.cpu_count()} cores, Python "
                           f"{platform.python_version()}",
                "versions": engine_versions(),
                "rows": rows,
                "scaling": scaling(rows),
                "linear_target": LINEAR_TARGET,
                **verdicts(rows),
            }
            write_json(out_json, result, threads=next(iter(rows.values()))["threads"])
            write_text(args.out / "scale.md", markdown(result))
            if not args.keep:
                shutil.rmtree(tmp / name, ignore_errors=True)
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
