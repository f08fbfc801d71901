"""What each layer and tensor costs: measured KL divergence, and the cheap proxies beside it.

Three measurements, all on a few chunks of calibration text (the choices made from them are
then judged on the held-out scoring set):

- per layer: mean KLD against the base when that layer alone is removed (a correctly pruned
  F16 base, see pipeline.formats.prune), and when only its attention or only its MLP tensors are
  quantized to a low type with everything else left at the base;
- per tensor and type: the imatrix-weighted squared weight error sum_j a_j sum_i (W_ij - Q_ij)^2
  (a_j = mean squared input activation of column j), read back from files llama.cpp quantized;
- the proxies: imatrix CosSim and ZD per layer (as `llama-imatrix --show-statistics` computes
  them) and Block Influence from layers.csv when the calibration pass wrote one.

KLD is, to second order, a quadratic form of the weight error, so a tensor group's KLD at any
type is predicted as alpha_g * error_g(type), with alpha_g = measured KLD / error at the low
type. pipeline.measure.allocate picks types from those predictions.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np

from pipeline.engine.context import Context
from pipeline.engine.model import Model
from pipeline.engine.quantize import quantize_file
from pipeline.errors import SqueezeError
from pipeline.formats.ggml_types import fits
from pipeline.formats.gguf_index import read_index, tensor_values
from pipeline.formats.imatrix_file import Imatrix, read_imatrix
from pipeline.formats.layers_csv import block_influence
from pipeline.formats.model_info import ModelInfo
from pipeline.formats.prune import prune_gguf
from pipeline.formats.tensor_names import ATTN_KINDS, MLP_KINDS, TOKEN_EMBD, exact_pattern, kind_of, layer_of, parse
from pipeline.fsutil import atomic_path
from pipeline.measure import perplexity
from pipeline.measure.statistics import layer_statistics, tensor_statistics
from pipeline.progress import serial_map

LOW_TYPE = "Q2_K"
# For rows whose length is not a multiple of 256 (K-quants' block): the smallest 32-block type.
LOW_FALLBACK = "Q4_0"
# Types whose per-tensor error is measured (and that pipeline.measure.allocate may choose from).
CANDIDATE_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "IQ4_NL", "Q5_0", "Q5_1", "Q8_0")


def group_of(name: str) -> str | None:
    """'token_embd', '<layer>.attn' or '<layer>.mlp': the unit a KLD is measured for."""
    if name == TOKEN_EMBD:
        return "token_embd"
    n = parse(name)
    if n.layer is None:
        return None
    if n.kind in ATTN_KINDS:
        return f"{n.layer}.attn"
    if n.kind in MLP_KINDS:
        return f"{n.layer}.mlp"
    return None


def low_type_for(shape, low: str = LOW_TYPE, fallback: str = LOW_FALLBACK) -> str:
    return low if fits(shape, low) else fallback


# ---- building the variants that are measured --------------------------------------------------
def build_mixed(base: Path, dst: Path, types: dict[str, str], imatrix_path: Path | None,
                threads: int | None = None) -> None:
    """`base` with only the tensors in `types` quantized (name -> type), the rest left as they are.

    llama.cpp applies tensor overrides only under a quantized file type, so the file type is Q8_0
    and a final catch-all keeps every other tensor at F16 (1-D tensors are never quantized)."""
    overrides = [(exact_pattern(n), t) for n, t in types.items() if n != TOKEN_EMBD] + [(".", "F16")]
    quantize_file(base, dst, "Q8_0", imatrix_path=imatrix_path, overrides=overrides,
                  token_embedding_type=types.get(TOKEN_EMBD, "F16"), threads=threads)


# ---- the KLD probe ----------------------------------------------------------------------------
class KLDProbe:
    """The base model's distribution on a few calibration chunks, and the KLD of a model file
    against it. The base distribution is cached in `cache` (an .npz) when given."""

    def __init__(self, base: Path, text: str, ctx: int, chunks: int, threads: int | None = None,
                 cache: Path | None = None, n_gpu_layers: int = 0):
        self.threads = threads
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
        with Model(path, self.n_gpu_layers) as model, \
                Context(model, self.ctx, len(self.base["tokens"]), self.threads) as c:
            per_token = perplexity.score_against_base(model, c, self.base)
        return perplexity.summarize(self.base, per_token)

    def kld(self, path: Path) -> float:
        return self.measure(path)["mean_kld"]


@dataclass(frozen=True)
class TensorError:
    """The imatrix-weighted squared weight error of one tensor at one type, and its size there."""

    tensor: str
    group: str  # pipeline.measure.sensitivity.group_of
    type: str
    bytes: int
    error: float


# ---- per-tensor weight error -------------------------------------------------------------------
def _column_weights(weights: dict[str, np.ndarray], name: str, n_cols: int) -> np.ndarray:
    """Mean squared input activation per column; ones where the imatrix has no entry (the
    embedding: its rows are looked up, and as the tied output its inputs are not recorded)."""
    values = weights.get(name)
    if values is not None and values.size == n_cols:
        return values.astype(np.float64)
    return np.ones(n_cols)


def tensor_errors(base: Path, imatrix_path: Path | None, info: ModelInfo, workdir: Path,
                  types=CANDIDATE_TYPES, threads: int | None = None, only=None, map=serial_map) -> list[TensorError]:
    """A row for every quantizable tensor (or those in `only`)
    and every type its rows fit, measured on files llama.cpp quantized (with the imatrix).
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
            err = float((d2 * _column_weights(weights, name, d2.size)).sum())
            rows.append(TensorError(name, group_of(name), qtype, int(entry.n_bytes), err))
    return rows


# ---- proxies ----------------------------------------------------------------------------------
def imatrix_layer_stats(im: Imatrix) -> dict[int, dict[str, float]]:
    """Per layer: CosSim with the previous layer and ZD (a fraction), as
    `llama-imatrix --show-statistics` prints them (pipeline.measure.statistics)."""
    return {r["layer"]: {"cossim": r["mean_cossim"], "zd": r["mean_zd_pct"] / 100}
            for r in layer_statistics(tensor_statistics(im))}


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties); nan when undefined."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return math.nan
    ra, rb = _ranks(a[ok]), _ranks(b[ok])
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):  # ties share their average rank
        same = x == v
        ranks[same] = ranks[same].mean()
    return ranks


# ---- the layer map -----------------------------------------------------------------------------
@dataclass
class LayerRow:
    layer: int
    kld_removed: float
    kld_attn_low: float
    kld_mlp_low: float
    attn_types: str
    mlp_types: str
    cossim: float = math.nan
    zd: float = math.nan
    block_influence: float = math.nan


def low_types(info: ModelInfo, layer: int, kinds) -> dict[str, str]:
    return {t.name: low_type_for(t.shape) for t in info.quantizable()
            if layer_of(t.name) == layer and kind_of(t.name) in kinds}


# What one probe changes in the base: a layer removed, or a group of tensors at the low type.
LAYER_PROBES = ("removed", "attn", "mlp")
EMBEDDING = (None, "token_embd")  # the probe of the token embedding at the low type


def probe_types(info: ModelInfo, unit: tuple[int | None, str]) -> dict[str, str]:
    """The tensors a probe quantizes (name -> type); empty for a layer removed."""
    layer, what = unit
    if what == "token_embd":
        return {t.name: low_type_for(t.shape) for t in info.quantizable() if t.name == TOKEN_EMBD}
    if what == "removed":
        return {}
    return low_types(info, layer, ATTN_KINDS if what == "attn" else MLP_KINDS)


def probe_kld(probe: KLDProbe, base: Path, imatrix_path: Path | None, info: ModelInfo, workdir: Path,
              threads: int | None, unit: tuple[int | None, str]) -> float:
    """Mean KLD against the base of the base changed as `unit` (layer, one of LAYER_PROBES), or
    EMBEDDING, says: one variant file built in `workdir`, measured, removed."""
    layer, what = unit
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "variant.gguf"
        if what == "removed":
            prune_gguf(base, path, [layer])
        else:
            build_mixed(base, path, probe_types(info, unit), imatrix_path, threads)
        return probe.kld(path)


def measure_probes(probe: KLDProbe, base: Path, imatrix_path: Path | None, info: ModelInfo, workdir: Path,
                   units: list, threads: int | None = None, map=serial_map) -> dict:
    """unit -> KLD for each probe unit; `map` runs them (each unit is independent of the others)."""
    klds = map(partial(probe_kld, probe, base, imatrix_path, info, workdir, threads), list(units),
               "sensitivity probes")
    return dict(zip(units, klds))


def layer_rows(info: ModelInfo, layers, kld: dict) -> list[LayerRow]:
    return [LayerRow(layer, kld[(layer, "removed")], kld[(layer, "attn")], kld[(layer, "mlp")],
                     _types_label(probe_types(info, (layer, "attn"))), _types_label(probe_types(info, (layer, "mlp"))))
            for layer in layers]


def measure_layer_map(probe: KLDProbe, base: Path, imatrix_path: Path | None, info: ModelInfo,
                      workdir: Path, layers=None, threads: int | None = None, map=serial_map) -> list[LayerRow]:
    layers = list(range(info.n_layers)) if layers is None else list(layers)
    units = [(layer, what) for layer in layers for what in LAYER_PROBES]
    return layer_rows(info, layers, measure_probes(probe, base, imatrix_path, info, workdir, units, threads, map))


def _types_label(types: dict[str, str]) -> str:
    return " ".join(f"{kind_of(n)}={t}" for n, t in types.items())


def add_proxies(rows: list[LayerRow], im: Imatrix | None, layers_csv: Path | None) -> None:
    stats = imatrix_layer_stats(im) if im is not None else {}
    bi = block_influence(layers_csv)
    for r in rows:
        if r.layer in stats:
            r.cossim, r.zd = stats[r.layer]["cossim"], stats[r.layer]["zd"]
        r.block_influence = bi.get(r.layer, math.nan)


def proxy_correlations(rows: list[LayerRow]) -> dict[str, float]:
    """Spearman of each proxy against each measured KLD. Signs as expected when the proxy works:
    Block Influence positive (influential layers hurt when removed), CosSim negative (a layer
    that looks like its predecessor is redundant)."""
    out = {}
    for proxy in ("block_influence", "cossim", "zd"):
        for measured in ("kld_removed", "kld_attn_low", "kld_mlp_low"):
            out[f"{proxy} vs {measured}"] = spearman([getattr(r, proxy) for r in rows],
                                                     [getattr(r, measured) for r in rows])
    return out


def group_alphas(errors: list[TensorError], group_kld: dict[str, GroupKLD]) -> dict[str, float]:
    """KLD per unit of weight error for each measured group: alpha_g = KLD_g / sum of its
    tensors' errors at the types it was measured with."""
    err = {(r.tensor, r.type): r.error for r in errors}
    out = {}
    for group, g in group_kld.items():
        kld, types = g.kld, g.types
        total = sum(err.get((n, t), math.nan) for n, t in types.items())
        if not total > 0:
            raise SqueezeError(f"sensitivity: no weight error measured for group {group} at {types}")
        out[group] = max(kld, 0.0) / total
    return out


@dataclass(frozen=True)
class GroupKLD:
    kld: float  # measured with these tensors at these types, everything else at the base
    types: dict[str, str]


@dataclass
class Sensitivity:
    """Everything the sensitivity step measured (sensitivity.json), what allocation reads."""

    rows: list[LayerRow]
    group_kld: dict[str, GroupKLD]
    alphas: dict[str, float]  # per group: predicted KLD per unit of weight error
    errors: list[TensorError]
    correlations: dict[str, float]

    def to_json(self) -> str:
        data = {"group_kld": {g: asdict(v) for g, v in self.group_kld.items()}, "alphas": self.alphas,
                "errors": [asdict(e) for e in self.errors], "correlations": self.correlations,
                "layers": [asdict(r) for r in self.rows]}
        return json.dumps(data, indent=1, default=str) + "\n"

    @staticmethod
    def from_json(data: dict) -> Sensitivity:
        return Sensitivity([LayerRow(**r) for r in data["layers"]],
                           {g: GroupKLD(v["kld"], v["types"]) for g, v in data["group_kld"].items()},
                           data["alphas"], [TensorError(**e) for e in data["errors"]], data["correlations"])


def load_sensitivity(json_path: Path) -> Sensitivity:
    try:
        return Sensitivity.from_json(json.loads(Path(json_path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SqueezeError(f"{json_path}: not a sensitivity file squeeze can read ({type(exc).__name__}: {exc}); "
                           f"rerun `squeeze run --force sensitivity`") from None


# ---- everything at once (the stage and the benchmarks) ----------------------------------------
def run_sensitivity(base: Path, imatrix_path: Path | None, info: ModelInfo, probe: KLDProbe, workdir: Path,
                    layers_csv: Path | None = None, threads: int | None = None, layers=None,
                    types=CANDIDATE_TYPES, map=serial_map) -> Sensitivity:
    """The layer map, the embedding's sensitivity, per-tensor errors and per-group alphas. `map`
    runs the independent pieces: the KLD probes (3 per layer and the embedding's) in one call, the
    weight errors (one file per type) in another."""
    layers = list(range(info.n_layers)) if layers is None else list(layers)
    units = [(layer, what) for layer in layers for what in LAYER_PROBES]
    if probe_types(info, EMBEDDING):
        units.append(EMBEDDING)
    kld = measure_probes(probe, base, imatrix_path, info, workdir, units, threads, map)
    rows = layer_rows(info, layers, kld)
    add_proxies(rows, read_imatrix(imatrix_path) if imatrix_path else None, layers_csv)
    group_kld = {}
    for r in rows:
        group_kld[f"{r.layer}.attn"] = GroupKLD(r.kld_attn_low, probe_types(info, (r.layer, "attn")))
        group_kld[f"{r.layer}.mlp"] = GroupKLD(r.kld_mlp_low, probe_types(info, (r.layer, "mlp")))
    if EMBEDDING in kld:
        group_kld["token_embd"] = GroupKLD(kld[EMBEDDING], probe_types(info, EMBEDDING))
    errors = tensor_errors(base, imatrix_path, info, workdir, types, threads, map=map)
    measured = {g for g in group_kld}
    errors = [e for e in errors if e.group in measured]
    return Sensitivity(rows, group_kld, group_alphas(errors, group_kld), errors, proxy_correlations(rows))
