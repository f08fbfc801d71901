"""The benchmark harness is fair by construction: at least 3 runs a side, the sides alternating
which goes first, every run's command and load recorded, and the structural differences written
beside the numbers (scripts/bench_common.py; the benchmarks themselves are not run here)."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from bench_common import Harness, Side  # noqa: E402


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
        assert rec["command"] == side.argv and len(rec["seconds"]["runs"]) == 4
        assert rec["seconds"]["min"] <= rec["seconds"]["median"] <= rec["seconds"]["max"]
    assert comp["sides"]["squeeze"]["call"] == "nothing()"
    assert all(len(r["load_before"]) == 3 and len(r["load_after"]) == 3 for r in comp["runs"])
    assert result["threads"] == 2 and result["structural_differences"] == ["one sleeps"]
    on_disk = json.loads((tmp_path / "tiny.json").read_text())
    assert on_disk["comparisons"][0]["ratio"] == comp["ratio"]
    md = (tmp_path / "tiny.md").read_text()
    assert "## What still differs between the two sides" in md and "- one sleeps" in md
