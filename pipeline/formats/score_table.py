"""A published score table: the Markdown (or CSV) table of a model card someone else made, read so
squeeze can put its own figures beside it (`report.published` in a recipe, `squeeze compare`).

The first column names the variant; the other columns are recognised by their headers: size
("Size", "File size", with GB/GiB/MB/MiB in the header or the cell), "PPL", "KLD" (the mean),
"Same top" (%). A cell may carry its uncertainty ("31.22 ± 0.25", "31.22 +/- 0.25"); "-", "–" or
an empty cell is a figure the card does not give. Other columns are ignored.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import SqueezeError
from pipeline.fsutil import read_text
from pipeline.units import parse_size

# (column key, header pattern), first match wins: "Mean KLD" is a KLD, "99% KLD" is not the mean.
_COLUMNS = (
    ("size_bytes", re.compile(r"\bsize\b", re.I)),
    ("ppl", re.compile(r"^\s*(mean\s+)?ppl\b|perplexity", re.I)),
    ("mean_kld", re.compile(r"^\s*(mean\s+)?kld\b|kl[- ]divergence", re.I)),
    ("same_top_pct", re.compile(r"same\s+top", re.I)),
)
_UNIT_IN_HEADER = re.compile(r"\b(GB|GiB|MB|MiB)\b")
_MISSING = {"", "-", "–", "—", "n/a", "na"}
_NUMBER = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)\s*(?:(?:±|\+/-)\s*(\d+(?:\.\d+)?))?\s*(%)?\s*(\w+)?\s*$",
                     re.I)


@dataclass(frozen=True)
class PublishedRow:
    variant: str
    size_bytes: float = math.nan
    ppl: float = math.nan
    mean_kld: float = math.nan
    same_top_pct: float = math.nan


def _plain(cell: str) -> str:
    """A cell without the card's markup: bold, code and links ('[Q4_K_M](https://...)')."""
    cell = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", cell)
    return re.sub(r"\*\*|__|`", "", cell).strip()


def _cells(line: str) -> list[str]:
    return [_plain(c) for c in line.strip().strip("|").split("|")]


def _rows(path: Path, text: str) -> list[list[str]]:
    if path.suffix.lower() == ".csv":
        return [[_plain(c) for c in r] for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
    lines = [ln for ln in text.splitlines() if ln.strip().startswith("|")]
    rows = [_cells(ln) for ln in lines]
    # drop the |---|---| separator line(s)
    return [r for r in rows if not all(re.fullmatch(r":?-{2,}:?", c) for c in r if c)]


def _number(cell: str, key: str, unit: str | None, where: str) -> float:
    if cell.lower() in _MISSING:
        return math.nan
    m = _NUMBER.match(cell)
    if not m:
        raise SqueezeError(f"{where}expected a number (optionally '± error'), got {cell!r}")
    value, suffix = float(m.group(1)), m.group(4)
    if key == "size_bytes":
        unit = suffix or unit
        if unit is None:
            raise SqueezeError(f"{where}a size needs a unit (GB, GiB, MB, MiB) in the cell or the header")
        return float(parse_size(f"{value} {unit}", where))
    return value


def read_score_table(path: str | Path) -> list[PublishedRow]:
    """The rows of a card's table, one per variant, in the table's order."""
    path = Path(path)
    text = read_text(path)
    rows = _rows(path, text)
    if len(rows) < 2:
        raise SqueezeError(f"{path}: no table found (expected a Markdown or CSV table whose first column "
                           "names the variants)")
    header, body = rows[0], rows[1:]
    columns: dict[int, tuple[str, str | None]] = {}
    for i, title in enumerate(header[1:], start=1):
        for key, pattern in _COLUMNS:
            if pattern.search(title) and key not in {k for k, _ in columns.values()}:
                unit = _UNIT_IN_HEADER.search(title)
                columns[i] = (key, unit.group(1) if unit else None)
                break
    if not columns:
        raise SqueezeError(f"{path}: the table's header {header} names no column squeeze compares "
                           "(Size, PPL, KLD, Same top p)")
    out = []
    for n, r in enumerate(body, start=2):
        if len(r) != len(header):
            raise SqueezeError(f"{path}: table row {n} has {len(r)} cells, the header {len(header)}")
        values = {key: _number(r[i], key, unit, f"{path}: row {n} ({r[0]}), column '{header[i]}': ")
                  for i, (key, unit) in columns.items()}
        out.append(PublishedRow(r[0], **values))
    return out
