"""Make an unquantized base (F16, BF16 or F32) from any GGUF, one tensor at a time.

1-D tensors (norms, biases) stay F32, as llama.cpp's converter writes them."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from pipeline.formats import ggml_types
from pipeline.formats.gguf_io import copy_metadata, open_gguf, stream_gguf
from pipeline.progress import bar

_NUMPY = {"F16": np.float16, "F32": np.float32}


def dequantize_gguf(src: Path, dst: Path, base_type: str = "F16") -> None:
    reader = open_gguf(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    target = ggml_types.TENSOR_TYPES[base_type.upper()]
    by_name = {t.name: t for t in reader.tensors}

    def out_type(t) -> T:
        return T.F32 if len(t.shape) == 1 or t.tensor_type == T.F32 else target

    plan = []
    for t in reader.tensors:
        np_shape = tuple(int(x) for x in reversed(t.shape))
        ot = out_type(t)
        n = int(np.prod(np_shape))
        if ot == T.BF16:
            plan.append((t.name, (*np_shape[:-1], np_shape[-1] * 2), np.dtype(np.uint8), n * 2, ot))
        else:
            dtype = np.dtype(_NUMPY[ot.name])
            plan.append((t.name, np_shape, dtype, n * dtype.itemsize, ot))

    def produce(name: str) -> np.ndarray:
        t = by_name[name]
        np_shape = tuple(int(x) for x in reversed(t.shape))
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(np_shape)
        ot = out_type(t)
        if ot == T.BF16:
            return gguf.quants.quantize(values.astype(np.float32), T.BF16)
        return values.astype(_NUMPY[ot.name], copy=False)

    ftype = ggml_types.FILE_TYPES[base_type.upper()]

    def metadata(writer: gguf.GGUFWriter) -> None:
        copy_metadata(reader, writer, drop={gguf.Keys.General.FILE_TYPE, gguf.Keys.General.QUANTIZATION_VERSION},
                      add={gguf.Keys.General.FILE_TYPE: (int(ftype), gguf.GGUFValueType.UINT32, None)})

    with bar(total=len(plan), desc=f"dequantize to {base_type}", unit="tensor") as progress:
        stream_gguf(dst, arch, plan, produce, metadata, progress=lambda i: progress.update(1))
