"""Regenerate every benchmark record in results/bench/, one benchmark at a time (two cores: never
two heavy jobs at once), each by the script that owns it. `make bench` runs this.

    python scripts/bench_all.py             # all that run on this machine, in the order below
    python scripts/bench_all.py --list      # what each writes, how long it takes, what it needs
    python scripts/bench_all.py --only targets,allocate

Every record a script writes carries the commit, date, machine, threads and the other work the
machine did meanwhile (bench_common.provenance), its target and a met/missed verdict. A record
that no longer holds those (made before they were required) is listed in AWAITING_RERUN with the
reason, until a run of its benchmark replaces it; tests/test_bench_records.py holds both lists to
the files that are there.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "bench"


@dataclass(frozen=True)
class Bench:
    name: str
    argv: tuple[str, ...]  # relative to the repository root; "python" is this interpreter
    writes: tuple[str, ...]  # file names (or glob patterns) under results/bench/
    minutes: int  # about, on a quiet 2-core machine
    needs: str = ""  # a machine this one is not: such a benchmark is listed, not run here


BENCHES = (
    Bench("imatrix", ("python", "scripts/bench_imatrix.py"), ("imatrix.json", "imatrix.md"), 12),
    Bench("score", ("python", "scripts/bench_score.py"), ("score.json", "score.md"), 20),
    Bench("sensitivity", ("python", "scripts/bench_sensitivity.py"), ("sensitivity.json", "sensitivity.md"), 45),
    Bench("sampled-errors", ("python", "scripts/bench_sampled_errors.py"),
          ("sampled-errors.json", "sampled-errors.md"), 15),
    Bench("prune", ("python", "scripts/bench_prune.py"), ("prune.json", "prune.md"), 30),
    Bench("allocate", ("python", "scripts/bench_allocate.py"), ("allocate.json", "allocate.md", "variants/*"), 60),
    Bench("targets", ("python", "scripts/bench_targets.py"), ("targets.json", "targets.md"), 25),
    Bench("rounding", ("python", "scripts/bench_rounding.py"), ("rounding.json", "rounding.md"), 40),
    Bench("probe-kernels", ("python", "scripts/bench_probe_kernels.py"), ("probe-kernels.json", "probe-kernels.md"), 10),
    Bench("card-method", ("python", "scripts/bench_card_method.py"), ("card-method.json", "card-method.md"), 25),
    Bench("convert", ("python", "scripts/bench_convert.py"), ("convert.json",), 15),
    Bench("default-recipe", ("python", "scripts/bench_estimate.py", "--recipe", "recipes/gemma3-270m-pruned.yaml",
                             "--name", "default-recipe", "--runs", "3"), ("default-recipe.json", "default-recipe.md"), 35),
    Bench("auto-recipe", ("python", "scripts/bench_estimate.py", "--recipe", "recipes/gemma3-270m-auto.yaml",
                          "--name", "auto-recipe", "--runs", "3"), ("auto-recipe.json", "auto-recipe.md"), 30),
    Bench("scale", ("python", "scripts/bench_scale.py"), ("scale.json", "scale.md"), 200),
    Bench("gpu", ("bash", "scripts/gpu_check.sh"), ("gpu.json",), 8,
          needs="a machine with an NVIDIA GPU (stage it here with `scripts/gpu_check.sh --pack`)"),
)

# Records made before every record had to carry its provenance, target and verdict, or by hand;
# each stays listed until its benchmark runs again and replaces it.
AWAITING_RERUN = {
    "cuda-build.json": "written by hand when the CUDA wheel was built; no script times `make setup GPU=cuda` yet",
    "estimate.json": "one run of the default recipe; default-recipe.json (3 runs) replaces it at its next run",
    "estimate.md": "the companion of estimate.json",
    "imatrix.json": "made before records carried their commit and load",
    "score.json": "made before records carried their commit and load",
    "sensitivity.json": "records 62 probes in one field and 55 in another; made before records carried their commit",
    "sampled-errors.json": "records no machine or threads",
    "prune.json": "made with 4 probe chunks (the stage now uses 2)",
    "card-method.json": "records no machine or threads",
    "convert.json": "made before records carried their commit and load",
    "default-recipe.json": "written by hand; bench_estimate.py --name default-recipe writes it now",
    "auto-recipe.json": "made before records carried their commit and targets",
}


def python_argv(bench: Bench) -> list[str]:
    return [sys.executable if a == "python" else a for a in bench.argv]


def listing() -> str:
    rows = []
    for b in BENCHES:
        where = f"needs {b.needs}" if b.needs else "here"
        rows.append(f"{b.name:16} ~{b.minutes:>3} min  {where:12.60}  {' '.join(b.argv)}  -> {', '.join(b.writes)}")
    total = sum(b.minutes for b in BENCHES if not b.needs)
    return "\n".join(rows + [f"in all about {total / 60:.1f} h on a quiet 2-core machine, one after another"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--list", action="store_true", help="list the benchmarks and what each writes")
    ap.add_argument("--only", default="", help="comma-separated names (see --list)")
    args = ap.parse_args(argv)
    if args.list:
        print(listing())
        return 0
    names = {b.name: b for b in BENCHES}
    wanted = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = [n for n in wanted if n not in names]
    if unknown:
        print(f"Error: --only: unknown benchmark {', '.join(unknown)}; one of {', '.join(names)}", file=sys.stderr)
        return 2
    chosen = [names[n] for n in wanted] if wanted else [b for b in BENCHES if not b.needs]
    failed = []
    for b in chosen:
        if b.needs and not wanted:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] bench {b.name}: {' '.join(b.argv)} (about {b.minutes} min)", flush=True)
        started = time.monotonic()
        done = subprocess.run(python_argv(b), cwd=ROOT)
        took = (time.monotonic() - started) / 60
        print(f"[{time.strftime('%H:%M:%S')}] bench {b.name}: exit {done.returncode} after {took:.1f} min", flush=True)
        if done.returncode != 0:
            failed.append(b.name)
    if failed:
        print(f"Error: bench_all: {', '.join(failed)} failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
