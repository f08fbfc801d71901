"""Per-tensor weight error at every candidate type, computed in-process with ggml's quantize.

For tensor W and type T: the imatrix-weighted squared error sum_j a_j sum_i (W_ij - Q_ij)^2,
where Q is W quantized to T and read back (ggml_quantize_chunk with the tensor's imatrix entry,
as llama_model_quantize calls it) and a_j the mean squared input of column j. No file is
written: every (tensor, type) pair is one round trip in memory, rows split over all cores.

Rows are quantized independently, so a tensor's error is a sum over rows: for a tall tensor (the
262k-row token embedding) a systematic sample of rows, scaled up, estimates it to well under a
percent at a fraction of the cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.engine.ggml_quant import round_trip
from pipeline.formats.ggml_types import fits
from pipeline.formats.gguf_index import read_index, tensor_values
from pipeline.formats.imatrix_file import read_imatrix
from pipeline.formats.model_info import ModelInfo
from pipeline.choose.budget import tensor_bytes
from pipeline.progress import bar

# Rows sampled from a tensor with more (a 262k x 640 embedding: 1 row in 16).
MAX_ROWS = 16384


@dataclass(frozen=True)
class TensorError:
    """The imatrix-weighted squared weight error of one tensor at one type, and its size there."""

    tensor: str
    group: str  # pipeline.choose.groups.group_of
    type: str
    bytes: int
    error: float


def column_weights(weights: dict[str, np.ndarray], name: str, n_cols: int) -> np.ndarray | None:
    """The imatrix entry of a tensor when it has one of the right size (the embedding has none:
    its rows are looked up, and as the tied output its inputs are not recorded)."""
    values = weights.get(name)
    if values is not None and values.size == n_cols:
        return values.astype(np.float32)
    return None


def sampled_rows(n_rows: int, max_rows: int = MAX_ROWS) -> np.ndarray:
    step = max(1, -(-n_rows // max_rows))
    return np.arange(0, n_rows, step)


def tensor_error(values: np.ndarray, qtype: str, weights: np.ndarray | None, scale: float = 1.0) -> float:
    """Weighted squared error of `values` (rows, n) stored in `qtype`, times `scale`."""
    q = round_trip(values, qtype, weights)
    d2 = np.square(values - q, dtype=np.float32).sum(axis=0, dtype=np.float64)  # per column
    w = weights.astype(np.float64) if weights is not None else 1.0
    return float((d2 * w).sum()) * scale


def tensor_errors(base: Path, imatrix_path: Path | None, info: ModelInfo, types, group_of, only=None,
                  max_rows: int = MAX_ROWS) -> list[TensorError]:
    """A row for every quantizable tensor whose `group_of(name)` is not None (or those in
    `only`) and every type in `types` its rows fit."""
    weights = read_imatrix(imatrix_path).normalized() if imatrix_path else {}
    index = read_index(base)
    wanted = [t for t in info.quantizable() if group_of(t.name) is not None and (only is None or t.name in only)]
    rows = []
    with bar(total=len(wanted), desc="weight error per tensor", unit="tensor") as progress:
        for t in wanted:
            values = tensor_values(base, index[t.name])
            pick = sampled_rows(values.shape[0], max_rows)
            sample = values[pick] if len(pick) < values.shape[0] else values
            scale = values.shape[0] / len(pick)
            cw = column_weights(weights, t.name, values.shape[1])
            for qtype in types:
                if fits(t.shape, qtype):
                    rows.append(TensorError(t.name, group_of(t.name), qtype, tensor_bytes(qtype, t.shape),
                                            tensor_error(sample, qtype, cw, scale)))
            progress.update(1)
    return rows
