"""Measured refinement of an allocation: correct the predictions where the model disagrees.

The allocator predicts a group's KLD as alpha_g * error, alpha_g measured at one low type with the
rest of the model intact. At the types actually chosen that can be off (KLD is only quadratic in
the error to second order), and groups quantized together interact. So, a few rounds of:

1. allocate with the corrections so far;
2. measure the whole chosen mix, and each group whose chosen types changed since it was last
   measured (that group alone at its types, everything else at the base);
3. correction_g = measured group KLD / uncorrected predicted group KLD at the chosen types, and a
   global interaction factor = measured mix KLD / sum of corrected group predictions, so the
   reported prediction is interaction * sum.

A round's prediction is made before its measurement, so |predicted - measured| / measured is an
honest test of the model; refinement stops once that is within `tolerance`, or after `rounds`; the mix kept is the one that
measured lowest.
Groups whose types did not change are not measured again (their correction already matches
them), and a mix identical to the last one measured is not measured twice.

The callables come from the caller (in production: in-memory KLD probes of the real model), so
this module is arithmetic only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

from pipeline.choose.allocate import Allocation
from pipeline.errors import SqueezeError


@dataclass
class Refinement:
    # the mix that measured lowest (a round's corrections can make the next mix worse: the
    # measurement, not the model, decides), with the corrections it was chosen under
    allocation: Allocation
    predicted: float  # its predicted KLD, made before it was measured
    measured: float  # its measured KLD
    corrections: dict[str, float]  # after the last measurement (what a further round would use)
    interaction: float
    history: list[dict] = field(default_factory=list)  # per round: round, predicted, measured, bytes, changed


def _relative_gap(predicted: float, measured: float) -> float:
    if measured > 0:
        return abs(predicted - measured) / measured
    return 0.0 if predicted == measured else math.inf


def _largest(groups: list[str], predicted: dict[str, float], share: float) -> list[str]:
    """The groups with the largest predictions, until they carry `share` of their total."""
    order = sorted(groups, key=lambda g: -predicted.get(g, 0.0))
    total = sum(max(predicted.get(g, 0.0), 0.0) for g in groups)
    picked, carried = [], 0.0
    for g in order:
        if total > 0 and carried >= share * total:
            break
        picked.append(g)
        carried += max(predicted.get(g, 0.0), 0.0)
    return sorted(picked)


def refine(allocate_fn: Callable[[dict[str, float]], Allocation],
           measure_groups: Callable[[dict[str, dict[str, str]]], dict[str, float]],
           measure_mix: Callable[[dict[str, str]], float],
           rounds: int = 3, tolerance: float = 0.10, group_share: float = 1.0) -> Refinement:
    """allocate_fn(corrections) -> Allocation (group -> factor; {} the first time);
    measure_groups({group: {tensor: type}}) -> {group: measured KLD};
    measure_mix({tensor: type}) -> measured KLD of the whole mix.
    `group_share` < 1: of the changed groups, measure only the largest predicted ones until they
    carry that share of their predicted KLD (each group measured costs a model evaluation; the
    small ones keep their correction, and the interaction factor scales them with the rest)."""
    if rounds < 1:
        raise SqueezeError(f"refine: rounds must be at least 1, got {rounds}")
    corrections: dict[str, float] = {}
    interaction = 1.0
    measured_types: dict[str, dict[str, str]] = {}  # group -> the types it was last measured at
    group_measured: dict[str, float] = {}
    last_mix: tuple[dict[str, str], float] | None = None
    history: list[dict] = []
    best = None  # (allocation, its prediction, its measured KLD): the lowest measured mix so far
    for r in range(1, rounds + 1):
        alloc = dataclasses.replace(allocate_fn(dict(corrections)), interaction=interaction)
        predicted = alloc.predicted_kld
        types_by_group = alloc.group_types()
        changed = sorted(g for g, ty in types_by_group.items() if measured_types.get(g) != ty)
        if group_share < 1.0:
            changed = _largest(changed, alloc.group_kld(corrected=True), group_share)
        if r == rounds:
            changed = []  # the corrections would only serve a round that does not come
        if changed:
            got = measure_groups({g: types_by_group[g] for g in changed})
            missing = [g for g in changed if g not in got]
            if missing:
                raise SqueezeError(f"refine: measure_groups returned no KLD for {', '.join(missing)}")
            for g in changed:
                group_measured[g] = float(got[g])
                measured_types[g] = types_by_group[g]
        if last_mix is not None and last_mix[0] == alloc.types:
            measured = last_mix[1]
        else:
            measured = float(measure_mix(dict(alloc.types)))
            last_mix = (dict(alloc.types), measured)
        history.append({"round": r, "predicted": predicted, "measured": measured, "bytes": alloc.total_bytes,
                        "changed": changed})
        if best is None or measured <= best[2]:  # the same mix again: its later, better-informed prediction
            best = (alloc, predicted, measured)
        raw = alloc.group_kld(corrected=False)
        for g in types_by_group:
            m = group_measured.get(g)
            # a group predicted or measured at no KLD gives no ratio: keep what it had
            if m is not None and math.isfinite(m) and m >= 0 and raw.get(g, 0.0) > 0:
                corrections[g] = m / raw[g]
        corrected_sum = sum(corrections.get(g, 1.0) * raw.get(g, 0.0) for g in types_by_group)
        if corrected_sum > 0 and math.isfinite(measured) and measured > 0:
            interaction = measured / corrected_sum
        if _relative_gap(predicted, measured) <= tolerance:
            break
    alloc, predicted, measured = best
    return Refinement(alloc, predicted, measured, corrections, interaction, history)
