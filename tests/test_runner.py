"""The stage runner on small synthetic steps: what reruns and why, atomic outputs, the lock."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from pipeline.errors import SqueezeError
from pipeline.run.runner import Runner, Step


def copy_step(src: Path, dst: Path, params=None, versions=None, stage="quantize", fail=False) -> Step:
    def action(io):
        tmp = io.out(dst)
        tmp.write_text(src.read_text().upper())
        if fail:
            raise RuntimeError("interrupted")
    return Step(f"{stage} {dst.stem}", stage, params or {"x": 1}, [src], [dst], action,
                versions=versions or {"llama.cpp": "b1"})


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "in.txt").write_text("hello")
    return tmp_path


def run(folder, steps, **kw):
    lines = []
    counts = Runner(folder, echo=lines.append).run(steps, **kw)
    return counts, lines


def test_second_run_skips_and_says_up_to_date(folder):
    step = copy_step(folder / "in.txt", folder / "out.txt")
    assert run(folder, [step])[1][0] == "quantize out: run, no previous result"
    counts, lines = run(folder, [step])
    assert counts == {"ran": 0, "skipped": 1}
    assert lines == ["quantize out: up to date"]
    assert (folder / "out.txt").read_text() == "HELLO"


@pytest.mark.parametrize("change, reason", [
    (lambda f, s: copy_step(f / "in.txt", f / "out.txt", params={"x": 2}), "x changed"),
    (lambda f, s: copy_step(f / "in.txt", f / "out.txt", versions={"llama.cpp": "b2"}),
     "llama.cpp version changed (b1 -> b2)"),
    (lambda f, s: (f / "in.txt").write_text("changed") and s, "input in.txt changed"),
    (lambda f, s: (f / "out.txt").unlink() or s, "output out.txt is missing"),
    (lambda f, s: (f / "out.txt").write_text("tampered") and s, "output out.txt was modified"),
])
def test_rerun_names_the_reason(folder, change, reason):
    step = copy_step(folder / "in.txt", folder / "out.txt")
    run(folder, [step])
    os.utime(folder / "in.txt", ns=(1, 1))  # a new mtime alone must not count as a change
    assert run(folder, [step])[1] == ["quantize out: up to date"]
    step = change(folder, step)
    _, lines = run(folder, [step])
    assert lines[0] == f"quantize out: rerun, {reason}"


def test_force_and_from_redo_done_steps(folder):
    a = copy_step(folder / "in.txt", folder / "a.txt", stage="convert")
    b = copy_step(folder / "a.txt", folder / "b.txt", stage="score")
    run(folder, [a, b])
    assert run(folder, [a, b], force_stages={"score"})[1][:2] == ["convert a: up to date", "score b: rerun, forced"]
    lines = run(folder, [a, b], from_stage="convert", stage_order=("convert", "score"))[1]
    assert lines[0] == "convert a: rerun, forced"


def test_failed_step_leaves_no_output_and_no_record(folder):
    step = copy_step(folder / "in.txt", folder / "out.txt", fail=True)
    with pytest.raises(RuntimeError):
        run(folder, [step])
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "in.txt", "manifest.json"]
    assert Runner(folder).status([step])[0].state == "missing"


def test_status_marks_steps_downstream_of_a_stale_step(folder):
    a = copy_step(folder / "in.txt", folder / "a.txt", stage="convert")
    b = copy_step(folder / "a.txt", folder / "b.txt", stage="score")
    run(folder, [a, b])
    (folder / "in.txt").write_text("new")
    states = [(v.state, v.reason) for v in Runner(folder).status([a, b])]
    assert states == [("stale", "input in.txt changed"), ("stale", "waits on convert a")]


def test_second_run_on_the_same_folder_is_refused(folder):
    step = copy_step(folder / "in.txt", folder / "out.txt")
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"pid 4242, started 10:00:00")
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(SqueezeError) as err:
            run(folder, [step])
        assert str(err.value) == (f"{folder} is in use by another squeeze run (pid 4242, started 10:00:00); "
                                  f"wait for it to finish")
        assert not (folder / "out.txt").exists()
    finally:
        os.close(fd)
    assert run(folder, [step])[0] == {"ran": 1, "skipped": 0}


def test_each_step_records_its_own_peak_memory_children_included(folder):
    """A step's peak is its own (the high-water mark is reset before it) and a child process it
    runs counts; the figures land in manifest.json for `squeeze status` and the scaling bench."""
    import json
    import subprocess
    import sys

    import numpy as np

    mib = 1 << 20

    def step(name, action):
        def act(io):
            action()
            io.out(folder / f"{name}.txt").write_text(name)
        return Step(f"quantize {name}", "quantize", {}, [folder / "in.txt"], [folder / f"{name}.txt"], act)

    big = step("big", lambda: np.ones(400 * mib // 8).sum())
    small = step("small", lambda: None)
    child = step("child", lambda: subprocess.run(
        [sys.executable, "-c", "import numpy; numpy.ones(600 * 2**20 // 8).sum()"], check=True))
    # a child smaller than an earlier one: its own peak is not in getrusage's maximum, the sampler sees it
    later = step("later", lambda: subprocess.run(
        [sys.executable, "-c", "import numpy, time; a = numpy.ones(300 * 2**20 // 8); time.sleep(0.3)"], check=True))
    run(folder, [big, small, child, later])
    peaks = {k: v["peak_rss_bytes"] for k, v in json.loads((folder / "manifest.json").read_text())["steps"].items()}
    assert peaks["quantize big"] >= 400 * mib
    assert 0 < peaks["quantize small"] < peaks["quantize big"] - 300 * mib
    assert peaks["quantize child"] >= 600 * mib
    assert peaks["quantize later"] >= 300 * mib
