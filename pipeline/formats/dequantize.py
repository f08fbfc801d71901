"""Make an unquantized base (F16, BF16 or F32) from any GGUF, one tensor at a time.

1-D tensors (norms, biases) stay F32, as llama.cpp's converter writes them."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from pipeline.formats import ggml_types
from pipeline.formats.gguf_index import encode_kv, read_index, read_metadata, tensor_values, write_gguf_tensors
from pipeline.formats.gguf_io import check_gguf
from pipeline.progress import bar

_NUMPY = {"F16": np.float16, "F32": np.float32}
_DROPPED = {gguf.Keys.General.FILE_TYPE, gguf.Keys.General.QUANTIZATION_VERSION}


def dequantize_gguf(src: Path, dst: Path, base_type: str = "F16") -> None:
    """`dst`: every tensor of `src` at `base_type` (1-D and F32 ones at F32), the metadata copied
    as it is but for the file type. The header is read with squeeze's own parser: gguf-py's
    reader decodes every vocabulary string first, about 10 s for a 262k-token vocabulary."""
    check_gguf(src)
    entries, alignment = read_metadata(src)
    index = list(read_index(src).values())
    target = ggml_types.TENSOR_TYPES[base_type.upper()]

    def out_type(e) -> T:
        return T.F32 if len(e.shape) == 1 or e.type == T.F32 else target

    def n_elements(e) -> int:
        return int(np.prod(e.shape, dtype=np.int64))

    plan = []
    for e in index:
        ot = out_type(e)
        itemsize = 2 if ot in (T.F16, T.BF16) else 4
        plan.append((e.name, tuple(e.shape), int(ot), n_elements(e) * itemsize))

    def produce(i: int) -> np.ndarray:
        e = index[i]
        values = tensor_values(src, e)
        ot = out_type(e)
        if ot == T.BF16:
            return gguf.quants.quantize(values, T.BF16)
        return np.ascontiguousarray(values.astype(_NUMPY[ot.name], copy=False))

    ftype = int(ggml_types.FILE_TYPES[base_type.upper()])
    metadata = [kv.raw for kv in entries if kv.key not in _DROPPED]
    metadata.append(encode_kv(gguf.Keys.General.FILE_TYPE, ftype, int(gguf.GGUFValueType.UINT32)))
    with bar(total=len(plan), desc=f"dequantize to {base_type}", unit="tensor") as progress:
        write_gguf_tensors(dst, metadata, plan, produce, alignment, progress=lambda i: progress.update(1))
