"""Choose a type for every tensor so the file fits a size budget with the least predicted KLD.

Each tensor t can take any measured type its rows fit; its predicted KLD at type T is
c_g * alpha_g * error_t(T) (pipeline.choose.sensitivity: alpha_g is the measured KLD per unit of
weight error of t's group - a layer's attention, a layer's MLP, the embedding; c_g is a correction
from measuring the chosen mix, pipeline.choose.refine, 1 until then). The predictions add up over
tensors (second-order view of KLD), so this is a multiple-choice knapsack, solved in
pipeline.choose.knapsack: a Lagrangian price per byte bisected to the budget, the bytes left spent
on upgrades, then swaps while they lower the predicted KLD.

Nothing anchors a tensor to its stock type: under a budget equal to a stock mix's size, tensors
that are cheap to shrink go below their stock type to pay for sensitive ones going above it.
`start` (e.g. the stock mix) is only one more seed for the local search and a column in the
explanation; `frozen` tensors keep the given types (their bytes are spent, not chosen).

The result is one type per tensor, the same choice as a tensor-type file for
`llama-quantize --tensor-type-file`, and a Markdown explanation of every choice.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.choose import knapsack
from pipeline.errors import SqueezeError
from pipeline.formats.tensor_names import kind_of, sort_key
from pipeline.units import MiB

if TYPE_CHECKING:  # only its fields are read: the allocator stays arithmetic, free of the engine
    from pipeline.choose.sensitivity import TensorError


@dataclass(frozen=True)
class Option:
    type: str
    bytes: int
    kld: float  # predicted contribution to the mean KLD, correction applied
    raw_kld: float = math.nan  # alpha * error, before the group's correction


@dataclass(frozen=True)
class Search:
    """How the choice was found (for the explanation). KLDs are sums over tensors, frozen ones
    included, before the interaction factor."""

    lagrangian_bytes: int  # the whole file at the Lagrangian choice
    lagrangian_kld: float
    bound: float  # no mix within the budget predicts less (Lagrangian dual)
    upgrades: int  # single upgrades after the Lagrangian choice
    swaps: int  # one tensor down to pay for another up
    seed: str  # what the kept local search started from: "lagrangian", "greedy order", "start mix"


@dataclass
class Allocation:
    types: dict[str, str]  # tensor -> chosen type (frozen tensors included)
    options: dict[str, list[Option]]  # tensor -> its Pareto frontier of types, smallest first
    chosen: dict[str, int]  # tensor -> index into options
    budget_bytes: int
    fixed_bytes: int  # bytes not chosen here (1-D tensors, metadata)
    price: float  # lambda: KLD per MiB at which the Lagrangian choice fits (the cut-off)
    groups: dict[str, str] = field(default_factory=dict)
    frozen: frozenset[str] = frozenset()  # tensors kept at given types (options: that one type)
    start: dict[str, Option] = field(default_factory=dict)  # the mix it was asked to improve on, as measured
    corrections: dict[str, float] = field(default_factory=dict)  # group -> factor on its KLDs
    interaction: float = 1.0  # measured mix KLD / sum of group KLDs (pipeline.choose.refine)
    search: Search | None = None

    @property
    def tensor_bytes(self) -> int:
        return sum(self.options[t][i].bytes for t, i in self.chosen.items())

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + self.tensor_bytes

    @property
    def predicted_kld(self) -> float:
        return self.interaction * sum(self.options[t][i].kld for t, i in self.chosen.items())

    def group_kld(self, corrected: bool = True) -> dict[str, float]:
        """Per group: the summed predicted KLD of its tensors at the chosen types."""
        out: dict[str, float] = defaultdict(float)
        for t, i in self.chosen.items():
            o = self.options[t][i]
            out[self.groups[t]] += o.kld if corrected else o.raw_kld
        return dict(out)

    def group_types(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = defaultdict(dict)
        for t, ty in self.types.items():
            out[self.groups[t]][t] = ty
        return dict(out)


def _rows(errors: list[TensorError], alphas: dict[str, float],
          corrections: dict[str, float]) -> tuple[dict[str, dict[str, Option]], dict[str, str]]:
    rows: dict[str, dict[str, Option]] = defaultdict(dict)
    groups = {}
    for r in errors:
        alpha = alphas.get(r.tensor, alphas.get(r.group))  # a tensor's own alpha, else its group's
        if alpha is None:
            raise SqueezeError(f"allocate: no measured sensitivity for group {r.group} ({r.tensor})")
        raw = alpha * float(r.error)
        rows[r.tensor][r.type] = Option(r.type, int(r.bytes), corrections.get(r.group, 1.0) * raw, raw)
        groups[r.tensor] = r.group
    return rows, groups


def frontier(opts) -> list[Option]:
    """The types no other beats on both size and KLD, smallest first (KLD strictly falling)."""
    out: list[Option] = []
    for o in sorted(opts, key=lambda o: (o.bytes, o.kld)):
        if not out or o.kld < out[-1].kld:
            if out and o.bytes == out[-1].bytes:
                out.pop()
            out.append(o)
    return out


def check_budget_fits(budget_bytes: int, floor: int, where: str, label: str) -> None:
    if budget_bytes < floor:
        raise SqueezeError(f"{where}the budget of {label} is smaller than the smallest possible file, "
                           f"{floor / MiB:.1f} MiB (every tensor at its smallest type)")


def smallest_bytes(options: dict[str, list[Option]], fixed_bytes: int) -> int:
    return fixed_bytes + sum(opts[0].bytes for opts in options.values())


def _measured(rows, t: str, ty: str, what: str, where: str) -> Option:
    if t not in rows:
        raise SqueezeError(f"{where}{what} tensor {t} has no measured types")
    if ty not in rows[t]:
        raise SqueezeError(f"{where}{what} tensor {t}: type {ty} was not measured for it "
                           f"(measured: {', '.join(sorted(rows[t]))})")
    return rows[t][ty]


def _check_corrections(corrections: dict[str, float], where: str) -> None:
    for g, c in corrections.items():
        if not (math.isfinite(c) and c >= 0):
            raise SqueezeError(f"{where}correction for group {g} must be a finite number >= 0, got {c}")


def allocate(errors: list[TensorError], alphas: dict[str, float], budget_bytes: int, fixed_bytes: int,
             where: str = "", budget_label: str | None = None, *, start: dict[str, str] | None = None,
             frozen: dict[str, str] | None = None, corrections: dict[str, float] | None = None) -> Allocation:
    """One type per tensor in `errors` within `budget_bytes` (fixed_bytes included) with the least
    predicted KLD. `frozen` tensors keep their types and only spend bytes; `start` is a mix to
    improve on (measured tensors it names must have been measured at those types); `corrections`
    multiply every predicted KLD of a group's tensors."""
    corrections = dict(corrections or {})
    _check_corrections(corrections, where)
    rows, groups = _rows(errors, alphas, corrections)
    frozen = dict(frozen or {})
    # a stock mix also names tensors outside the measured groups (norms, an untied output): their
    # bytes are the caller's fixed_bytes, not a choice here
    start = {t: ty for t, ty in (start or {}).items() if t in rows}
    options = {t: [_measured(rows, t, ty, "frozen", where)] for t, ty in frozen.items()}
    for t in sorted(rows):
        if t not in frozen:
            options[t] = frontier(rows[t].values())
    free = [t for t in sorted(options) if t not in frozen]
    if not free:
        raise SqueezeError(f"{where}no tensor has measured types to choose from")
    floor = smallest_bytes(options, fixed_bytes)
    check_budget_fits(budget_bytes, floor, where, budget_label or f"{budget_bytes / MiB:.1f} MiB")
    spent = fixed_bytes + sum(options[t][0].bytes for t in frozen)
    capacity = budget_bytes - spent
    items = [options[t] for t in free]

    relaxed = knapsack.lagrangian(items, capacity)
    seeds = [("lagrangian",) + knapsack.fill_ratio(items, relaxed.choice, capacity),
             ("greedy order",) + knapsack.fill_greedy(items, relaxed.choice, capacity)]
    start_choice = _start_choice(items, free, rows, start, where)
    if start_choice is not None and knapsack.size(items, start_choice) <= capacity:
        seeds.append(("start mix", start_choice, 0))
    best = None
    for name, seed, filled in seeds:
        choice, upgrades, swaps = knapsack.polish(items, seed, capacity)
        kld = knapsack.total(items, choice)
        if best is None or kld < best[0]:
            best = (kld, name, choice, filled + upgrades, swaps)
    _, seed_name, choice, upgrades, swaps = best

    chosen = {t: 0 for t in frozen}
    chosen.update(zip(free, choice))
    frozen_kld = sum(options[t][0].kld for t in frozen)
    search = Search(spent + knapsack.size(items, relaxed.choice), frozen_kld + knapsack.total(items, relaxed.choice),
                    frozen_kld + relaxed.bound, upgrades, swaps, seed_name)
    types = {t: options[t][i].type for t, i in chosen.items()}
    start_options = {t: _measured(rows, t, ty, "start", where) for t, ty in start.items()}
    return Allocation(types, options, chosen, budget_bytes, fixed_bytes, relaxed.price * MiB, groups,
                      frozenset(frozen), start_options, corrections, 1.0, search)


def _start_choice(items, free, rows, start, where) -> list[int] | None:
    """The start mix as frontier indices: a type off the frontier becomes the frontier type that
    is no larger and predicts no more (one always exists). None when start names no free tensor."""
    if not any(t in start for t in free):
        return None
    choice = []
    for t, opts in zip(free, items):
        if t not in start:
            choice.append(0)
            continue
        o = _measured(rows, t, start[t], "start", where)
        choice.append(max(i for i, f in enumerate(opts) if f.bytes <= o.bytes))
    return choice


def explain_markdown(alloc: Allocation, title: str, measured_note: str = "", history: list[dict] | None = None) -> str:
    """How the mix was found (method, price, bound, frozen tensors, rounds of measured refinement)
    and every tensor's type and why: its predicted KLD at the chosen type, and what the next
    smaller and next larger type would lose or gain per MiB, against the cut-off price."""
    lines = [f"## {title}", ""]
    lines.append(f"Budget {alloc.budget_bytes / MiB:.2f} MiB; chosen file {alloc.total_bytes / MiB:.2f} MiB "
                 f"({alloc.fixed_bytes / MiB:.2f} MiB of it is metadata and 1-D tensors). Predicted mean KLD "
                 f"{alloc.predicted_kld:.4f}.")
    lines += ["", _method(alloc)]
    if alloc.frozen:
        lines += ["", "Frozen (kept at the given types, their bytes counted in the budget, not chosen): "
                  + ", ".join(f"`{t}` {alloc.types[t]}" for t in sorted(alloc.frozen, key=sort_key)) + "."]
    if alloc.start:
        lines += ["", _against_start(alloc)]
    if measured_note:
        lines += ["", measured_note]
    if history:
        lines += ["", "### Measured refinement", "",
                  "Each round allocates with the corrections so far, then measures the chosen mix and every group "
                  "whose types changed (that group alone at its types); a group's correction is its measured KLD "
                  "over its uncorrected prediction, and an interaction factor scales the sum to the measured mix.",
                  "", "| Round | Predicted KLD | Measured KLD | MiB | Groups measured |", "|---|---|---|---|---|"]
        for h in history:
            changed = h.get("changed") or []
            shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
            lines.append(f"| {h['round']} | {h['predicted']:.4f} | {h['measured']:.4f} | {h['bytes'] / MiB:.2f} | "
                         f"{shown or '-'} |")
    if alloc.corrections or alloc.interaction != 1.0:
        lines += ["", f"Corrections: interaction factor {alloc.interaction:.3g} on the sum; per group "
                  + (", ".join(f"{g} x{c:.3g}" for g, c in sorted(alloc.corrections.items())) or "none")
                  + ". The per-tensor KLDs below include the group factors, not the interaction factor."]
    counts = Counter()
    for t, ty in alloc.types.items():
        counts[(kind_of(t), ty)] += 1
    lines += ["", "### Types by tensor kind", "", "| Tensor kind | Type | Tensors |", "|---|---|---|"]
    for (kind, ty), n in sorted(counts.items()):
        lines.append(f"| {kind} | {ty} | {n} |")
    start_col = bool(alloc.start)
    lines += ["", "### Every tensor", "",
              "| Tensor | Type |" + (" Start |" if start_col else "") + " MiB | Predicted KLD | Why |",
              "|---|---|" + ("---|" if start_col else "") + "---|---|---|"]
    for t in sorted(alloc.types, key=sort_key):
        o = alloc.options[t][alloc.chosen[t]]
        start = ""
        if start_col:
            s = alloc.start.get(t)
            start = " - |" if s is None else f" {s.type} {_arrow(s, o)} |"
        lines.append(f"| `{t}` | {o.type} |{start} {o.bytes / MiB:.2f} | {o.kld:.2e} | {_why(alloc, t)} |")
    return "\n".join(lines) + "\n"


def _method(alloc: Allocation) -> str:
    s = alloc.search
    if s is None:
        return ""
    text = ("Method: Lagrangian relaxation. Every tensor takes the type that minimises its predicted KLD + "
            "lambda x its bytes; lambda was bisected over the tensors' hull breakpoints to the lowest price whose "
            f"choice fits, lambda = {alloc.price:.4g} KLD per MiB (file {s.lagrangian_bytes / MiB:.2f} MiB, "
            f"predicted KLD {alloc.interaction * s.lagrangian_kld:.4f}). ")
    moves = f"{s.upgrades} single upgrade{'s' * (s.upgrades != 1)} and {s.swaps} swap{'s' * (s.swaps != 1)}"
    if s.seed == "start mix":
        text += (f"Starting from the start mix, {moves} (one tensor down to pay for another up) did better, "
                 "so that was kept. ")
    else:
        text += (f"The {(alloc.budget_bytes - s.lagrangian_bytes) / MiB:.2f} MiB left were spent by {moves} "
                 "(one tensor down to pay for another up). ")
    text += (f"No mix within the budget can predict less than {alloc.interaction * s.bound:.4f} "
             "(the Lagrangian bound).")
    return text


def _against_start(alloc: Allocation) -> str:
    up = down = same = 0
    for t, s in alloc.start.items():
        o = alloc.options[t][alloc.chosen[t]]
        if o.bytes > s.bytes:
            up += 1
        elif o.bytes < s.bytes:
            down += 1
        else:
            same += 1
    text = f"Against the start mix: {up} tensors above their start type, {down} below, {same} the same size."
    if set(alloc.start) >= set(alloc.chosen) - alloc.frozen:
        kld = alloc.interaction * (sum(s.kld for s in alloc.start.values())
                                   + sum(alloc.options[t][0].kld for t in alloc.frozen if t not in alloc.start))
        size = alloc.fixed_bytes + sum(s.bytes for s in alloc.start.values()) + \
            sum(alloc.options[t][0].bytes for t in alloc.frozen if t not in alloc.start)
        text += f" The start mix is {size / MiB:.2f} MiB with a predicted KLD of {kld:.4f}."
    return text


def _arrow(start: Option, o: Option) -> str:
    return "up" if o.bytes > start.bytes else "down" if o.bytes < start.bytes else "="


def _why(alloc: Allocation, t: str) -> str:
    if t in alloc.frozen:
        return "frozen (kept at the given type)"
    i = alloc.chosen[t]
    opts = alloc.options[t]
    o = opts[i]
    why = []
    if i + 1 < len(opts):
        up = opts[i + 1]
        gain = knapsack.slope(o, up) * MiB
        reason = "no room left for it" if gain > alloc.price else "less than the cut-off"
        why.append(f"{up.type} would save {gain:.3g} KLD/MiB ({reason})")
    else:
        why.append("best measured type")
    if i > 0:
        down = opts[i - 1]
        why.append(f"{down.type} would lose {knapsack.slope(down, o) * MiB:.3g} KLD/MiB saved")
    else:
        why.append("smallest type its rows allow")
    return "; ".join(why)
