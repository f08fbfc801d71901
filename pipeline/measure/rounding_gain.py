"""What error-compensated rounding buys per tensor kind: the output error ||(W - Q) X||^2 of
files with the same types and other rounding, summed over each kind's tensors.

X is the calibration text the second moments were collected on, so the figure is in-sample by
construction (GPTQ minimises exactly this on that text); it says where the rounding works, per
kind, and the KLD on held-out text judges whether that carries to the model's output.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pipeline.formats.gguf_index import read_index, tensor_values
from pipeline.formats.moments_file import Moments
from pipeline.formats.tensor_names import kind_of

UNQUANTIZED = ("F32", "F16", "BF16")


def output_error(weights: np.ndarray, values: np.ndarray, h: np.ndarray) -> float:
    """||(W - Q) X||^2 summed over the calibration tokens: trace((W - Q) H (W - Q)^T); for routed
    experts (H of shape (n_expert, n, n), the rows expert by expert) summed over the experts."""
    h = np.asarray(h, dtype=np.float64)
    d = np.asarray(weights, dtype=np.float64) - np.asarray(values, dtype=np.float64)
    if h.ndim == 3:
        d = d.reshape(h.shape[0], -1, h.shape[1])
        return float(np.einsum("eij,ejk,eik->", d, h, d, optimize=True))
    return float(np.einsum("ij,jk,ik->", d, h, d, optimize=True))


def output_error_by_kind(base: Path, files: Mapping[str, Path], moments: Moments) -> dict[str, dict[str, float]]:
    """kind -> {label: summed output error} for every file in `files` (label -> path), over the
    block weights with a measured input second moment that every file holds quantized, at one type."""
    base_index = read_index(base)
    indexes = {label: read_index(path) for label, path in files.items()}
    out: dict[str, dict[str, float]] = {}
    for name, entry in base_index.items():
        h = moments.of_weight(name)
        held = [ix.get(name) for ix in indexes.values()]
        if h is None or len(entry.shape) not in (2, 3) or any(e is None or e.type.name in UNQUANTIZED for e in held):
            continue
        if len({e.type for e in held}) != 1:
            continue  # other types: not a comparison of rounding
        weights = tensor_values(base, entry)
        sums = out.setdefault(kind_of(name), dict.fromkeys(files, 0.0))
        for label, path in files.items():
            sums[label] += output_error(weights, tensor_values(path, indexes[label][name]), h)
    return out
