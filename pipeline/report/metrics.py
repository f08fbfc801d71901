"""The one table of the figures squeeze reports: for each, its column heading (unit included),
digits, which way is better, and where it is shown. The report's quality table (ppl-kld.csv, also
the card's), `squeeze compare` and the table against published figures all read it, so a figure
has one label and one precision everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    key: str  # the column of pipeline.report.tables.variant_metrics (a score record's field)
    label: str  # the heading, unit included: "Same top p %", "Size (MiB)"
    digits: int
    lower_is_better: bool | None  # None: neither direction is better (mean Δp)
    compared: bool = False  # a column of `squeeze compare`
    quality: bool = False  # a column of the quality table (ppl-kld.csv, the card's "Quality against the base")
    published_key: str | None = None  # the field of a published table (pipeline.formats.score_table.ScoreRow)

    @property
    def arrow(self) -> str:
        return "" if self.lower_is_better is None else ("↓" if self.lower_is_better else "↑")

    @property
    def heading(self) -> str:
        """The heading with the direction that is better: 'Mean KLD ↓'."""
        return f"{self.label} {self.arrow}".rstrip()

    def text(self, value) -> str:
        """The value at this metric's digits, '-' where there is none."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.{self.digits}f}"


METRICS = (
    Metric("size_mib", "Size (MiB)", 1, True, compared=True),
    Metric("bpw", "BPW", 2, True, compared=True),
    Metric("ppl", "PPL", 4, True, compared=True, quality=True, published_key="ppl"),
    Metric("ppl_ratio", "PPL ratio", 4, True, quality=True),
    Metric("cor_ln_ppl_pct", "Cor(ln PPL) %", 2, False, compared=True, published_key="cor_ln_ppl_pct"),
    Metric("mean_kld", "Mean KLD", 5, True, compared=True, quality=True, published_key="mean_kld"),
    Metric("kld_p99", "99% KLD", 4, True, quality=True),
    Metric("same_top_pct", "Same top p %", 2, False, compared=True, quality=True, published_key="same_top_pct"),
    # llama-perplexity prints RMS Δp and mean Δp at three decimals
    Metric("rms_dp_pct", "RMS Δp %", 3, True, compared=True, quality=True, published_key="rms_dp_pct"),
    Metric("mean_dp_pct", "Mean Δp %", 3, None, quality=True),
    Metric("task_average_pct", "Task avg %", 2, False, compared=True),
    # a card's task columns (ARC: ARC-Easy and ARC-Challenge pooled) and their mean, its Average
    Metric("arc_pct", "ARC %", 2, False, compared=True, published_key="arc_pct"),
    Metric("hellaswag_pct", "HellaSwag %", 2, False, compared=True, published_key="hellaswag_pct"),
    Metric("mmlu_pct", "MMLU %", 2, False, compared=True, published_key="mmlu_pct"),
    Metric("truthfulqa_pct", "TruthfulQA %", 2, False, compared=True, published_key="truthfulqa_pct"),
    Metric("winogrande_pct", "WinoGrande %", 2, False, compared=True, published_key="winogrande_pct"),
    Metric("card_average_pct", "Card task avg %", 2, False, compared=True, published_key="task_average_pct"),
    Metric("pp_tps", "pp t/s", 1, False, compared=True, published_key="pp_tps"),
    Metric("tg_tps", "tg t/s", 1, False, compared=True, published_key="tg_tps"),
)

COMPARED = tuple(m for m in METRICS if m.compared)
QUALITY = tuple(m for m in METRICS if m.quality)
PUBLISHED = tuple(m for m in METRICS if m.published_key)


def metric(key: str) -> Metric:
    return next(m for m in METRICS if m.key == key)
