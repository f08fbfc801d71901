"""Per-tensor weight error at every candidate type, computed in-process with ggml's quantize.

For tensor W and type T: the imatrix-weighted squared error sum_j a_j sum_i (W_ij - Q_ij)^2,
where Q is W quantized to T and read back (ggml_quantize_chunk with the tensor's imatrix entry,
as llama_model_quantize calls it) and a_j the mean squared input of column j. No file is
written: every (tensor, type) pair is one round trip in memory, rows split over all cores.

Rows are quantized independently, so a tensor's error is a sum over rows, and a systematic
sample of rows (every k-th), scaled up, estimates it. The sampling rule: each matrix of a block
tensor contributes at most BLOCK_ROWS rows (an expert tensor shares them among its experts, at
least MIN_ROWS_PER_MATRIX each), a tensor outside the blocks (the token embedding, an untied
output: one row per vocabulary entry, rows that vary far more) at most VOCAB_ROWS. The cost of
the whole map then grows with the number of matrices times their row length, not with every
weight; and since every candidate type of a tensor is measured on the same rows, the ratios
between types that the allocator trades on are estimated far better than the errors themselves.
Measured on Gemma 3 270M (tests/test_sensitivity.py, scripts/bench_sampled_errors.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.choose.budget import tensor_bytes
from pipeline.engine.ggml_quant import round_trip
from pipeline.formats.ggml_types import fits
from pipeline.formats.gguf_index import read_index, tensor_values
from pipeline.formats.imatrix_file import read_imatrix
from pipeline.formats.model_info import ModelInfo
from pipeline.formats.tensor_names import layer_of
from pipeline.progress import bar

# Rows sampled per tensor (see the module's docstring): a 262k x 640 embedding keeps 1 row in 16,
# a 2048-row FFN matrix 1 in 4.
BLOCK_ROWS = 512
VOCAB_ROWS = 16384
MIN_ROWS_PER_MATRIX = 32


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


def sampled_rows(n_rows: int, max_rows: int) -> np.ndarray:
    step = max(1, -(-n_rows // max_rows))
    return np.arange(0, n_rows, step)


def row_limit(name: str, n_matrices: int) -> int:
    """Rows sampled from each matrix of tensor `name` (the sampling rule)."""
    if layer_of(name) is None:
        return VOCAB_ROWS
    return max(MIN_ROWS_PER_MATRIX, BLOCK_ROWS // n_matrices)


def tensor_error(values: np.ndarray, qtype: str, weights: np.ndarray | None, scale: float = 1.0) -> float:
    """Weighted squared error of `values` (rows, n) stored in `qtype`, times `scale`."""
    q = round_trip(values, qtype, weights)
    d2 = np.square(values - q, dtype=np.float32).sum(axis=0, dtype=np.float64)  # per column
    w = weights.astype(np.float64) if weights is not None else 1.0
    return float((d2 * w).sum()) * scale


def matrix_weights(weights: dict[str, np.ndarray], name: str, n_cols: int, n_matrices: int) -> list:
    """The imatrix entry's slice for each matrix of a tensor: an expert tensor's entry holds one
    slice per expert, each quantized with its own (as llama_model_quantize does)."""
    values = weights.get(name)
    if values is not None and values.size == n_cols * n_matrices and n_matrices > 1:
        flat = values.astype(np.float32).reshape(n_matrices, n_cols)
        return list(flat)
    return [column_weights(weights, name, n_cols)] * n_matrices


def tensor_errors(base: Path, imatrix_path: Path | None, info: ModelInfo, types, group_of, only=None,
                  sample: bool = True) -> list[TensorError]:
    """A row for every quantizable tensor whose `group_of(name)` is not None (or those in
    `only`) and every type in `types` its rows fit; `sample=False` measures every row."""
    weights = read_imatrix(imatrix_path).normalized() if imatrix_path else {}
    index = read_index(base)
    wanted = [t for t in info.quantizable() if group_of(t.name) is not None and (only is None or t.name in only)]
    rows = []
    with bar(total=len(wanted), desc="weight error per tensor", unit="tensor") as progress:
        for t in wanted:
            entry = index[t.name]
            n_cols = int(entry.shape[0])
            mats = int(np.prod(entry.shape[2:])) if len(entry.shape) > 2 else 1
            per_matrix = int(entry.shape[1])
            pick = sampled_rows(per_matrix, row_limit(t.name, mats) if sample else per_matrix)
            scale = per_matrix / len(pick)
            values = tensor_values(base, entry, np.concatenate([e * per_matrix + pick for e in range(mats)]))
            samples = np.split(values, mats)
            slices = matrix_weights(weights, t.name, n_cols, mats)
            for qtype in types:
                if fits(t.shape, qtype):
                    error = sum(tensor_error(m, qtype, w, scale) for m, w in zip(samples, slices))
                    rows.append(TensorError(t.name, group_of(t.name), qtype, tensor_bytes(qtype, t.shape), error))
            progress.update(1)
    return rows
