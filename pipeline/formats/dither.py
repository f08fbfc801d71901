"""Take a dequantized base off its source's quantization grid.

A base dequantized from a quantized GGUF holds values that lie on that file's grids, so
requantizing a tensor to its source type is nearly free and every quality-per-byte figure rewards
landing back on the grid. Dithering restores the residual a real rounding would have left: for
each block of 32 values the grid step is the smallest positive gap between its distinct values,
and uniform noise in ±step/2 is added (method and figures: shared/FINDINGS.md, "An off-grid base").
Deterministic: the noise of a tensor depends only on its name and the seed.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import gguf
import numpy as np

from pipeline.errors import SqueezeError

BLOCK = 32  # every ggml block type's row length is a multiple of this
_SLICE = BLOCK << 20  # values per pass (a multiple of BLOCK)
_FLOAT_TYPES = {gguf.GGMLQuantizationType.F16: np.float16, gguf.GGMLQuantizationType.F32: np.float32}


def block_steps(values: np.ndarray) -> np.ndarray:
    """The grid step of each row of `values` (blocks × 32): the smallest positive gap between its
    distinct values; 0 for a block whose values are all equal (nothing to dither)."""
    gaps = np.diff(np.sort(values, axis=1), axis=1)
    gaps[gaps <= 0] = np.inf
    steps = gaps.min(axis=1)
    steps[~np.isfinite(steps)] = 0.0
    return steps


def dither_values(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`values` (any shape, size a multiple of 32) with each block's ±step/2 noise added, in float32."""
    blocks = values.astype(np.float32).reshape(-1, BLOCK)
    steps = block_steps(blocks)
    noise = rng.uniform(-0.5, 0.5, size=blocks.shape).astype(np.float32) * steps[:, None]
    return (blocks + noise).reshape(values.shape)


def dither_gguf(path: Path, names: set[str], seed: int = 0) -> int:
    """Dither the tensors `names` of the F16/F32 GGUF at `path` in place; returns how many."""
    reader = gguf.GGUFReader(str(path), "r+")
    done = 0
    for t in reader.tensors:
        if t.name not in names:
            continue
        dtype = _FLOAT_TYPES.get(t.tensor_type)
        if dtype is None:
            raise SqueezeError(f"{path}: {t.name} is {t.tensor_type.name}; dithering needs an F16 or F32 base "
                               "(model.base_type)")
        if t.data.size % BLOCK:
            raise SqueezeError(f"{path}: {t.name} has {t.data.size} values, not whole blocks of {BLOCK}")
        rng = np.random.default_rng([seed, zlib.crc32(t.name.encode())])
        flat = t.data.reshape(-1)
        for start in range(0, flat.size, _SLICE):  # a slice at a time: memory stays small for any tensor
            flat[start:start + _SLICE] = dither_values(np.asarray(flat[start:start + _SLICE]), rng).astype(dtype)
        done += 1
    reader.data.flush()
    del reader
    return done
