"""The benchmark harness is fair by construction: at least 3 runs a side, the sides alternating
which goes first, every run's command and load recorded, and the structural differences written
beside the numbers (scripts/bench_common.py; the benchmarks themselves are not run here). The
records name files relative to the repository or by what they are, never by this machine's paths."""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from bench_common import Harness, Side, portable, portable_text  # noqa: E402


def test_fewer_than_three_repetitions_is_refused():
    with pytest.raises(SystemExit, match="at least 3 repetitions"):
        Harness("x", "x", threads=2, repetitions=2)


def test_sides_alternate_and_everything_is_recorded(tmp_path):
    h = Harness("tiny", "Tiny comparison", threads=2, repetitions=4)
    sq = Side("squeeze", [sys.executable, "-c", "pass"], call="nothing()")
    cli = Side("llama-nothing", [sys.executable, "-c", "import time; time.sleep(0.05)"])
    h.compare("nothing", sq, cli, tokens=100)
    result = h.write(settings={"chunks": 1}, sizes_note="trivial", structural_differences=["one sleeps"], out=tmp_path)
    comp = result["comparisons"][0]
    # A B / B A / A B / B A: each side goes first in every other repetition
    assert comp["order"] == ["squeeze", "llama-nothing", "llama-nothing", "squeeze"] * 2
    assert [r["position"] for r in comp["runs"] if r["side"] == "squeeze"] == [0, 1, 0, 1]
    for name, side in (("squeeze", sq), ("llama-nothing", cli)):
        rec = comp["sides"][name]
        assert rec["command"] == portable(side.argv) and len(rec["seconds"]["runs"]) == 4
        assert rec["seconds"]["min"] <= rec["seconds"]["median"] <= rec["seconds"]["max"]
    assert comp["sides"]["squeeze"]["call"] == "nothing()"
    assert all(len(r["load_before"]) == 3 and len(r["load_after"]) == 3 for r in comp["runs"])
    assert result["threads"] == 2 and result["structural_differences"] == ["one sleeps"]
    on_disk = json.loads((tmp_path / "tiny.json").read_text())
    assert on_disk["comparisons"][0]["ratio"] == comp["ratio"]
    md = (tmp_path / "tiny.md").read_text()
    assert "## What still differs between the two sides" in md and "- one sleeps" in md
    assert sys.executable not in md and f"`{portable_text(sys.executable)} -c pass`" in md


def test_paths_in_a_record_are_relative_to_the_repository_or_named_by_what_they_are():
    cache = Path.home() / ".cache" / "squeeze"
    record = {"argv": [sys.executable, str(ROOT / "scripts" / "bench_score.py"), "--work",
                       str(ROOT / "results" / "bench" / "work"), "--model", str(cache / "test-models" / "m.gguf")],
              "line": f"cd {ROOT} && ls {Path(tempfile.gettempdir()) / 'x'} {ROOT}2/y", str(ROOT / "k"): 1.5}
    out = portable(record)
    assert out["argv"][1:] == ["scripts/bench_score.py", "--work", "results/bench/work", "--model",
                               "<cache>/squeeze/test-models/m.gguf"]
    assert out["argv"][0].startswith("<venv>/") or not sys.executable.startswith(sys.prefix)
    # A sibling folder is not the checkout; it keeps its own absolute path, or is named after the
    # known folder it lies in when the checkout itself lives there (a clean CI clone in /tmp).
    sibling = f"{ROOT}2/y"
    for folder, name in ((Path(tempfile.gettempdir()), "<tmp>"), (Path("/tmp"), "<tmp>"), (Path.home(), "~")):
        if ROOT.resolve().is_relative_to(folder.resolve()):
            sibling = f"{name}/{ROOT.resolve().relative_to(folder.resolve())}2/y"
            break
    assert out["line"] == f"cd . && ls <tmp>/x {sibling}"
    assert out["k"] == 1.5


# A path that starts at the root of one of the machines the records were made on (not a relative
# path that merely contains such a folder, like results/bench/work/).
MACHINE_PATH = re.compile(r"(?<![\w.>~-])/(?:work|root|home|tmp)/")


def test_committed_benchmark_records_hold_no_absolute_paths():
    bench = ROOT / "results" / "bench"
    found = []
    for path in sorted(bench.rglob("*")):
        parts = path.relative_to(bench).parts
        if not path.is_file() or parts[0] == "work" or path.suffix not in (".json", ".md", ".csv", ".txt"):
            continue  # work/ is the benchmarks' local scratch folder (git ignores it)
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if MACHINE_PATH.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {MACHINE_PATH.search(line).group(0)}...")
    assert not found, "absolute paths in committed records (scripts/bench_common.portable makes them " \
                      "relative):\n" + "\n".join(found[:20])
