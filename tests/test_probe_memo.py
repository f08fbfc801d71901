"""Measure once, reuse everywhere: a probe measured by one step (the sensitivity map, a prune
search, a variant's refinement) is answered from the run's memo by every later one, keyed by
what it was measured on and by the change itself; a killed step resumes with what it had."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.choose.memory_probe import MemoryProbe, ProbeMemo, probe_key
from pipeline.engine.quantized_tensors import QuantizedCache, shared_cache
from pipeline.fsutil import read_text

CTX, CHUNKS = 256, 2
ATTN_3 = {"blk.3.attn_v.weight": "Q4_0", "blk.3.attn_output.weight": "Q4_0"}


def test_a_probe_key_names_the_change_not_how_it_was_asked():
    assert probe_key({"b.weight": "q4_k", "a.weight": "Q8_0"}, [5, 2]) == \
        probe_key({"a.weight": "Q8_0", "b.weight": "Q4_K"}, (2, 5, 5))
    assert probe_key(removed=[2]) != probe_key(removed=[3])
    assert probe_key({"a.weight": "Q4_0"}) != probe_key({"a.weight": "Q4_1"})


def test_the_memo_keeps_what_was_measured_on_each_input_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "probes.memo.jsonl"
    memo = ProbeMemo(path)
    memo.add("base-a", probe_key(removed=[1]), {"mean_kld": 0.5})
    memo.add("base-b", probe_key(removed=[1]), {"mean_kld": 0.75})
    with open(path, "a") as f:
        f.write('{"on": "base-a", "probe": "{\\"types')  # killed in the middle of a write
    again = ProbeMemo(path)
    assert again.get("base-a", probe_key(removed=[1])) == {"mean_kld": 0.5}
    assert again.get("base-b", probe_key(removed=[1])) == {"mean_kld": 0.75}
    assert again.get("base-a", probe_key(removed=[2])) is None
    assert again.count("base-a") == 1


@pytest.fixture(scope="module")
def imatrix(squeeze_imatrix) -> Path:
    return squeeze_imatrix[0]


def _probe(base, text, imatrix, memo):
    return MemoryProbe(base, text, CTX, CHUNKS, imatrix_path=imatrix, memo=memo)


@pytest.mark.slow
def test_a_later_step_reuses_the_probes_an_earlier_one_measured(base_f16, imatrix, calibration_sample, tmp_path):
    memo, text = tmp_path / "probes.memo.jsonl", read_text(calibration_sample)
    with _probe(base_f16, text, imatrix, memo) as first:  # e.g. variant A's refinement
        removed = first.kld(removed=[7])
        attn = first.kld(ATTN_3)
        assert (first.measured, first.reused) == (2, 0)
        assert first.kld(removed=[7]) == removed and first.measured == 2  # the same step asks again
    with _probe(base_f16, text, imatrix, memo) as second:  # variant B, a later step
        assert second.kld(ATTN_3) == attn
        assert second.kld(removed=[7]) == removed
        assert (second.measured, second.reused) == (0, 2)
        together = second.kld(ATTN_3, removed=[7])  # a change not measured before is measured
        assert second.measured == 1 and together > 0
    with _probe(base_f16, text, None, memo) as no_imatrix:  # other inputs: measured, not reused
        assert no_imatrix.identity() != second.identity()
        no_imatrix.kld(ATTN_3)
        assert (no_imatrix.measured, no_imatrix.reused) == (1, 0)
    rows = [json.loads(line) for line in memo.read_text().splitlines()]
    assert len(rows) == 4 and {r["on"] for r in rows} == {second.identity(), no_imatrix.identity()}


KILLED_STEP = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from pipeline.fsutil import read_text
    from pipeline.choose.memory_probe import MemoryProbe

    base, imatrix, text, memo, kill_after = sys.argv[1:6]
    probe = MemoryProbe(Path(base), read_text(Path(text)), 256, 2, imatrix_path=Path(imatrix), memo=Path(memo))
    for n, layer in enumerate([2, 5, 9], 1):
        probe.kld(removed=[layer])
        if n == int(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind, as a real kill
""")


@pytest.mark.slow
def test_a_killed_step_resumes_with_the_probes_it_had_measured(base_f16, imatrix, calibration_sample, tmp_path):
    memo, script = tmp_path / "probes.memo.jsonl", tmp_path / "killed.py"
    script.write_text(KILLED_STEP)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "SQUEEZE_PROGRESS": "0"}
    r = subprocess.run([sys.executable, str(script), str(base_f16), str(imatrix), str(calibration_sample), str(memo),
                        "2"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert len(memo.read_text().splitlines()) == 2
    with _probe(base_f16, read_text(calibration_sample), imatrix, memo) as probe:
        logged = probe.kld(removed=[2])
        probe.kld(removed=[5])
        probe.kld(removed=[9])
        assert (probe.measured, probe.reused) == (1, 2)  # only layer 9 was left to measure
        fresh = MemoryProbe(base_f16, read_text(calibration_sample), CTX, CHUNKS, imatrix_path=imatrix)
        try:  # what was logged before the kill is what an uninterrupted probe measures
            assert fresh.kld(removed=[2]) == pytest.approx(logged, rel=1e-12)
        finally:
            fresh.close()


def test_quantized_bytes_are_kept_least_recently_used_first_out():
    import numpy as np


    cache = QuantizedCache(limit=300)
    cache.put(("a", "Q4_0", "-"), np.zeros(100, np.uint8))
    cache.put(("b", "Q4_0", "-"), np.zeros(100, np.uint8))
    assert cache.get(("a", "Q4_0", "-")) is not None  # a is now the most recent
    cache.put(("c", "Q4_0", "-"), np.zeros(150, np.uint8))  # over the limit: b goes
    assert cache.get(("b", "Q4_0", "-")) is None and cache.get(("a", "Q4_0", "-")) is not None
    assert cache.bytes == 250
    cache.put(("huge", "Q4_0", "-"), np.zeros(400, np.uint8))  # larger than the cache: not kept
    assert cache.get(("huge", "Q4_0", "-")) is None and cache.bytes == 250


@pytest.mark.slow
def test_a_mix_applied_again_reuses_its_quantized_bytes_and_measures_the_same(base_f16, imatrix, calibration_sample):
    with _probe(base_f16, read_text(calibration_sample), imatrix, None) as probe:
        cache = shared_cache()
        first = probe.kld(ATTN_3)
        misses = cache.misses
        assert probe.kld(ATTN_3) == first  # measured again (no memo), from the same bytes
        assert cache.misses == misses and cache.hits >= len(ATTN_3)
