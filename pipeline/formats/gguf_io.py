"""Rewrite a GGUF file tensor by tensor: metadata copied with edits, tensors transformed one at a
time and streamed to disk, so a model is never held in memory twice (dequantizing the base,
pruning layers)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from pipeline.errors import DamagedFile, SqueezeError
from pipeline.formats.gguf_index import read_index

# Keys the writer sets itself, or that only describe the old file's layout.
_WRITER_OWNED = {gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.ALIGNMENT}


def gguf_problem(path: Path, kind: str = "GGUF") -> str | None:
    """What is wrong with a GGUF file in a few words, or None when its header reads and every
    tensor's data lies inside the file -- the check llama.cpp's model loader makes ("tensor data is
    not within the file bounds"), which gguf-py answers with a reshape error or an IndexError."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return f"empty {kind} file (0 bytes)"
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        article = "an" if kind[0] in "aeiouAEIOU" else "a"
        return f"truncated {kind} file ({size} bytes)" if b"GGUF".startswith(magic) else \
            f"not {article} {kind} file (it starts with {magic!r}, not b'GGUF')"
    if size >= 8:
        with open(path, "rb") as f:
            f.seek(4)
            (version,) = struct.unpack("<I", f.read(4))
        if version not in (2, 3):
            return f"damaged {kind} file (GGUF version {version}; llama.cpp reads versions 2 and 3)"
    try:
        index = read_index(path)
        end = max((e.offset + e.n_bytes for e in index.values()), default=0)
    except SqueezeError as exc:  # an unsupported version, an unknown value type
        return f"damaged {kind} file ({str(exc).removeprefix(f'{path}: ')})"
    except (struct.error, ValueError, KeyError, OverflowError):  # the header ends before it says it does
        return f"truncated or damaged {kind} file (its header does not fit in its {size} bytes)"
    if size < end:
        return f"truncated {kind} file ({size} bytes; its tensors need {end})"
    return None


def check_gguf(path: Path, kind: str = "GGUF", remedy: str = "delete it and rerun") -> None:
    """Nothing when `path` is a whole GGUF file, else one line naming it and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise SqueezeError(f"{path}: {kind} file not found")
    problem = gguf_problem(path, kind)
    if problem is not None:
        raise DamagedFile(path, problem, remedy)


def open_gguf(path: Path, kind: str = "GGUF", remedy: str = "delete it and rerun") -> gguf.GGUFReader:
    """gguf-py's reader, or one line naming the file and what is wrong with it."""
    path = Path(path)
    check_gguf(path, kind, remedy)
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # noqa: BLE001 - gguf-py raises ValueError, IndexError, KeyError ... on bad bytes
        detail = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DamagedFile(path, f"damaged {kind} file (gguf-py: {detail})", remedy) from None


def copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, edit: Callable[[str, object], object] | None = None,
                  drop: set[str] = frozenset(), add: dict[str, tuple[object, gguf.GGUFValueType, gguf.GGUFValueType | None]] | None = None) -> None:
    """Copy every key/value except GGUF.* bookkeeping; `edit(key, value)` may return a new value."""
    for field in reader.fields.values():
        key = field.name
        if key.startswith("GGUF.") or key in _WRITER_OWNED or key in drop or (add and key in add):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        value = field.contents()
        if edit is not None:
            value = edit(key, value)
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for key, (value, vtype, sub) in (add or {}).items():
        writer.add_key_value(key, value, vtype, sub_type=sub)


def stream_gguf(dst: Path, arch: str, plan: list[tuple[str, tuple[int, ...], np.dtype, int, gguf.GGMLQuantizationType]],
                produce: Callable[[str], np.ndarray], metadata: Callable[[gguf.GGUFWriter], None],
                progress: Callable[[int], None] | None = None) -> None:
    """Write a GGUF whose tensors are described up front (`plan`: name, numpy shape, dtype,
    nbytes, ggml type) and produced one at a time by `produce(name)`."""
    writer = gguf.GGUFWriter(str(dst), arch)
    metadata(writer)
    for name, shape, dtype, nbytes, raw in plan:
        writer.add_tensor_info(name, shape, dtype, nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for i, (name, shape, dtype, nbytes, raw) in enumerate(plan):
        arr = produce(name)
        if arr.nbytes != nbytes:
            raise ValueError(f"{name}: produced {arr.nbytes} bytes, planned {nbytes}")
        writer.write_tensor_data(arr)
        if progress:
            progress(i)
    writer.close()
