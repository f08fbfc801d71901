"""Error-compensated rounding (GPTQ) into llama.cpp's own types: the same scales llama.cpp picks,
other indices on their grid.

llama.cpp rounds every block on its own, weighted by the imatrix (the diagonal of the input's
second moment). GPTQ rounds a matrix's input columns in order and pushes each column's rounding
error onto the columns not rounded yet, through the Cholesky factor of the damped inverse of the
full second moment H = sum x x^T, so the output error ||(W - Q) X|| is what it minimises, not
each value's own error.

Here, for each block of columns (32 or 256 wide, the type's block), the block's scales come from
llama.cpp's own quantizer (ggml_quantize_chunk, with the imatrix) on the block's current,
error-updated weights; then each column is rounded onto that block's grid
(pipeline.formats.block_grid) and its error fed forward. The bytes are llama.cpp's block with new
indices: the same type and size, loaded by stock llama.cpp.
"""

from __future__ import annotations

import numpy as np

from pipeline.engine.assemble import Rounder
from pipeline.engine.ggml_quant import quantize_rows, row_bytes
from pipeline.errors import SqueezeError
from pipeline.formats import block_grid, ggml_types
from pipeline.formats.moments_file import Moments

# Added to H's diagonal, as a share of its mean, before inverting (the GPTQ paper's 1 %): keeps
# the factor finite where inputs are nearly collinear.
DAMP = 0.01


def supports(qtype: str) -> bool:
    """Whether `qtype` is rounded here; other types (the i-quants) keep llama.cpp's rounding."""
    return qtype.upper() in block_grid.SUPPORTED


def inverse_factor(h: np.ndarray, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """(U, dead): the upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, and the columns
    no input ever reached (diag 0), which are rounded without feedback."""
    h = np.array(h, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    # With J the order reversed, J H J = M M^T (M lower) gives H = R R^T with R = J M J upper, so
    # H^-1 = (R^-1)^T R^-1 and U = R^-1 = J M^-1 J: one factorisation and one triangular inverse.
    try:
        m = np.linalg.cholesky(h[::-1, ::-1])
    except np.linalg.LinAlgError as exc:
        raise SqueezeError(f"the input second moment is not positive definite even damped ({exc})") from None
    u = lower_inverse(m)[::-1, ::-1]
    return np.ascontiguousarray(np.triu(u)), dead


def lower_inverse(m: np.ndarray) -> np.ndarray:
    """The inverse of a lower triangular matrix, by halves: [[A, 0], [C, D]]^-1 is
    [[A^-1, 0], [-D^-1 C A^-1, D^-1]]. A sixth of the work of a general inverse, in matrix
    products (numpy has no triangular inverse of its own)."""
    n = m.shape[0]
    if n <= 128:
        return np.linalg.inv(m)
    k = n // 2
    a, d = lower_inverse(m[:k, :k]), lower_inverse(m[k:, k:])
    out = np.zeros_like(m)
    out[:k, :k], out[k:, k:] = a, d
    out[k:, :k] = -(d @ m[k:, :k]) @ a
    return out


def gptq_rows(weights: np.ndarray, qtype: str, h: np.ndarray, column_weights: np.ndarray | None = None,
              damp: float = DAMP, factor: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """`weights` (n_rows, n) rounded into `qtype` with error feedback through H (n, n): the
    (n_rows, row_bytes) uint8 rows llama.cpp's file holds. `column_weights`: the tensor's imatrix
    entry, which llama.cpp's quantizer picks the block scales with; `factor`: inverse_factor(h)
    when the caller has it already (the weights that read one input share it)."""
    qtype = qtype.upper()
    if not supports(qtype):
        raise SqueezeError(f"{qtype}: no error-compensated rounding (supported: {', '.join(block_grid.SUPPORTED)})")
    w = np.asarray(weights)
    n_rows, n = w.shape
    if h.shape != (n, n):
        raise SqueezeError(f"an input second moment of {h.shape} for rows of {n}")
    size = ggml_types.block_size(ggml_types.tensor_type(qtype))
    if n % size:
        raise SqueezeError(f"rows of {n} values do not divide into {qtype} blocks of {size}")
    # A column no input reached keeps its values, rounded without feedback (its row of U is
    # diagonal): an expert no calibration token was routed to is rounded as llama.cpp would, not
    # zeroed as GPTQ's reference does, since other text may well reach it.
    u, _ = factor if factor is not None else inverse_factor(h, damp)
    # Columns are rows here (n, n_rows): the loop below reads and updates one column at a time,
    # and a contiguous one costs half what a strided one does.
    wt = np.array(w.T, dtype=np.float64, order="C")
    per_block = row_bytes(qtype, size)
    out = np.empty((n_rows, n // size, per_block), dtype=np.uint8)
    imp = None if column_weights is None else np.asarray(column_weights, dtype=np.float32)
    for b, b0 in enumerate(range(0, n, size)):
        b1 = b0 + size
        block = wt[b0:b1]  # a view: the updates below land in wt
        raw = quantize_rows(np.ascontiguousarray(block.T, dtype=np.float32), qtype,
                            None if imp is None else imp[b0:b1])
        grid = block_grid.decode(raw, qtype, size)
        scale, offset = grid.scale.T.astype(np.float64), grid.offset.T.astype(np.float64)
        divisor = np.where(scale != 0, scale, np.inf)  # a zero scale holds only index 0
        index = np.empty((size, n_rows), dtype=np.int16)
        err = np.empty((size, n_rows), dtype=np.float64)
        for j in range(size):
            c = b0 + j
            k = np.clip(np.rint((block[j] - offset[j]) / divisor[j]), 0, grid.levels - 1)
            index[j] = k
            e = (block[j] - (scale[j] * k + offset[j])) / u[c, c]
            err[j] = e
            block[j + 1:] -= u[c, c + 1:b1, None] * e  # within the block now; beyond it once, below
        if b1 < n:
            wt[b1:] -= u[b0:b1, b1:].T @ err
        out[:, b] = block_grid.encode(raw, qtype, size, index.T).reshape(n_rows, per_block)
    return out.reshape(n_rows, -1)


class GptqRounder(Rounder):
    """Rounds every block matrix whose input's second moment the calibration pass measured, in a
    type with a grid here: a dense weight with its input's H, a routed expert tensor expert by
    expert with the H of the tokens routed to each. The rest (i-quants, the embedding and the
    output) keeps llama.cpp's rounding, and `describe` says which each tensor gets, and why."""

    def __init__(self, moments: Moments, identity: str):
        self.moments, self.identity = moments, f"gptq:{identity}"
        # per input, the last two: q/k/v share one and gate/up one, and a file's tensors come
        # layer by layer (a 12B model's factors together would not fit in memory)
        self._factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def describe(self, name, shape, qtype):
        if name not in self.moments.of or len(shape) not in (2, 3):
            return "llama.cpp's (no input second moment measured)"
        if not supports(qtype):
            return f"llama.cpp's ({qtype} has no grid here)"
        return "gptq"

    def round(self, name, values, shape, qtype, column_weights):
        if self.describe(name, shape, qtype) != "gptq":
            return None
        key = self.moments.of[name]
        h = self.moments.h(key)
        n = shape[0]
        rows = np.asarray(values, dtype=np.float32).reshape(-1, n)
        if len(shape) == 3:  # (n, rows per expert, experts): each expert its own H
            n_expert = shape[2]
            if h.shape != (n_expert, n, n):
                raise SqueezeError(f"{name}: second moments of {h.shape} for {n_expert} experts of {n} inputs")
            imp = None if column_weights is None else np.asarray(column_weights).reshape(n_expert, n)
            per = rows.reshape(n_expert, shape[1], n)
            return np.concatenate([gptq_rows(per[e], qtype, h[e], None if imp is None else imp[e]).reshape(-1)
                                   for e in range(n_expert)])
        factor = self._factors.pop(key, None)
        if factor is None:
            factor = inverse_factor(h)
        self._factors[key] = factor  # most recent last
        while len(self._factors) > 2:
            self._factors.pop(next(iter(self._factors)))
        return gptq_rows(rows, qtype, h, column_weights, factor=factor).reshape(-1)
