"""Progress bars with an ETA for long stages (quiet when not on a terminal unless asked)."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def bar(total: int | None, desc: str, unit: str = "it"):
    # Bars go to stderr; in logs and CI (no TTY) they update rarely so the log stays readable.
    interactive = sys.stderr.isatty()
    disable = os.environ.get("SQUEEZE_PROGRESS", "1") == "0"
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=disable,
                mininterval=0.5 if interactive else 30.0, dynamic_ncols=True, file=sys.stderr)
