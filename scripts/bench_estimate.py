"""Benchmark: what `squeeze plan --estimate` predicts for a fresh run against the run itself.

The recipe (default recipes/gemma3-270m-pruned.yaml) is estimated for a results folder that does
not exist yet, with the library code behind `squeeze plan RECIPE --results TMP --estimate`
(pipeline.cost.run_estimate.estimate_run, at this machine's cached or newly probed rates); then
`python -m pipeline run RECIPE --results TMP` runs it into that folder as a child process, timed
end to end. Per stage and per step: predicted seconds against the runner's own seconds
(manifest.json), predicted bytes against the sizes of the files written; the totals, the files
over 1 MiB one by one, and predicted peak memory against the run's peak RSS.

Writes results/bench/estimate.json and estimate.md (`--out DIR`, `--name NAME` elsewhere). The
temporary results folder is removed afterwards unless `--keep`. Run it on a quiet machine: the
estimate assumes one. `--runs N` runs the recipe N times, each into a fresh folder, and reports
each stage's median with its min and max (the per-step table is the first run's).
Usage: python scripts/bench_estimate.py [--recipe PATH] [--out DIR] [--name estimate] [--runs N] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import (MEMORY_TARGET_TEXT, OUT, ROOT, log, memory_error, provenance, run_child, verdict,
                          write_json, write_text)

from pipeline.cost.rates import cached_rates, cpu_name, machine_rates
from pipeline.cost.run_estimate import estimate_run, format_estimate
from pipeline.engine.backend import engine_versions
from pipeline.stages.registry import build_steps, open_run

DEFAULT_RECIPE = "recipes/gemma3-270m-pruned.yaml"
LARGE_FILE = 1 << 20  # files above this are compared one by one
TIME_TARGET = 0.15  # the estimate's total time against the measured steps' (memory: bench_common)
RERUN_TARGET_S = 5


def load_average() -> tuple[float, float, float]:
    return tuple(round(x, 2) for x in os.getloadavg())


def pct(predicted: float, measured: float) -> float | None:
    """Prediction error in percent of the measured value (positive: predicted too much)."""
    return round(100 * (predicted / measured - 1), 1) if measured else None


def compare(costs, manifest: dict, folder: Path) -> tuple[dict, list, dict]:
    """(per stage, per step, large files): predicted against measured."""
    records = manifest["steps"]
    stages: dict[str, dict] = {}
    steps = []
    for c in costs:
        rec = records.get(c.key)
        measured_s = rec["seconds"] if rec else None
        written = sum(o["size"] for o in rec["outputs"].values()) if rec else None
        steps.append({"key": c.key, "stage": c.stage, "predicted_s": round(c.seconds, 2), "measured_s": measured_s,
                      "predicted_bytes": c.bytes_written, "written_bytes": written,
                      "predicted_memory_bytes": c.memory_bytes,
                      "measured_peak_rss_bytes": rec.get("peak_rss_bytes") if rec else None})
        s = stages.setdefault(c.stage, {"steps": 0, "predicted_s": 0.0, "measured_s": 0.0,
                                        "predicted_bytes": 0, "written_bytes": 0})
        s["steps"] += 1
        s["predicted_s"] += c.seconds
        s["predicted_bytes"] += c.bytes_written
        s["measured_s"] += measured_s or 0.0
        s["written_bytes"] += written or 0
    for s in stages.values():
        s["time_error_pct"] = pct(s["predicted_s"], s["measured_s"])
        s["predicted_s"], s["measured_s"] = round(s["predicted_s"], 1), round(s["measured_s"], 1)
        s["bytes_error_pct"] = pct(s["predicted_bytes"], s["written_bytes"])
    sizes = {rel: o["size"] for rec in records.values() for rel, o in rec["outputs"].items()}
    large = {}
    for c in costs:
        for path, predicted in c.writes.items():
            rel = str(Path(path).relative_to(folder))
            if predicted > LARGE_FILE and rel in sizes:
                large[rel] = {"predicted": predicted, "written": sizes[rel],
                              "error_pct": round(100 * (predicted / sizes[rel] - 1), 3)}
    return stages, steps, large


def cell(value) -> str:
    """A table cell: '-' where nothing was measured (a step of 0.0 s has no error in percent)."""
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def _mib(value) -> str:
    return "-" if not value else f"{value / 2**20:,.0f}"


def spread(s: dict) -> str:
    return f"{s['min_s']}-{s['max_s']}" if "min_s" in s else "-"


def medians(runs: list[dict]) -> tuple[dict, dict]:
    """(per stage, total): the median measured seconds over the runs, with min and max."""
    def summary(values: list[float]) -> dict:
        return {"median_s": round(statistics.median(values), 1), "min_s": round(min(values), 1),
                "max_s": round(max(values), 1)}
    stages = {name: summary([r["stages"][name] for r in runs]) for name in runs[0]["stages"]}
    return stages, summary([r["steps_s"] for r in runs])


def markdown(r: dict) -> str:
    t, la = r["total"], r["load_average"]
    md = [f"# {r['title']}", "",
          f"{r['date']}, {r['machine']}. Load average (1/5/15 min) {la['before']} before the estimate, "
          f"{la['before_run']} before the run, {la['after']} after it.", "",
          f"- predicted: `{r['commands']['predicted']}` (the library call `{r['commands']['predicted_call']}`), "
          f"rates {r['rates_source']}",
          f"- measured: `{r['commands']['measured']}`, {t['measured_wall_s']:.0f} s wall, "
          f"{t['measured_steps_s']:.0f} s in the steps", "",
          *([f"Measured seconds are medians of {len(r['runs'])} runs, each into a fresh results folder, "
             "with the min-max range.", ""] if len(r["runs"]) > 1 else []),
          "| stage | steps | predicted s | measured s | min-max s | time error % | predicted bytes | written bytes | "
          "bytes error % |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in r["stages"].items():
        md.append(f"| {name} | {s['steps']} | {s['predicted_s']} | {s['measured_s']} | {spread(s)} | "
                  f"{cell(s['time_error_pct'])} | {cell(s['predicted_bytes'])} | {cell(s['written_bytes'])} | "
                  f"{cell(s['bytes_error_pct'])} |")
    md.append(f"| **total** | {len(r['steps'])} | {t['predicted_s']} | {t['measured_steps_s']} | {spread(t)} | "
              f"{cell(t['time_error_pct'])} | {cell(t['predicted_folder_bytes'])} | {cell(t['written_bytes'])} | "
              f"{cell(t['bytes_error_pct'])} |")
    md += ["", f"Peak memory: predicted {t['predicted_peak_memory_bytes'] / 2**20:.0f} MiB, the run's peak RSS "
               f"{t['measured_peak_rss_bytes'] / 2**20:.0f} MiB ({r['memory_error_pct']:+.1f} %). A run into the "
               f"finished folder: {r['rerun_up_to_date_s']} s ({r['rerun_said']}).", "",
           f"Commit {r['commit']}; other work on the machine: {r['load']['other_cpus']} CPUs.", "",
           "| target | verdict |", "|---|---|",
           *[f"| {r['target'][k]} | {r['verdicts'][k]} |" for k in r["target"]], ""]
    if r["large_files"]:
        md += ["## Files over 1 MiB", "", "| file | predicted bytes | written bytes | error % |", "|---|---:|---:|---:|"]
        md += [f"| {rel} | {f['predicted']:,} | {f['written']:,} | {f['error_pct']} |"
               for rel, f in r["large_files"].items()]
        md.append("")
    md += ["## Steps", "", "| step | predicted s | measured s | predicted bytes | written bytes | predicted memory MiB "
           "| step's peak RSS MiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {s['key']} | {s['predicted_s']} | {cell(s['measured_s'])} | {cell(s['predicted_bytes'])} | "
           f"{cell(s['written_bytes'])} | {_mib(s.get('predicted_memory_bytes'))} | "
           f"{_mib(s.get('measured_peak_rss_bytes'))} |" for s in r["steps"]]
    md += ["", "## The estimate as `squeeze plan --estimate` printed it", "", "```", *r["estimate_printout"], "```"]
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"recipe to estimate and run (default {DEFAULT_RECIPE})")
    ap.add_argument("--out", type=Path, default=OUT, help="folder for NAME.json and NAME.md (default results/bench)")
    ap.add_argument("--name", default="estimate")
    ap.add_argument("--keep", action="store_true", help="keep the temporary results folder")
    ap.add_argument("--runs", type=int, default=1, help="runs of the recipe, each into a fresh folder (medians)")
    args = ap.parse_args()
    given = Path(args.recipe).resolve()
    if given.exists():  # named from elsewhere: as the repository root sees it
        args.recipe = str(given.relative_to(ROOT)) if given.is_relative_to(ROOT) else str(given)
    os.chdir(ROOT)  # the run starts where `make` starts it: relative recipe paths from the repository root
    load_before = load_average()

    tmp = Path(tempfile.mkdtemp(prefix="squeeze-estimate-"))
    results = tmp / "results"  # fresh: the estimate is for a folder holding nothing yet
    try:
        ctx = open_run(args.recipe, results)
        cached = cached_rates(ctx.threads) is not None
        log(f"estimating {args.recipe} ({'cached rates' if cached else 'probing this machine first'})")
        rates = machine_rates(ctx.threads, echo=log)
        estimate = estimate_run(ctx, build_steps(ctx), rates)
        printout = format_estimate(estimate)
        for line in printout:
            print(line)

        argv = [sys.executable, "-m", "pipeline", "run", args.recipe, "--results", str(results)]
        load_before_run = load_average()
        runs, peaks = [], []
        for i in range(args.runs):
            if i:
                shutil.rmtree(results)  # each run starts from nothing, as the estimate assumes
            log(f"running ({i + 1}/{args.runs}): {subprocess.list2cmdline(argv)}")
            wall, rss, output = run_child(argv, tmp / "run.log")
            load_after = load_average()
            log(f"ran in {wall:.0f} s, peak RSS {rss / 2**20:.0f} MiB, load {load_before_run[0]} -> {load_after[0]}")
            manifest = json.loads((results / "manifest.json").read_text())
            got = compare(estimate.costs, manifest, results)
            peaks.append(rss)
            if i == 0:
                stages, steps, large = got
                first = (wall, rss, output, manifest)
            runs.append({"wall_s": round(wall, 1), "peak_rss_bytes": rss, "load_after": load_after,
                         "steps_s": round(sum(s["measured_s"] or 0 for s in got[1]), 1),
                         "stages": {name: s["measured_s"] for name, s in got[0].items()}})
        wall, rss, output, manifest = first
        # a second run into the finished folder: every step is up to date (what a rerun of `make` costs)
        again_s, _, again_out = run_child(argv)
        log(f"run again into the same folder: {again_s:.1f} s ({again_out.strip().splitlines()[-1]})")
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    steps_s = sum(s["measured_s"] or 0 for s in steps)
    if len(runs) > 1:  # the stages' and the total's measured seconds become medians over the runs
        by_stage, total = medians(runs)
        for name, s in stages.items():
            s.update({"measured_s": by_stage[name]["median_s"], "min_s": by_stage[name]["min_s"],
                      "max_s": by_stage[name]["max_s"]})
            s["time_error_pct"] = pct(s["predicted_s"], s["measured_s"])
        steps_s = total["median_s"]
    written = sum(o["size"] for rec in manifest["steps"].values() for o in rec["outputs"].values())
    threads = rates.key.get("threads")
    result = {
        "benchmark": args.name,
        "title": f"squeeze plan --estimate against a measured run of {Path(args.recipe).name}",
        "what": "the estimate for a fresh results folder, then "
                + ("one `squeeze run` of the same recipe into it" if args.runs == 1 else
                   f"{args.runs} runs of the same recipe, each into a fresh folder (medians, min, max)"),
        "recipe": args.recipe,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{cpu_name()}, {platform.machine()}, {os.cpu_count()} cores, {threads} threads, "
                   f"Python {platform.python_version()}",
        "versions": engine_versions(),
        "commands": {"predicted": f"squeeze plan {args.recipe} --results {results} --estimate",
                     "predicted_call": "pipeline.cost.run_estimate.estimate_run(open_run(recipe, results), "
                                       "build_steps(ctx), machine_rates(ctx.threads))",
                     "measured": subprocess.list2cmdline(argv), "measured_argv": argv},
        "rates_source": "from the cache (measured earlier)" if cached else "probed by this benchmark",
        "rates": {k: v for k, v in rates.to_json().items() if k != "key"},
        "load_average": {"before": load_before, "before_run": load_before_run, "after": load_after,
                         "note": "os.getloadavg() (1, 5, 15 min); the run's own threads count in it"},
        "runs": runs,
        "total": {"predicted_s": round(estimate.seconds, 1), "measured_steps_s": round(steps_s, 1),
                  **({"min_s": min(r["steps_s"] for r in runs), "max_s": max(r["steps_s"] for r in runs)}
                     if len(runs) > 1 else {}),
                  "measured_wall_s": round(wall, 1), "time_error_pct": pct(estimate.seconds, steps_s),
                  "predicted_folder_bytes": estimate.folder_bytes, "written_bytes": written,
                  "bytes_error_pct": pct(estimate.folder_bytes, written),
                  "predicted_peak_memory_bytes": estimate.peak_memory, "measured_peak_rss_bytes": rss},
        "rerun_up_to_date_s": round(again_s, 2),
        "rerun_said": again_out.strip().splitlines()[-1],
        "stages": stages,
        "large_files": large,
        "steps": steps,
        "estimate_printout": printout,
        "run_output_tail": output.splitlines()[-5:],
    }
    t = result["total"]
    peak = max(peaks)
    t["measured_peak_rss_bytes"] = peak  # the largest over the runs
    memory_off, memory_met = memory_error(estimate.peak_memory, peak)
    result["target"] = {"time": f"total within ±{TIME_TARGET:.0%} of the measured steps",
                        "memory": MEMORY_TARGET_TEXT,
                        "rerun": f"a run into a finished folder in under {RERUN_TARGET_S} s"}
    met = {"time": abs(estimate.seconds / steps_s - 1) <= TIME_TARGET,
           "memory": memory_met,
           "rerun": again_s < RERUN_TARGET_S}
    result["memory_error_pct"] = round(100 * memory_off, 1)
    result["verdicts"] = {k: verdict(v) for k, v in met.items()}
    result["verdict"] = verdict(all(met.values()))
    result = {**provenance(threads), **result}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", result, threads=threads)
    write_text(args.out / f"{args.name}.md", markdown(result))
    t = result["total"]
    log(f"total: predicted {t['predicted_s']} s, measured {t['measured_steps_s']} s in steps "
        f"({t['time_error_pct']} %); memory {result['memory_error_pct']} %; verdicts {result['verdicts']}; "
        f"wrote {args.out / args.name}.json/.md")


if __name__ == "__main__":
    main()
