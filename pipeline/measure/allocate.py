"""Choose a type for every tensor so the file fits a size budget with the least predicted KLD.

Each tensor t can take any measured type its rows fit; its predicted KLD at type T is
alpha_g * error_t(T) (pipeline.measure.sensitivity: alpha_g is the measured KLD per unit of weight error
of t's group - a layer's attention, a layer's MLP, the embedding). The predictions add up over
tensors (second-order view of KLD), so this is a multiple-choice knapsack: every tensor starts
at its smallest type, then the upgrade that buys the most predicted KLD per byte is taken, again
and again, while it fits (upgrades follow each tensor's lower convex hull of bytes vs KLD).

The result is one type per tensor, the same choice as a tensor-type file for
`llama-quantize --tensor-type-file`, and a Markdown explanation of every choice.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from pipeline.errors import SqueezeError
from pipeline.formats.tensor_names import kind_of, sort_key
from pipeline.measure.sensitivity import TensorError
from pipeline.units import MiB


@dataclass(frozen=True)
class Option:
    type: str
    bytes: int
    kld: float  # predicted contribution to the mean KLD


@dataclass
class Allocation:
    types: dict[str, str]  # tensor -> chosen type
    options: dict[str, list[Option]]  # tensor -> its hull options, smallest first
    chosen: dict[str, int]  # tensor -> index into options
    budget_bytes: int
    fixed_bytes: int  # bytes not chosen here (1-D tensors, metadata)
    price: float  # KLD per MiB of the last upgrade that fitted (the cut-off)
    groups: dict[str, str] = field(default_factory=dict)

    @property
    def tensor_bytes(self) -> int:
        return sum(self.options[t][i].bytes for t, i in self.chosen.items())

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + self.tensor_bytes

    @property
    def predicted_kld(self) -> float:
        return sum(self.options[t][i].kld for t, i in self.chosen.items())


def tensor_options(errors: list[TensorError], alphas: dict[str, float]) -> tuple[dict[str, list[Option]], dict[str, str]]:
    """Per tensor: the options on the lower convex hull of (bytes, predicted KLD), smallest first."""
    by_tensor: dict[str, list[Option]] = defaultdict(list)
    groups = {}
    for r in errors:
        alpha = alphas.get(r.group)
        if alpha is None:
            raise SqueezeError(f"allocate: no measured sensitivity for group {r.group} ({r.tensor})")
        by_tensor[r.tensor].append(Option(r.type, int(r.bytes), alpha * float(r.error)))
        groups[r.tensor] = r.group
    return {t: _hull(opts) for t, opts in by_tensor.items()}, groups


def _hull(opts: list[Option]) -> list[Option]:
    # For each size keep the best type; drop types that a smaller one already beats.
    best: dict[int, Option] = {}
    for o in opts:
        if o.bytes not in best or o.kld < best[o.bytes].kld:
            best[o.bytes] = o
    frontier = []
    for o in sorted(best.values(), key=lambda o: o.bytes):
        if not frontier or o.kld < frontier[-1].kld:
            frontier.append(o)
    hull: list[Option] = []
    for o in frontier:  # lower convex hull: slopes (KLD saved per byte) must decrease
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) <= _slope(hull[-1], o):
            hull.pop()
        hull.append(o)
    return hull


def _slope(a: Option, b: Option) -> float:
    return (a.kld - b.kld) / (b.bytes - a.bytes)


def check_budget_fits(budget_bytes: int, floor: int, where: str, label: str) -> None:
    if budget_bytes < floor:
        raise SqueezeError(f"{where}the budget of {label} is smaller than the smallest possible file, "
                           f"{floor / MiB:.1f} MiB (every tensor at its smallest type)")


def smallest_bytes(options: dict[str, list[Option]], fixed_bytes: int) -> int:
    return fixed_bytes + sum(opts[0].bytes for opts in options.values())


def allocate(errors: list[TensorError], alphas: dict[str, float], budget_bytes: int, fixed_bytes: int,
             where: str = "", budget_label: str | None = None) -> Allocation:
    options, groups = tensor_options(errors, alphas)
    if not options:
        raise SqueezeError(f"{where}no tensor has measured types to choose from")
    floor = smallest_bytes(options, fixed_bytes)
    check_budget_fits(budget_bytes, floor, where, budget_label or f"{budget_bytes / MiB:.1f} MiB")
    chosen = {t: 0 for t in options}
    left = budget_bytes - floor
    heap = []

    def push(t):
        i = chosen[t]
        if i + 1 < len(options[t]):
            a, b = options[t][i], options[t][i + 1]
            heapq.heappush(heap, (-_slope(a, b), t))

    for t in sorted(options):
        push(t)
    price = math.inf
    skipped = []
    while heap:
        neg_slope, t = heapq.heappop(heap)
        a, b = options[t][chosen[t]], options[t][chosen[t] + 1]
        extra = b.bytes - a.bytes
        if extra > left:
            skipped.append(t)  # does not fit; smaller upgrades further down the list may
            continue
        left -= extra
        chosen[t] += 1
        price = -neg_slope * MiB
        push(t)
    types = {t: options[t][i].type for t, i in chosen.items()}
    return Allocation(types, options, chosen, budget_bytes, fixed_bytes,
                      price if math.isfinite(price) else 0.0, groups)


def explain_markdown(alloc: Allocation, title: str, measured_note: str = "") -> str:
    """Every tensor's type and why: its predicted KLD at the chosen type, and what the next
    smaller and next larger type would cost or save per MiB, against the cut-off price."""
    lines = [f"## {title}", ""]
    lines.append(f"Budget {alloc.budget_bytes / MiB:.2f} MiB; chosen file {alloc.total_bytes / MiB:.2f} MiB "
                 f"({alloc.fixed_bytes / MiB:.2f} MiB of it is metadata and 1-D tensors). Predicted mean KLD "
                 f"{alloc.predicted_kld:.4f}. Cut-off: the last upgrade taken saved {alloc.price:.4g} KLD per MiB; "
                 "an upgrade is taken when it saves more per MiB than the ones left and still fits.")
    if measured_note:
        lines += ["", measured_note]
    counts = Counter()
    for t, ty in alloc.types.items():
        counts[(kind_of(t), ty)] += 1
    lines += ["", "### Types by tensor kind", "", "| Tensor kind | Type | Tensors |", "|---|---|---|"]
    for (kind, ty), n in sorted(counts.items()):
        lines.append(f"| {kind} | {ty} | {n} |")
    lines += ["", "### Every tensor", "",
              "| Tensor | Type | MiB | Predicted KLD | Why |", "|---|---|---|---|---|"]
    for t in sorted(alloc.types, key=sort_key):
        i = alloc.chosen[t]
        opts = alloc.options[t]
        o = opts[i]
        why = []
        if i + 1 < len(opts):
            up = opts[i + 1]
            gain = _slope(o, up) * MiB
            reason = "no room left for it" if gain > alloc.price else "less than the cut-off"
            why.append(f"{up.type} would save {gain:.3g} KLD/MiB ({reason})")
        else:
            why.append("best measured type")
        if i > 0:
            down = opts[i - 1]
            why.append(f"{down.type} would cost {_slope(down, o) * MiB:.3g} KLD/MiB saved")
        else:
            why.append("smallest type its rows allow")
        lines.append(f"| `{t}` | {o.type} | {o.bytes / MiB:.2f} | {o.kld:.2e} | {'; '.join(why)} |")
    return "\n".join(lines) + "\n"
