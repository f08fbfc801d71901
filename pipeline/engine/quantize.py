"""llama_model_quantize in-process, with the imatrix, tensor-override and kv-override structs
that llama-quantize builds from its flags.

Given the same imatrix and overrides the output tensors are bit-identical to the CLI's; the
`quantize.imatrix.*` keys are written the same way (through kv overrides). Layers are pruned
before quantizing (pipeline.formats.prune), never here: llama.cpp's own prune re-derives every
per-layer fact from the new index.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from pipeline.engine.backend import capture_log, default_threads, init_backend
from pipeline.errors import SqueezeError
from pipeline.formats import ggml_types
from pipeline.formats.imatrix_file import read_imatrix


@dataclass
class QuantizeParams:
    """llama_model_quantize_params as llama-quantize fills it from its flags; `kv` are the
    metadata overrides it writes (key, override tag, value), `columns` the imatrix entries it is
    given (tensor name -> normalized values), `keep_alive` the ctypes buffers the struct points
    into, which must outlive the call."""

    ftype: str
    params: llama_cpp.llama_model_quantize_params
    kv: list[tuple[str, int, object]]
    columns: dict[str, np.ndarray]
    keep_alive: list


def quantize_params(ftype: str, *, imatrix_path: Path | None = None, overrides: list[tuple[str, str]] = (),
                    output_type: str | None = None, token_embedding_type: str | None = None,
                    threads: int | None = None) -> QuantizeParams:
    init_backend()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads or default_threads()
    params.ftype = int(ggml_types.file_type(ftype))
    if output_type:
        params.output_tensor_type = int(ggml_types.tensor_type(output_type))
    if token_embedding_type:
        params.token_embedding_type = int(ggml_types.tensor_type(token_embedding_type))

    keep_alive = []
    kv = []
    data = {}
    if imatrix_path is not None:
        im = read_imatrix(imatrix_path)
        data = im.normalized()
        arr = (llama_cpp.llama_model_imatrix_data * (len(data) + 1))()
        for i, (name, values) in enumerate(data.items()):
            buf = (ctypes.c_float * len(values)).from_buffer_copy(values.tobytes())
            keep_alive.append(buf)
            arr[i].name = name.encode()
            arr[i].data = ctypes.cast(buf, ctypes.POINTER(ctypes.c_float))
            arr[i].size = len(values)
        arr[len(data)].name = None
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep_alive.append(arr)
        kv.append(("quantize.imatrix.file", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, str(imatrix_path)))
        if im.datasets:
            kv.append(("quantize.imatrix.dataset", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, im.datasets[0]))
        kv.append(("quantize.imatrix.entries_count", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, len(data)))
        if im.chunk_count > 0:
            kv.append(("quantize.imatrix.chunks_count", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, im.chunk_count))
    if kv:
        arr = (llama_cpp.llama_model_kv_override * (len(kv) + 1))()
        for i, (key, tag, value) in enumerate(kv):
            arr[i].key = key.encode()
            arr[i].tag = tag
            if tag == llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR:
                arr[i].value.val_str = value.encode()[:127]
            else:
                arr[i].value.val_i64 = value
        arr[len(kv)].key = b""
        params.kv_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_kv_override))
        keep_alive.append(arr)
    if overrides:
        arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, qtype) in enumerate(overrides):
            arr[i].pattern = pattern.encode()
            arr[i].type = int(ggml_types.tensor_type(qtype))
        arr[len(overrides)].pattern = None
        params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        keep_alive.append(arr)
    # what llama.cpp writes of a string override: its fixed 128-byte field, cut at 127 bytes
    kv = [(k, t, v.encode()[:127].decode("utf-8", "ignore") if isinstance(v, str) else v) for k, t, v in kv]
    return QuantizeParams(ftype, params, kv, data, keep_alive)


def _call(src: Path, dst: Path, qp: QuantizeParams, what: str) -> None:
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(qp.params))
    if rc != 0:
        raise SqueezeError(f"{what} failed (llama_model_quantize returned {rc}); "
                           f"set SQUEEZE_LLAMA_LOG=1 to see llama.cpp's log")


def quantize_file(src: Path, dst: Path, ftype: str, **flags) -> None:
    """Quantize `src` into `dst` as llama-quantize would with the equivalent flags (the keyword
    arguments of quantize_params)."""
    quantize_with(src, dst, quantize_params(ftype, **flags))


def quantize_with(src: Path, dst: Path, qp: QuantizeParams) -> None:
    _call(src, dst, qp, f"quantizing {src.name} to {qp.ftype}")


# One line per tensor of llama_model_quantize's dry run: "[  12/ 236]  blk.1.attn_k.weight - [ 640,
# 256, 1, 1], type = f16, size = 0.312 MiB -> 0.088 MiB (q4_K)" (no "-> ... (type)" when it stays).
_PLANNED = re.compile(r"\[\s*\d+/\s*\d+\]\s+(?P<name>\S+)\s+- \[[^\]]*\], type =\s*(?P<type>\S+), "
                      r"size =\s*[\d.]+ MiB(?: ->\s*[\d.]+ MiB \((?P<new>\S+)\))?")


@dataclass
class QuantizePlan:
    types: dict[str, str]  # tensor name -> ggml type name, upper case
    refused: bool  # llama_model_quantize would refuse it (a type that needs an imatrix, none given)


def planned_types(src: Path, qp: QuantizeParams) -> QuantizePlan:
    """Each tensor's type in the file llama_model_quantize would write from `src` with `qp`, from
    its own dry run: llama.cpp's mix rules, the overrides and its fallbacks for rows a type cannot
    hold, decided by llama.cpp itself, nothing quantized."""
    qp.params.dry_run = True
    try:
        with capture_log() as lines:
            _call(src, src.with_name(src.name + ".dry-run"), qp, f"planning {src.name} in {qp.ftype}")
            said = "".join(lines)
    finally:
        qp.params.dry_run = False
    types = {m["name"]: (m["new"] or m["type"]).upper() for m in _PLANNED.finditer(said)}
    if not types:
        raise SqueezeError(f"{src}: llama.cpp's dry run of {qp.ftype} reported no tensor; this llama.cpp build "
                           "logs it differently")
    return QuantizePlan(types, "will require an imatrix" in said)
