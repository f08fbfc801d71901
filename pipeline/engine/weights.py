"""The weight tensors of a loaded model, overwritten in place and restored bit for bit.

A probe ("this tensor at Q2_K", "this layer removed") changes a few tensors of the model that is
already loaded, measures, and puts the original bytes back: no file is written or loaded per
probe. A tensor can also take another type in place (`write_quantized`): every candidate type
is smaller than the base's F16/BF16/F32, so its bytes fit the buffer the base tensor was given;
the tensor's type and strides are changed with them, and ggml then multiplies with the same
quantized kernels (activations rounded to 8 bits included) that a quantized file would use. The model must be loaded writable (Model(..., writable=True)): a read-only mapping of
the file faults on the first write.

llama.cpp has no public list of a model's tensors, but every weight is a source of some node of
the compute graph, and the eval callback is asked about every node: one short decode finds the
address of every weight tensor by its GGUF name. A tensor can live in more than one buffer (a
tied embedding is loaded twice when the output layer sits on another device): every copy is
written. Writes go through ggml_backend_tensor_set, which copies into CPU and GPU buffers alike.
"""

from __future__ import annotations

import ctypes

import numpy as np
from gguf import GGMLQuantizationType

from pipeline.engine.context import Context
from pipeline.engine.eval_hook import EvalHook, GgmlTensor, ggml, weight_name
from pipeline.engine.ggml_quant import from_storage, row_bytes
from pipeline.engine.model import Model
from pipeline.errors import SqueezeError
from pipeline.formats import ggml_types


class _WeightFinder(EvalHook):
    """Asked about every graph node: note the named sources (weights are leaves with the GGUF
    name); never asks to see data, so the decode runs at full speed."""

    def __init__(self):
        super().__init__()
        self.found: dict[str, set[int]] = {}

    def ask(self, t: GgmlTensor) -> bool:
        for i in range(len(t.src)):
            src = t.src[i]
            if not src:
                break
            s = src.contents
            raw = s.name
            # scheduler copies are named "<backend>#<name>#<n>": not the weight itself
            if raw and b"#" not in raw and s.buffer and not s.view_src:
                self.found.setdefault(weight_name(raw), set()).add(ctypes.addressof(s))
        return False

    def collect(self, t: GgmlTensor) -> bool:
        return True


def find_weights(model: Model) -> dict[str, list[int]]:
    """name -> addresses of its tensor(s), from one two-token decode of `model`."""
    finder = _WeightFinder()
    with Context(model, 2, 1, cb_eval=finder.callback) as context:
        context.eval([np.array([model.bos if model.bos >= 0 else 0] * 2, dtype=np.int32)], output_last_only=True)
    finder.check()
    return {name: sorted(addrs) for name, addrs in finder.found.items()}


def _block(qtype: str) -> int:
    return ggml_types.block_size(ggml_types.tensor_type(qtype))


class ModelWeights:
    """Read, overwrite and restore the float weight tensors of a writable Model."""

    def __init__(self, model: Model):
        self.model = model
        self._lib = ggml().lib
        self._where = find_weights(model)
        self._saved: dict[str, np.ndarray] = {}  # name -> original raw bytes, for tensors changed
        self._types: dict[str, tuple] = {}  # name -> (type, nb) as loaded, for tensors retyped

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def _tensor(self, name: str) -> GgmlTensor:
        addrs = self._where.get(name)
        if not addrs:
            raise SqueezeError(f"{self.model.path}: tensor {name} is not among the weights the model computes with")
        return GgmlTensor.from_address(addrs[0])

    def shape(self, name: str) -> tuple[int, ...]:
        """ggml order (shape[0] is the row length), trailing ones dropped."""
        ne = [int(x) for x in self._tensor(name).ne]
        while len(ne) > 1 and ne[-1] == 1:
            ne.pop()
        return tuple(ne)

    def stored_type(self, name: str) -> str:
        """The type the tensor was loaded with (also while write_quantized has changed it)."""
        if name in self._types:
            return GGMLQuantizationType(self._types[name][0]).name
        return GGMLQuantizationType(self._tensor(name).type).name

    def _nbytes(self, name: str) -> int:
        return int(self._lib.ggml_nbytes(self._where[name][0]))

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as they are now."""
        n = self._nbytes(name)
        out = np.empty(n, dtype=np.uint8)
        self._lib.ggml_backend_tensor_get(self._where[name][0], out.ctypes.data, 0, n)
        return out

    def original_raw(self, name: str) -> np.ndarray:
        return self._saved[name] if name in self._saved else self.raw(name)

    def original(self, name: str) -> np.ndarray:
        """The base's values as float32, (rows, row length)."""
        shape = self.shape(name)
        return from_storage(self.original_raw(name), self.stored_type(name)).reshape(-1, shape[0])

    def write_raw(self, name: str, data: np.ndarray) -> None:
        data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
        n = self._nbytes_as_loaded(name)
        if data.size != n:
            raise SqueezeError(f"{name}: {data.size} bytes for a tensor of {n}")
        if name not in self._saved:
            self._saved[name] = self.raw(name)
        self._retype_back(name)
        for addr in self._where[name]:
            self._lib.ggml_backend_tensor_set(addr, data.ctypes.data, 0, n)

    def write_quantized(self, name: str, qtype: str, data: np.ndarray) -> None:
        """Store the tensor as `qtype` (rows of `data`, as ggml_quant.quantize_rows makes them) in
        its own buffer: the type and strides change with the bytes; restore() undoes both."""
        shape = self.shape(name)
        data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
        row = row_bytes(qtype, shape[0])
        n_rows = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        if data.size != row * n_rows:
            raise SqueezeError(f"{name}: {data.size} bytes of {qtype} for {n_rows} rows of {row}")
        if data.size > self._nbytes_as_loaded(name):
            raise SqueezeError(f"{name}: {qtype} needs more bytes than the base tensor holds")
        if name not in self._saved:
            self._saved[name] = self.raw(name)
        qt = int(GGMLQuantizationType[qtype])
        for addr in self._where[name]:
            t = GgmlTensor.from_address(addr)
            if name not in self._types:
                self._types[name] = (int(t.type), tuple(int(x) for x in t.nb))
            t.type = qt
            t.nb[0] = row // (shape[0] // _block(qtype))
            t.nb[1] = row
            t.nb[2] = row * int(t.ne[1])
            t.nb[3] = t.nb[2] * int(t.ne[2])
            self._lib.ggml_backend_tensor_set(addr, data.ctypes.data, 0, data.size)

    def _nbytes_as_loaded(self, name: str) -> int:
        if name not in self._types:
            return self._nbytes(name)
        return self._saved[name].size

    @property
    def changed(self) -> list[str]:
        return list(self._saved)

    def restore(self, names=None) -> None:
        """Put the original bytes back (all changed tensors, or `names`)."""
        for name in list(self._saved if names is None else names):
            data = self._saved.pop(name, None)
            if data is None:
                continue
            self._retype_back(name)  # the type first: tensor_set checks the size against it
            for addr in self._where[name]:
                self._lib.ggml_backend_tensor_set(addr, data.ctypes.data, 0, data.size)

    def _retype_back(self, name: str) -> None:
        loaded = self._types.pop(name, None)
        if loaded is None:
            return
        for addr in self._where[name]:
            t = GgmlTensor.from_address(addr)
            t.type = loaded[0]
            for i, nb in enumerate(loaded[1]):
                t.nb[i] = nb
