"""layers.csv: per block, the mean cosine similarity between the hidden state entering and leaving
it over the calibration tokens, and Block Influence (1 - that, ShortGPT's pruning proxy).
One strict reader: a file with another header or a bad row is refused with its line number."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import SqueezeError

LAYERS_HEADER = ("layer", "cos_sim", "block_influence", "tokens")


@dataclass(frozen=True)
class LayerSimilarity:
    layer: int
    cos_sim: float
    block_influence: float
    tokens: int


def write_layers_csv(path: Path, rows: list[LayerSimilarity]) -> None:
    lines = [",".join(LAYERS_HEADER)]
    for r in rows:
        lines.append(f"{r.layer},{r.cos_sim:.8f},{r.block_influence:.8f},{r.tokens}")
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_layers_csv(path: Path) -> list[LayerSimilarity]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if not lines or tuple(lines[0].split(",")) != LAYERS_HEADER:
        raise SqueezeError(f"{path}:1: expected the header {','.join(LAYERS_HEADER)}")
    rows = []
    for i, line in enumerate(lines[1:], start=2):
        parts = line.split(",")
        try:
            rows.append(LayerSimilarity(int(parts[0]), float(parts[1]), float(parts[2]), int(parts[3])))
        except (ValueError, IndexError):
            raise SqueezeError(f"{path}:{i}: expected layer,cos_sim,block_influence,tokens numbers") from None
    return rows


def block_influence(path: Path | None) -> dict[int, float]:
    """Block Influence per layer from layers.csv, or {} when the run has none."""
    if path is None or not Path(path).exists():
        return {}
    return {r.layer: r.block_influence for r in read_layers_csv(path)}
