"""What each layer and tensor costs: measured KL divergence, and the cheap proxies beside it.

Three measurements, all on a few chunks of calibration text (the choices made from them are
then judged on the held-out scoring set):

- per layer: mean KLD against the base when that layer alone is removed (a correctly pruned
  F16 base, see pipeline.prune), and when only its attention or only its MLP tensors are
  quantized to a low type with everything else left at the base;
- per tensor and type: the imatrix-weighted squared weight error sum_j a_j sum_i (W_ij - Q_ij)^2
  (a_j = mean squared input activation of column j), read back from files llama.cpp quantized;
- the proxies: imatrix CosSim and ZD per layer (as `llama-imatrix --show-statistics` computes
  them) and Block Influence from layers.csv when the calibration pass wrote one.

KLD is, to second order, a quadratic form of the weight error, so a tensor group's KLD at any
type is predicted as alpha_g * error_g(type), with alpha_g = measured KLD / error at the low
type. pipeline.allocate picks types from those predictions.
"""

from __future__ import annotations

import csv
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import ggml_types, perplexity
from pipeline.engine import Context, Model
from pipeline.errors import SqueezeError
from pipeline.gguf_index import read_index, tensor_values
from pipeline.imatrix_file import Imatrix, read_imatrix
from pipeline.model_info import ModelInfo, layer_of
from pipeline.progress import bar

ATTN = ("attn_q", "attn_k", "attn_v", "attn_output")
MLP = ("ffn_gate", "ffn_up", "ffn_down")
TOKEN_EMBD = "token_embd.weight"
LOW_TYPE = "Q2_K"
# For rows whose length is not a multiple of 256 (K-quants' block): the smallest 32-block type.
LOW_FALLBACK = "Q4_0"
# Types whose per-tensor error is measured (and that pipeline.allocate may choose from).
CANDIDATE_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "IQ4_NL", "Q5_0", "Q5_1", "Q8_0")


def group_of(name: str) -> str | None:
    """'token_embd', '<layer>.attn' or '<layer>.mlp': the unit a KLD is measured for."""
    if name == TOKEN_EMBD:
        return "token_embd"
    layer = layer_of(name)
    if layer is None:
        return None
    kind = name.split(".")[2]
    if kind in ATTN:
        return f"{layer}.attn"
    if kind in MLP:
        return f"{layer}.mlp"
    return None


def fits(shape, qtype: str) -> bool:
    """Whether rows of this tensor can be stored in `qtype` (row length a multiple of its block)."""
    return shape is None or shape[0] % ggml_types.block_size(ggml_types.tensor_type(qtype)) == 0


def low_type_for(shape, low: str = LOW_TYPE, fallback: str = LOW_FALLBACK) -> str:
    return low if fits(shape, low) else fallback


def exact_pattern(name: str) -> str:
    return "^" + re.escape(name) + "$"


# ---- building the variants that are measured --------------------------------------------------
def build_mixed(base: Path, dst: Path, types: dict[str, str], imatrix_path: Path | None,
                threads: int | None = None) -> None:
    """`base` with only the tensors in `types` quantized (name -> type), the rest left as they are.

    llama.cpp applies tensor overrides only under a quantized file type, so the file type is Q8_0
    and a final catch-all keeps every other tensor at F16 (1-D tensors are never quantized)."""
    from pipeline.quantize import quantize_file

    overrides = [(exact_pattern(n), t) for n, t in types.items() if n != TOKEN_EMBD] + [(".", "F16")]
    quantize_file(base, dst, "Q8_0", imatrix_path=imatrix_path, overrides=overrides,
                  token_embedding_type=types.get(TOKEN_EMBD, "F16"), threads=threads)


# ---- the KLD probe ----------------------------------------------------------------------------
class KLDProbe:
    """The base model's distribution on a few calibration chunks, and the KLD of a model file
    against it. The base distribution is cached in `cache` (an .npz) when given."""

    def __init__(self, base: Path, text: str, ctx: int, chunks: int, threads: int | None = None,
                 cache: Path | None = None):
        self.threads = threads
        self.ctx = ctx
        if cache is not None and Path(cache).exists():
            self.base = perplexity.load_base(cache)
            return
        with Model(base) as model:
            ch = perplexity.make_chunks(model, text, ctx, chunks, what="calibration text")
            with Context(model, ctx, len(ch.tokens), threads) as c:
                self.base = perplexity.base_distribution(model, c, ch)
        if cache is not None:
            from pipeline.fsutil import atomic_path

            with atomic_path(Path(cache)) as tmp:
                perplexity.save_base(tmp, self.base)

    def measure(self, path: Path) -> dict[str, float]:
        with Model(path) as model, Context(model, self.ctx, len(self.base["tokens"]), self.threads) as c:
            per_token = perplexity.score_against_base(model, c, self.base)
        return perplexity.summarize(self.base, per_token)

    def kld(self, path: Path) -> float:
        return self.measure(path)["mean_kld"]


# ---- per-tensor weight error -------------------------------------------------------------------
def _column_weights(weights: dict[str, np.ndarray], name: str, n_cols: int) -> np.ndarray:
    """Mean squared input activation per column; ones where the imatrix has no entry (the
    embedding: its rows are looked up, and as the tied output its inputs are not recorded)."""
    values = weights.get(name)
    if values is not None and values.size == n_cols:
        return values.astype(np.float64)
    return np.ones(n_cols)


def tensor_errors(base: Path, imatrix_path: Path | None, info: ModelInfo, workdir: Path,
                  types=CANDIDATE_TYPES, threads: int | None = None, only=None) -> list[dict]:
    """Rows {tensor, group, type, bytes, error} for every quantizable tensor (or those in `only`)
    and every type its rows fit, measured on files llama.cpp quantized (with the imatrix)."""
    weights = read_imatrix(imatrix_path).normalized() if imatrix_path else {}
    base_index = read_index(base)
    wanted = [t for t in info.quantizable() if group_of(t.name) is not None and (only is None or t.name in only)]
    rows = []
    with bar(total=len(types), desc="weight error per type", unit="type") as progress:
        for qtype in types:
            todo = {t.name: qtype for t in wanted if fits(t.shape, qtype)}
            if not todo:
                progress.update(1)
                continue
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
                    rows.append({"tensor": name, "group": group_of(name), "type": qtype,
                                 "bytes": int(entry.n_bytes), "error": err})
            progress.update(1)
    return rows


# ---- proxies ----------------------------------------------------------------------------------
def imatrix_layer_stats(im: Imatrix) -> dict[int, dict[str, float]]:
    """Per layer: CosSim with the previous layer and ZD, weighted by elements, as
    llama-imatrix --show-statistics prints them (layer 0 has no predecessor: CosSim 0)."""
    per_tensor = {}
    for name, e in im.entries.items():
        if layer_of(name) is None:
            continue
        keep = e.counts > 0
        acts = (e.sums[keep] / e.counts[keep][:, None]).ravel().astype(np.float64)
        if acts.size == 0:
            continue
        sd = acts.std()
        zd = float(((acts - acts.mean()) / sd > 1).mean()) if sd > 0 else 0.0
        per_tensor[name] = (e.sums.ravel().astype(np.float64), zd, acts.size)
    layers: dict[int, list] = {}
    for name, (values, zd, n) in per_tensor.items():
        layer = layer_of(name)
        prev = per_tensor.get(f"blk.{layer - 1}.{name.split('.', 2)[2]}")
        cos = 0.0
        if prev is not None and prev[0].size == values.size:
            denom = np.linalg.norm(values) * np.linalg.norm(prev[0])
            cos = float(values @ prev[0] / denom) if denom > 0 else 0.0
        layers.setdefault(layer, []).append((cos, zd, n))
    out = {}
    for layer, items in sorted(layers.items()):
        total = sum(n for _, _, n in items)
        out[layer] = {"cossim": sum(c * n for c, _, n in items) / total,
                      "zd": sum(z * n for _, z, n in items) / total}
    return out


def block_influence(layers_csv: Path | None) -> dict[int, float]:
    """Block Influence per layer from the calibration pass's layers.csv (1 - cos(in, out) of the
    hidden state), or {} when there is none."""
    if layers_csv is None or not Path(layers_csv).exists():
        return {}
    with open(layers_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    cols = list(rows[0])
    layer_col = next((c for c in cols if c.lower() in ("layer", "block", "blk")), None)
    bi_col = next((c for c in cols if "influence" in c.lower() or c.lower() in ("bi", "block_influence")), None)
    if layer_col is None or bi_col is None:
        return {}
    return {int(r[layer_col]): float(r[bi_col]) for r in rows if r[bi_col] not in ("", None)}


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
            if layer_of(t.name) == layer and t.name.split(".")[2] in kinds}


def measure_layer_map(probe: KLDProbe, base: Path, imatrix_path: Path | None, info: ModelInfo,
                      workdir: Path, layers=None, threads: int | None = None) -> list[LayerRow]:
    from pipeline.prune import prune_gguf

    layers = list(range(info.n_layers)) if layers is None else list(layers)
    rows = []
    with bar(total=len(layers), desc="layer sensitivity", unit="layer") as progress:
        for layer in layers:
            with tempfile.TemporaryDirectory(dir=workdir) as tmp:
                path = Path(tmp) / "variant.gguf"
                prune_gguf(base, path, [layer])
                removed = probe.kld(path)
                path.unlink()
                attn = low_types(info, layer, ATTN)
                build_mixed(base, path, attn, imatrix_path, threads)
                kld_attn = probe.kld(path)
                path.unlink()
                mlp = low_types(info, layer, MLP)
                build_mixed(base, path, mlp, imatrix_path, threads)
                kld_mlp = probe.kld(path)
            rows.append(LayerRow(layer, removed, kld_attn, kld_mlp, _types_label(attn), _types_label(mlp)))
            progress.update(1)
    return rows


def _types_label(types: dict[str, str]) -> str:
    return " ".join(f"{n.split('.')[2]}={t}" for n, t in types.items())


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


def write_layer_csv(path: Path, rows: list[LayerRow]) -> None:
    from dataclasses import asdict

    from pipeline.fsutil import atomic_path

    with atomic_path(Path(path)) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))


def read_layer_csv(path: Path) -> list[LayerRow]:
    with open(path, newline="") as f:
        out = []
        for r in csv.DictReader(f):
            out.append(LayerRow(int(r["layer"]), float(r["kld_removed"]), float(r["kld_attn_low"]),
                                float(r["kld_mlp_low"]), r["attn_types"], r["mlp_types"],
                                float(r["cossim"]), float(r["zd"]), float(r["block_influence"])))
        return out


def plot_heatmap(path: Path, rows: list[LayerRow]) -> None:
    """Layers x {removed, attention low, MLP low}, log-scaled KLD, values written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    from pipeline.fsutil import atomic_path

    cols = [("kld_removed", "layer removed"), ("kld_attn_low", "attention low"), ("kld_mlp_low", "MLP low")]
    data = np.array([[max(getattr(r, c), 1e-6) for c, _ in cols] for r in rows])
    fig, ax = plt.subplots(figsize=(4.8, 0.32 * len(rows) + 1.4))
    im = ax.imshow(data, aspect="auto", cmap="magma_r", norm=LogNorm(vmin=data.min(), vmax=data.max()))
    ax.set_xticks(range(len(cols)), [label for _, label in cols])
    ax.set_yticks(range(len(rows)), [str(r.layer) for r in rows])
    ax.set_ylabel("layer")
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            v = data[i, j]
            ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7,
                    color="white" if v > math.sqrt(data.min() * data.max()) else "black")
    fig.colorbar(im, ax=ax, label="mean KLD vs base")
    ax.set_title("Layer sensitivity (KLD, log scale)", fontsize=9)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def group_alphas(errors: list[dict], group_kld: dict[str, tuple[float, dict[str, str]]]) -> dict[str, float]:
    """KLD per unit of weight error for each measured group: alpha_g = KLD_g / sum of its
    tensors' errors at the types it was measured with."""
    err = {(r["tensor"], r["type"]): r["error"] for r in errors}
    out = {}
    for group, (kld, types) in group_kld.items():
        total = sum(err.get((n, t), math.nan) for n, t in types.items())
        if not total > 0:
            raise SqueezeError(f"sensitivity: no weight error measured for group {group} at {types}")
        out[group] = max(kld, 0.0) / total
    return out


# ---- everything at once (the stage and the benchmarks) ----------------------------------------
def run_sensitivity(base: Path, imatrix_path: Path | None, info: ModelInfo, probe: KLDProbe, workdir: Path,
                    layers_csv: Path | None = None, threads: int | None = None, layers=None,
                    types=CANDIDATE_TYPES) -> dict:
    """The layer map, the embedding's sensitivity, per-tensor errors and per-group alphas."""
    rows = measure_layer_map(probe, base, imatrix_path, info, workdir, layers, threads)
    add_proxies(rows, read_imatrix(imatrix_path) if imatrix_path else None, layers_csv)
    embd = next((t for t in info.quantizable() if t.name == TOKEN_EMBD), None)
    group_kld = {}
    for r in rows:
        group_kld[f"{r.layer}.attn"] = (r.kld_attn_low, low_types(info, r.layer, ATTN))
        group_kld[f"{r.layer}.mlp"] = (r.kld_mlp_low, low_types(info, r.layer, MLP))
    if embd is not None:
        embd_types = {TOKEN_EMBD: low_type_for(embd.shape)}
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            path = Path(tmp) / "embd.gguf"
            build_mixed(base, path, embd_types, imatrix_path, threads)
            group_kld["token_embd"] = (probe.kld(path), embd_types)
    errors = tensor_errors(base, imatrix_path, info, workdir, types, threads)
    measured = {g for g in group_kld}
    errors = [e for e in errors if e["group"] in measured]
    alphas = group_alphas(errors, group_kld)
    return {"rows": rows, "group_kld": {g: {"kld": k, "types": t} for g, (k, t) in group_kld.items()},
            "alphas": alphas, "errors": errors, "correlations": proxy_correlations(rows)}


def save_sensitivity(result: dict, csv_path: Path, json_path: Path, png_path: Path | None,
                     md_path: Path | None = None) -> None:
    import json
    from dataclasses import asdict

    from pipeline.fsutil import atomic_path

    write_layer_csv(csv_path, result["rows"])
    data = {k: v for k, v in result.items() if k != "rows"}
    data["layers"] = [asdict(r) for r in result["rows"]]
    with atomic_path(Path(json_path)) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=1, default=_nan_safe) + "\n")
    if png_path is not None:
        plot_heatmap(png_path, result["rows"])
    if md_path is not None:
        from pipeline.fsutil import write_text_atomic

        write_text_atomic(Path(md_path), sensitivity_markdown(result))


def sensitivity_markdown(result: dict) -> str:
    """The layer map as a table, and how well each proxy ranks the layers (Spearman)."""
    rows = result["rows"]
    lines = ["## Layer sensitivity", "",
             "Mean KLD against the base on calibration chunks when the layer is removed, or when only its "
             f"attention / MLP tensors are quantized to {LOW_TYPE} ({LOW_FALLBACK} for rows K-quants cannot "
             "hold), everything else at the base. ↓ = less sensitive.", "",
             "| Layer | Removed ↓ | Attention low ↓ | MLP low ↓ | imatrix CosSim | ZD | Block Influence |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.layer} | {r.kld_removed:.4f} | {r.kld_attn_low:.5f} | {r.kld_mlp_low:.5f} | "
                     f"{r.cossim:.4f} | {r.zd:.4f} | {r.block_influence:.4f} |")
    if "token_embd" in result.get("group_kld", {}):
        g = result["group_kld"]["token_embd"]
        lines += ["", f"Token embedding (tied output) at {', '.join(g['types'].values())}: KLD {g['kld']:.5f}."]
    lines += ["", "### Proxies against measured KLD (Spearman ρ over layers)", "",
              "| Proxy vs measured | ρ |", "|---|---|"]
    for name, rho in result["correlations"].items():
        lines.append(f"| {name} | {'n/a' if rho != rho else f'{rho:+.2f}'} |")
    lines += ["", "A useful pruning proxy ranks layers like `kld_removed`: Block Influence with ρ > 0, "
              "CosSim with ρ < 0 (a layer like its predecessor is redundant)."]
    return "\n".join(lines) + "\n"


def _nan_safe(x):
    return None if isinstance(x, float) and math.isnan(x) else str(x)


def load_sensitivity(json_path: Path) -> dict:
    import json

    return json.loads(Path(json_path).read_text())


# ---- the stage step ---------------------------------------------------------------------------
# Calibration chunks each sensitivity run is measured on (3 runs per layer: keep it small).
PROBE_CHUNKS = 4


def steps(ctx) -> list:
    """One step, only when a variant chooses its types for a budget (it needs the alphas)."""
    from pipeline.engine import engine_versions
    from pipeline.imatrix import imatrix_input
    from pipeline.runner import Step

    recipe = ctx.recipe
    if not any(recipe.budget_for(v) for v in recipe.variants):
        return []
    imatrix = imatrix_input(ctx)
    inputs = [ctx.base_path] + ([imatrix] if imatrix else [])
    cal = recipe.calibration
    if cal is not None and not cal.imatrix:
        inputs.append(ctx.layers_path)
    from pipeline.prune import _probe_params, probe_for

    params = {"sensitivity.chunks": PROBE_CHUNKS, "sensitivity.types": list(CANDIDATE_TYPES),
              "sensitivity.low_type": LOW_TYPE, **_probe_params(ctx)}
    outputs = [ctx.sensitivity_csv_path, ctx.sensitivity_json_path, ctx.sensitivity_plot_path,
               ctx.sensitivity_json_path.with_suffix(".md")]

    def action(io):
        probe = probe_for(ctx, PROBE_CHUNKS)
        layers_csv = ctx.layers_path if ctx.layers_path.exists() else None
        result = run_sensitivity(ctx.base_path, imatrix, ctx.model_info, probe, ctx.folder, layers_csv, ctx.threads)
        save_sensitivity(result, *(io.out(p) for p in outputs))
        return {"correlations": result["correlations"]}

    return [Step("sensitivity", "statistics", params, inputs, outputs, action, versions=engine_versions(),
                 produces=f"sensitivity.csv/.json/.png/.md (per layer: KLD removed, attention/MLP at {LOW_TYPE}; "
                          f"per tensor: weight error for {len(CANDIDATE_TYPES)} types)")]
