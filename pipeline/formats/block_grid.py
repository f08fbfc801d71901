"""The grid every value of a quantized ggml block lies on, and the same block with other
indices on that grid: what error-compensated rounding needs to keep llama.cpp's scales and
choose the indices itself (pipeline.choose.gptq_rounding).

In each supported type a value is `scale * index + offset`, with `scale` and `offset` fixed per
block or sub-block by the block's header (ggml-common.h):

  Q8_0   d * q,                q in -128..127
  Q4_0   d * (q - 8),          q in 0..15        Q4_1   d * q + m,        q in 0..15
  Q5_0   d * (q - 16),         q in 0..31        Q5_1   d * q + m,        q in 0..31
  Q2_K   d*sc * q - dmin*mn,   q in 0..3   (16 sub-blocks of 16, 4-bit sc and mn)
  Q3_K   d*(sc-32) * (q - 4),  q in 0..7   (16 sub-blocks of 16, 6-bit sc; the high bit in hmask)
  Q4_K   d*sc * q - dmin*mn,   q in 0..15  (8 sub-blocks of 32, 6-bit sc and mn)
  Q5_K   d*sc * q - dmin*mn,   q in 0..31  (likewise; the fifth bit in qh)
  Q6_K   d*sc * (q - 32),      q in 0..63  (16 sub-blocks of 16, int8 sc)

`decode` reads (scale, offset, index) for every value of rows stored in one of these types;
`encode` writes new indices into the same bytes, every header byte kept. Indices are the
unsigned codes the bits hold; the signed shifts above are folded into the offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import SqueezeError

QK_K = 256


@dataclass(frozen=True)
class Grid:
    """Per value (n_rows, n_per_row): value = scale * index + offset, index in 0..levels-1."""

    scale: np.ndarray
    offset: np.ndarray
    index: np.ndarray
    levels: int

    def values(self) -> np.ndarray:
        return (self.scale * self.index + self.offset).astype(np.float32)

    def nearest(self, w: np.ndarray, columns: slice | np.ndarray) -> np.ndarray:
        """The index of the grid point nearest `w` (n_rows, k) in these columns."""
        s, o = self.scale[:, columns], self.offset[:, columns]
        with np.errstate(divide="ignore", invalid="ignore"):
            k = np.rint(np.where(s != 0, (w - o) / s, 0.0))
        return np.clip(k, 0, self.levels - 1).astype(np.int16)


def _f16(block: np.ndarray, at: int) -> np.ndarray:
    return block[:, at:at + 2].copy().view(np.float16)[:, 0].astype(np.float32)


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of Q4_K/Q5_K from their 12 packed bytes (get_scale_min_k4)."""
    q = scales.astype(np.int32)
    sc = np.empty((q.shape[0], 8), dtype=np.int32)
    mn = np.empty_like(sc)
    sc[:, :4], mn[:, :4] = q[:, 0:4] & 63, q[:, 4:8] & 63
    sc[:, 4:] = (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return sc, mn


def _q3k_scales(packed: np.ndarray) -> np.ndarray:
    """The 16 six-bit scales of Q3_K from their 12 packed bytes, less 32."""
    aux = packed.copy().view(np.uint32).astype(np.int64)  # 3 words per block
    a0, a1, tmp = aux[:, 0], aux[:, 1], aux[:, 2]
    k1, k2 = 0x03030303, 0x0F0F0F0F
    words = np.stack([(a0 & k2) | (((tmp >> 0) & k1) << 4), (a1 & k2) | (((tmp >> 2) & k1) << 4),
                      ((a0 >> 4) & k2) | (((tmp >> 4) & k1) << 4), ((a1 >> 4) & k2) | (((tmp >> 6) & k1) << 4)],
                     axis=1).astype(np.uint32)
    return words.view(np.uint8).reshape(-1, 16).astype(np.int32) - 32


# Each type's layout: (block size, bytes per block, index levels).
_LAYOUT = {"Q8_0": (32, 34, 256), "Q4_0": (32, 18, 16), "Q4_1": (32, 20, 16), "Q5_0": (32, 22, 32),
           "Q5_1": (32, 24, 32), "Q2_K": (QK_K, 84, 4), "Q3_K": (QK_K, 110, 8), "Q4_K": (QK_K, 144, 16),
           "Q5_K": (QK_K, 176, 32), "Q6_K": (QK_K, 210, 64)}
SUPPORTED = tuple(_LAYOUT)


# Where each value's bits are, per type: for element e of a block, (byte, shift, width) arrays of
# its low bits and (byte, bit) of a high bit, and the sub-block whose scale it takes.
def _positions(qtype: str):
    e = np.arange(_LAYOUT[qtype][0])
    if qtype == "Q8_0":
        return {"low": (2 + e, 0, 8)}
    if qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        start = {"Q4_0": 2, "Q4_1": 4, "Q5_0": 6, "Q5_1": 8}[qtype]
        out = {"low": (start + e % 16, 4 * (e >= 16), 4)}
        if qtype in ("Q5_0", "Q5_1"):
            out["high"] = (start - 4 + e // 8, e % 8)  # qh: bit e of a little-endian uint32
        return out
    h, r = e // 128, e % 128
    if qtype in ("Q2_K", "Q3_K"):
        j, l2 = r // 32, r % 32
        qs = 16 if qtype == "Q2_K" else 32  # Q2_K: scales[16] first; Q3_K: hmask[32] first
        out = {"low": (qs + 32 * h + l2, 2 * j, 2), "sub": 8 * h + 2 * j + (l2 >= 16)}
        if qtype == "Q3_K":
            out["high"] = (l2, 4 * h + j)
        return out
    if qtype in ("Q4_K", "Q5_K"):
        c, r64 = e // 64, e % 64
        qs = 16 if qtype == "Q4_K" else 48  # d, dmin, scales[12] (and qh[32] for Q5_K)
        out = {"low": (qs + 32 * c + r64 % 32, 4 * (r64 >= 32), 4), "sub": 2 * c + (r64 >= 32)}
        if qtype == "Q5_K":
            out["high"] = (16 + r64 % 32, 2 * c + (r64 >= 32))
        return out
    if qtype == "Q6_K":
        g, l = r // 32, r % 32
        return {"low": (64 * h + l + 32 * (g % 2), 4 * (g >= 2), 4), "high2": (128 + 32 * h + l, 2 * g),
                "sub": 8 * h + l // 16 + 2 * g}
    raise SqueezeError(f"{qtype}: no block grid (supported: {', '.join(SUPPORTED)})")


def _blocks(raw: np.ndarray, qtype: str, n_per_row: int) -> np.ndarray:
    if qtype not in _LAYOUT:
        raise SqueezeError(f"{qtype}: no block grid (supported: {', '.join(SUPPORTED)})")
    size, nbytes, _ = _LAYOUT[qtype]
    if n_per_row % size:
        raise SqueezeError(f"rows of {n_per_row} values do not divide into {qtype} blocks of {size}")
    return np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, nbytes)


def _indices(blocks: np.ndarray, qtype: str) -> np.ndarray:
    pos = _positions(qtype)
    byte, shift, width = pos["low"]
    q = (blocks[:, byte].astype(np.int32) >> shift) & ((1 << width) - 1)
    if "high" in pos:
        hb, bit = pos["high"]
        q |= ((blocks[:, hb].astype(np.int32) >> bit) & 1) << width
    if "high2" in pos:
        hb, bit = pos["high2"]
        q |= ((blocks[:, hb].astype(np.int32) >> bit) & 3) << width
    return q


def _scales(blocks: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) per element of every block, float32."""
    size = _LAYOUT[qtype][0]
    n = blocks.shape[0]
    if qtype in ("Q8_0", "Q4_0", "Q5_0"):
        d = _f16(blocks, 0)[:, None]
        shift = {"Q8_0": 0, "Q4_0": 8, "Q5_0": 16}[qtype]
        scale = np.broadcast_to(d, (n, size))
        return scale, -shift * scale if shift else np.zeros((n, size), np.float32)
    if qtype in ("Q4_1", "Q5_1"):
        d, m = _f16(blocks, 0)[:, None], _f16(blocks, 2)[:, None]
        return np.broadcast_to(d, (n, size)), np.broadcast_to(m, (n, size))
    sub = _positions(qtype)["sub"]
    if qtype == "Q2_K":
        sc = blocks[:, 0:16].astype(np.int32)
        d, dmin = _f16(blocks, 80)[:, None], _f16(blocks, 82)[:, None]
        dl, ml = d * (sc & 0xF), dmin * (sc >> 4)
        return dl[:, sub], -ml[:, sub]
    if qtype == "Q3_K":
        d = _f16(blocks, 108)[:, None]
        dl = d * _q3k_scales(blocks[:, 96:108])
        return dl[:, sub], -4 * dl[:, sub]
    if qtype in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blocks, 0)[:, None], _f16(blocks, 2)[:, None]
        sc, mn = _scale_min_k4(blocks[:, 4:16])
        return (d * sc)[:, sub], -(dmin * mn)[:, sub]
    if qtype == "Q6_K":
        d = _f16(blocks, 208)[:, None]
        dl = d * blocks[:, 192:208].view(np.int8).astype(np.int32)
        return dl[:, sub], -32 * dl[:, sub]
    raise SqueezeError(f"{qtype}: no block grid")


def decode(raw: np.ndarray, qtype: str, n_per_row: int) -> Grid:
    """The grid of rows stored as `qtype` ((n_rows, row_bytes) uint8)."""
    qtype = qtype.upper()
    blocks = _blocks(raw, qtype, n_per_row)
    scale, offset = _scales(blocks, qtype)
    shape = (-1, n_per_row)
    levels = _LAYOUT[qtype][2]
    index = _indices(blocks, qtype)
    if qtype == "Q8_0":  # int8 codes: index 0..255 stands for q - 128
        index = (index ^ 0x80)
        offset = offset - 128 * scale
    return Grid(np.ascontiguousarray(scale, np.float32).reshape(shape),
                np.ascontiguousarray(offset, np.float32).reshape(shape), index.reshape(shape).astype(np.int16),
                levels)


def encode(raw: np.ndarray, qtype: str, n_per_row: int, index: np.ndarray) -> np.ndarray:
    """`raw` with every value's index replaced by `index` (n_rows, n_per_row), headers kept. (In
    every supported type the bytes that hold indices hold nothing else, so they are rebuilt whole.)"""
    qtype = qtype.upper()
    blocks = _blocks(raw, qtype, n_per_row)
    size = _LAYOUT[qtype][0]
    q = np.asarray(index, dtype=np.int32).reshape(-1, size)
    if qtype == "Q8_0":
        q = q ^ 0x80
    pos = _positions(qtype)
    acc = blocks.astype(np.int32)
    fields = [(pos["low"][0], pos["low"][1], pos["low"][2], 0)]
    width = pos["low"][2]
    if "high" in pos:
        fields.append((pos["high"][0], pos["high"][1], 1, width))
    if "high2" in pos:
        fields.append((pos["high2"][0], pos["high2"][1], 2, width))
    for byte, shift, bits, skip in fields:
        byte, shift = np.broadcast_to(byte, (size,)), np.broadcast_to(shift, (size,))
        acc[:, np.unique(byte)] = 0
        for e in range(size):
            acc[:, byte[e]] |= ((q[:, e] >> skip) & ((1 << bits) - 1)) << int(shift[e])
    return acc.astype(np.uint8).reshape(np.shape(raw))
