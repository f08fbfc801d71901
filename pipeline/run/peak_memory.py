"""Each step's peak resident memory, measured in the process that runs it.

The process's high-water mark (VmHWM in /proc/self/status) only grows, and resetting it would
also falsify what `time -v` or a batch scheduler reports for the whole run, so it is left alone.
A step that raises it gets that mark, exact; otherwise its peak is the highest resident size a
sampling thread read every 20 ms during the step (/proc/self/statm). What earlier steps still
hold (the base kept loaded, caches) counts, as it does on the user's machine. A step that runs a
child process (the converter) peaks in the child: the sampler adds the children's resident sizes
(/proc/self/task/*/children), and the largest child's own peak (getrusage RUSAGE_CHILDREN) counts
exactly when it grew during the step (a child below an earlier step's child is only sampled).
Without /proc the peak is recorded as 0.
"""

from __future__ import annotations

import os
import resource
import threading
from pathlib import Path

_STATUS = Path("/proc/self/status")
_STATM = Path("/proc/self/statm")
_TASKS = Path("/proc/self/task")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
SAMPLE_SECONDS = 0.02


def _children_peak() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux


def _high_water() -> int:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _resident_of(statm: Path) -> int:
    try:
        return int(statm.read_text().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0  # not Linux, or a child that just exited


def _resident() -> int:
    """This process's resident bytes and its running children's."""
    children = []
    for listing in _TASKS.glob("*/children"):
        try:
            children += listing.read_text().split()
        except OSError:
            continue
    return _resident_of(_STATM) + sum(_resident_of(Path(f"/proc/{pid}/statm")) for pid in children)


class StepPeak:
    """`with StepPeak() as peak: ...`, then `peak.bytes` (0: not measurable here)."""

    def __enter__(self) -> "StepPeak":
        self.bytes = 0
        self._mark, self._children = _high_water(), _children_peak()
        self._sampled = _resident()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="squeeze-peak-memory", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(SAMPLE_SECONDS):
            self._sampled = max(self._sampled, _resident())

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self._sampled = max(self._sampled, _resident())
        mark, children = _high_water(), _children_peak()
        own = mark if mark > self._mark else self._sampled
        self.bytes = max(own, children if children > self._children else 0)
