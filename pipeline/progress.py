"""Progress for long stages: a tqdm bar with an ETA on a terminal; in a log file (`make > log`, a
cluster worker) one plain line per step every ~30 s (done/total, rate, ETA), since a bar's carriage
returns turn into hundreds of blank lines there. SQUEEZE_PROGRESS=0 turns both off;
SQUEEZE_PROGRESS_INTERVAL sets the seconds between plain lines.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, TextIO

from tqdm import tqdm

PLAIN_INTERVAL_S = 30.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class PlainProgress:
    """The log-file form of a bar: a line when at least `interval` seconds passed since the last,
    and one when it closes. `clock` is injectable so the throttling can be tested."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", stream: TextIO | None = None,
                 interval: float = PLAIN_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.interval, self.clock = interval, clock
        self.n = 0
        self.start = self.last = clock()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._line(now)

    def close(self) -> None:
        elapsed = self.clock() - self.start
        if elapsed >= self.interval:  # short steps stay silent: the runner's own line says they ran
            of = f"/{self.total}" if self.total else ""
            self._write(f"{self.desc}: {self.n}{of} {self.unit} in {_duration(elapsed)}")

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        text = f"{self.desc}: {self.n}"
        if self.total:
            text += f"/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f", {rate:.3g} {self.unit}/s"
        if self.total and rate > 0:
            text += f", ETA {_duration((self.total - self.n) / rate)}"
        self._write(text)

    def _write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


class _Silent:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int | None, desc: str, unit: str = "it"):
    if os.environ.get("SQUEEZE_PROGRESS", "1") == "0":
        return _Silent()
    if not sys.stderr.isatty():
        interval = float(os.environ.get("SQUEEZE_PROGRESS_INTERVAL", PLAIN_INTERVAL_S))
        return PlainProgress(total, desc, unit, interval=interval)
    return tqdm(total=total, desc=desc, unit=unit, leave=False, mininterval=0.5, dynamic_ncols=True,
                file=sys.stderr)


def serial_map(fn: Callable, items, desc: str = "", unit: str = "it") -> list:
    """`fn` over `items` here, one after another, with a bar: results in the items' order. What a
    step's `io.map` does under the local runner (the Ray executor spreads the items instead), and
    the default `map` of the measurements that take one."""
    items = list(items)
    out = []
    with bar(total=len(items), desc=desc, unit=unit) as progress:
        for item in items:
            out.append(fn(item))
            progress.update(1)
    return out
