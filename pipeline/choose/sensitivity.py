"""What each layer and tensor loses: measured KL divergence, and the cheap proxies beside it.

Three measurements, all on a few chunks of calibration text (the choices made from them are
then judged on the held-out scoring set):

- per layer: mean KLD against the base when that layer alone is removed, and when only its
  attention or only its MLP tensors are at a low type with everything else left at the base.
  Each is an in-memory probe (pipeline.choose.memory_probe): the base is loaded once, the
  probe's tensors are overwritten in place, measured and restored; each result is appended to a
  log as it comes, so a killed step resumes where it stopped;
- per tensor and type: the imatrix-weighted squared weight error sum_j a_j sum_i (W_ij - Q_ij)^2
  (a_j = mean squared input activation of column j), computed with ggml's quantize in-process
  (pipeline.choose.weight_errors);
- the proxies: imatrix CosSim and ZD per layer (as `llama-imatrix --show-statistics` computes
  them) and Block Influence from layers.csv when the calibration pass wrote one.

KLD is, to second order, a quadratic form of the weight error, so a tensor group's KLD at any
type is predicted as alpha_g * error_g(type), with alpha_g = measured KLD / error at the low
type. pipeline.choose.allocate picks types from those predictions.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from pipeline.choose.groups import (CANDIDATE_TYPES, EMBEDDING, KIND_PREFIX, LAYER_PROBES, group_of, kind_units,
                                    probe_types)
from pipeline.choose.memory_probe import MemoryProbe, ProbeLog
from pipeline.choose.weight_errors import TensorError, tensor_errors
from pipeline.errors import SqueezeError
from pipeline.formats.imatrix_file import Imatrix, read_imatrix
from pipeline.formats.layers_csv import block_influence
from pipeline.formats.model_info import ModelInfo
from pipeline.formats.tensor_names import kind_of
from pipeline.measure.statistics import layer_statistics, tensor_statistics
from pipeline.progress import serial_map


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


def unit_key(unit: tuple[int | None, str]) -> str:
    """A probe unit as text (the probe log's key): '5.removed', '5.attn', 'token_embd', 'kind:ffn_down'."""
    layer, what = unit
    return what if layer is None else f"{layer}.{what}"


def probe_fingerprint(probe: MemoryProbe, types_of: dict[str, dict[str, str]]) -> str:
    """What a probe log was measured with: the probe's inputs (MemoryProbe.identity) and the
    probes' types."""
    return hashlib.sha256((probe.identity() + json.dumps(types_of, sort_keys=True)).encode()).hexdigest()


def probe_unit(probe: MemoryProbe, info: ModelInfo, log: ProbeLog | None, unit: tuple[int | None, str]) -> float:
    """The KLD of one probe unit (layer, one of LAYER_PROBES) or EMBEDDING, logged when done."""
    layer, what = unit
    removed = [layer] if what == "removed" else []
    kld = probe.kld(probe_types(info, unit), removed)
    if log is not None:
        log.add(unit_key(unit), kld)
    return kld


def measure_probes(probe: MemoryProbe, info: ModelInfo, units: list, log: ProbeLog | None = None,
                   map=serial_map, echo=None) -> dict:
    """unit -> KLD for each probe unit; `map` runs the ones the log does not have yet."""
    done = log.start() if log is not None else {}
    todo = [u for u in units if unit_key(u) not in done]
    if done and echo:
        echo(f"sensitivity: resuming with {len(units) - len(todo)} of {len(units)} probes measured ({log.path.name})")
    klds = dict(zip(todo, map(partial(probe_unit, probe, info, log), todo, "sensitivity probes")))
    return {u: done[unit_key(u)] if unit_key(u) in done else klds[u] for u in units}


def layer_rows(info: ModelInfo, layers, kld: dict) -> list[LayerRow]:
    return [LayerRow(layer, kld[(layer, "removed")], kld[(layer, "attn")], kld[(layer, "mlp")],
                     _types_label(probe_types(info, (layer, "attn"))), _types_label(probe_types(info, (layer, "mlp"))))
            for layer in layers]


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


def kind_gains(errors: list[TensorError], kind_kld: dict[str, GroupKLD]) -> dict[str, float]:
    """KLD per unit of weight error of each tensor kind, from the probes of that kind at the low
    type in every layer. The weight error is each matrix's own output error; what it loses in KLD
    depends on where the output goes (a down projection writes straight into the residual stream),
    so within a layer's group the kinds weigh differently, and one alpha per group would let the
    allocator starve the expensive kind."""
    err = {(r.tensor, r.type): r.error for r in errors}
    out = {}
    for kind, g in kind_kld.items():
        total = sum(err.get((n, t), math.nan) for n, t in g.types.items())
        if total > 0 and g.kld > 0:
            out[kind] = g.kld / total
    return out


def group_alphas(errors: list[TensorError], group_kld: dict[str, GroupKLD],
                 gains: dict[str, float] | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """(per group, per tensor) KLD per unit of weight error. Per group: alpha_g = KLD_g / the
    sum of its tensors' errors (each weighed by its kind's gain) at the types it was measured
    with; per tensor: alpha_g x its kind's gain, so the group's prediction at the probe's types
    is the KLD measured. Without gains every kind weighs 1."""
    gains = gains or {}
    err = {(r.tensor, r.type): r.error for r in errors}
    per_group, per_tensor = {}, {}
    for group, g in group_kld.items():
        kld, types = g.kld, g.types
        weight = {n: gains.get(kind_of(n), 1.0) if len(types) > 1 else 1.0 for n in types}
        total = sum(weight[n] * err.get((n, t), math.nan) for n, t in types.items())
        if not total > 0:
            raise SqueezeError(f"sensitivity: no weight error measured for group {group} at {types}")
        per_group[group] = max(kld, 0.0) / total
        for n in types:
            per_tensor[n] = per_group[group] * weight[n]
    return per_group, per_tensor


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
    tensor_alphas: dict[str, float] = field(default_factory=dict)  # per tensor: its group's x its kind's gain
    kind_kld: dict[str, GroupKLD] = field(default_factory=dict)  # kind -> measured at the low type in every layer
    kind_gains: dict[str, float] = field(default_factory=dict)

    @property
    def predictors(self) -> dict[str, float]:
        """What the allocator multiplies a tensor's weight error by: its own alpha, else its group's."""
        return {**self.alphas, **self.tensor_alphas}

    def to_json(self) -> str:
        data = {"group_kld": {g: asdict(v) for g, v in self.group_kld.items()}, "alphas": self.alphas,
                "tensor_alphas": self.tensor_alphas, "kind_kld": {k: asdict(v) for k, v in self.kind_kld.items()},
                "kind_gains": self.kind_gains,
                "errors": [asdict(e) for e in self.errors], "correlations": self.correlations,
                "layers": [asdict(r) for r in self.rows]}
        return json.dumps(data, indent=1, default=str) + "\n"

    @staticmethod
    def from_json(data: dict) -> Sensitivity:
        return Sensitivity([LayerRow(**r) for r in data["layers"]],
                           {g: GroupKLD(v["kld"], v["types"]) for g, v in data["group_kld"].items()},
                           data["alphas"], [TensorError(**e) for e in data["errors"]], data["correlations"],
                           data.get("tensor_alphas", {}),
                           {k: GroupKLD(v["kld"], v["types"]) for k, v in data.get("kind_kld", {}).items()},
                           data.get("kind_gains", {}))


def load_sensitivity(json_path: Path) -> Sensitivity:
    try:
        return Sensitivity.from_json(json.loads(Path(json_path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SqueezeError(f"{json_path}: not a sensitivity file squeeze can read ({type(exc).__name__}: {exc}); "
                           f"rerun `squeeze run --force sensitivity`") from None


def probe_units(info: ModelInfo, layers=None) -> list:
    layers = list(range(info.n_layers)) if layers is None else list(layers)
    units = [(layer, what) for layer in layers for what in LAYER_PROBES]
    if probe_types(info, EMBEDDING):
        units.append(EMBEDDING)
    return units + kind_units(info)


def run_sensitivity(probe: MemoryProbe, info: ModelInfo, imatrix_path: Path | None = None,
                    layers_csv: Path | None = None, layers=None, types=CANDIDATE_TYPES,
                    log_path: Path | None = None, map=serial_map, echo=None) -> Sensitivity:
    """The layer map, the embedding's sensitivity, per-tensor errors and per-group alphas.
    `map` runs the probes (each independent of the others); `log_path` keeps each probe's result
    as it comes, and a rerun after a kill measures only the rest (the caller removes the log
    once the results are saved)."""
    layers = list(range(info.n_layers)) if layers is None else list(layers)
    units = probe_units(info, layers)
    log = None
    if log_path is not None:
        log = ProbeLog(log_path, probe_fingerprint(probe, {unit_key(u): probe_types(info, u) for u in units}))
    kld = measure_probes(probe, info, units, log, map, echo)
    rows = layer_rows(info, layers, kld)
    add_proxies(rows, read_imatrix(imatrix_path) if imatrix_path else None, layers_csv)
    group_kld = {}
    for r in rows:
        group_kld[f"{r.layer}.attn"] = GroupKLD(r.kld_attn_low, probe_types(info, (r.layer, "attn")))
        group_kld[f"{r.layer}.mlp"] = GroupKLD(r.kld_mlp_low, probe_types(info, (r.layer, "mlp")))
    if EMBEDDING in kld:
        group_kld["token_embd"] = GroupKLD(kld[EMBEDDING], probe_types(info, EMBEDDING))
    kind_kld = {what[len(KIND_PREFIX):]: GroupKLD(kld[(layer, what)], probe_types(info, (layer, what)))
                for layer, what in units if what.startswith(KIND_PREFIX)}
    # only the groups probed: with `layers` a subset, the other layers' tensors are not read
    errors = tensor_errors(probe.base_path, imatrix_path, info, types,
                           lambda name: group if (group := group_of(name)) in group_kld else None)
    gains = kind_gains(errors, kind_kld)
    per_group, per_tensor = group_alphas(errors, group_kld, gains)
    return Sensitivity(rows, group_kld, per_group, errors, proxy_correlations(rows), per_tensor, kind_kld, gains)
