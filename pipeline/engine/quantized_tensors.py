"""Tensors stored in a quantized type, as llama_model_quantize stores them, and a process-wide
cache of those bytes: the in-memory probes (pipeline.choose.memory_probe) and the file assembler
(pipeline.engine.assemble) ask for the same (tensor, type, imatrix) pairs again and again, across
refinement rounds, variants and the final file, and quantizing with an imatrix (a few million
weights a second per core) is most of their cost on a large model.

A pair is keyed by the identity of the file the values come from (path, size, modification time),
the tensor's name, the type and the identity of the imatrix file: the probe's loaded base and the
assembler's source are the same file when a variant is not pruned, so the bytes a refinement
measured are the bytes its variant's file is written from.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.engine.ggml_quant import quantize_rows

# Least recently used pairs go first beyond a quarter of the machine's memory, at least 2 GiB
# (SQUEEZE_QUANTIZED_CACHE_MIB sets it): a whole mix must fit for a refinement round, or the file
# after it, to find its pairs again; a 12B mix at 5 bits per weight is about 7.5 GB.
MIN_LIMIT = 2 << 30


def default_limit() -> int:
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        memory = 0
    return max(MIN_LIMIT, memory // 4)


def _matrices(values: np.ndarray, shape, column_weights: np.ndarray | None):
    """(matrix, its imatrix slice) pairs: a 3-D tensor (experts) is quantized one matrix at a
    time, each with its own slice of the imatrix entry, as llama_model_quantize does."""
    n = shape[0]
    mats = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    per = values.reshape(mats, -1, n)
    for e in range(mats):
        w = column_weights
        if column_weights is not None and column_weights.size == n * mats:
            w = column_weights[e * n:(e + 1) * n]
        yield per[e], w


def quantized_bytes(values: np.ndarray, shape, qtype: str, column_weights: np.ndarray | None) -> np.ndarray:
    """`values` (rows, row length) stored in `qtype`: the bytes a quantized file holds."""
    return np.concatenate([quantize_rows(m, qtype, w).reshape(-1) for m, w in _matrices(values, shape, column_weights)])


def file_identity(path: Path | None) -> str:
    """A file as the cache keys it: resolved path, size and modification time ('-' for none)."""
    if path is None:
        return "-"
    st = Path(path).stat()
    return f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"


class QuantizedCache:
    """key -> quantized bytes, least recently used dropped past `limit`; counts hits and misses."""

    def __init__(self, limit: int):
        self.limit, self.bytes = limit, 0
        self._data: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> np.ndarray | None:
        data = self._data.get(key)
        if data is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return data

    def put(self, key: tuple, data: np.ndarray) -> None:
        if data.nbytes > self.limit:
            return
        self._data[key] = data
        self.bytes += data.nbytes
        while self.bytes > self.limit:
            _, old = self._data.popitem(last=False)
            self.bytes -= old.nbytes

    def get_or_quantize(self, source: str, name: str, qtype: str, imatrix: str,
                        make: Callable[[], np.ndarray]) -> np.ndarray:
        """The bytes of tensor `name` of file `source` in `qtype` with imatrix `imatrix` (both
        file_identity strings), from the cache or from `make()`, which is then kept."""
        key = (source, name, qtype.upper(), imatrix)
        data = self.get(key)
        if data is None:
            data = make()
            self.put(key, data)
        return data


_shared: QuantizedCache | None = None


def shared_cache() -> QuantizedCache:
    """The process's one cache, shared by every probe and every assembled file."""
    global _shared
    if _shared is None:
        mib = os.environ.get("SQUEEZE_QUANTIZED_CACHE_MIB")
        _shared = QuantizedCache(int(mib) << 20 if mib else default_limit())
    return _shared
