"""Take a dequantized base off its source's quantization grid.

A base dequantized from a quantized GGUF holds values that lie on that file's grids, so
requantizing a tensor to its source type is nearly free and every quality-per-byte figure rewards
landing back on the grid (a file type can then beat the next larger one). Dithering restores the
residual a real rounding would have left. The method, as this module does it:

1. The source GGUF is dequantized to the F16/F32 base as usual (a new file; the source is never
   written). Every tensor the source held in a quantized type is then dithered in that base file,
   in place; tensors the source held as F32/F16/BF16 are left as they are.
2. A tensor's values are taken in storage order in blocks of 32 consecutive values (a ggml row
   is a whole number of blocks, so a block never spans two rows).
3. A block's grid step is the smallest positive gap between its distinct values, read from the
   base as stored. That is the quantizer's step when two of the block's values sit on
   neighbouring levels, a multiple of it when none do, and the finer one when the block spans
   two sub-blocks with their own scales (Q2_K, Q3_K and Q6_K scale 16 values at a time).
   A block whose values are all equal has step 0 and is left unchanged.
4. Each value gets uniform noise in [-step/2, +step/2) of its block's step, computed in float32
   and stored back in the base's type (so F16 rounds it once more).

Deterministic: the noise of a tensor depends only on its name and the seed (a generator seeded with
the seed and the CRC-32 of the name, drawn slice by slice in storage order). What it changes is
measured in tests/test_dither.py: on the dithered base, KLD falls strictly from Q2_K to Q8_0.
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
