"""`prune: {auto: K}`: pick the K layers whose removal costs least, measured.

Greedy on measured KLD: the set grows one layer at a time, each time by the candidate whose
removal (together with the layers already picked) gives the lowest mean KLD against the base on
calibration chunks. Measuring every layer at every step costs K x n_layers model runs, so the
cheap proxies choose the candidates first: the layers with the lowest Block Influence
(layers.csv) and the highest imatrix CosSim with the layer above, taken alternately; the first
`n_candidates` are measured. Layer 0 is never a candidate when a proxy exists (it has no predecessor to be
redundant with).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.errors import SqueezeError
from pipeline.formats.prune import prune_gguf
from pipeline.progress import bar


@dataclass
class PruneChoice:
    """The layers `prune: {auto: K}` drops and how they were found (pruned/autoK.json)."""

    layers: list[int]  # sorted, original numbers
    order: list[int]  # as picked
    kld: float  # measured with all of them removed
    candidates: list[int]
    steps: list[dict]  # per pick: {"picked": layer, "tried": {layer: kld}}
    proxies: dict = field(default_factory=dict)  # the rankings the candidates came from

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def proxy_ranking(n_layers: int, cossim: dict[int, float], bi: dict[int, float]) -> list[int]:
    """Layers from most to least prunable by the proxies: the per-proxy rankings (low Block
    Influence first, high CosSim first) interleaved, so the first M hold the top of each proxy.
    All layers in order when there is no proxy; layer 0 last when there is one."""
    rankings = []
    if bi:
        rankings.append(sorted(bi, key=lambda layer: (bi[layer], layer)))
    if cossim:
        rankings.append(sorted(cossim, key=lambda layer: (-cossim[layer], layer)))
    if not rankings:
        return list(range(n_layers))
    out: list[int] = []
    for items in zip(*rankings):
        for layer in items:
            if layer not in out and 0 <= layer < n_layers:
                out.append(layer)
    out += [layer for layer in range(n_layers) if layer not in out]  # layers a proxy lacks
    if n_layers > 1 and 0 in out:
        out.remove(0)
        out.append(0)
    return out


def default_candidates(k: int, n_layers: int) -> int:
    return min(n_layers, max(2 * k + 2, 6))


def choose_layers(base: Path, k: int, n_layers: int, probe, ranking: list[int], n_candidates: int,
                  workdir: Path, where: str = "", echo=None) -> PruneChoice:
    """Greedy choice of k layers, each step's measurements kept."""
    if k >= n_layers:
        raise SqueezeError(f"{where}cannot prune {k} of {n_layers} layers; K must be below the layer count")
    candidates = ranking[:max(n_candidates, k)]
    picked: list[int] = []
    steps = []
    kld = math.nan
    with bar(total=sum(len(candidates) - i for i in range(k)), desc=f"choose {k} layers", unit="run") as progress:
        for _ in range(k):
            tried = {}
            for layer in candidates:
                if layer in picked:
                    continue
                with tempfile.TemporaryDirectory(dir=workdir) as tmp:
                    path = Path(tmp) / "pruned.gguf"
                    prune_gguf(base, path, picked + [layer])
                    tried[layer] = probe.kld(path)
                progress.update(1)
            best = min(tried, key=lambda layer: (tried[layer], layer))
            picked.append(best)
            kld = tried[best]
            steps.append({"picked": best, "tried": {str(k_): v for k_, v in sorted(tried.items())}})
            if echo:
                echo(f"prune auto: picked layer {best} (KLD {kld:.4f} with {sorted(picked)} removed)")
    return PruneChoice(sorted(picked), picked, kld, candidates, steps)
