"""Where each tensor of a GGUF file lies, without decoding its metadata values.

gguf-py's GGUFReader builds a numpy view for every metadata element; for a 262k-token
vocabulary that takes 10-30 s per file. Measuring sensitivities opens dozens of files and
needs only the tensor table, so this reader skips the values (string arrays by their lengths)
and memory-maps the tensor data. Layout per the GGUF spec (v2/v3, little-endian).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from pipeline.errors import SqueezeError

_V = gguf.GGUFValueType
# numpy type of each scalar value type (its byte size is the item size)
_NUMPY = {_V.UINT8: np.uint8, _V.INT8: np.int8, _V.UINT16: np.uint16, _V.INT16: np.int16, _V.UINT32: np.uint32,
          _V.INT32: np.int32, _V.FLOAT32: np.float32, _V.BOOL: np.bool_, _V.UINT64: np.uint64, _V.INT64: np.int64,
          _V.FLOAT64: np.float64}
_SCALAR = {int(t): np.dtype(n).itemsize for t, n in _NUMPY.items()}
_NUMPY = {int(t): n for t, n in _NUMPY.items()}
_STRING, _ARRAY, _U32 = int(_V.STRING), int(_V.ARRAY), int(_V.UINT32)
_ALIGNMENT_KEY = gguf.Keys.General.ALIGNMENT


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    type: gguf.GGMLQuantizationType
    offset: int  # absolute byte offset in the file

    @property
    def n_bytes(self) -> int:
        bs, ts = gguf.GGML_QUANT_SIZES[self.type]
        n = 1
        for d in self.shape:
            n *= d
        return n // bs * ts


def read_index(path: Path) -> dict[str, TensorEntry]:
    data = np.memmap(path, dtype=np.uint8, mode="r")
    buf = memoryview(data)
    if bytes(buf[:4]) != b"GGUF":
        raise SqueezeError(f"{path}: not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version < 2:
        raise SqueezeError(f"{path}: GGUF version {version} is not supported")
    pos = 24
    alignment = 32

    def string(p):
        (n,) = struct.unpack_from("<Q", buf, p)
        return bytes(buf[p + 8:p + 8 + n]).decode("utf-8", "replace"), p + 8 + n

    def skip_value(vtype, p):
        if vtype in _SCALAR:
            return p + _SCALAR[vtype]
        if vtype == _STRING:
            (n,) = struct.unpack_from("<Q", buf, p)
            return p + 8 + n
        if vtype == _ARRAY:
            item, count = struct.unpack_from("<IQ", buf, p)
            p += 12
            if item in _SCALAR:
                return p + _SCALAR[item] * count
            for _ in range(count):
                p = skip_value(item, p)
            return p
        raise SqueezeError(f"{path}: unknown metadata value type {vtype} at byte {p}")

    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if key == _ALIGNMENT_KEY and vtype == _U32:
            (alignment,) = struct.unpack_from("<I", buf, pos)
        pos = skip_value(vtype, pos)
    infos = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        shape = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, tuple(int(x) for x in shape), qtype, offset))
    start = (pos + alignment - 1) // alignment * alignment
    return {name: TensorEntry(name, shape, gguf.GGMLQuantizationType(qtype), start + offset)
            for name, shape, qtype, offset in infos}


def tensor_values(path: Path, entry: TensorEntry, rows: np.ndarray | None = None) -> np.ndarray:
    """The tensor as float32, numpy shape (rows, row length); `rows`: only those rows (read and
    converted alone, so a sample of a large tensor costs what the sample holds)."""
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=entry.offset, shape=(entry.n_bytes,))
    row = entry.shape[0]
    row_bytes = row // gguf.GGML_QUANT_SIZES[entry.type][0] * gguf.GGML_QUANT_SIZES[entry.type][1]
    n_rows = entry.n_bytes // row_bytes
    by_row = raw.reshape(n_rows, row_bytes)
    if rows is not None:
        by_row = by_row[rows]
        n_rows = len(by_row)
    if entry.type == gguf.GGMLQuantizationType.F16:
        return by_row.view(np.float16).reshape(n_rows, row).astype(np.float32)
    if entry.type == gguf.GGMLQuantizationType.F32:
        return np.array(by_row.view(np.float32).reshape(n_rows, row))
    return gguf.quants.dequantize(by_row, entry.type).reshape(n_rows, row).astype(np.float32, copy=False)


# ---- metadata as raw byte spans (for rewriting a file with a few keys changed) ---------------


@dataclass(frozen=True)
class KeyValue:
    key: str
    vtype: int
    raw: bytes  # the encoded entry, key included, as it appears in the file
    value: object  # scalars and strings decoded; arrays as (item type, list or None for strings)
    count: int | None = None  # an array's number of items (string arrays included)


def read_metadata(path: Path) -> tuple[list[KeyValue], int]:
    """Every key/value entry (raw bytes plus the decoded value where cheap) and the alignment."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    buf = memoryview(data)
    _, _, n_kv = struct.unpack_from("<IQQ", buf, 4)
    pos, alignment, out = 24, 32, []
    for _ in range(n_kv):
        start = pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        key = bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8", "replace")
        pos += 8 + n
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        value, count = None, None
        if vtype in _SCALAR:
            value = np.frombuffer(buf[pos:pos + _SCALAR[vtype]], _NUMPY[vtype])[0].item()
            pos += _SCALAR[vtype]
        elif vtype == _STRING:
            (n,) = struct.unpack_from("<Q", buf, pos)
            value = bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8", "replace")
            pos += 8 + n
        else:
            item, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if item in _SCALAR:
                value = np.frombuffer(buf[pos:pos + _SCALAR[item] * count], _NUMPY[item]).tolist()
                pos += _SCALAR[item] * count
            else:
                for _ in range(count):
                    (n,) = struct.unpack_from("<Q", buf, pos)
                    pos += 8 + n
            value = (item, value)
        if key == _ALIGNMENT_KEY and vtype == _U32:
            alignment = value
        out.append(KeyValue(key, vtype, bytes(buf[start:pos]), value, count))
    return out, alignment


def encode_kv(key: str, value, vtype: int, item_type: int | None = None) -> bytes:
    """One metadata entry: a scalar of `vtype`, or an array (vtype 9) of numeric `item_type`."""
    kb = key.encode()
    head = struct.pack("<Q", len(kb)) + kb + struct.pack("<I", vtype)
    if vtype == _ARRAY:
        arr = np.asarray(value, dtype=_NUMPY[item_type])
        return head + struct.pack("<IQ", item_type, len(arr)) + arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    if vtype == _STRING:
        vb = str(value).encode()
        return head + struct.pack("<Q", len(vb)) + vb
    return head + np.asarray(value, dtype=_NUMPY[vtype]).tobytes()


def write_gguf(dst: Path, src: Path, metadata: list[bytes], tensors: list[tuple[str, TensorEntry]],
               alignment: int = 32, progress=None) -> None:
    """A GGUF v3 file with the given encoded metadata entries and tensors copied byte for byte
    from `src` (each (new name, entry in src)), data aligned as llama.cpp expects."""
    src_data = np.memmap(src, dtype=np.uint8, mode="r")
    write_gguf_tensors(dst, metadata, [(name, e.shape, e.type, e.n_bytes) for name, e in tensors],
                       lambda i: memoryview(src_data[tensors[i][1].offset:tensors[i][1].offset + tensors[i][1].n_bytes]),
                       alignment, progress)


def write_gguf_tensors(dst: Path, metadata: list[bytes], tensors: list[tuple[str, tuple[int, ...], int, int]],
                       produce, alignment: int = 32, progress=None) -> None:
    """A GGUF v3 file: the encoded metadata entries, then the tensors described up front (name,
    ggml shape, ggml type, bytes), whose data `produce(i)` returns one at a time, in order, each
    padded with zeros to `alignment` as gguf_get_meta_data and llama_model_quantize write it."""
    infos, offset = [], 0
    for name, shape, ggml_type, n_bytes in tensors:
        nb = name.encode()
        infos.append(struct.pack("<Q", len(nb)) + nb + struct.pack(f"<I{len(shape)}Q", len(shape), *shape)
                     + struct.pack("<IQ", int(ggml_type), offset))
        offset += (n_bytes + alignment - 1) // alignment * alignment
    with open(dst, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
        for kv in metadata:
            f.write(kv)
        for info in infos:
            f.write(info)
        f.write(b"\0" * (-f.tell() % alignment))
        for i, (name, _, _, n_bytes) in enumerate(tensors):
            data = memoryview(produce(i))
            if data.nbytes != n_bytes:
                raise ValueError(f"{name}: produced {data.nbytes} bytes, planned {n_bytes}")
            f.write(data)
            f.write(b"\0" * (-n_bytes % alignment))
            if progress:
                progress(i)
