"""Types for a size budget: predicted from the sensitivity map, then corrected by measuring the
chosen mix in memory (pipeline.choose.refine with in-memory probes as its measurements).

The first allocation uses the sensitivity map's alphas alone. Each round then builds the chosen
mix in the loaded base (no file), measures its KLD on the calibration chunks, and measures the
groups that carry most of the predicted KLD alone at their chosen types; the corrected
predictions allocate again. A variant whose layers are pruned is measured with those layers
removed in memory too, so its prediction includes what the pruning costs together with the bits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.choose.allocate import Allocation, allocate, smallest_bytes
from pipeline.choose.memory_probe import MemoryProbe
from pipeline.choose.refine import Refinement, refine
from pipeline.choose.sensitivity import Sensitivity
from pipeline.errors import SqueezeError
from pipeline.formats.tensor_names import layer_of
from pipeline.units import MiB

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


# ---- the smallest mix that meets a KLD target ------------------------------------------------------

# The search resolves a budget to this share of the range between the smallest and the largest
# mix (about 40 KB on a 270M model): finer, two budgets choose the same mix or one type step apart,
# and the cheaper mixes measured afterwards walk the last steps.
BUDGET_RESOLUTION = 1 / 4096
# Once a mix meets the target, the budget is bisected between it and the largest mix that missed,
# measuring each midpoint: at most this many measurements, down to MEASURED_RESOLUTION of the range
# between the smallest and the largest mix. What is left is the chosen mix and, just below it on the
# allocator's path, a cheaper one that measured above the target: the evidence that it is near the
# smallest.
MEASURED_STEPS = 6
MEASURED_RESOLUTION = 1 / 256


@dataclass
class TargetChoice(BudgetChoice):
    target_kld: float = 0.0
    # the next cheaper mix on the path (the allocation for one byte less): its bytes and KLDs;
    # None when nothing was measured (no probe) or no cheaper mix exists
    next_cheaper: dict | None = None

    @property
    def met(self) -> bool | None:
        """Whether the chosen mix measured at or below the target on the calibration chunks."""
        return None if self.measured_kld is None else self.measured_kld <= self.target_kld


def choose_types_for_kld(sens: Sensitivity, target_kld: float, fixed_bytes: int, *, probe: MemoryProbe | None = None,
                         drop=(), exclude: dict[str, str] | None = None, frozen: dict[str, str] | None = None,
                         rounds: int = ROUNDS, where: str = "", echo=None) -> TargetChoice:
    """The smallest mix whose KLD meets `target_kld`: the least budget whose allocation predicts
    it (bisected over bytes: the allocator's price per byte, run the other way), measured in
    memory; while the measurement misses, the predictions are scaled by measured / predicted and the
    budget searched again (at most `rounds` times). Then the budget is bisected, measuring, between
    the mix that met the target and the largest that missed, so the choice ends next to a cheaper
    mix that measured above it: near the smallest. A target that even the largest
    candidate types cannot meet is refused in one line, with the lowest KLD reachable."""
    drop, exclude = set(drop), dict(exclude or {})
    errors = [e for e in sens.errors if layer_of(e.tensor) not in drop and e.tensor not in exclude]
    if not errors:
        raise SqueezeError(f"{where}no tensor has measured types to choose from")
    pinned = {n: t for n, t in exclude.items() if layer_of(n) not in drop}
    label = f"target_kld {target_kld:g}"
    cache: dict[int, Allocation] = {}

    def allocate_for(budget: int) -> Allocation:
        if budget not in cache:
            cache[budget] = allocate(errors, sens.predictors, budget, fixed_bytes, where, label, frozen=frozen)
        return cache[budget]

    def measure(alloc: Allocation) -> float | None:
        if probe is None:
            return None
        kld = probe.kld({**pinned, **alloc.types}, removed=sorted(drop))
        if echo:
            echo(f"allocation: {alloc.total_bytes / MiB:.2f} MiB measured in memory, KLD {kld:.4f} "
                 f"(target {target_kld:g})")
        return kld

    largest = allocate_for(1 << 62)  # every tensor at its best type: nothing predicts less
    floor = smallest_bytes(largest.options, fixed_bytes)
    hi = largest.total_bytes
    best_measured = None
    if largest.predicted_kld > target_kld:
        best_measured = measure(largest)
        reach = best_measured if best_measured is not None else largest.predicted_kld
        if reach > target_kld:
            raise SqueezeError(f"{where}target_kld {target_kld:g} cannot be met: even the largest candidate types "
                               f"({hi / MiB:.1f} MiB) {'measure' if best_measured is not None else 'predict'} "
                               f"KLD {reach:.4g} on the calibration text; ask for {reach:.4g} or more")

    def smallest_meeting(goal: float) -> Allocation:
        if allocate_for(floor).predicted_kld <= goal:
            return allocate_for(floor)
        lo, up = floor, hi  # predicted(lo) > goal >= predicted(up)
        step = max(1, int((hi - floor) * BUDGET_RESOLUTION))
        while up - lo > step:
            mid = (lo + up) // 2
            if allocate_for(mid).predicted_kld <= goal:
                up = mid
            else:
                lo = mid
        return allocate_for(up)

    scale, history = 1.0, []
    first = chosen = smallest_meeting(target_kld)
    measured = None
    for r in range(1, max(rounds, 0) + 2):
        chosen = smallest_meeting(target_kld / scale)
        measured = measure(chosen)
        history.append({"round": r, "predicted": scale * chosen.predicted_kld, "measured": measured,
                        "bytes": chosen.total_bytes, "scale": scale})
        if measured is None or measured <= target_kld:
            break
        if chosen.total_bytes >= hi:
            raise SqueezeError(f"{where}target_kld {target_kld:g} cannot be met: the largest candidate types "
                               f"({hi / MiB:.1f} MiB) measure KLD {measured:.4g} on the calibration text")
        # the mix measured this much above its own prediction: predictions are low by that factor
        # (at least a little more each round, so the budget always grows)
        scale = max(measured / chosen.predicted_kld, scale * 1.01) if chosen.predicted_kld > 0 else scale * 2
    else:
        raise SqueezeError(f"{where}target_kld {target_kld:g}: no mix measured at or below it after {rounds} "
                           f"corrections (the last, {chosen.total_bytes / MiB:.1f} MiB, measured {measured:.4g})")

    next_cheaper = None
    if measured is not None:
        missed = [h for h in history if h["measured"] > target_kld]
        below = max((h["bytes"] for h in missed), default=floor - 1)  # the largest mix known to miss
        if missed:
            worst = max(missed, key=lambda h: h["bytes"])
            next_cheaper = {"bytes": worst["bytes"], "predicted": worst["predicted"], "measured": worst["measured"]}
        resolution = max(1, int((hi - floor) * MEASURED_RESOLUTION))
        for _ in range(MEASURED_STEPS):
            if chosen.total_bytes - below <= resolution:
                break
            mid = allocate_for(max(floor, (below + chosen.total_bytes) // 2))
            if mid.total_bytes >= chosen.total_bytes:
                break  # no cheaper mix between them on the path
            kld = measure(mid)
            history.append({"round": "bisect", "predicted": scale * mid.predicted_kld, "measured": kld,
                            "bytes": mid.total_bytes, "scale": scale})
            if kld <= target_kld:
                chosen, measured = mid, kld
            else:
                below = mid.total_bytes
                next_cheaper = {"bytes": mid.total_bytes, "predicted": scale * mid.predicted_kld, "measured": kld}
    predicted = scale * chosen.predicted_kld
    chosen = dataclasses.replace(chosen, budget_bytes=chosen.total_bytes, interaction=scale)
    return TargetChoice(chosen, predicted, measured, history, first.predicted_kld, target_kld, next_cheaper)
