"""Progress in a log file is plain lines, not a bar: one line per step every ~30 s with done/total,
rate and ETA, and nothing a carriage return could turn into blank lines."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap

from pipeline.progress import PlainProgress, bar
from tests.conftest import ROOT
from tests.tiny_gemma import build_tiny_gemma3, calibration_text


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plain_lines_come_every_interval_with_rate_and_eta():
    clock, out = Clock(), io.StringIO()
    with PlainProgress(100, "score Q4_0", "chunk", stream=out, interval=30, clock=clock) as p:
        for _ in range(100):
            clock.now += 1.0  # one chunk a second
            p.update()
    lines = out.getvalue().splitlines()
    # at 30, 60 and 90 s, then the closing line
    assert lines == ["score Q4_0: 30/100 chunk (30%), 1 chunk/s, ETA 1:10",
                     "score Q4_0: 60/100 chunk (60%), 1 chunk/s, ETA 0:40",
                     "score Q4_0: 90/100 chunk (90%), 1 chunk/s, ETA 0:10",
                     "score Q4_0: 100/100 chunk in 1:40"]


def test_a_short_step_prints_nothing_and_an_unknown_total_has_no_eta():
    clock, out = Clock(), io.StringIO()
    with PlainProgress(10, "quick", stream=out, interval=30, clock=clock) as p:
        clock.now = 5.0
        p.update(10)
    assert out.getvalue() == ""
    with PlainProgress(None, "download", "file", stream=out, interval=30, clock=clock) as p:
        clock.now = 65.0
        p.update(3)
    assert out.getvalue().splitlines() == ["download: 3 file, 0.05 file/s", "download: 3 file in 1:00"]


def test_off_a_terminal_bar_is_plain_and_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("SQUEEZE_PROGRESS", "1")
    assert isinstance(bar(3, "x"), PlainProgress)  # pytest's captured stderr is not a terminal
    monkeypatch.setenv("SQUEEZE_PROGRESS", "0")
    assert not isinstance(bar(3, "x"), PlainProgress)


def test_a_run_logged_to_a_file_has_plain_lines_and_no_carriage_returns(tmp_path):
    hf = build_tiny_gemma3(tmp_path / "tiny-gemma3", calibration_text(), n_layers=2)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        model: {{source: {hf}, base_type: F16}}
        variants: {{Q4_0: Q4_0}}
        score: {{ctx: 128, chunks: 2}}
        """))
    env = dict(os.environ, SQUEEZE_PROGRESS="1", SQUEEZE_PROGRESS_INTERVAL="0")
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(recipe), "--results",
                               str(tmp_path / "results")], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    text = (tmp_path / "log").read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text and "\x1b[" not in text
    assert re.search(r"^score Q4_0: 1/2 chunk \(50%\), [\d.e+]+ chunk/s, ETA \d+:\d\d$", text, re.M), text
