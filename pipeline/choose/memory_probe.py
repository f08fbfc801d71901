"""KLD probes on a model loaded once: each probe overwrites tensors in place, measures, restores.

A probe is a change to the base: some tensors at other types (their values become what ggml's
quantize then dequantize make of them, with the imatrix, exactly what a quantized file would
hold; or, with a `rounder`, what the variant's error-compensated rounding makes), and some layers
removed. A layer is removed by zeroing the tensors that write into the
residual stream (attention output and FFN down projections, and their biases): the block then
adds nothing, and every later layer keeps its index, its attention kind and its RoPE base, which
is what a correctly pruned file keeps too (pipeline.formats.prune). The KLD against the cached
base distribution is then measured on a few calibration chunks, and the original bytes go back.

A tensor at another type takes that type in place (pipeline.engine.weights.write_quantized), so
ggml multiplies with the same quantized kernels a file of that mix would use, activations
rounded to 8 bits included. (Writing the dequantized values back as F16 instead skips that
rounding: measured here, 1 to 2 % off the file's KLD on single-group probes, so it is not done.)

The probe pickles as its settings: a worker process (a Ray task measuring a share of the probes)
loads the model and the cached base distribution once, the first time it measures.

Measure once, reuse everywhere: with a `memo` file (one per results folder), every probe's
figures are appended as it finishes, keyed by what it was measured on (base and imatrix files,
the chunks' tokens, the engine: `identity()`) and by the probe itself (its types and removed
layers: `probe_key`). The sensitivity map, the prune searches, every variant's refinement rounds
and the prune-or-bits search then measure a given change once per run, and a killed step
resumes with what it had measured.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from pipeline.engine.assemble import Rounder
from pipeline.engine.backend import engine_version
from pipeline.engine.context import Context
from pipeline.engine.model import Model
from pipeline.engine.quantized_tensors import file_identity, quantized_bytes, shared_cache
from pipeline.engine.weights import ModelWeights
from pipeline.errors import SqueezeError
from pipeline.formats.imatrix_file import read_imatrix
from pipeline.formats.tensor_names import residual_outputs
from pipeline.fsutil import atomic_path
from pipeline.measure import perplexity

# Calibration chunks every probe measures on (sensitivity, automatic pruning, allocation): one
# probe costs a pass over them, and the stages share measurements only at the same count.
PROBE_CHUNKS = 2

_open_probes: dict[tuple, tuple] = {}  # settings -> (model, weights, context): one per process


class MemoryProbe:
    """The base model loaded writable, its distribution on `chunks` chunks of `text` (cached in
    `cache`, an .npz, when given), and the KLD of any change to it."""

    def __init__(self, base: Path, text: str, ctx: int, chunks: int, threads: int | None = None,
                 cache: Path | None = None, n_gpu_layers: int = 0, imatrix_path: Path | None = None,
                 memo: Path | None = None, skip_chunks: int = 0, rounder: Rounder | None = None):
        """`skip_chunks`: the chunks start after that many of `text` (held out from what they score).
        `rounder`: how a tensor's values are rounded onto its type's grid where it does not keep
        llama.cpp's own (pipeline.choose.gptq_rounding), as the variant's file will have them."""
        self.base_path = Path(base)
        self.rounder = rounder
        self.memo = ProbeMemo(memo) if memo is not None else None
        self._identity = None
        self.measured = 0  # probes evaluated by this object (memo hits are not)
        self.reused = 0  # probes answered from the memo
        self.ctx = ctx
        self.threads = threads
        self.n_gpu_layers = n_gpu_layers
        self.imatrix_path = Path(imatrix_path) if imatrix_path else None
        self.cache = Path(cache) if cache is not None else None
        self._columns = None
        self._holds = False  # whether this probe counts among the users of the loaded model
        if self.cache is not None and self.cache.exists():
            self.base = perplexity.load_base(self.cache)
            return
        model = self._loaded()["model"]
        try:
            ch = perplexity.make_chunks(model, text, ctx, chunks, what="calibration text", skip=skip_chunks)
            self.base = perplexity.base_distribution(model, self._context(len(ch.tokens)), ch)
        except BaseException:
            self.close()  # the caller gets no probe to close
            raise
        if self.cache is not None:
            with atomic_path(self.cache) as tmp:
                perplexity.save_base(tmp, self.base)

    # ---- the loaded model (one per process, base and offload) ------------------------------------
    def _key(self) -> tuple:
        return (str(self.base_path.resolve()), self.n_gpu_layers, os.getpid())

    def _loaded(self) -> dict:
        loaded = _open_probes.get(self._key())
        if loaded is None:
            model = Model(self.base_path, self.n_gpu_layers, writable=True)
            loaded = _open_probes[self._key()] = {"model": model, "weights": ModelWeights(model), "contexts": {},
                                                  "users": 0}
        if not self._holds:
            loaded["users"] += 1
            self._holds = True
        return loaded

    def _context(self, n_seq: int | None = None) -> Context:
        # as llama-perplexity packs them: n_batch / ctx sequences per decode, the rest in turns
        n_seq = min(n_seq or len(self.base["tokens"]), perplexity.seqs_per_batch(self.ctx))
        contexts = self._loaded()["contexts"]
        if (self.ctx, n_seq) not in contexts:
            contexts[(self.ctx, n_seq)] = Context(self._loaded()["model"], self.ctx, n_seq, self.threads)
        return contexts[(self.ctx, n_seq)]

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.cache is not None:
            del state["base"]
        state["_columns"] = None
        state["_holds"] = False
        state["_identity"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if "base" not in state:
            self.base = perplexity.load_base(self.cache)

    @property
    def weights(self) -> ModelWeights:
        return self._loaded()["weights"]

    def close(self) -> None:
        """Let go of the loaded model; the last probe of this process on the same base frees it."""
        loaded = _open_probes.get(self._key())
        if loaded is None or not self._holds:
            return
        self._holds = False
        loaded["users"] -= 1
        if loaded["users"] == 0:
            del _open_probes[self._key()]
            for context in loaded["contexts"].values():
                context.close()
            loaded["model"].close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- changes ----------------------------------------------------------------------------------
    def column_weights(self, name: str) -> np.ndarray | None:
        """The imatrix entry llama_model_quantize would use for this tensor (None: no imatrix or
        no entry, e.g. the token embedding, whose rows are looked up)."""
        if self.imatrix_path is None:
            return None
        if self._columns is None:
            self._columns = read_imatrix(self.imatrix_path).normalized()
        return self._columns.get(name)

    def residual_outputs(self, layer: int) -> list[str]:
        """The tensors of `layer` that write into the residual stream."""
        names = residual_outputs(self.weights.names, (layer,))
        if not names:
            raise SqueezeError(f"{self.base_path.name}: layer {layer} has no attention output or FFN down "
                               "projection to zero; it cannot be removed in memory")
        return names

    def apply(self, types: dict[str, str] | None = None, removed=()) -> None:
        """Change the loaded model: tensors at types (name -> type), layers removed."""
        weights = self.weights
        cache = shared_cache()  # the assembler writes the variant's file from the same bytes
        source, imatrix = file_identity(self.base_path), file_identity(self.imatrix_path)
        rounder = self.rounder
        made_with = imatrix + (f"|{rounder.identity}" if rounder else "")  # as the assembler keys them

        def make(name: str, qtype: str) -> np.ndarray:
            values, shape, columns = weights.original(name), weights.shape(name), self.column_weights(name)
            rounded = rounder.round(name, values, shape, qtype, columns) if rounder else None
            return rounded if rounded is not None else quantized_bytes(values, shape, qtype, columns)

        for name, qtype in (types or {}).items():
            data = cache.get_or_quantize(source, name, qtype, made_with, lambda: make(name, qtype))
            weights.write_quantized(name, qtype, data)
        for layer in removed:
            for name in self.residual_outputs(layer):
                weights.write_raw(name, np.zeros_like(weights.original_raw(name)))

    def restore(self) -> None:
        self.weights.restore()

    # ---- measuring --------------------------------------------------------------------------------
    def identity(self) -> str:
        """What every measurement of this probe depends on besides the change itself: the base and
        imatrix files (path, size, modification time), the chunks' tokens and the engine."""
        if self._identity is None:
            h = hashlib.sha256()
            for path in (self.base_path, self.imatrix_path):
                if path is not None:
                    st = Path(path).stat()
                    h.update(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}|".encode())
                h.update(b"-|")
            h.update(np.ascontiguousarray(self.base["tokens"]).tobytes())
            h.update(f"|{self.ctx}|{engine_version()}".encode())
            if self.rounder is not None:  # llama.cpp's rounding keeps the identities it always had
                h.update(f"|{self.rounder.identity}".encode())
            self._identity = h.hexdigest()[:32]
        return self._identity

    def measure(self, types: dict[str, str] | None = None, removed=()) -> dict[str, float]:
        """Every KLD figure of the base changed as asked, against the base; the model is restored
        afterwards, also when measuring fails. A change the memo holds is not measured again."""
        key = probe_key(types, removed)
        if self.memo is not None:
            known = self.memo.get(self.identity(), key)
            if known is not None:
                self.reused += 1
                return known
        loaded = self._loaded()
        try:
            self.apply(types, removed)
            per_token = perplexity.score_against_base(loaded["model"], self._context(), self.base)
        finally:
            loaded["weights"].restore()
        figures = perplexity.summarize(self.base, per_token)
        self.measured += 1
        if self.memo is not None:
            self.memo.add(self.identity(), key, figures)
        return figures

    def kld(self, types: dict[str, str] | None = None, removed=()) -> float:
        return self.measure(types, removed)["mean_kld"]

    def logits(self) -> np.ndarray:
        """The logits of the model as it is now on the probe's chunks (tests compare them)."""
        context, tokens = self._context(), self.base["tokens"]
        return np.concatenate([context.eval(list(tokens[i:i + context.n_seq]), output_from=int(self.base["first"]))
                               for i in range(0, len(tokens), context.n_seq)])


def probe_key(types: dict[str, str] | None = None, removed=()) -> str:
    """A probe as text, the same for the same change however it was asked for."""
    return json.dumps({"types": {n: str(t).upper() for n, t in sorted((types or {}).items())},
                       "removed": sorted({int(x) for x in removed})}, separators=(",", ":"))


class ProbeMemo:
    """Every probe measured on a results folder's base, one JSON line each, appended and fsynced
    as it finishes: `{"on": identity, "probe": key, "figures": {...}}`. Lines measured on other
    inputs (an older base, another imatrix) are ignored, not deleted: a variant without imatrix
    measures on the same base in the same run. A torn last line (a kill mid-write) is skipped."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._known: dict[tuple[str, str], dict] | None = None

    def _load(self) -> dict[tuple[str, str], dict]:
        if self._known is None:
            self._known = {}
            try:
                lines = self.path.read_text().splitlines()
            except OSError:
                lines = []
            for line in lines:
                try:
                    row = json.loads(line)
                    self._known[(row["on"], row["probe"])] = dict(row["figures"])
                except (ValueError, KeyError, TypeError):
                    continue
        return self._known

    def get(self, on: str, key: str) -> dict | None:
        return self._load().get((on, key))

    def count(self, on: str) -> int:
        return sum(1 for o, _ in self._load() if o == on)

    def add(self, on: str, key: str, figures: dict) -> None:
        self._load()[(on, key)] = dict(figures)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"on": on, "probe": key, "figures": figures}, separators=(",", ":"))
        with open(self.path, "a") as f:  # one write per line: appends from Ray workers do not interleave
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


class ProbeLog:
    """Measured probes, one JSON line each, appended as they finish: a killed step resumes with
    the probes it had measured (a torn last line is ignored). `fingerprint` names what the
    probes were measured on; a log of anything else is started over."""

    def __init__(self, path: Path, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint

    def load(self) -> dict[str, float]:
        done: dict[str, float] = {}
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return done
        if not lines or lines[0] != json.dumps({"fingerprint": self.fingerprint}):
            return done
        for line in lines[1:]:
            try:
                row = json.loads(line)
                done[row["unit"]] = float(row["kld"])
            except (ValueError, KeyError, TypeError):
                continue
        return done

    def start(self) -> dict[str, float]:
        """The probes already measured; a log of other inputs is replaced by an empty one."""
        done = self.load()
        if not done and not self._matches():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps({"fingerprint": self.fingerprint}) + "\n")
        return done

    def _matches(self) -> bool:
        try:
            with open(self.path) as f:
                return f.readline().rstrip("\n") == json.dumps({"fingerprint": self.fingerprint})
        except OSError:
            return False

    def add(self, unit: str, kld: float) -> None:
        with open(self.path, "a") as f:  # one short write per line: appends from workers do not interleave
            f.write(json.dumps({"unit": unit, "kld": kld}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
