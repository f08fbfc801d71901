"""What each step of a run costs before it runs (`squeeze plan --estimate`): the work every step
declares (pipeline.work records, from the step's `work`), priced in the units of
pipeline.cost.estimate for a fresh results folder. Nothing here knows which stage declared what:
a new stage is priced by declaring its work.

The stages that write large files (convert, prune, quantize) also ask here for the size of what
they are about to write, to check the disk has room first (pipeline.fsutil.ensure_free_space).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cost import estimate as est
from pipeline.cost.estimate import Pricer, Shape, StepCost
from pipeline.cost.gpu_rates import GPU
from pipeline.cost.rates import Rates, load_text
from pipeline.engine.backend import supports_gpu_offload
from pipeline.engine.quantized_tensors import default_limit
from pipeline.errors import SqueezeError
from pipeline.formats.gguf_index import read_index, read_metadata
from pipeline.recipe.plan import AutoPrune
from pipeline.run.layout import RunContext
from pipeline.run.runner import Step
from pipeline.sources.model_source import parse_source, source_gguf
from pipeline.work import (Decode, Dense, Dequantize, Fixed, Forward, GptqColumns, Hook, Kld, Load, Memory, Note,
                           Quantize, Resident, Roundtrip, RoundtripWeights, Sketch, VocabHeader, Write)

# Small outputs: typical sizes measured on the default recipe (results/bench/estimate.json).
SMALL_FILE_BYTES = {".json": 1800, ".csv": 700, ".md": 6000, ".png": 45000, ".txt": 550, ".npz": 0}


@dataclass
class RunEstimate:
    recipe: str
    shape: Shape
    costs: list[StepCost]
    device: str
    notes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.costs)

    @property
    def bytes_written(self) -> int:
        return sum(c.bytes_written for c in self.costs)

    @property
    def folder_bytes(self) -> int:
        """What the results folder holds at the end: every output once (a rerun replaces)."""
        files = {}
        for c in self.costs:
            files.update(c.writes)
        return sum(files.values())

    @property
    def peak_memory(self) -> int:
        return max((c.memory_bytes for c in self.costs), default=0)

    def by_stage(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for c in self.costs:
            s = out.setdefault(c.stage, {"steps": 0, "seconds": 0.0, "bytes": 0, "memory_bytes": 0})
            s["steps"] += 1
            s["seconds"] += c.seconds
            s["bytes"] += c.bytes_written
            s["memory_bytes"] = max(s["memory_bytes"], c.memory_bytes)
        return out

    def to_json(self) -> dict:
        return {"recipe": self.recipe, "device": self.device, "model": {
                    "arch": self.shape.arch, "layers": self.shape.n_layers, "params": self.shape.n_params,
                    "active_params": self.shape.n_active_params,
                    "vocab": self.shape.n_vocab, "shapes": "exact" if self.shape.exact else "from the parameter count"},
                "seconds": round(self.seconds, 1), "bytes_written": self.bytes_written,
                "folder_bytes": self.folder_bytes, "peak_memory_bytes": self.peak_memory,
                "stages": {k: {**v, "seconds": round(v["seconds"], 1)} for k, v in self.by_stage().items()},
                "steps": [{"key": c.key, "stage": c.stage, "seconds": round(c.seconds, 2),
                           "bytes": c.bytes_written, "memory_bytes": c.memory_bytes,
                           "writes": {str(p): b for p, b in c.writes.items()}} for c in self.costs],
                "notes": self.notes}


# ---- the model's shape for a run --------------------------------------------------------------
def _metadata_bytes(path: Path) -> int:
    return Path(path).stat().st_size - sum(e.n_bytes for e in read_index(path).values())


def expert_counts(path: Path, arch: str) -> tuple[int, int]:
    """(<arch>.expert_count, <arch>.expert_used_count) of a GGUF; (0, 0) for a dense model."""
    values = {kv.key: kv.value for kv in read_metadata(path)[0]
              if kv.key in (f"{arch}.expert_count", f"{arch}.expert_used_count")}
    count, used = values.get(f"{arch}.expert_count"), values.get(f"{arch}.expert_used_count")
    if not isinstance(count, int) or not isinstance(used, int) or count <= 1 or not 0 < used <= count:
        return 0, 0
    return count, used


def model_shape(run: RunContext, params: int | None = None, vocab: int | None = None,
                active_params: int | None = None) -> Shape:
    """The model's shape: exact from the tensors the model info lists, else (a hub model not
    downloaded yet) from `params` and `vocab`, with the recipe's model.arch and model.layers.
    A mixture of experts: its expert counts from the GGUF, or `active_params` as given."""
    info = run.model_info
    if info.tensors and all(t.shape is not None for t in info.tensors):
        gguf_path = None
        if run.base_path.exists():
            gguf_path = run.base_path
        else:
            source = parse_source(run.recipe)
            if source.kind in ("gguf", "pypi"):
                gguf_path = source_gguf(run.recipe, source)
        header, experts = None, (0, 0)
        if gguf_path is not None:
            header, experts = _metadata_bytes(gguf_path), expert_counts(gguf_path, info.arch)
        return est.shape_from_info(info, header, *experts, active_params=active_params)
    if params is None or vocab is None:
        raise SqueezeError(f"{run.recipe.where('model')}the model's tensor shapes are not known until it is "
                           f"downloaded: give its size with --params (e.g. 12.2B) and --vocab (e.g. 262144)")
    return est.shape_from_size(info.arch, info.n_layers, params, vocab, active_params)


# ---- pricing declared work --------------------------------------------------------------------
class _Pricing:
    """Prices the records a step declares (pipeline.work), in order; knows no stage."""

    def __init__(self, shape: Shape, rates: Rates, gpu: GPU | None, threads: int | None = None):
        self.shape, self.gpu = shape, gpu
        self.p = Pricer(rates, gpu, threads)
        self.rss = rates.process_rss_bytes
        self.header_s_per_token = rates.header_s_per_token
        self.out_flops = shape.output_flops_per_token()
        self.tensors_by_name = {t.name: t for t in shape.tensors}
        # The process's cache of quantized tensors (pipeline.engine.quantized_tensors) keeps every
        # (tensor, type) pair a probe or an assembled file made, up to its limit, for the rest of
        # the run: what it holds counts in every later step's resident memory.
        self.cached: dict[tuple[str, str, str], int] = {}
        self.cache_limit = default_limit()

    def keep_quantized(self, types: dict[str, str], source: str) -> None:
        """The (source, tensor, type) triples a step quantizes through the shared cache, as the
        cache will hold them: a pruned base's tensors are kept beside the base's."""
        by_name = self.tensors_by_name
        for n, ty in types.items():
            if n in by_name and ty not in UNQUANTIZED:
                self.cached.setdefault((source, n, ty), est.tensor_nbytes(ty, by_name[n].shape))

    @property
    def cache_bytes(self) -> int:
        return min(self.cache_limit, sum(self.cached.values()))

    def resident(self, r: Resident) -> tuple[int, int]:
        """(host, device) bytes: the mapped weights (on the device with --gpu), KV cache, the
        context's compute buffer, logits."""
        shape, n = self.shape, r.ctx_tokens
        kv = est.kv_cache_bytes(shape, n, r.model.layers) if n else 0
        compute = est.compute_buffer_bytes(shape, n) if n else 0
        logits = est.logits_bytes(r.logits, shape.n_vocab)
        if self.gpu is not None:
            return self.rss + logits + r.extra, r.model.bytes + kv + compute
        return self.rss + r.model.bytes + kv + compute + logits + r.extra, 0

    def seconds(self, w) -> float:
        p, vocab = self.p, self.shape.n_vocab
        if isinstance(w, Load):
            return p.load(w.models)
        if isinstance(w, Forward):
            return p.forward(w.tokens, w.flops_per_token, w.quantized, w.logits, self.out_flops)
        if isinstance(w, Decode):
            return p.decode(w.tokens, w.model_bytes)
        if isinstance(w, Kld):
            return p.kld(w.rows, vocab)
        if isinstance(w, Sketch):
            return p.sketch(w.rows, vocab)
        if isinstance(w, Hook):
            return p.hook(w.tokens, self.shape.hooked_values_per_token())
        if isinstance(w, Roundtrip):
            by_name = self.tensors_by_name
            self.keep_quantized(w.types, w.source)
            return w.times * sum(p.roundtrip(est.n_values(by_name[n].shape), ty) for n, ty in w.types.items()
                                 if n in by_name and ty not in UNQUANTIZED)
        if isinstance(w, RoundtripWeights):
            return p.roundtrip(w.weights, w.type)
        if isinstance(w, Quantize):
            seconds = p.quantize(self.shape, {n: "Q8_0" for n in w.types} if w.fastest else w.types)
            self.keep_quantized(w.types, w.source)  # assembled from cached pairs (engine/assemble.py)
            return seconds
        if isinstance(w, Dequantize):
            return p.dequantize(w.tensors)
        if isinstance(w, VocabHeader):
            return self.header_s_per_token * w.tokens
        if isinstance(w, Write):
            return p.write(w.bytes) if w.timed else 0.0
        if isinstance(w, Dense):
            return p.dense(w.flops)
        if isinstance(w, GptqColumns):
            return p.gptq_columns(w.values)
        if isinstance(w, Fixed):
            return w.seconds
        if isinstance(w, (Resident, Memory, Note)):
            return 0.0
        raise TypeError(f"no price for declared work {w!r}")

    def cost(self, step: Step) -> StepCost:
        work = step.work(self.shape) if step.work is not None else []
        seconds, writes, host, dev, notes = 0.0, {}, 0, 0, []
        for w in work:
            seconds += self.seconds(w)
            if isinstance(w, Write):
                writes[w.path] = w.bytes
            elif isinstance(w, Resident):
                h, d = self.resident(w)
                host, dev = max(host, h), max(dev, d)
            elif isinstance(w, Memory):
                host = max(host, w.bytes + (self.rss if w.beside_process else 0))
            elif isinstance(w, Note):
                notes.append(w.text)
        for out in step.outputs:  # what the step did not size: typical small files
            writes.setdefault(out, _small_file(out))
        # what the process's cache holds from this and earlier steps
        return StepCost(step.key, step.stage, seconds, writes, host + self.cache_bytes, dev, note="; ".join(notes))


UNQUANTIZED = ("F32", "F16", "BF16")


def _small_file(path: Path) -> int:
    return SMALL_FILE_BYTES.get(Path(path).suffix, 1000)


def estimate_run(run: RunContext, steps: list[Step], rates: Rates, gpu: GPU | None = None,
                 params: int | None = None, vocab: int | None = None, cpu_threads: int | None = None,
                 active_params: int | None = None) -> RunEstimate:
    """Every step's cost. CPU work is priced for a host of `cpu_threads` threads; with `gpu` and
    no `cpu_threads`, for that GPU class's usual host (pipeline.cost.gpu_rates); else this machine."""
    if cpu_threads is not None and cpu_threads < 1:
        raise SqueezeError(f"--cpu-threads: expected a thread count of at least 1, got {cpu_threads}")
    shape = model_shape(run, params, vocab, active_params)
    threads = cpu_threads or (gpu.host_threads if gpu is not None else None)
    pricing = _Pricing(shape, rates, gpu, threads)
    costs = [pricing.cost(s) for s in steps]
    notes = []
    if threads is not None and threads != rates.threads:
        how = "as given (--cpu-threads)" if cpu_threads else f"the default host for a {gpu.name} (pipeline/cost/gpu_rates.py)"
        notes.append(f"CPU work priced for a host of {threads} threads, {how}: this machine's rates at "
                     f"{rates.threads} threads scaled by Amdahl's law with the parallel fractions measured here "
                     f"at 1 and 2 threads ({_fractions(rates)})")
    if rates.load.get("busy"):
        notes.append(f"the rates were measured on a busy machine ({load_text(rates.load)}): times may come out slow")
    if shape.n_active_params != shape.n_params:
        notes.append(f"mixture of experts: model evaluation priced by {shape.n_active_params / 1e9:.2f}B active "
                     f"parameters per token, sizes and quantizing by all {shape.n_params / 1e9:.2f}B")
    if any(c.stage == "quantize" and "refinement" in c.note for c in costs):
        notes.append("budgeted variants: every refinement round priced in full (an upper bound: refinement stops "
                     "early within tolerance, and probes an earlier step measured are reused)")
    if not shape.exact:
        notes.append(f"tensor shapes derived from {shape.n_params / 1e9:.1f}B parameters and a vocabulary of "
                     f"{shape.n_vocab} (n_embd ~{shape.n_embd}): sizes are approximate")
    if gpu is not None:
        notes.append(f"model evaluation on {gpu.name} from its spec ({gpu.source}); quantizing, converting and "
                     f"squeeze's numpy work on the host's CPU")
        need = max((c.gpu_memory_bytes for c in costs), default=0)
        if need > gpu.memory_gib * (1 << 30):
            notes.append(f"the largest model with its KV cache needs {need / (1 << 30):.1f} GiB, more than the "
                         f"{gpu.name}'s {gpu.memory_gib:g} GiB: it would run partly on the CPU (not modelled)")
        if run.recipe.model.n_gpu_layers == 0:
            notes.append("the recipe offloads no layers (model.n_gpu_layers: 0): priced as if it did; set it "
                         "(-1: every layer) to use the GPU")
    if run.recipe.model.n_gpu_layers != 0 and not supports_gpu_offload():
        notes.append(f"the recipe offloads (model.n_gpu_layers: {run.recipe.model.n_gpu_layers}) and this llama.cpp "
                     f"build has no GPU backend: `squeeze run` here would refuse it (make setup GPU=cuda)")
    if any(isinstance(v.prune, AutoPrune) for v in run.recipe.plans):
        notes.append("automatic pruning: sizes assume K middle layers are dropped")
    if gpu is not None:
        device = f"{gpu.name} with a {threads}-thread host" if threads else gpu.name
    elif threads is not None and threads != rates.threads:
        device = f"a {threads}-thread CPU (scaled from this machine's {rates.key.get('cpu')})"
    else:
        device = f"this machine's CPU ({rates.key.get('cpu')}, {rates.key.get('threads')} threads)"
    return RunEstimate(run.recipe.name, shape, costs, device, notes)


def _fractions(rates: Rates) -> str:
    if not rates.scaling:
        return "not measured on this machine: CPU work left at this machine's speed"
    return ", ".join(f"{k} {v['parallel_fraction']:.2f}" for k, v in rates.scaling.items())



def parse_count(text: str, option: str = "--params") -> int:
    """'12.2B', '270M', '7e9' -> a parameter count."""
    t = str(text).strip().upper().replace("_", "")
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(t[-1:], 1)
    try:
        n = int(float(t[:-1] if scale != 1 else t) * scale)
    except ValueError:
        n = 0
    if n <= 0:
        raise SqueezeError(f"{option}: expected a parameter count like 12.2B or 270M, got {text!r}")
    return n


def _size(n: float) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def _time(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 90:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def format_estimate(e: RunEstimate) -> list[str]:
    """The estimate as `squeeze plan --estimate` prints it: steps, stages, totals, notes."""
    sh = e.shape
    params = f"{sh.n_params / 1e6:,.0f}M parameters"
    if sh.n_active_params != sh.n_params:
        params = f"{sh.n_params / 1e6:,.0f}M parameters ({sh.n_active_params / 1e6:,.0f}M active per token)"
    lines = [f"estimate for {e.recipe}: {sh.arch}, {sh.n_layers} layers, {params}, "
             f"vocabulary {sh.n_vocab}; a fresh run on {e.device}",
             f"  {'step':<28} {'time':>9} {'writes':>10} {'peak memory':>12}"]
    for c in e.costs:
        mem = _size(c.memory_bytes) + (f" (+{_size(c.gpu_memory_bytes)} GPU)" if c.gpu_memory_bytes else "")
        lines.append(f"  {c.key:<28} {_time(c.seconds):>9} {_size(c.bytes_written):>10} {mem:>12}")
    lines.append("  per stage:")
    for stage, s in e.by_stage().items():
        lines.append(f"  {stage:<28} {_time(s['seconds']):>9} {_size(s['bytes']):>10} {_size(s['memory_bytes']):>12}"
                     f"   ({s['steps']} steps)")
    lines.append(f"total: {_time(e.seconds)} wall time, {_size(e.folder_bytes)} in the results folder, "
                 f"peak memory {_size(e.peak_memory)}")
    lines += [f"note: {n}" for n in e.notes]
    lines.append("note: an estimate from measured rates and the model's shape; disk sizes are close, times "
                 "within tens of percent on a quiet machine")
    return lines
