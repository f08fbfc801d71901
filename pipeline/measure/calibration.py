"""The calibration pass: one forward pass of the base model over the calibration chunks, watched
through llama.cpp's `cb_eval` hook, collecting two things at once:

* the importance matrix, exactly as llama.cpp's tools/imatrix does: for every MUL_MAT whose
  weight is a `blk.*` tensor (and every MUL_MAT_ID), the per-column sum of squared input
  activations and the number of rows (tokens) that went in;
* per block, the cosine similarity between the hidden state entering it and leaving it (mean
  over tokens; ShortGPT's Block Influence is 1 minus that), from the graph nodes llama.cpp names
  `inp_embd` / `inp_scaled` (input of block 0) and `l_out-<il>` (output of block il);
* when asked (error-compensated rounding, pipeline.choose.gptq_rounding), the full second moment
  H = sum x x^T of every distinct input of a dense `blk.*` matrix, in float64: attn_q/k/v read one
  input and share one H, ffn_gate/up another; attn_output and ffn_down have their own. Its
  diagonal is the imatrix's sum of squares.

The chunks are laid out as llama-imatrix lays them out (n_batch 2048 / ctx sequences per decode,
first token of each chunk replaced by BOS), so the numbers agree with the CLI's.
"""

from __future__ import annotations

import hashlib
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline import __version__
from pipeline.engine.backend import engine_version
from pipeline.engine.context import Context
from pipeline.engine.eval_hook import GGML_TYPE_F32, EvalHook, GgmlTensor, address, ggml, weight_name
from pipeline.engine.model import Model
from pipeline.errors import SqueezeError
from pipeline.formats.imatrix_file import Imatrix, ImatrixEntry
from pipeline.formats.layers_csv import LayerSimilarity
from pipeline.formats.tensor_names import layer_of
from pipeline.fsutil import atomic_path, read_text
from pipeline.progress import bar

# ---- the collector ------------------------------------------------------------------------------

@dataclass
class Collected:
    """Running totals; the float32 sums are rounded exactly as the CLI's, and a checkpoint stores
    them bit for bit, so a resumed pass ends where an uninterrupted one does."""
    sums: dict[str, np.ndarray] = field(default_factory=dict)  # (n_counts, values per count)
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # int64 (n_counts,)
    cos_sum: np.ndarray | None = None  # per block: sum over tokens of cos(input, output)
    cos_tokens: np.ndarray | None = None
    chunks_done: int = 0
    # H per distinct input, keyed by the first weight that reads it (a routed expert tensor's: one
    # per expert, (n_expert, n_in, n_in)); every weight -> its key
    moments: dict[str, np.ndarray] = field(default_factory=dict)
    moment_of: dict[str, str] = field(default_factory=dict)

    def second_moment(self, weight: str) -> np.ndarray:
        """H = sum x x^T over the inputs `weight` saw (float64, n_in x n_in)."""
        return self.moments[self.moment_of[weight]]


class Collector(EvalHook):
    """The cb_eval observer of the calibration pass (see pipeline.engine.eval_hook)."""

    def __init__(self, n_layer: int, totals: Collected, stop_after_last_block: bool = True,
                 second_moments: bool = False, moment_layers: range | None = None, moments_only: bool = False):
        """`moment_layers`: the blocks whose inputs' second moments are kept (None: all);
        `moments_only`: nothing else (no imatrix, no similarities), and the pass stops after the
        last of those blocks (a later pass of a model whose moments do not fit in memory at once)."""
        super().__init__()
        self.second_moments = second_moments or moments_only
        self.moment_layers = range(n_layer) if moment_layers is None else moment_layers
        self.moments_only = moments_only
        self._moment_keys: dict[int, str] = {}  # input node -> the first weight that read it (this graph)
        self.g = ggml()
        self.n_layer = n_layer
        self.totals = totals
        if totals.cos_sum is None:
            totals.cos_sum = np.zeros(n_layer)
            totals.cos_tokens = np.zeros(n_layer, dtype=np.int64)
        # Nothing after the last block matters here: skipping the 262k-wide output layer (which
        # the CLI computes for its perplexity printout) is most of squeeze's speed advantage.
        self.stop_after_last_block = stop_after_last_block
        self._inputs = {b"inp_embd", b"inp_scaled"}
        self._outputs = {f"l_out-{i}".encode(): i for i in range(n_layer)}
        self._prev: np.ndarray | None = None  # hidden state entering the next block
        self._sq_cache: dict[int, tuple] = {}  # src1 node -> (totals before, totals after) its rows

    def ask(self, t: GgmlTensor) -> bool:
        op = t.op
        if op == self.g.MUL_MAT_ID:
            return not self.moments_only or self._keeps_moment(weight_name(t.src[0].contents.name))
        if op == self.g.MUL_MAT:
            src1 = t.src[1].contents
            # tools/imatrix skips batches under 16 rows (token-by-token generation) and non-F32 inputs
            if src1.ne[1] < 16 or src1.type != GGML_TYPE_F32:
                return False
            name = weight_name(t.src[0].contents.name)
            return name.startswith("blk.") and (not self.moments_only or self._keeps_moment(name))
        name = t.name
        return name in self._outputs or name in self._inputs

    def collect(self, t: GgmlTensor) -> bool:
        op = t.op
        if op == self.g.MUL_MAT:
            self._mul_mat(t)
            return True
        if op == self.g.MUL_MAT_ID:
            self._mul_mat_id(t)
            return True
        name = t.name
        if self.moments_only:  # a block ends: its inputs' addresses may be reused
            self._moment_keys.clear()
            il = self._outputs.get(name)
            return il is None or il < self.moment_layers[-1]
        hidden = self.g.array(t)
        hidden = hidden.reshape(-1, hidden.shape[-1])  # (tokens, n_embd)
        if name in self._inputs:
            self._prev = hidden.copy()
            self._sq_cache.clear()  # a new graph (ubatch) starts: node addresses are reused
            self._moment_keys.clear()
            return True
        il = self._outputs[name]
        self._sq_cache.clear()
        self._moment_keys.clear()
        prev = self._prev
        if prev is not None and prev.shape == hidden.shape:
            dot = np.einsum("ij,ij->i", prev, hidden, dtype=np.float64)
            norms = np.linalg.norm(prev.astype(np.float64), axis=1) * np.linalg.norm(hidden.astype(np.float64), axis=1)
            cos = dot / np.where(norms > 0, norms, 1.0)
            self.totals.cos_sum[il] += float(cos.sum())
            self.totals.cos_tokens[il] += len(cos)
        self._prev = hidden.copy()
        return not (self.stop_after_last_block and il == self.n_layer - 1)

    def _keeps_moment(self, name: str) -> bool:
        layer = layer_of(name)
        return layer is not None and layer in self.moment_layers

    def _mul_mat(self, t: GgmlTensor) -> None:
        src0, src1 = t.src[0].contents, t.src[1].contents
        name = weight_name(src0.name)
        ne0 = int(src1.ne[0])
        n_mat = int(src0.ne[2] * src0.ne[3])
        if self.moments_only:
            if n_mat == 1:
                self._second_moment(name, src1, ne0)
            return
        sums = self.totals.sums.get(name)
        if sums is None:
            # one count per dense tensor, values for every matrix of a 3-D weight (as the CLI stores it)
            sums = self.totals.sums[name] = np.zeros((1, ne0 * n_mat), dtype=np.float32)
            self.totals.counts[name] = np.zeros(1, dtype=np.int64)
        elif sums.size != ne0 * n_mat:
            raise SqueezeError(f"{name}: input of {ne0} x {n_mat} values after {sums.size} before")
        flat = sums.reshape(-1)
        # attn_q/k/v (and ffn_gate/up) read the same input node and have seen the same inputs so
        # far: their totals are bit-equal, so add the rows once and copy the result.
        key = address(src1)
        cached = self._sq_cache.get(key)
        if cached is not None and cached[0].shape == flat.shape and np.array_equal(cached[0], flat):
            flat[:] = cached[1]
        else:
            before = flat.copy()
            x = self.g.array(src1)
            s0ne2, s0ne3 = int(src0.ne[2]), int(src0.ne[3])
            for i3 in range(x.shape[0]):
                for i2 in range(x.shape[1]):
                    mat = (i3 % s0ne3) * s0ne2 + (i2 % s0ne2)
                    accumulate_squares(flat[mat * ne0:(mat + 1) * ne0], x[i3, i2])
            self._sq_cache[key] = (before, flat.copy())
        n_rows = int(src1.ne[1] * src1.ne[2] * src1.ne[3])
        self.totals.counts[name] += n_rows // n_mat
        if self.second_moments and n_mat == 1 and self._keeps_moment(name):
            self._second_moment(name, src1, ne0)

    def _first_reader(self, name: str, src1: GgmlTensor) -> str | None:
        """The key of the input `name` reads; None when another weight of this graph has added
        this very input already (q/k/v, gate/up, the experts' gate/up)."""
        key = address(src1)
        first = self._moment_keys.get(key)
        if first is not None:
            self.totals.moment_of.setdefault(name, first)
            return None
        first = self.totals.moment_of.setdefault(name, name)
        self._moment_keys[key] = first
        return first

    def _second_moment(self, name: str, src1: GgmlTensor, ne0: int) -> None:
        first = self._first_reader(name, src1)
        if first is None:
            return
        x = self.g.array(src1).reshape(-1, ne0).astype(np.float64)
        h = self.totals.moments.get(first)
        if h is None:
            h = self.totals.moments[first] = np.zeros((ne0, ne0))
        h += x.T @ x

    def _mul_mat_id(self, t: GgmlTensor) -> None:
        # ids: (n_tokens, n_expert_used) expert numbers; src1: (n_tokens, n_expert_used or 1, cols)
        src0, src1, ids_t = t.src[0].contents, t.src[1].contents, t.src[2].contents
        name = weight_name(src0.name)
        n_as, ne0 = int(src0.ne[2]), int(src1.ne[0])
        if src1.ne[3] != 1:
            raise SqueezeError(f"{name}: MUL_MAT_ID input with more than 3 dimensions")
        x = self.g.array(src1)[0]  # (n_tokens, ne1, ne0)
        ids = self.g.array(ids_t, dtype=np.int32)[0, 0]  # (n_tokens, n_ids)
        if ids.size and (ids.min() < 0 or ids.max() >= n_as):
            raise SqueezeError(f"{name}: expert id outside 0..{n_as - 1}")
        if self.moments_only:
            self._expert_moments(name, src1, x, ids, n_as, ne0)
            return
        sums = self.totals.sums.get(name)
        if sums is None:
            sums = self.totals.sums[name] = np.zeros((n_as, ne0), dtype=np.float32)
            self.totals.counts[name] = np.zeros(n_as, dtype=np.int64)
        elif sums.shape != (n_as, ne0):
            raise SqueezeError(f"{name}: {n_as} experts x {ne0} values after {sums.shape[0]} x {sums.shape[1]} before")
        counts = self.totals.counts[name]
        # the CLI's order: expert slot by slot, token by token within a slot
        for idx in range(ids.shape[1]):
            rows = x[:, idx % x.shape[1], :]
            for row, ex in enumerate(ids[:, idx]):
                accumulate_squares(sums[ex], rows[row:row + 1])
            counts += np.bincount(ids[:, idx], minlength=n_as)
        if self.second_moments and self._keeps_moment(name):
            self._expert_moments(name, src1, x, ids, n_as, ne0)

    def _expert_moments(self, name: str, src1: GgmlTensor, x: np.ndarray, ids: np.ndarray, n_as: int,
                        ne0: int) -> None:
        """Each routed expert's own H, over the tokens routed to it: (n_as, ne0, ne0)."""
        first = self._first_reader(name, src1)
        if first is None:
            return
        h = self.totals.moments.get(first)
        if h is None:
            h = self.totals.moments[first] = np.zeros((n_as, ne0, ne0))
        for idx in range(ids.shape[1]):
            rows = x[:, idx % x.shape[1], :].astype(np.float64)
            for ex in np.unique(ids[:, idx]):
                routed = rows[ids[:, idx] == ex]
                h[ex] += routed.T @ routed


def accumulate_squares(acc: np.ndarray, rows: np.ndarray) -> None:
    """acc[j] += x[j]*x[j] for each row x in order, in float32, rounded as tools/imatrix rounds:
    the square rounded to float32, then the sum (that file is compiled without FMA). Same order,
    same rounding: the totals come out bit-identical to the CLI's, which is what makes quantizing
    with either imatrix give the same tensors."""
    sq = np.square(rows, dtype=np.float32)
    for r in range(sq.shape[0]):
        np.add(acc, sq[r], out=acc)


# ---- the pass -----------------------------------------------------------------------------------

def chunk_tokens(tokens: np.ndarray, n_ctx: int, n_chunks: int, bos: int | None) -> list[np.ndarray]:
    """The chunks llama-imatrix evaluates: consecutive n_ctx windows, the first token set to BOS."""
    out = []
    for i in range(n_chunks):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx].copy()
        if bos is not None:
            chunk[0] = bos
        out.append(chunk)
    return out


def fingerprint(model_path: Path, tokens: np.ndarray, n_ctx: int, n_seq: int, second_moments: bool = False,
                moment_layers: range | None = None, moments_only: bool = False) -> str:
    """What a checkpoint must have been made from to be resumed."""
    st = Path(model_path).stat()
    what = ""
    if second_moments or moments_only:
        what = "moments|" if moment_layers is None else f"moments {moment_layers.start}-{moment_layers.stop}|"
        what += "only|" if moments_only else ""
    h = hashlib.sha256(f"{Path(model_path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{n_ctx}|{n_seq}|"
                       f"{engine_version()}|{__version__}|{what}".encode())
    h.update(np.ascontiguousarray(tokens, dtype=np.int32).tobytes())
    return h.hexdigest()


def save_checkpoint(path: Path, totals: Collected, fp: str) -> None:
    arrays = {"fingerprint": np.array(fp), "chunks_done": np.array(totals.chunks_done),
              "cos_sum": totals.cos_sum, "cos_tokens": totals.cos_tokens}
    for name in totals.sums:
        arrays[f"sum:{name}"] = totals.sums[name]
        arrays[f"count:{name}"] = totals.counts[name]
    for name, h in totals.moments.items():
        arrays[f"moment:{name}"] = h
    for name, first in totals.moment_of.items():
        arrays[f"moment_of:{name}"] = np.array(first)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_checkpoint(path: Path, fp: str) -> Collected | None:
    """The totals of an interrupted pass over the same model and tokens, else None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != fp:
                return None
            totals = Collected(cos_sum=z["cos_sum"].copy(), cos_tokens=z["cos_tokens"].copy(),
                               chunks_done=int(z["chunks_done"]))
            for key in z.files:
                if key.startswith("sum:"):
                    name = key[4:]
                    totals.sums[name] = z[key].copy()
                    totals.counts[name] = z[f"count:{name}"].copy()
                elif key.startswith("moment:"):
                    totals.moments[key[7:]] = z[key].copy()
                elif key.startswith("moment_of:"):
                    totals.moment_of[key[10:]] = str(z[key])
            return totals
    except (OSError, ValueError, KeyError, EOFError, NotImplementedError, zipfile.BadZipFile):
        return None  # a damaged checkpoint: the pass starts over


# The float64 second moments one calibration pass may hold: a model whose moments exceed it
# (Gemma 3 1B's are 10.7 GB, 12B's 108 GB) collects them over several passes, a few blocks each,
# the later passes stopping after their last block.
MOMENTS_PASS_BYTES = 4 << 30


def moment_groups(layer_bytes: list[int], budget: int | None = None) -> list[range]:
    """Consecutive blocks whose moments (`layer_bytes[i]`: block i's, float64) fit `budget`
    (MOMENTS_PASS_BYTES) per pass, at least one block each."""
    budget = MOMENTS_PASS_BYTES if budget is None else budget
    groups, start, held = [], 0, 0
    for i, n in enumerate(layer_bytes):
        if i > start and held + n > budget:
            groups.append(range(start, i))
            start, held = i, 0
        held += n
    if layer_bytes:
        groups.append(range(start, len(layer_bytes)))
    return groups


_BATCH_TOKENS = 2048  # llama-imatrix's default n_batch: it packs n_batch / ctx chunks per decode


def collect(model_path: Path, tokens: np.ndarray, n_ctx: int, n_chunks: int, *, threads: int | None = None,
            checkpoint: Path | None = None, on_batch: Callable[[int], None] | None = None,
            n_seq: int | None = None, progress_desc: str = "imatrix",
            n_gpu_layers: int = 0, second_moments: bool = False, moment_layers: range | None = None,
            moments_only: bool = False) -> tuple[Collected, dict]:
    """Run the pass over the first `n_chunks` chunks of `tokens`; resume from `checkpoint` when it
    holds an interrupted pass over the same model and tokens, and save it after every decode.

    `on_batch(chunks_done)` is called after each saved checkpoint (tests interrupt there).
    With layers offloaded, the hook copies each observed node out of device memory.
    `second_moments`: also every block input's H (Collected.second_moment), of the blocks
    `moment_layers` only when given; `moments_only`: those H and nothing else (Collector)."""
    n_seq = n_seq or max(1, _BATCH_TOKENS // n_ctx)
    with Model(model_path, n_gpu_layers) as model:
        chunks = chunk_tokens(tokens, n_ctx, n_chunks, model.bos if model.add_bos else None)
        fp = fingerprint(model_path, tokens[:n_chunks * n_ctx], n_ctx, n_seq, second_moments, moment_layers,
                         moments_only)
        totals = load_checkpoint(checkpoint, fp) if checkpoint and checkpoint.exists() else None
        if totals is None or totals.chunks_done > n_chunks or totals.chunks_done % n_seq:
            totals = Collected()
        resumed_from = totals.chunks_done
        if resumed_from:
            print(f"{progress_desc}: resuming after chunk {resumed_from} of {n_chunks} ({checkpoint.name})",
                  file=sys.stderr)
        collector = Collector(model.n_layer, totals, second_moments=second_moments, moment_layers=moment_layers,
                              moments_only=moments_only)
        start = time.monotonic()
        with Context(model, n_ctx, n_seq, threads, cb_eval=collector.callback) as lctx, \
                bar(n_chunks, progress_desc, unit="chunk") as progress:
            progress.update(resumed_from)
            for first in range(resumed_from, n_chunks, n_seq):
                batch = chunks[first:first + n_seq]
                try:
                    lctx.eval(batch)
                finally:
                    collector.check()
                for name, sums in totals.sums.items():
                    if not np.isfinite(sums).all():
                        raise SqueezeError(f"{name}: non-finite activations in chunks {first + 1}-{first + len(batch)}")
                totals.chunks_done = first + len(batch)
                progress.update(len(batch))
                if checkpoint is not None:
                    save_checkpoint(checkpoint, totals, fp)
                if on_batch is not None:
                    on_batch(totals.chunks_done)
        seconds = time.monotonic() - start
    done_tokens = (n_chunks - resumed_from) * n_ctx
    return totals, {"chunks": n_chunks, "tokens": n_chunks * n_ctx, "resumed_from_chunk": resumed_from,
                    "seconds": round(seconds, 2),
                    "tokens_per_s": round(done_tokens / seconds, 1) if seconds > 0 else None}


def to_imatrix(totals: Collected, n_ctx: int, datasets: list[str]) -> Imatrix:
    im = Imatrix(datasets=list(datasets), chunk_size=n_ctx)
    for name in sorted(totals.sums):
        im.entries[name] = ImatrixEntry(totals.sums[name].astype(np.float32), totals.counts[name].astype(np.int64))
    # as tools/imatrix: the chunk count is the largest count over whole chunks
    im.chunk_count = max((int(c.max()) for c in totals.counts.values()), default=0) // n_ctx
    return im


def layer_rows(totals: Collected) -> list[LayerSimilarity]:
    rows = []
    for il in range(len(totals.cos_sum)):
        n = int(totals.cos_tokens[il])
        cos = totals.cos_sum[il] / n if n else float("nan")
        rows.append(LayerSimilarity(il, cos, 1.0 - cos, n))
    return rows


def calibration_tokens(model_path: Path, files: list[Path]) -> np.ndarray:
    """The calibration files as one token stream (texts joined by a blank line), tokenized as
    llama-imatrix tokenizes its prompt file (BOS added, special tokens not parsed)."""
    texts = []
    for f in files:
        if f.is_dir():
            raise SqueezeError(f"{f}: calibration data must be a text file, not a folder")
        texts.append(read_text(f))
    with Model(model_path) as model:
        return model.tokenize("\n\n".join(texts), add_special=True)
