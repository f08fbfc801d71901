"""llama_context wrappers: one context and its batch, laid out three ways -- independent
sequences from position 0 (perplexity, calibration), appended tokens (generation, speed), and
a prefix shared by several sequences (the task benchmarks, as llama-perplexity lays them out).

Only the low-level API is used, so squeeze controls exactly which rows produce logits (the
262k-wide output layer dominates the cost of a small model) and can install `cb_eval`.
"""

from __future__ import annotations

import llama_cpp
import numpy as np

from pipeline.engine.backend import default_threads
from pipeline.engine.model import Model
from pipeline.errors import SqueezeError


class ContextBase:
    """Owns one llama_context and its batch (one decode of up to `n_tokens` tokens); subclasses
    decide how sequences are laid out in it."""

    def _open(self, model: Model, n_tokens: int, n_seq: int, n_threads: int | None, *, n_ubatch: int = 512,
              cb_eval=None, kv_unified: bool = False, seq_ids_per_token: int = 1, what: str = "a context",
              flash_attn: bool | None = None) -> None:
        self.model = model
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = n_tokens
        params.n_ubatch = min(n_ubatch, n_tokens)
        params.n_seq_max = n_seq
        if kv_unified and hasattr(params, "kv_unified"):
            params.kv_unified = True  # sequences may share cells (a common prefix)
        params.n_threads = params.n_threads_batch = n_threads or default_threads()
        params.no_perf = True
        if flash_attn is not None:  # None: llama.cpp's default (auto, on for the CPU backend)
            params.flash_attn_type = 1 if flash_attn else 0  # LLAMA_FLASH_ATTN_TYPE_ENABLED / _DISABLED
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


class SharedPrefixContext(ContextBase):
    """A context that decodes one group of sequences at a time: a common prefix shared by up to
    `max_seq` sequences (several sequence ids on one token), then each sequence's own tokens."""

    def __init__(self, model: Model, ctx: int, max_seq: int, n_threads: int | None = None,
                 flash_attn: bool | None = None):
        # Like llama-perplexity's task modes: -c ctx with n_parallel sequences is a unified
        # cache of n_parallel x ctx cells, and a group fits when all its tokens fit in it.
        self.ctx = ctx
        self.n_ctx = ctx * max_seq
        self.max_seq = max_seq
        self._open(model, self.n_ctx, max_seq, n_threads, kv_unified=True, seq_ids_per_token=max_seq,
                   flash_attn=flash_attn,
                   what=f"a task context of {self.n_ctx} tokens")

    def decode(self, seqs: list[np.ndarray], prefix: int, all_logits: bool, what: str) -> np.ndarray:
        """Logit rows in the CLI's order: the last prefix token, then per sequence its tokens from
        `prefix` on (all of them when `all_logits`, else all but the last)."""
        need = prefix + sum(len(s) - prefix for s in seqs)
        if need > self.n_ctx:
            raise SqueezeError(f"{what}: needs {need} tokens, more than the {self.n_ctx} of the task context "
                               f"({self.max_seq} sequences x ctx {self.ctx}); raise score.tasks.ctx")
        if len(seqs) > self.max_seq:
            raise SqueezeError(f"{what}: {len(seqs)} answers, more than the {self.max_seq} sequences of the context")
        b = self._batch
        k = 0

        def add(tok, pos, seq_ids, want):
            nonlocal k
            b.token[k] = int(tok)
            b.pos[k] = pos
            b.n_seq_id[k] = len(seq_ids)
            for j, s in enumerate(seq_ids):
                b.seq_id[k][j] = s
            b.logits[k] = want
            k += 1

        all_ids = list(range(len(seqs)))
        for i in range(prefix):
            add(seqs[0][i], i, all_ids, i == prefix - 1)
        for s, seq in enumerate(seqs):
            for i in range(prefix, len(seq)):
                add(seq[i], i, [s], all_logits or i < len(seq) - 1)
        b.n_tokens = k
        n_out = sum(int(b.logits[i] != 0) for i in range(k))
        self.clear()
        rc = llama_cpp.llama_decode(self._ctx, b)
        if rc != 0:
            raise SqueezeError(f"{self.model.path}: llama_decode failed with code {rc} on {what}")
        ptr = llama_cpp.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out * self.model.n_vocab,)).reshape(n_out, -1).copy()
