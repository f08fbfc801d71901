"""llama.cpp in-process, through llama-cpp-python's C bindings: load a GGUF, tokenize, and
evaluate batches of sequences, returning logits as numpy arrays.

Only the low-level API is used, so squeeze controls exactly which rows produce logits (the
262k-wide output layer dominates the cost of a small model) and can install `cb_eval`.
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from pathlib import Path

import llama_cpp
import numpy as np

from pipeline.errors import SqueezeError

_LOG_LEVEL_ERROR = 4  # GGML_LOG_LEVEL_ERROR
_log_lines: list[str] = []


@llama_cpp.llama_log_callback
def _quiet_log(level, text, user_data):
    # llama.cpp logs every tensor it loads; keep errors only, for messages on failure.
    if level >= _LOG_LEVEL_ERROR and text:
        _log_lines.append(text.decode("utf-8", "replace"))
        del _log_lines[:-50]


_initialized = False


def init_backend() -> None:
    global _initialized
    if not _initialized:
        if os.environ.get("SQUEEZE_LLAMA_LOG") != "1":
            llama_cpp.llama_log_set(_quiet_log, ctypes.c_void_p())
        llama_cpp.llama_backend_init()
        _initialized = True


def engine_versions() -> dict[str, str]:
    """What a stage's results depend on besides its inputs: the engine and squeeze itself."""
    import gguf  # noqa: F401 - version via importlib.metadata below
    from importlib.metadata import version

    from pipeline import __version__

    return {"llama-cpp-python": llama_cpp.__version__, "gguf": version("gguf"), "squeeze": __version__}


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


class Model:
    """A loaded llama_model (weights mmapped; closed explicitly or as a context manager)."""

    def __init__(self, path: Path, n_gpu_layers: int = 0):
        init_backend()
        path = Path(path)
        if not path.is_file():
            raise SqueezeError(f"{path}: model file not found")
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        _log_lines.clear()
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            detail = _log_lines[-1].strip() if _log_lines else "llama.cpp could not load it"
            raise SqueezeError(f"{path}: cannot load model: {detail}")
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


class ContextBase:
    """Owns one llama_context and its batch (one decode of up to `n_tokens` tokens); subclasses
    decide how sequences are laid out in it."""

    def _open(self, model: Model, n_tokens: int, n_seq: int, n_threads: int | None, *, n_ubatch: int = 512,
              cb_eval=None, kv_unified: bool = False, seq_ids_per_token: int = 1, what: str = "a context") -> None:
        self.model = model
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = n_tokens
        params.n_ubatch = min(n_ubatch, n_tokens)
        params.n_seq_max = n_seq
        if kv_unified and hasattr(params, "kv_unified"):
            params.kv_unified = True  # sequences may share cells (a common prefix)
        params.n_threads = params.n_threads_batch = n_threads or default_threads()
        params.no_perf = True
        if cb_eval is not None:
            self._cb = cb_eval  # keep the ctypes callback alive as long as the context
            params.cb_eval = cb_eval
        self._ctx = llama_cpp.llama_init_from_model(model.ptr, params)
        if not self._ctx:
            raise SqueezeError(f"{model.path}: llama.cpp could not create {what}")
        self._batch = llama_cpp.llama_batch_init(n_tokens, 0, seq_ids_per_token)

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Context(ContextBase):
    """A llama_context that evaluates up to `n_seq` independent sequences of `n_ctx` tokens per
    decode (like llama-perplexity, which packs n_batch / n_ctx sequences into one batch)."""

    def __init__(self, model: Model, n_ctx: int, n_seq: int = 1, n_threads: int | None = None,
                 cb_eval=None, n_ubatch: int = 512):
        self.n_ctx = n_ctx
        self.n_seq = n_seq
        self._open(model, n_ctx * n_seq, n_seq, n_threads, n_ubatch=n_ubatch, cb_eval=cb_eval,
                   what=f"a context of {n_ctx}x{n_seq} tokens")

    def eval(self, sequences: list[np.ndarray], output_from: int = 0, output_last_only: bool = False) -> np.ndarray:
        """Evaluate each sequence from position 0 in its own sequence slot.

        Returns logits of shape (len(sequences), n_out, n_vocab) for the positions
        [output_from, len) of every sequence (all sequences must have the same length), or only
        the last position when `output_last_only`. The cache is cleared first."""
        if len(sequences) > self.n_seq:
            raise ValueError(f"{len(sequences)} sequences for a context of {self.n_seq}")
        n_tok = len(sequences[0])
        if any(len(s) != n_tok for s in sequences) or n_tok > self.n_ctx:
            raise ValueError("sequences must have equal length, at most n_ctx")
        first = n_tok - 1 if output_last_only else output_from
        self.clear()
        b = self._batch
        k = 0
        for s, seq in enumerate(sequences):
            for pos, tok in enumerate(seq):
                b.token[k] = int(tok)
                b.pos[k] = pos
                b.n_seq_id[k] = 1
                b.seq_id[k][0] = s
                b.logits[k] = pos >= first
                k += 1
        b.n_tokens = k
        rc = llama_cpp.llama_decode(self._ctx, b)
        if rc != 0:
            raise SqueezeError(f"{self.model.path}: llama_decode failed with code {rc}")
        n_out = n_tok - first
        ptr = llama_cpp.llama_get_logits(self._ctx)
        flat = np.ctypeslib.as_array(ptr, shape=(len(sequences) * n_out * self.model.n_vocab,))
        return flat.reshape(len(sequences), n_out, self.model.n_vocab)

    def decode_tokens(self, tokens, start_pos: int, seq: int = 0, want_last: bool = True) -> np.ndarray | None:
        """Append `tokens` at `start_pos` of sequence `seq` (no clearing); logits of the last one."""
        b = self._batch
        for i, tok in enumerate(tokens):
            b.token[i] = int(tok)
            b.pos[i] = start_pos + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = want_last and i == len(tokens) - 1
        b.n_tokens = len(tokens)
        rc = llama_cpp.llama_decode(self._ctx, b)
        if rc != 0:
            raise SqueezeError(f"{self.model.path}: llama_decode failed with code {rc}")
        if not want_last:
            return None
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()


@contextmanager
def open_context(path: Path, n_ctx: int, n_seq: int = 1, n_threads: int | None = None,
                 n_gpu_layers: int = 0, cb_eval=None):
    with Model(path, n_gpu_layers) as model, Context(model, n_ctx, n_seq, n_threads, cb_eval) as ctx:
        yield model, ctx
