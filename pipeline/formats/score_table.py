"""A published score table: the Markdown (or CSV) tables of a model card someone else made, read
so squeeze can put its own figures beside them (`report.published` in a recipe, `squeeze compare`).

The first column names the variant; the other columns are recognised by their headers (`COLUMNS`):
size ("Size", "File size", with GB/GiB/MB/MiB in the header or the cell; not "Stock size" or
"Model size"), "PPL", "Cor(ln PPL)", "KLD" (the mean), "RMS Δp", "Same top" (%), the task
benchmarks ("ARC", "HellaSwag", "MMLU", "TruthfulQA", "WinoGrande", "Average") and speed
("pp512 t/s", "tg128 t/s"). A cell may carry its uncertainty ("31.22 ± 0.25", "31.22 +/- 0.25");
"-", "–" or an empty cell is a figure the card does not give. Other columns are ignored.

A Markdown file may hold several tables (sizes, quality, tasks, speed, as cards lay them out): a
variant's figures are gathered from every table that has a row for it. A figure given twice with
different values is refused.
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

# (column key, header pattern), first match wins: "Mean KLD" is a KLD, "99% KLD" is not the mean;
# "Cor(ln PPL)" is the correlation, not the PPL; "Stock size" is another file's size.
COLUMNS = (
    ("size_bytes", re.compile(r"^\s*(file\s+)?size\b", re.I)),
    ("cor_ln_ppl_pct", re.compile(r"^\s*cor", re.I)),
    ("ppl", re.compile(r"^\s*(mean\s+)?ppl\b|perplexity", re.I)),
    ("mean_kld", re.compile(r"^\s*(mean\s+)?kld\b|kl[- ]divergence", re.I)),
    ("rms_dp_pct", re.compile(r"^\s*rms\s*(Δp|dp|delta\s*p)", re.I)),
    ("same_top_pct", re.compile(r"same\s+top", re.I)),
    ("arc_pct", re.compile(r"^\s*arc\b", re.I)),
    ("hellaswag_pct", re.compile(r"^\s*hellaswag\b", re.I)),
    ("mmlu_pct", re.compile(r"^\s*mmlu\b", re.I)),
    ("truthfulqa_pct", re.compile(r"^\s*truthfulqa\b", re.I)),
    ("winogrande_pct", re.compile(r"^\s*winogrande\b", re.I)),
    ("task_average_pct", re.compile(r"^\s*(task\s+)?average\b", re.I)),
    ("pp_tps", re.compile(r"^\s*pp\d+\s*(t/s|tok)", re.I)),
    ("tg_tps", re.compile(r"^\s*tg\d+\s*(t/s|tok)", re.I)),
)
_COLUMN_NAMES = "Size, PPL, KLD, Same top p, RMS Δp, task benchmarks, pp/tg t/s"
_UNIT_IN_HEADER = re.compile(r"\b(GB|GiB|MB|MiB)\b")
_MISSING = {"", "-", "–", "—", "n/a", "na"}
_NUMBER = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)\s*(?:(?:±|\+/-)\s*(\d+(?:\.\d+)?))?\s*(%)?\s*(\w+)?\s*$",
                     re.I)


@dataclass(frozen=True)
class PublishedRow:
    """One variant's published figures (NaN: not given). The keys are those of squeeze's own
    records (scores/<variant>.json), so the two line up by name."""

    variant: str
    size_bytes: float = math.nan
    ppl: float = math.nan
    cor_ln_ppl_pct: float = math.nan
    mean_kld: float = math.nan
    rms_dp_pct: float = math.nan
    same_top_pct: float = math.nan
    arc_pct: float = math.nan  # a card's one ARC column (squeeze pools ARC-Easy and ARC-Challenge)
    hellaswag_pct: float = math.nan
    mmlu_pct: float = math.nan
    truthfulqa_pct: float = math.nan
    winogrande_pct: float = math.nan
    task_average_pct: float = math.nan
    pp_tps: float = math.nan  # prompt processing, tokens/s
    tg_tps: float = math.nan  # generation, tokens/s


def _plain(cell: str) -> str:
    """A cell without the card's markup: bold, code and links ('[Q4_K_M](https://...)')."""
    cell = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", cell)
    return re.sub(r"\*\*|__|`", "", cell).strip()


def _cells(line: str) -> list[str]:
    return [_plain(c) for c in line.strip().strip("|").split("|")]


def _tables(path: Path, text: str) -> list[list[tuple[int, list[str]]]]:
    """Each table as (line number, cells) rows, its header first; a CSV file is one table."""
    if path.suffix.lower() == ".csv":
        rows = [(n, [_plain(c) for c in r]) for n, r in enumerate(csv.reader(io.StringIO(text)), start=1)
                if any(c.strip() for c in r)]
        return [rows] if rows else []
    tables, current = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip().startswith("|"):  # a table ends at the first line outside it
            if current:
                tables.append(current)
            current = []
            continue
        cells = _cells(line)
        if not all(re.fullmatch(r":?-{2,}:?", c) for c in cells if c):  # not the |---|---| line
            current.append((n, cells))
    if current:
        tables.append(current)
    return tables


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
    """The rows of a card's tables, one per variant, in the order the variants first appear."""
    path = Path(path)
    text = read_text(path)
    tables = [t for t in _tables(path, text) if len(t) >= 2]
    if not tables:
        raise SqueezeError(f"{path}: no table found (expected a Markdown or CSV table whose first column "
                           "names the variants)")
    figures: dict[str, dict[str, float]] = {}
    read_any = False
    for (_, header), *body in tables:
        columns = _columns(header)
        read_any = read_any or bool(columns)
        for n, r in body:
            if len(r) != len(header):
                raise SqueezeError(f"{path}: line {n} has {len(r)} cells, its table's header {len(header)}")
            row = figures.setdefault(r[0], {})
            for i, (key, unit) in columns.items():
                value = _number(r[i], key, unit, f"{path}: line {n} ({r[0]}), column '{header[i]}': ")
                if math.isnan(value):
                    continue
                if key in row and row[key] != value:
                    raise SqueezeError(f"{path}: line {n} ({r[0]}), column '{header[i]}': {r[i]!r} differs from "
                                       f"the same figure in an earlier table ({row[key]:g})")
                row[key] = value
    if not read_any:
        raise SqueezeError(f"{path}: the table's header {tables[0][0][1]} names no column squeeze compares "
                           f"({_COLUMN_NAMES})")
    return [PublishedRow(variant, **values) for variant, values in figures.items()]


def _columns(header: list[str]) -> dict[int, tuple[str, str | None]]:
    """Column index -> (figure key, size unit in the header) for the columns squeeze reads."""
    columns: dict[int, tuple[str, str | None]] = {}
    for i, title in enumerate(header[1:], start=1):
        for key, pattern in COLUMNS:
            if pattern.search(title):
                if key not in {k for k, _ in columns.values()}:
                    unit = _UNIT_IN_HEADER.search(title)
                    columns[i] = (key, unit.group(1) if unit else None)
                break
    return columns
