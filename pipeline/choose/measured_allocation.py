"""Types for a size budget: predicted from the sensitivity map, then corrected by measuring the
chosen mix in memory (pipeline.choose.refine with in-memory probes as its measurements).

The first allocation uses the sensitivity map's alphas alone. Each round then builds the chosen
mix in the loaded base (no file), measures its KLD on the calibration chunks, and measures the
groups that carry most of the predicted KLD alone at their chosen types; the corrected
predictions allocate again. A variant whose layers are pruned is measured with those layers
removed in memory too, so its prediction includes the loss of the pruning together with the bits'.
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
    # the next cheaper mix on the path (the allocation for one byte less): its bytes, KLDs and the
    # tensors whose types it lowers; None when nothing was measured (no probe) or no cheaper mix exists
    next_cheaper: dict | None = None
    measurements: int = 0  # distinct mixes measured (a mix the path reaches twice is measured once)

    @property
    def met(self) -> bool | None:
        """Whether the chosen mix measured at or below the target on the calibration chunks."""
        return None if self.measured_kld is None else self.measured_kld <= self.target_kld

    @property
    def slack(self) -> float | None:
        """How far below the target the chosen mix measured (target - measured)."""
        return None if self.measured_kld is None else self.target_kld - self.measured_kld


def _type_changes(cheaper: dict[str, str], chosen: dict[str, str]) -> dict[str, str]:
    """tensor -> 'cheaper type -> chosen type' for the tensors two mixes type differently."""
    return {t: f"{cheaper.get(t, '-')} -> {chosen.get(t, '-')}" for t in sorted(set(cheaper) | set(chosen))
            if cheaper.get(t) != chosen.get(t)}


def choose_types_for_kld(sens: Sensitivity, target_kld: float, fixed_bytes: int, *, probe: MemoryProbe | None = None,
                         drop=(), exclude: dict[str, str] | None = None, frozen: dict[str, str] | None = None,
                         rounds: int = ROUNDS, where: str = "", echo=None) -> TargetChoice:
    """The smallest mix whose KLD meets `target_kld`: the least budget whose allocation predicts
    it (bisected over bytes: the allocator's price per byte, run the other way), measured in
    memory; while the measurement misses, the predictions are scaled by measured / predicted and the
    budget searched again (at most `rounds` times). A target those corrections still miss is not
    given up on: the budget is bisected, measuring, between the largest mix that missed and the
    largest candidate mix, which is measured first (it is the one mix that decides whether the
    target can be met at all). Then the budget is bisected, measuring, between the mix that met the
    target and the largest that missed, so the choice ends next to a cheaper mix that measured above
    it: near the smallest. No mix is measured twice. A target that even the largest candidate
    types cannot meet is refused in one line, with the lowest KLD reachable."""
    drop, exclude = set(drop), dict(exclude or {})
    errors = [e for e in sens.errors if layer_of(e.tensor) not in drop and e.tensor not in exclude]
    if not errors:
        raise SqueezeError(f"{where}no tensor has measured types to choose from")
    pinned = {n: t for n, t in exclude.items() if layer_of(n) not in drop}
    label = f"target_kld {target_kld:g}"
    cache: dict[int, Allocation] = {}
    measured_mixes: dict[tuple, float] = {}

    def allocate_for(budget: int) -> Allocation:
        if budget not in cache:
            cache[budget] = allocate(errors, sens.predictors, budget, fixed_bytes, where, label, frozen=frozen)
        return cache[budget]

    history: list[dict] = []  # one row per distinct mix measured, in the order measured
    scale = 1.0

    def measure(alloc: Allocation, step) -> float | None:
        if probe is None:
            return None
        key = tuple(sorted(alloc.types.items()))
        if key not in measured_mixes:  # two budgets often choose the same mix: it is measured once
            measured_mixes[key] = probe.kld({**pinned, **alloc.types}, removed=sorted(drop))
            history.append({"round": step, "predicted": scale * alloc.predicted_kld, "measured": measured_mixes[key],
                            "bytes": alloc.total_bytes, "scale": scale})
            if echo:
                echo(f"allocation: {alloc.total_bytes / MiB:.2f} MiB measured in memory, KLD "
                     f"{measured_mixes[key]:.4f} (target {target_kld:g})")
        return measured_mixes[key]

    def cannot_meet(kld: float, how: str) -> SqueezeError:
        return SqueezeError(f"{where}target_kld {target_kld:g} cannot be met: even the largest candidate types "
                            f"({hi / MiB:.1f} MiB) {how} KLD {kld:.4g} on the calibration text; ask for "
                            f"{kld:.4g} or more")

    largest = allocate_for(1 << 62)  # every tensor at its best type: nothing predicts less
    floor = smallest_bytes(largest.options, fixed_bytes)
    hi = largest.total_bytes
    if largest.predicted_kld > target_kld:
        reach = measure(largest, "largest")
        if (reach if reach is not None else largest.predicted_kld) > target_kld:
            raise cannot_meet(reach if reach is not None else largest.predicted_kld,
                              "measure" if reach is not None else "predict")

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

    resolution = max(1, int((hi - floor) * MEASURED_RESOLUTION))

    def bisect(lo_budget: int, up: Allocation, steps: int, label: str) -> Allocation:
        """Between a budget whose mix missed and a mix `up` that met the target: the smallest mix
        measured to meet it, in at most `steps` new measurements (a budget that reaches a mix
        measured before narrows the range for free)."""
        new = 0
        while up.total_bytes - lo_budget > resolution and new < steps:
            mid_budget = (lo_budget + up.total_bytes) // 2
            mid = allocate_for(max(floor, mid_budget))
            if mid.total_bytes >= up.total_bytes:
                break  # no cheaper mix between them on the path
            before = len(measured_mixes)
            kld = measure(mid, label)
            new += len(measured_mixes) - before
            if kld <= target_kld:
                up = mid
            else:
                lo_budget = mid_budget  # the allocator's mixes grow with the budget: all below miss too
        return up

    first = chosen = smallest_meeting(target_kld)
    measured = None
    for r in range(1, max(rounds, 0) + 2):
        chosen = smallest_meeting(target_kld / scale)
        measured = measure(chosen, r)
        if measured is None or measured <= target_kld:
            break
        if chosen.total_bytes >= hi:
            raise cannot_meet(measured, "measure")
        # the mix measured this much above its own prediction: predictions are low by that factor
        # (at least a little more each round, so the budget always grows)
        scale = max(measured / chosen.predicted_kld, scale * 1.01) if chosen.predicted_kld > 0 else scale * 2
    else:
        # The corrections did not reach it: walk up by bisection towards the largest mix, which
        # decides whether the target can be met at all. Never a fixed count of tries and a refusal.
        top = measure(largest, "largest")
        if top > target_kld:
            raise cannot_meet(top, "measure")
        chosen = bisect(chosen.total_bytes, largest, 1 << 30, "walk up")
        measured = measure(chosen, "walk up")

    next_cheaper = None
    if measured is not None:
        missed = [h for h in history if h["measured"] > target_kld and h["bytes"] < chosen.total_bytes]
        below = max((h["bytes"] for h in missed), default=floor - 1)  # the largest mix known to miss
        chosen = bisect(below, chosen, MEASURED_STEPS, "bisect")
        measured = measure(chosen, "bisect")
        missed = [h for h in history if h["measured"] > target_kld and h["bytes"] < chosen.total_bytes]
        if missed:
            worst = max(missed, key=lambda h: h["bytes"])
            cheaper = next((a.types for a in cache.values() if a.total_bytes == worst["bytes"]), {})
            # why the search cannot land nearer the target: the next cheaper mix the allocator offers
            # (one price step down) changes these tensors at once, and it measured above the target
            next_cheaper = {"bytes": worst["bytes"], "predicted": worst["predicted"], "measured": worst["measured"],
                            "changes": _type_changes(cheaper, chosen.types)}
    predicted = scale * chosen.predicted_kld
    chosen = dataclasses.replace(chosen, budget_bytes=chosen.total_bytes, interaction=scale)
    return TargetChoice(chosen, predicted, measured, history, first.predicted_kld, target_kld, next_cheaper,
                        len(measured_mixes))
