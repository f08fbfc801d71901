"""Rewrite a GGUF file tensor by tensor: metadata copied with edits, tensors transformed one at a
time and streamed to disk, so a model is never held in memory twice (dequantizing the base,
pruning layers)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import gguf
import numpy as np

# Keys the writer sets itself, or that only describe the old file's layout.
_WRITER_OWNED = {gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.ALIGNMENT}


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
