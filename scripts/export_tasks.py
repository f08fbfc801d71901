"""Write the multiple-choice benchmarks squeeze reads from their original files (ARC JSONL, MMLU
CSVs, TruthfulQA mc_task.json) in llama.cpp's binary format, so `llama-perplexity
--multiple-choice -bf FILE --multiple-choice-tasks N` runs on exactly the tasks squeeze scores.

    .venv/bin/python scripts/export_tasks.py [OUT_FOLDER] [--benchmark arc-easy ...]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default=str(ROOT / "results" / "tasks"))
    ap.add_argument("--benchmark", action="append", choices=["arc-easy", "arc-challenge", "mmlu", "truthfulqa"])
    args = ap.parse_args()
    os.environ.setdefault("SQUEEZE_DATA", str(ROOT.parent / "shared" / "datasets"))
    from pipeline.formats.task_data import BENCHMARKS, read_choice_tasks, write_multiple_choice
    from pipeline.fsutil import atomic_path
    from pipeline.sources.datasets import resolve_dataset

    out = Path(args.out)
    for name in args.benchmark or ["arc-easy", "arc-challenge", "mmlu", "truthfulqa"]:
        tasks = read_choice_tasks(name, resolve_dataset(BENCHMARKS[name]))
        with atomic_path(out / f"{name}.bin") as tmp:
            write_multiple_choice(tasks, tmp)
        print(f"{out / f'{name}.bin'}: {len(tasks)} tasks")


if __name__ == "__main__":
    main()
