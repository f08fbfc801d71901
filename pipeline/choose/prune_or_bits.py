"""Prune or spend the bytes on bits: under one size budget, is the model better with some layers
removed and the bytes they free spent on higher types for the rest, or with every layer kept?

Each candidate is a set of removed layers (none for "keep every layer"), the measured KLD of the
pruned F16 model against the base, and the allocation for the same byte budget with those layers
removed (pipeline.choose.allocate), whose predicted KLD is the quantization's. Both are small
perturbations of the same output distribution, so to first order their KLDs add: the candidate with
the lowest prune KLD + predicted quantization KLD is chosen. When every candidate's whole mix (its
layers removed and its types, together) was also measured, as the prune stage does in memory,
the lowest measured KLD decides instead: no additivity assumed. A candidate whose allocation is
None (the budget does not fit it) or whose prune KLD was not measured cannot be chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.choose.allocate import Allocation
from pipeline.errors import SqueezeError
from pipeline.units import MiB


@dataclass(frozen=True)
class PruneCandidate:
    label: str
    removed_layers: tuple[int, ...]
    prune_kld: float  # measured: the pruned F16 model against the base (0 when nothing is removed)
    allocation: Allocation | None  # types for the budget with those layers removed; None if it does not fit
    measured_kld: float | None = None  # the whole mix measured: layers removed and types applied together

    @property
    def quant_kld(self) -> float:
        return self.allocation.predicted_kld if self.allocation is not None else math.inf

    @property
    def total_kld(self) -> float:
        if self.allocation is None or not math.isfinite(self.prune_kld):
            return math.inf
        return self.prune_kld + self.quant_kld

    @property
    def deciding_kld(self) -> float:
        """What the choice compares: the measured mix when there is one, else the predicted sum."""
        if self.measured_kld is not None and math.isfinite(self.total_kld):
            return self.measured_kld
        return self.total_kld


def choose_prune_or_bits(candidates) -> tuple[PruneCandidate, str]:
    """The candidate with the lowest predicted total KLD (ties: fewer layers removed) and a
    Markdown paragraph with every candidate's figures. `candidates`: PruneCandidate or tuples
    (label, removed_layers, measured_prune_kld, Allocation or None)."""
    cands = [c if isinstance(c, PruneCandidate) else PruneCandidate(c[0], tuple(sorted(c[1])), float(c[2]), c[3])
             for c in candidates]
    if not cands:
        raise SqueezeError("prune or bits: no candidates")
    budgets = {c.allocation.budget_bytes for c in cands if c.allocation is not None}
    if len(budgets) > 1:
        raise SqueezeError("prune or bits: the candidates were allocated for different budgets ("
                           + ", ".join(f"{b / MiB:.2f} MiB" for b in sorted(budgets)) + "); compare at one budget")
    feasible = [c for c in cands if math.isfinite(c.total_kld)]
    if not feasible:
        raise SqueezeError("prune or bits: no candidate fits the budget with a measured prune KLD")
    measured = all(c.measured_kld is not None for c in feasible)
    key = (lambda c: c.deciding_kld) if measured else (lambda c: c.total_kld)
    best = min(feasible, key=lambda c: (key(c), len(c.removed_layers), c.label))
    return best, _markdown(best, cands, budgets.pop(), measured)


def _layers(c: PruneCandidate) -> str:
    return ", ".join(str(x) for x in c.removed_layers) if c.removed_layers else "none"


def _markdown(best: PruneCandidate, cands: list[PruneCandidate], budget: int, measured: bool = False) -> str:
    others = [c for c in cands if c is not best and math.isfinite(c.total_kld)]
    what = (f"removing layers {_layers(best)} and spending the bytes they free on higher types"
            if best.removed_layers else "keeping every layer and spending the budget on bits")
    key = (lambda c: c.deciding_kld) if measured else (lambda c: c.total_kld)
    if measured:
        claim = (f"measures the lowest KLD, {best.measured_kld:.4f}, with its layers removed and its types applied "
                 f"together (pruning alone {best.prune_kld:.4f}, quantization predicted {best.quant_kld:.4f})")
        closing = ". Every candidate:"
    else:
        claim = (f"predicts the lowest total KLD, {best.total_kld:.4f} (pruning {best.prune_kld:.4f} measured + "
                 f"quantization {best.quant_kld:.4f} predicted)")
        closing = (". The two KLDs are taken to add: both are small perturbations of the same output distribution. "
                   "Every candidate:")
    text = f"**Prune or bits.** Under a budget of {budget / MiB:.2f} MiB, {best.label} - {what} - {claim}"
    if others:
        runner = min(others, key=key)
        text += f", against {key(runner):.4f} for the next best, {runner.label}"
    text += closing
    lines = [text, "", "| Candidate | Layers removed | MiB | Predicted quant KLD | Prune KLD | Total | "
                       "Measured together |", "|---|---|---|---|---|---|---|"]
    for c in cands:
        mark = " (chosen)" if c is best else ""
        prune = f"{c.prune_kld:.4f}" if math.isfinite(c.prune_kld) else "not measured"
        if c.allocation is None:
            lines.append(f"| {c.label}{mark} | {_layers(c)} | - | does not fit | {prune} | - | - |")
            continue
        total = f"{c.total_kld:.4f}" if math.isfinite(c.total_kld) else "-"
        together = f"{c.measured_kld:.4f}" if c.measured_kld is not None else "-"
        lines.append(f"| {c.label}{mark} | {_layers(c)} | {c.allocation.total_bytes / MiB:.2f} | "
                     f"{c.quant_kld:.4f} | {prune} | {total} | {together} |")
    return "\n".join(lines) + "\n"
