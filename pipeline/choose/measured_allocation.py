"""Types for a size budget: predicted from the sensitivity map, then corrected by measuring the
chosen mix in memory (pipeline.choose.refine with in-memory probes as its measurements).

The first allocation uses the sensitivity map's alphas alone. Each round then builds the chosen
mix in the loaded base (no file), measures its KLD on the calibration chunks, and measures the
groups that carry most of the predicted KLD alone at their chosen types; the corrected
predictions allocate again. A variant whose layers are pruned is measured with those layers
removed in memory too, so its prediction includes what the pruning costs together with the bits.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import SqueezeError
from pipeline.formats.tensor_names import layer_of
from pipeline.choose.allocate import Allocation, allocate
from pipeline.choose.memory_probe import MemoryProbe
from pipeline.choose.refine import Refinement, refine
from pipeline.choose.sensitivity import Sensitivity

ROUNDS = 3
TOLERANCE = 0.10
# Groups measured alone per round: those with the largest predicted KLD until they carry this
# share of it (the rest keep their alphas; the mix measurement scales them all).
GROUP_SHARE = 0.8


@dataclass
class BudgetChoice:
    allocation: Allocation
    predicted_kld: float  # made before the last measurement (honest); alphas alone without a probe
    measured_kld: float | None  # the chosen mix on the probe's calibration chunks
    history: list[dict]
    unrefined_kld: float  # the first allocation's prediction, from the alphas alone


def choose_types(sens: Sensitivity, budget_bytes: int, fixed_bytes: int, *, probe: MemoryProbe | None = None,
                 drop=(), exclude: dict[str, str] | None = None, frozen: dict[str, str] | None = None, start: dict[str, str] | None = None,
                 rounds: int = ROUNDS, tolerance: float = TOLERANCE, group_share: float = GROUP_SHARE, where: str = "",
                 budget_label: str | None = None, echo=None) -> BudgetChoice:
    """Every measured tensor's type for `budget_bytes` (`fixed_bytes` of it not chosen here): the
    tensors of `drop` layers and those in `exclude` (name -> type, pinned by a recipe rule) are
    left out of the choice, and measured at their pinned types."""
    drop, exclude = set(drop), dict(exclude or {})
    errors = [e for e in sens.errors if layer_of(e.tensor) not in drop and e.tensor not in exclude]
    if not errors:
        raise SqueezeError(f"{where}no tensor has measured types to choose from")

    def allocate_with(corrections: dict[str, float]) -> Allocation:
        return allocate(errors, sens.predictors, budget_bytes, fixed_bytes, where, budget_label, start=start,
                        frozen=frozen, corrections=corrections)

    first = allocate_with({})
    pinned = {n: t for n, t in exclude.items() if layer_of(n) not in drop}
    if probe is None:
        return BudgetChoice(first, first.predicted_kld, None, [], first.predicted_kld)

    def measure_groups(groups: dict[str, dict[str, str]]) -> dict[str, float]:
        return {g: probe.kld(types, removed=sorted(drop)) for g, types in groups.items()}

    def measure_mix(types: dict[str, str]) -> float:
        kld = probe.kld({**pinned, **types}, removed=sorted(drop))
        if echo:
            echo(f"allocation: measured the chosen mix in memory, KLD {kld:.4f}")
        return kld

    result: Refinement = refine(allocate_with, measure_groups, measure_mix, rounds, tolerance, group_share)
    return BudgetChoice(result.allocation, result.predicted, result.measured, result.history, first.predicted_kld)
