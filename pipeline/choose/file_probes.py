"""Measuring variant FILES: the reference the in-memory probes (pipeline.choose.memory_probe)
are checked against, and what the benchmarks time as the old way.

A variant is written with llama_model_quantize (only the named tensors quantized) or
pipeline.formats.prune, loaded, and scored against the base distribution on a few chunks.
"""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

import numpy as np

from pipeline.choose.groups import CANDIDATE_TYPES, group_of
from pipeline.choose.weight_errors import TensorError, column_weights
from pipeline.engine.context import Context
from pipeline.engine.layer_kinds import sliding_window_layers
from pipeline.engine.model import Model
from pipeline.engine.quantize import quantize_file
from pipeline.formats.ggml_types import fits
from pipeline.formats.gguf_index import read_index, tensor_values
from pipeline.formats.imatrix_file import read_imatrix
from pipeline.formats.model_info import ModelInfo
from pipeline.formats.prune import prune_gguf
from pipeline.formats.tensor_names import TOKEN_EMBD, exact_pattern
from pipeline.fsutil import atomic_path
from pipeline.measure import perplexity
from pipeline.progress import serial_map


def build_mixed(base: Path, dst: Path, types: dict[str, str], imatrix_path: Path | None,
                threads: int | None = None) -> None:
    """`base` with only the tensors in `types` quantized (name -> type), the rest left as they are.

    llama.cpp applies tensor overrides only under a quantized file type, so the file type is Q8_0
    and a final catch-all keeps every other tensor at F16 (1-D tensors are never quantized)."""
    overrides = [(exact_pattern(n), t) for n, t in types.items() if n != TOKEN_EMBD] + [(".", "F16")]
    quantize_file(base, dst, "Q8_0", imatrix_path=imatrix_path, overrides=overrides,
                  token_embedding_type=types.get(TOKEN_EMBD, "F16"), threads=threads)


class KLDProbe:
    """The base model's distribution on a few calibration chunks, and the KLD of a model file
    against it. The base distribution is cached in `cache` (an .npz) when given. `repack`: False
    scores files with the CPU kernels an in-place probe runs (pipeline.engine.model)."""

    def __init__(self, base: Path, text: str, ctx: int, chunks: int, threads: int | None = None,
                 cache: Path | None = None, n_gpu_layers: int = 0, repack: bool = True):
        self.threads = threads
        self.repack = repack
        self.ctx = ctx
        self.n_gpu_layers = n_gpu_layers
        self.cache = Path(cache) if cache is not None else None
        if cache is not None and Path(cache).exists():
            self.base = perplexity.load_base(cache)
            return
        with Model(base, n_gpu_layers) as model:
            ch = perplexity.make_chunks(model, text, ctx, chunks, what="calibration text")
            with Context(model, ctx, len(ch.tokens), threads) as c:
                self.base = perplexity.base_distribution(model, c, ch)
        if cache is not None:
            with atomic_path(Path(cache)) as tmp:
                perplexity.save_base(tmp, self.base)

    def __getstate__(self):
        """A probe with a cache pickles as the path to it (a Ray task measuring a share of the
        probes loads the base distribution from there once, instead of a copy through the
        object store); the arrays are those np.savez wrote, so the KLDs are the same."""
        state = dict(self.__dict__)
        if self.cache is not None:
            del state["base"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if "base" not in state:
            self.base = perplexity.load_base(self.cache)

    def measure(self, path: Path) -> dict[str, float]:
        with Model(path, self.n_gpu_layers, repack=self.repack) as model, \
                Context(model, self.ctx, len(self.base["tokens"]), self.threads) as c:
            per_token = perplexity.score_against_base(model, c, self.base)
        return perplexity.summarize(self.base, per_token)

    def kld(self, path: Path) -> float:
        return self.measure(path)["mean_kld"]


def file_tensor_errors(base: Path, imatrix_path: Path | None, info: ModelInfo, workdir: Path,
                  types=CANDIDATE_TYPES, threads: int | None = None, only=None, map=serial_map) -> list[TensorError]:
    """A row for every quantizable tensor (or those in `only`) and every type its rows fit,
    measured on whole-model files llama.cpp quantized (with the imatrix): the old way, and the
    reference pipeline.choose.weight_errors is checked against.
    One file per type: `map` (pipeline.progress.serial_map, or a step's `io.map`) runs them."""
    weights = read_imatrix(imatrix_path).normalized() if imatrix_path else {}
    wanted = [(t.name, t.shape) for t in info.quantizable()
              if group_of(t.name) is not None and (only is None or t.name in only)]
    per_type = map(partial(type_errors, base, imatrix_path, weights, wanted, workdir, threads), list(types),
                   "weight error per type")
    return [row for rows in per_type for row in rows]


def type_errors(base: Path, imatrix_path: Path | None, weights: dict[str, np.ndarray], wanted, workdir: Path,
                threads: int | None, qtype: str) -> list[TensorError]:
    """The rows of tensor_errors for one type: the `wanted` tensors ((name, shape) pairs) whose
    rows fit it, quantized in one file."""
    todo = {name: qtype for name, shape in wanted if fits(shape, qtype)}
    if not todo:
        return []
    rows = []
    base_index = read_index(base)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        out = Path(tmp) / f"all-{qtype}.gguf"
        build_mixed(base, out, todo, imatrix_path, threads)
        for name, entry in read_index(out).items():
            if name not in todo or entry.type.name != qtype:
                continue  # llama.cpp fell back to another type: not a choice for this tensor
            q = tensor_values(out, entry)
            w = tensor_values(base, base_index[name])
            d2 = np.square(w - q).sum(axis=0, dtype=np.float64)  # per column (input channel)
            cw = column_weights(weights, name, d2.size)  # None: every column weighs 1
            err = float((d2 * (cw.astype(np.float64) if cw is not None else 1.0)).sum())
            rows.append(TensorError(name, group_of(name), qtype, int(entry.n_bytes), err))
    return rows


def file_kld(probe: KLDProbe, base: Path, imatrix_path: Path | None, workdir: Path, threads: int | None,
             types: dict[str, str] | None = None, removed=()) -> float:
    """Mean KLD against the base of the base with `types` quantized (name -> type) or the layers
    in `removed` pruned: one variant file built in `workdir`, measured, removed."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "variant.gguf"
        if removed:
            prune_gguf(base, path, list(removed), swa_layers=sliding_window_layers(base))
        else:
            build_mixed(base, path, types or {}, imatrix_path, threads)
        return probe.kld(path)
