"""ggml's own quantize and dequantize functions, called in-process on numpy arrays.

`ggml_quantize_chunk` is what llama_model_quantize calls for every tensor (with the same
per-column importance weights from the imatrix), so a tensor quantized here is bit-identical to
the one a quantized file holds, without writing or reading a file. Rows are split over threads:
ctypes releases the GIL for the call, and ggml's quantize functions share no state between rows.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipeline.engine.eval_hook import ggml
from pipeline.errors import SqueezeError
from pipeline.formats import ggml_types

_FLOAT_P = ctypes.POINTER(ctypes.c_float)


class _TypeTraits(ctypes.Structure):
    """`struct ggml_type_traits` of ggml.h."""

    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, _FLOAT_P, ctypes.c_int64)
_bound = False
_pool: ThreadPoolExecutor | None = None
_ROWS_PER_JOB = 256  # enough work per call that the thread hand-off costs nothing


def _lib():
    global _bound
    lib = ggml().lib
    if not _bound:
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, _FLOAT_P, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                            ctypes.c_int64, _FLOAT_P]
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        _bound = True
    return lib


def _map(fn, jobs) -> None:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="squeeze-quant")
    for _ in _pool.map(fn, jobs):
        pass


def _row_jobs(n_rows: int):
    return [(r, min(n_rows, r + _ROWS_PER_JOB)) for r in range(0, n_rows, _ROWS_PER_JOB)]


def row_bytes(qtype: str, n_per_row: int) -> int:
    return ggml_types.bytes_per_row(ggml_types.tensor_type(qtype), n_per_row)


def quantize_rows(values: np.ndarray, qtype: str, column_weights: np.ndarray | None = None) -> np.ndarray:
    """Rows of float32 `values` (n_rows, n_per_row) in `qtype`, as (n_rows, row_bytes) uint8.
    `column_weights`: the imatrix entry of this tensor (mean squared input per column), or None."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    n_rows, n = values.shape
    t = int(ggml_types.tensor_type(qtype))
    if not ggml_types.fits((n,), qtype):
        raise SqueezeError(f"rows of {n} values cannot be stored as {qtype} "
                           f"(blocks of {ggml_types.block_size(ggml_types.tensor_type(qtype))})")
    out = np.empty((n_rows, row_bytes(qtype, n)), dtype=np.uint8)
    weights = None
    if column_weights is not None:
        weights = np.ascontiguousarray(column_weights, dtype=np.float32)
        if weights.size != n:
            raise SqueezeError(f"an imatrix entry of {weights.size} values for rows of {n}")
    lib = _lib()
    src = values.ctypes.data_as(_FLOAT_P)
    dst = out.ctypes.data
    w = weights.ctypes.data_as(_FLOAT_P) if weights is not None else None

    def job(span):
        r0, r1 = span
        lib.ggml_quantize_chunk(t, src, dst, r0 * n, r1 - r0, n, w)

    _map(job, _row_jobs(n_rows))
    return out


def dequantize_rows(data: np.ndarray, qtype: str, n_per_row: int) -> np.ndarray:
    """The inverse: (n_rows, row_bytes) uint8 in `qtype` back to float32 (n_rows, n_per_row)."""
    data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, row_bytes(qtype, n_per_row))
    n_rows = data.shape[0]
    out = np.empty((n_rows, n_per_row), dtype=np.float32)
    traits = _lib().ggml_get_type_traits(int(ggml_types.tensor_type(qtype))).contents
    if not traits.to_float:
        raise SqueezeError(f"ggml has no dequantize function for {qtype}")
    to_float = _TO_FLOAT(traits.to_float)
    rb = data.shape[1]

    def job(span):
        r0, r1 = span
        to_float(data.ctypes.data + r0 * rb, ctypes.cast(out.ctypes.data + r0 * n_per_row * 4, _FLOAT_P),
                 (r1 - r0) * n_per_row)

    _map(job, _row_jobs(n_rows))
    return out


def round_trip(values: np.ndarray, qtype: str, column_weights: np.ndarray | None = None) -> np.ndarray:
    """What `values` become once stored in `qtype` and read back (float32, same shape)."""
    n = values.shape[-1]
    flat = values.reshape(-1, n)
    return dequantize_rows(quantize_rows(flat, qtype, column_weights), qtype, n).reshape(values.shape)


# ---- the float types a base model stores: read as float32 -----------------------------------------

def from_storage(raw: np.ndarray, stored: str) -> np.ndarray:
    """Raw bytes of a float tensor (F32, F16, BF16) as float32."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if stored == "F32":
        return raw.view(np.float32).copy()
    if stored == "F16":
        return raw.view(np.float16).astype(np.float32)
    if stored == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    raise SqueezeError(f"a {stored} tensor cannot be read as float values; the base must be F32, F16 or BF16")
