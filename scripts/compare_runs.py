"""Check that two results folders of the same recipe hold the same work: every variant GGUF has
the same tensors, byte for byte, and every score file the same numbers (speed files excluded:
tokens/s are timings). Used to show that a code change (the package layout of issue 9, say)
changed nothing a user gets.

    .venv/bin/python scripts/compare_runs.py BEFORE_RESULTS AFTER_RESULTS [--json results/bench/X.json]

Prints one line per variant and per score file, exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_common import write_json  # noqa: E402

from pipeline.formats.gguf_index import read_index  # noqa: E402


def tensor_digests(path: Path) -> dict[str, str]:
    """sha256 of each tensor's data, with its type and shape (metadata keys are not compared:
    they hold file paths)."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, e in read_index(path).items():
        h = hashlib.sha256(f"{e.type.name}{e.shape}".encode())
        h.update(memoryview(data[e.offset:e.offset + e.n_bytes]))
        out[name] = h.hexdigest()
    return out


def differing_values(a, b, path="") -> list[str]:
    """Keys whose values differ, numbers compared exactly (NaN equals NaN)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in differing_values(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differing_values(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [f"{path.lstrip('.')}: {a!r} != {b!r}"]


def compare(before: Path, after: Path) -> dict:
    result = {"before": str(before), "after": str(after), "variants": {}, "scores": {}}
    for gguf in sorted((before / "variants").glob("*.gguf")):
        other = after / "variants" / gguf.name
        if not other.exists():
            result["variants"][gguf.stem] = {"same": False, "why": "missing after"}
            continue
        a, b = tensor_digests(gguf), tensor_digests(other)
        diff = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
        result["variants"][gguf.stem] = {"same": not diff, "tensors": len(a), "differing_tensors": diff[:10]}
    for score in sorted((before / "scores").glob("*.json")):
        if score.name.endswith(".speed.json"):
            continue
        other = after / "scores" / score.name
        if not other.exists():
            result["scores"][score.name] = {"same": False, "why": "missing after"}
            continue
        diff = differing_values(json.loads(score.read_text()), json.loads(other.read_text()))
        result["scores"][score.name] = {"same": not diff, "differences": diff[:10]}
    result["same"] = all(v["same"] for group in ("variants", "scores") for v in result[group].values()) \
        and bool(result["variants"]) and bool(result["scores"])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--json", type=Path, help="also write the comparison here")
    args = ap.parse_args()
    result = compare(args.before, args.after)
    for name, v in result["variants"].items():
        print(f"variant {name}: {'same tensors' if v['same'] else 'DIFFERENT ' + str(v)}"
              + (f" ({v['tensors']} tensors)" if v.get("tensors") else ""))
    for name, v in result["scores"].items():
        print(f"scores/{name}: {'same numbers' if v['same'] else 'DIFFERENT ' + str(v)}")
    print("identical" if result["same"] else "the runs differ")
    if args.json:
        write_json(args.json, result)
    return 0 if result["same"] else 1


if __name__ == "__main__":
    sys.exit(main())
