"""`prune: {auto: K}`: pick the K layers whose removal loses least, measured.

Every candidate set is measured, not guessed: a probe (pipeline.choose.memory_probe) removes the
layers from the model it holds in memory and gives the mean KLD against the base on calibration
chunks, about as fast as one forward pass, so whole searches fit where one pruned file per try
did not. Two searches run, and the set with the lowest measured KLD is taken:

- `sleb`: greedy, one layer at a time, every remaining layer re-measured after each removal
  (SLEB, Song et al. 2024: a layer's redundancy changes once its neighbours are gone). K steps,
  n + (n - 1) + ... + (n - K + 1) probes.
- `contiguous`: every window of K consecutive layers (block pruning as in Gromov et al. 2024,
  "The Unreasonable Ineffectiveness of the Deeper Layers", which ranks windows by the angular
  distance between the block's input and output; here each window's removal is measured).
  n - K + 1 probes.

The proxies are measured with the same probe, for comparison and as candidates too: the K layers
of lowest Block Influence (layers.csv), of highest imatrix CosSim with the layer before, and the
last K layers. A set measured once is never measured again (windows and proxies often repeat
SLEB's tries). Nothing here knows an architecture: a layer is whatever the probe removes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Protocol

from pipeline.errors import SqueezeError
from pipeline.progress import bar

# What `choose_layers` does, for the prune step's params: a change of search reruns the step.
SEARCH = "sleb+contiguous, proxies measured; lowest KLD"
PROXIES = ("block_influence", "cossim", "last")


class LayerProbe(Protocol):
    def kld(self, types=None, removed=()) -> float: ...


@dataclass
class Method:
    """One way of picking the K layers and what it measured."""

    name: str  # sleb, contiguous, block_influence, cossim, last
    layers: list[int]  # sorted, original numbers
    kld: float  # measured with all of them removed
    # sleb: per step {"picked", "kld", "tried": {layer: KLD with it and the earlier picks removed}};
    # contiguous: per window {"layers", "kld"}; a proxy: its value for each layer it took
    steps: list[dict] = field(default_factory=list)
    probes: int = 0  # measurements this method made (a set measured before is not measured again)
    seconds: float = 0.0


@dataclass
class PruneChoice:
    """The layers `prune: {auto: K}` drops and how they were found (pruned/autoK.json)."""

    layers: list[int]  # sorted, original numbers
    kld: float  # measured with all of them removed
    method: str  # the method (a key of `methods`) whose set this is
    k: int
    n_layers: int
    candidates: list[int]  # the layers the searches could take (all, unless restricted)
    methods: dict[str, Method]  # searches first, then the proxies; in the order they ran
    proxy_values: dict = field(default_factory=dict)  # {"block_influence": {layer: v}, "cossim": {...}}
    probe: dict = field(default_factory=dict)  # what the KLDs were measured on
    probes: int = 0  # measurements made in all
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


class Measured:
    """KLD of the probe with a set of layers removed, each distinct set measured once."""

    def __init__(self, probe: LayerProbe, progress=None, known: dict[tuple[int, ...], float] | None = None):
        self.probe = probe
        self.progress = progress
        # sets measured before on the same probe (the sensitivity map's single layers removed)
        self.klds: dict[tuple[int, ...], float] = {tuple(sorted(k)): float(v) for k, v in (known or {}).items()}
        self._known = len(self.klds)

    def __call__(self, layers: Iterable[int]) -> float:
        key = tuple(sorted(layers))
        if key not in self.klds:
            self.klds[key] = float(self.probe.kld(removed=list(key)))
        if self.progress is not None:
            self.progress.update(1)
        return self.klds[key]

    @property
    def count(self) -> int:
        """Measurements made here (sets known beforehand not counted)."""
        return len(self.klds) - self._known


def _best(tried: dict) -> object:
    """The key of the lowest value (NaN last), the first of equals."""
    return min(tried, key=lambda key: (math.isnan(tried[key]), tried[key]))


def sleb(measure: Measured, k: int, candidates: list[int]) -> Method:
    """Greedy removal: at each of k steps, every candidate not yet picked is measured together
    with the picks so far, and the lowest is picked."""
    picked: list[int] = []
    steps = []
    kld = math.nan
    for _ in range(k):
        tried = {layer: measure(picked + [layer]) for layer in candidates if layer not in picked}
        best = _best(tried)
        picked.append(best)
        kld = tried[best]
        steps.append({"picked": best, "kld": kld, "tried": {str(layer): v for layer, v in tried.items()}})
    return Method("sleb", sorted(picked), kld, steps)


def windows(n_layers: int, k: int, candidates: Iterable[int] | None = None) -> list[list[int]]:
    """Every run of k consecutive layers of 0..n_layers-1, wholly inside `candidates` if given."""
    allowed = set(range(n_layers) if candidates is None else candidates)
    return [list(range(start, start + k)) for start in range(n_layers - k + 1)
            if allowed.issuperset(range(start, start + k))]


def contiguous(measure: Measured, k: int, n_layers: int, candidates: Iterable[int] | None = None) -> Method | None:
    """Every window of k consecutive layers measured; the lowest taken (None: no window fits)."""
    steps = [{"layers": w, "kld": measure(w)} for w in windows(n_layers, k, candidates)]
    if not steps:
        return None
    best = steps[_best({i: s["kld"] for i, s in enumerate(steps)})]
    return Method("contiguous", list(best["layers"]), best["kld"], steps)


def proxy_picks(k: int, n_layers: int, cossim: dict[int, float], bi: dict[int, float]) -> dict[str, list[int]]:
    """The k layers each proxy would drop: lowest Block Influence, highest CosSim with the layer
    before (layer 0 has no such layer), the last k. A proxy without values is left out."""
    def top(values: dict[int, float], sign: float) -> list[int]:
        ok = [layer for layer in values if 0 <= layer < n_layers and not math.isnan(values[layer])]
        return sorted(sorted(ok, key=lambda layer: (sign * values[layer], layer))[:k])

    out = {}
    if len(bi) >= k:
        out["block_influence"] = top(bi, 1.0)
    if len(cossim) >= k:
        out["cossim"] = top({layer: v for layer, v in cossim.items() if layer != 0}, -1.0)
    out["last"] = list(range(n_layers - k, n_layers))
    return {name: layers for name, layers in out.items() if len(layers) == k}


def search_probes(k: int, n_layers: int) -> int:
    """The most measurements `choose_layers` makes (repeats are fewer): SLEB, windows, proxies."""
    return sum(n_layers - i for i in range(k)) + (n_layers - k + 1) + len(PROXIES)


def choose_layers(probe: LayerProbe, k: int, n_layers: int, cossim: dict[int, float] | None = None,
                  bi: dict[int, float] | None = None, candidates: Iterable[int] | None = None,
                  where: str = "", echo: Callable[[str], None] | None = None,
                  known: dict[tuple[int, ...], float] | None = None) -> PruneChoice:
    """The k layers to drop: SLEB and contiguous windows searched (over `candidates`, all layers
    by default), the proxies' picks measured, the set of lowest measured KLD taken. `known`: KLDs
    of sets already measured with the same probe, not measured again."""
    if not 1 <= k < n_layers:
        raise SqueezeError(f"{where}cannot prune {k} of {n_layers} layers; K must be from 1 to {n_layers - 1}")
    candidates = sorted(set(range(n_layers) if candidates is None else candidates))
    if len(candidates) < k or not all(0 <= c < n_layers for c in candidates):
        raise SqueezeError(f"{where}candidate layers {candidates}: need {k} of them in 0-{n_layers - 1}")
    cossim, bi = dict(cossim or {}), dict(bi or {})
    picks = proxy_picks(k, n_layers, cossim, bi)
    total = sum(len(candidates) - i for i in range(k)) + len(windows(n_layers, k, candidates)) + len(picks)
    started = time.perf_counter()
    methods: dict[str, Method] = {}
    with bar(total=total, desc=f"choose {k} layers", unit="probe") as progress:
        measure = Measured(probe, progress, known)

        def timed(run: Callable[[], Method | None]) -> None:
            t0, n0 = time.perf_counter(), measure.count
            method = run()
            if method is not None:
                method.seconds = round(time.perf_counter() - t0, 3)
                method.probes = measure.count - n0
                methods[method.name] = method
                if echo:
                    echo(f"prune auto: {method.name} drops {method.layers}, KLD {method.kld:.4f} "
                         f"({method.probes} probes, {method.seconds:.1f} s)")

        timed(lambda: sleb(measure, k, candidates))
        timed(lambda: contiguous(measure, k, n_layers, candidates))
        values = {"block_influence": bi, "cossim": cossim, "last": {}}
        for name, layers in picks.items():
            timed(lambda name=name, layers=layers: Method(
                name, layers, measure(layers),
                [{"layer": layer, "value": values[name][layer]} for layer in layers if layer in values[name]]))
    best = _best({name: m.kld for name, m in methods.items()})
    chosen = methods[best]
    if echo:
        echo(f"prune auto: dropping {chosen.layers} ({best}, KLD {chosen.kld:.4f})")
    return PruneChoice(chosen.layers, chosen.kld, best, k, n_layers, candidates, methods,
                       {"block_influence": bi, "cossim": cossim}, probes=measure.count,
                       seconds=round(time.perf_counter() - started, 3))
