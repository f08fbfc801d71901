"""The committed benchmark records (results/bench/) against the one list of the benchmarks that
write them (scripts/bench_all.py, what `make bench` runs): every file there has a script, every
record carries where and when it was made, its target and its verdict, and a record that does
not yet is named, with the reason, in the list of those awaiting a rerun. Nothing is run here."""

from __future__ import annotations

import fnmatch
import json
import subprocess
import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from bench_all import AWAITING_RERUN, BENCHES  # noqa: E402

BENCH = ROOT / "results" / "bench"
PROVENANCE = ("commit", "date", "machine", "threads", "load", "target", "verdict")


def _records() -> list[str]:
    return sorted(str(p.relative_to(BENCH)) for p in BENCH.rglob("*")
                  if p.is_file() and p.relative_to(BENCH).parts[0] != "work" and p.name != "README.md")


def test_every_file_in_results_bench_is_written_by_a_listed_benchmark():
    patterns = [w for b in BENCHES for w in b.writes]
    orphans = [f for f in _records() if f not in AWAITING_RERUN and not any(fnmatch.fnmatch(f, p) for p in patterns)]
    assert not orphans, f"no benchmark in scripts/bench_all.py writes {orphans}"
    for b in BENCHES:
        script = next(a for a in b.argv if a.startswith("scripts/"))
        assert (ROOT / script).is_file(), script


def test_every_record_carries_its_provenance_target_and_verdict_or_awaits_a_rerun():
    lacking = {}
    for name in _records():
        if not name.endswith(".json") or name in AWAITING_RERUN:
            continue
        record = json.loads((BENCH / name).read_text())
        missing = [k for k in PROVENANCE if k not in record]
        if missing or record.get("verdict") not in ("met", "missed"):
            lacking[name] = missing or ["verdict is met or missed"]
    assert not lacking, f"records without {lacking} (write them with bench_common.write_json, or list them in " \
                        "bench_all.AWAITING_RERUN with why)"


def test_the_awaiting_list_names_only_records_that_are_there_and_still_lack_something():
    for name, why in AWAITING_RERUN.items():
        assert (BENCH / name).is_file(), f"{name} is listed as awaiting a rerun but is not in results/bench/"
        assert why
        if name.endswith(".json"):
            record = json.loads((BENCH / name).read_text())
            assert any(k not in record for k in PROVENANCE), \
                f"{name} now carries its provenance: take it off bench_all.AWAITING_RERUN"


def test_the_list_command_names_every_benchmark():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_all.py"), "--list"], capture_output=True,
                         text=True, check=True).stdout
    for b in BENCHES:
        assert b.name in out
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_all.py"), "--only", "nosuch"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("Error: --only: unknown benchmark nosuch; one of imatrix")
