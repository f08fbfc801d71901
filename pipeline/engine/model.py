"""A loaded llama_model: tokenizer, vocabulary facts, metadata and sizes, through llama-cpp-python's
low-level bindings (weights mmapped unless asked to be writable; closed explicitly or as a context
manager)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import numpy as np

from pipeline.engine.backend import clear_errors, init_backend, last_error
from pipeline.errors import DamagedFile, SqueezeError
from pipeline.formats.gguf_io import gguf_problem

ALL_LAYERS = 2**31 - 1  # n_gpu_layers: -1 in a recipe; llama.cpp offloads min(this, layers + output)


# llama_load_mode: read into allocated buffers (the default maps the file read-only: writes fault)
LOAD_MODE_NONE = 0


class Model:
    def __init__(self, path: Path, n_gpu_layers: int = 0, writable: bool = False, repack: bool = True):
        """`writable`: read the weights into buffers of their own instead of mapping the file
        read-only, so they can be overwritten in place (pipeline.engine.weights). `repack`: let
        llama.cpp's CPU backend repack quantized weights into its interleaved layouts, as its tools
        do by default (--no-repack turns it off); those kernels round differently, so a file
        scored without it is what an in-place probe of the same bytes measures (see
        results/bench/README.md)."""
        init_backend()
        path = Path(path)
        if not path.is_file():
            raise SqueezeError(f"{path}: model file not found")
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = ALL_LAYERS if n_gpu_layers < 0 else n_gpu_layers
        if writable:
            params.load_mode = LOAD_MODE_NONE
        if not repack:
            params.use_extra_bufts = False
        clear_errors()
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            # llama.cpp says "failed to load model"; the file's own header usually says why
            problem = gguf_problem(path)
            if problem is not None:
                raise DamagedFile(path, problem)
            raise SqueezeError(f"{path}: cannot load model: {last_error('llama.cpp could not load it')}")
        self.path = path
        self.vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_layer = llama_cpp.llama_model_n_layer(self._model)
        self.n_embd = llama_cpp.llama_model_n_embd(self._model)
        self.bos = llama_cpp.llama_vocab_bos(self.vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))

    @property
    def ptr(self):
        return self._model

    @property
    def n_params(self) -> int:
        """Parameter count as llama.cpp reports it (bits per weight = size_bytes * 8 / n_params)."""
        return int(llama_cpp.llama_model_n_params(self._model))

    @property
    def size_bytes(self) -> int:
        """Bytes of tensor data as llama.cpp reports them."""
        return int(llama_cpp.llama_model_size(self._model))

    def tokenize(self, text: str, add_special: bool = True) -> np.ndarray:
        """Token ids as llama.cpp's tools tokenize a whole text (special tokens not parsed)."""
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, False)
        if n < 0:
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, False)
        return np.ctypeslib.as_array(buf)[:n].astype(np.int32)

    def piece(self, token: int) -> str:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, int(token), buf, len(buf), 0, False)
        return buf.raw[: max(n, 0)].decode("utf-8", "replace")

    def detokenize(self, tokens) -> str:
        return "".join(self.piece(t) for t in tokens)

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, int(token)))

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1024)
        n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return None if n < 0 else buf.value.decode("utf-8", "replace")

    def close(self) -> None:
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
