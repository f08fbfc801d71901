"""The multiple-choice knapsack behind type allocation: one option per item (a tensor's types),
the least summed KLD whose bytes fit a capacity. Pure arithmetic; pipeline.choose.allocate maps
tensors and types onto it.

Byte counts are far too large for an exact dynamic programme, so the search has three parts:

1. Lagrangian relaxation. At a price lambda (KLD per byte) every item on its own takes the option
   minimising kld + lambda * bytes; that option lies on the item's lower convex hull and is found
   by counting the hull segments that save more than lambda per byte. Bytes fall as lambda rises,
   and the choice only changes where lambda crosses a segment's slope, so lambda is bisected over
   those breakpoints to the smallest price whose choice fits. That choice is optimal for its own
   size (no mix of as many bytes or fewer predicts less), and kld + lambda * (bytes - capacity) is a
   lower bound on any mix that fits: the gap to the optimum is at most lambda times the bytes left.
2. Spending what is left, two ways, both kept as seeds: the best-value single upgrades that still
   fit, over every option (types off the hull fill gaps a hull step is too large for), and the
   order of the greedy allocator this replaced (hull steps by KLD saved per byte, skipping those
   that do not fit) - with it the result is never worse than that greedy's.
3. Local search from each seed (and from a caller's start mix): the best single upgrade that fits,
   or swap - one item down to any smaller option to pay for another up - while either lowers KLD.
   Swaps are what let a start mix trade down where a tensor is cheap to shrink.
"""

from __future__ import annotations

import heapq
import itertools
from bisect import bisect_right
from dataclasses import dataclass

# Each item's options: objects with .bytes and .kld, smallest first, bytes strictly rising and KLD
# strictly falling (a Pareto frontier; pipeline.choose.allocate builds them).


def slope(a, b) -> float:
    """KLD saved per extra byte going from option a to the larger option b."""
    return (a.kld - b.kld) / (b.bytes - a.bytes)


def hull_indices(opts) -> list[int]:
    """Indices of the lower convex hull of a frontier (slopes strictly falling), smallest first."""
    hull: list[int] = []
    for i, o in enumerate(opts):
        while len(hull) >= 2 and slope(opts[hull[-2]], opts[hull[-1]]) <= slope(opts[hull[-1]], o):
            hull.pop()
        hull.append(i)
    return hull


def size(items, choice) -> int:
    return sum(opts[c].bytes for opts, c in zip(items, choice))


def total(items, choice) -> float:
    return sum(opts[c].kld for opts, c in zip(items, choice))


@dataclass(frozen=True)
class Relaxed:
    """The Lagrangian choice: frontier indices, its price and the lower bound it proves."""

    choice: list[int]
    price: float  # lambda, KLD per byte (0 when every item's best option fits)
    bound: float  # no choice within the capacity sums to less KLD


def lagrangian(items, capacity: int) -> Relaxed:
    hulls = [hull_indices(opts) for opts in items]
    slopes = [[slope(opts[h[m]], opts[h[m + 1]]) for m in range(len(h) - 1)] for opts, h in zip(items, hulls)]

    def pick(lam: float) -> list[int]:
        # hull slopes fall, so the segments worth more than lam per byte are a prefix
        return [h[sum(1 for s in ss if s > lam)] for h, ss in zip(hulls, slopes)]

    prices = [0.0] + sorted({s for ss in slopes for s in ss})
    lo, hi = 0, len(prices) - 1  # the highest price picks every item's smallest option
    while lo < hi:
        mid = (lo + hi) // 2
        if size(items, pick(prices[mid])) <= capacity:
            hi = mid
        else:
            lo = mid + 1
    choice = pick(prices[lo])
    lam = prices[lo]
    return Relaxed(choice, lam, total(items, choice) - lam * (capacity - size(items, choice)))


def fill_greedy(items, choice: list[int], capacity: int) -> tuple[list[int], int]:
    """The replaced greedy's order from a hull choice: hull steps by KLD saved per byte, each
    taken if it fits. Returns the new choice and the number of steps taken."""
    hulls = [hull_indices(opts) for opts in items]
    pos = [h.index(c) for h, c in zip(hulls, choice)]
    choice = list(choice)
    left = capacity - size(items, choice)
    heap = []

    def push(i):
        if pos[i] + 1 < len(hulls[i]):
            heapq.heappush(heap, (-slope(items[i][hulls[i][pos[i]]], items[i][hulls[i][pos[i] + 1]]), i))

    for i in range(len(items)):
        push(i)
    taken = 0
    while heap:
        _, i = heapq.heappop(heap)
        extra = items[i][hulls[i][pos[i] + 1]].bytes - items[i][choice[i]].bytes
        if extra > left:
            continue  # smaller steps further down the order may still fit
        left -= extra
        pos[i] += 1
        choice[i] = hulls[i][pos[i]]
        taken += 1
        push(i)
    return choice, taken


def fill_ratio(items, choice: list[int], capacity: int) -> tuple[list[int], int]:
    """Repeatedly the single upgrade, to any larger option, with the most KLD saved per byte
    among those that still fit."""
    choice = list(choice)
    left = capacity - size(items, choice)
    taken = 0
    while True:
        best = None
        for i, opts in enumerate(items):
            cur = opts[choice[i]]
            for j in range(choice[i] + 1, len(opts)):
                extra = opts[j].bytes - cur.bytes
                if extra <= left:
                    key = ((cur.kld - opts[j].kld) / extra, cur.kld - opts[j].kld)
                    if best is None or key > best[0]:
                        best = (key, i, j, extra)
        if best is None:
            return choice, taken
        _, i, j, extra = best
        choice[i] = j
        left -= extra
        taken += 1


def polish(items, choice: list[int], capacity: int, max_moves: int | None = None) -> tuple[list[int], int, int]:
    """Local search: the move that lowers KLD most - one upgrade that fits, or a swap (one item
    down, or two items a step down each, to pay for another up) - until none does. Returns the
    choice, the upgrades and the swaps made."""
    choice = list(choice)
    upgrades = swaps = 0
    for _ in range(max_moves if max_moves is not None else 10 * len(items) + 100):
        move = _best_move(items, choice, capacity - size(items, choice))
        if move is None:
            break
        up, up_to, downs = move
        choice[up] = up_to
        for d, d_to in downs:
            choice[d] = d_to
        if downs:
            swaps += 1
        else:
            upgrades += 1
    return choice, upgrades, swaps


def _best_move(items, choice, left):
    ups, downs, steps = [], [(0, 0.0, ())], []  # downs: (bytes freed, KLD lost, ((item, to), ...))
    for i, opts in enumerate(items):
        cur = opts[choice[i]]
        for j, o in enumerate(opts):
            if j > choice[i]:
                ups.append((o.bytes - cur.bytes, cur.kld - o.kld, i, j))
            elif j < choice[i]:
                downs.append((cur.bytes - o.bytes, o.kld - cur.kld, ((i, j),)))
        if choice[i] > 0:
            steps.append(downs[-1])
    if not ups:
        return None
    # two items a step down each pay for what neither frees alone
    downs += [(a[0] + b[0], a[1] + b[1], a[2] + b[2]) for a, b in itertools.combinations(steps, 2)]
    ups.sort(key=lambda u: (u[0], -u[1], u[2]))
    best_ups = _prefix_bests(ups, 3)
    extras = [u[0] for u in ups]
    scale = abs(total(items, choice)) or 1.0
    best, best_net = None, 1e-12 * scale  # ignore float noise: a move must save something real
    for freed, loss, moved in downs:
        k = bisect_right(extras, left + freed) - 1
        if k < 0:
            continue
        busy = {d for d, _ in moved}
        u = next((u for u in best_ups[k] if u[2] not in busy), None)
        if u is not None and u[1] - loss > best_net:
            best, best_net = (u[2], u[3], moved), u[1] - loss
    return best


def _prefix_bests(ups, n: int) -> list[list]:
    """For each prefix of `ups`: its n largest savings from n different items, largest first."""
    out, cur = [], []
    for u in ups:
        same = next((c for c in cur if c[2] == u[2]), None)
        if same is None or u[1] > same[1]:
            cur = sorted([c for c in cur if c[2] != u[2]] + [u], key=lambda c: -c[1])[:n]
        out.append(cur)
    return out
