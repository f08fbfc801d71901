"""Sizes as people write them in recipes ('180 MiB', '1.2 GB') and as bytes."""

from __future__ import annotations

import re

from pipeline.errors import SqueezeError

MiB = 2**20

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1000, "kib": 2**10, "mb": 1000**2, "mib": 2**20, "gb": 1000**3, "gib": 2**30}


def parse_size(text: str, where: str = "") -> int:
    """'180 MiB', '1.5 GB', '123456' -> bytes."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise SqueezeError(f"{where}expected a size like '180 MiB' or '1.2 GB', got {text!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])
