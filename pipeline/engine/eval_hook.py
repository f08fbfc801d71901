"""llama.cpp's `cb_eval` hook, bound with ctypes: the graph node struct, the few libggml-base
functions that read a node's data (host memory as a numpy view, device memory copied with
ggml_backend_tensor_get), and a base class that turns the C callback into two Python methods.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import numpy as np
from gguf import GGMLQuantizationType

from pipeline.errors import SqueezeError

GGML_TYPE_F32 = int(GGMLQuantizationType.F32)


class GgmlTensor(ctypes.Structure):
    """`struct ggml_tensor` of ggml.h (GGML_MAX_DIMS 4, GGML_MAX_SRC 10, GGML_MAX_NAME 64)."""


GgmlTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * 4),
    ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * 16),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * 10),
    ("view_src", ctypes.POINTER(GgmlTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * 64),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]

_GGML_OBJECT_SIZE = 32  # struct ggml_object: offs, size, next, type + padding


class _Ggml:
    """The few libggml-base functions the hook needs, and the op numbers of this build."""

    def __init__(self):
        folder = Path(llama_cpp.__file__).resolve().parent / "lib"
        candidates = sorted(folder.glob("libggml-base.*")) or sorted(folder.glob("ggml-base.*"))
        if not candidates:
            raise SqueezeError(f"{folder}: no libggml-base library beside llama_cpp; reinstall the engine")
        lib = ctypes.CDLL(str(candidates[0]))
        lib.ggml_op_name.argtypes = [ctypes.c_int]
        lib.ggml_op_name.restype = ctypes.c_char_p
        lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
        lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        lib.ggml_backend_tensor_get.restype = None
        lib.ggml_backend_tensor_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        lib.ggml_backend_tensor_set.restype = None
        lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
        lib.ggml_nbytes.restype = ctypes.c_size_t
        lib.ggml_tensor_overhead.restype = ctypes.c_size_t
        # A layout mismatch would read garbage silently: check the struct size against the library.
        if lib.ggml_tensor_overhead() != _GGML_OBJECT_SIZE + ctypes.sizeof(GgmlTensor):
            raise SqueezeError(f"{candidates[0]}: struct ggml_tensor has {lib.ggml_tensor_overhead() - _GGML_OBJECT_SIZE}"
                               f" bytes, squeeze's binding {ctypes.sizeof(GgmlTensor)}; update pipeline/engine/eval_hook.py")
        self.lib = lib
        ops = {}
        for i in range(256):  # the op table is ordered; both names come early, stop before its end
            ops[lib.ggml_op_name(i).decode()] = i
            if "MUL_MAT" in ops and "MUL_MAT_ID" in ops:
                break
        self.MUL_MAT = ops["MUL_MAT"]
        self.MUL_MAT_ID = ops["MUL_MAT_ID"]

    def array(self, t: GgmlTensor, dtype=np.float32, copy: bool = False) -> np.ndarray:
        """The tensor as a (ne3, ne2, ne1, ne0) numpy view (host memory) or copy (device memory,
        or `copy`: the device path, which tests take on the CPU since CI has no GPU)."""
        shape = tuple(int(t.ne[i]) for i in (3, 2, 1, 0))
        strides = tuple(int(t.nb[i]) for i in (3, 2, 1, 0))
        span = sum((n - 1) * s for n, s in zip(shape, strides)) + np.dtype(dtype).itemsize
        if not copy and (not t.buffer or self.lib.ggml_backend_buffer_is_host(t.buffer)):
            buf = (ctypes.c_char * span).from_address(t.data)
        else:
            buf = ctypes.create_string_buffer(span)
            self.lib.ggml_backend_tensor_get(ctypes.addressof(t), buf, 0, span)
        return np.ndarray(shape, dtype=dtype, buffer=buf, strides=strides)


_ggml: _Ggml | None = None


def ggml() -> _Ggml:
    global _ggml
    if _ggml is None:
        _ggml = _Ggml()
    return _ggml


def weight_name(raw: bytes) -> str:
    """`CUDA0#blk.0.attn_k.weight#0` -> `blk.0.attn_k.weight` (as tools/imatrix filters names)."""
    name = raw.decode("utf-8", "replace")
    if "#" in name:
        name = name.split("#", 2)[1]
    return name


def address(t: GgmlTensor) -> int:
    """A node's address: the same node of the same graph keeps it (a cache key)."""
    return ctypes.addressof(t)


class EvalHook:
    """A cb_eval observer. llama.cpp asks about every graph node (`ask(node)`: True to see its
    data); for the nodes wanted it computes the graph up to there and calls `collect(node)`, whose
    False stops the graph. Pass `self.callback` as the context's cb_eval."""

    def __init__(self):
        self.error: BaseException | None = None
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._callback)

    def ask(self, t: GgmlTensor) -> bool:
        raise NotImplementedError

    def collect(self, t: GgmlTensor) -> bool:
        raise NotImplementedError

    def _callback(self, t_ptr, ask, _user_data) -> bool:
        # An exception cannot cross into C: keep it, stop this graph, re-raise after llama_decode.
        try:
            t = GgmlTensor.from_address(t_ptr)
            return self.ask(t) if ask else self.collect(t)
        except BaseException as exc:  # noqa: BLE001 - handed back to Python in check()
            if self.error is None:
                self.error = exc
            return False

    def check(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err
