"""What each step of a run costs before it runs (`squeeze plan --estimate`): the work every step
declares, in the units pipeline.cost.estimate prices, for a fresh results folder.

The stages that write large files (convert, prune, quantize) also ask here for the size of what
they are about to write, to check the disk has room first (pipeline.fsutil.ensure_free_space).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.choose.groups import CANDIDATE_TYPES, group_of, kind_units, low_type_for
from pipeline.choose.measured_allocation import GROUP_SHARE
from pipeline.choose.memory_probe import PROBE_CHUNKS
from pipeline.choose.prune_auto import search_probes
from pipeline.choose.text_transfer import FACTOR_CHUNKS, REFERENCE_FALLBACK, REFERENCE_TYPE
from pipeline.choose.weight_errors import row_limit, sampled_rows
from pipeline.cost import estimate as est
from pipeline.cost.estimate import Pricer, Shape, StepCost
from pipeline.cost.gpu_rates import GPU
from pipeline.cost.rates import Rates, load_text
from pipeline.engine.backend import supports_gpu_offload
from pipeline.engine.quantized_tensors import default_limit
from pipeline.errors import SqueezeError
from pipeline.formats.ggml_types import fits
from pipeline.formats.gguf_index import read_index, read_metadata
from pipeline.formats.model_info import read_model_info
from pipeline.formats.task_data import BENCHMARKS
from pipeline.formats.tensor_names import layer_of
from pipeline.measure import drift as drift_measure
from pipeline.measure.perplexity import TAIL_SAMPLES, TOP_K, seqs_per_batch
from pipeline.measure.tasks import load_selected
from pipeline.recipe.rules import resolve_types
from pipeline.recipe.plan import (AutoPrune, BitsBudget, Budget, SearchedPrune, SizeBudget, UpToPrune,
                                  VariantPlan)
from pipeline.run.layout import RunContext
from pipeline.run.runner import Step
from pipeline.sources.datasets import resolve_dataset
from pipeline.sources.model_source import parse_source, source_gguf

# Small outputs: typical sizes measured on the default recipe (results/bench/estimate.json).
SMALL_FILE_BYTES = {".json": 1800, ".csv": 700, ".md": 6000, ".png": 45000, ".txt": 550, ".npz": 0}
STATS_BYTES_PER_TENSOR = {"stats.csv": 139, "stats.md": 123}
# Fixed seconds for work that is neither model evaluation nor file writing (tables, plots):
# measured on the default recipe, 0.7 s for statistics and 0.2 s for the report.
STATISTICS_S = 0.7
REPORT_S = 0.2
# English text in a BPE/sentencepiece vocabulary: about this many characters per token.
CHARS_PER_TOKEN = 4.0
# Tokens a drift prompt has before the continuation (the built-in prompts are one sentence).
DRIFT_PROMPT_TOKENS = 20
# Refinement (pipeline.choose.refine) measures, in every round but the last, the groups whose
# predicted KLD adds up to GROUP_SHARE (80 %) of the total. How many groups that is depends on the
# map: on Gemma 3 270M's (its sensitivity stage, 2026-11; the map was kept as
# results/bench/sensitivity-map.csv until commit e8a66bd), 25 of its 36 layer groups carry 80 %
# of the KLD at the probe's low types, so this share of the groups is priced per round. Later
# rounds measure only the groups whose types changed, and refinement stops early once a round's
# prediction is within tolerance: pricing every round in full makes this an upper bound.
REFINE_GROUP_FRACTION = 25 / 36


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


def model_shape(ctx: RunContext, params: int | None = None, vocab: int | None = None,
                active_params: int | None = None) -> Shape:
    """The model's shape: exact from the tensors the model info lists, else (a hub model not
    downloaded yet) from `params` and `vocab`, with the recipe's model.arch and model.layers.
    A mixture of experts: its expert counts from the GGUF, or `active_params` as given."""
    info = ctx.model_info
    if info.tensors and all(t.shape is not None for t in info.tensors):
        gguf_path = None
        if ctx.base_path.exists():
            gguf_path = ctx.base_path
        else:
            source = parse_source(ctx.recipe)
            if source.kind in ("gguf", "pypi"):
                gguf_path = source_gguf(ctx.recipe, source)
        header, experts = None, (0, 0)
        if gguf_path is not None:
            header, experts = _metadata_bytes(gguf_path), expert_counts(gguf_path, info.arch)
        return est.shape_from_info(info, header, *experts, active_params=active_params)
    if params is None or vocab is None:
        raise SqueezeError(f"{ctx.recipe.where('model')}the model's tensor shapes are not known until it is "
                           f"downloaded: give its size with --params (e.g. 12.2B) and --vocab (e.g. 262144)")
    return est.shape_from_size(info.arch, info.n_layers, params, vocab, active_params)


def _source_tensors(ctx: RunContext, source):
    """The tensors the convert stage dequantizes, with their types in the source (not in a base
    an earlier run made: the estimate is for a fresh results folder)."""
    return read_model_info(source_gguf(ctx.recipe, source)).tensors


# ---- per step ---------------------------------------------------------------------------------
class _Estimator:
    def __init__(self, ctx: RunContext, shape: Shape, rates: Rates, gpu: GPU | None, threads: int | None = None):
        self.ctx, self.shape, self.rates, self.gpu = ctx, shape, rates, gpu
        self.p = Pricer(rates, gpu, threads)
        self.recipe = ctx.recipe
        self.base_type = self.recipe.model.base_type.upper()
        self.base_bytes = est.base_file_bytes(shape, self.base_type)
        self.rss = rates.process_rss_bytes
        self.largest_f32 = 4 * shape.largest_tensor_values
        self.out_flops = shape.output_flops_per_token()
        self.variant_bytes: dict[str, int] = {}
        self.variant_tensor_types: dict[str, dict[str, str]] = {}
        self.info = ctx.model_info
        # The process's cache of quantized tensors (pipeline.engine.quantized_tensors) keeps every
        # (tensor, type) pair a probe or an assembled file made, up to its limit, for the rest of
        # the run: what it holds counts in every later step's resident memory.
        self.cached: dict[tuple[str, str], int] = {}
        self.cache_limit = default_limit()
        self.tensors_by_name = {t.name: t for t in shape.tensors}

    # the layers a variant drops: auto choices are not known yet, so K of the middle layers
    def drop_for(self, v: VariantPlan) -> tuple[int, ...]:
        if not isinstance(v.prune, SearchedPrune):
            return v.prune.listed
        k = v.prune.k
        mid = self.shape.n_layers // 2
        return tuple(range(mid - k // 2, mid - k // 2 + k))

    def variant_size(self, v: VariantPlan) -> int:
        if v.name not in self.variant_bytes:
            drop = self.drop_for(v)
            budget = v.budget
            explicit = {n: c.type for n, c in resolve_types(v, self.info).items()} if self.shape.exact else {}
            types = est.variant_types(self.shape, v.ftype, explicit, drop, v.type_of("output_type"),
                                      v.type_of("token_embedding_type"))
            size = est.variant_file_bytes(self.shape, types)
            self.variant_tensor_types[v.name] = types
            if budget is not None:
                size = _budget_size(self.shape, budget, drop) or size
            self.variant_bytes[v.name] = size
        return self.variant_bytes[v.name]

    def model_for(self, name: str | None) -> tuple[float, int, bool, int]:
        """(FLOP per token, file bytes, quantized?, layers) of the base (None) or a variant."""
        if name is None:
            return self.shape.flops_per_token(), self.base_bytes, False, self.shape.n_layers
        v = self.recipe.variant(name)
        drop = self.drop_for(v)
        return self.shape.flops_per_token(drop), self.variant_size(v), True, self.shape.n_layers - len(drop)

    def mem(self, model_bytes: int, n_ctx_tokens: int = 0, n_logits: int = 0, extra: int = 0,
            layers: int | None = None) -> tuple[int, int]:
        """(host, device) peak bytes: the mapped weights (on the device with --gpu), KV cache, the
        context's compute buffer, logits."""
        kv = est.kv_cache_bytes(self.shape, n_ctx_tokens, layers) if n_ctx_tokens else 0
        compute = est.compute_buffer_bytes(self.shape, n_ctx_tokens) if n_ctx_tokens else 0
        logits = est.logits_bytes(n_logits, self.shape.n_vocab)
        if self.gpu is not None:
            return self.rss + logits + extra, model_bytes + kv + compute
        return self.rss + model_bytes + kv + compute + logits + extra, 0

    def keep_quantized(self, types: dict[str, str]) -> None:
        """The pairs a step quantizes through the shared cache, as the cache will hold them."""
        by_name = self.tensors_by_name
        for n, ty in types.items():
            if n in by_name and ty not in ("F32", "F16", "BF16"):
                self.cached.setdefault((n, ty), est.tensor_nbytes(ty, by_name[n].shape))

    @property
    def cache_bytes(self) -> int:
        return min(self.cache_limit, sum(self.cached.values()))

    def probe_mem(self) -> tuple[int, int]:
        """(host, device) bytes of in-memory probes (pipeline.choose.memory_probe): the base loaded
        writable, a context over the probe chunks, and numpy's copy of the logits it reads (the
        rows from each chunk's middle on) while their KLD is taken."""
        _, scored, _ = _chunk_counts(PROBE_CHUNKS, 512)
        return self.mem(self.base_bytes, PROBE_CHUNKS * 512, PROBE_CHUNKS * 512,
                        est.logits_bytes(scored, self.shape.n_vocab))

    def cost(self, step: Step) -> StepCost:
        fn = getattr(self, "_" + step.stage)
        c = fn(step)
        c.memory_bytes += self.cache_bytes  # what the process's cache holds from this and earlier steps
        writes = dict(c.writes)
        for out in step.outputs:  # what a step-specific rule did not size: typical small files
            if out not in writes:
                writes[out] = _small_file(out)
        c.writes = writes
        return c

    # convert -------------------------------------------------------------------------------
    def _convert(self, step: Step) -> StepCost:
        source = parse_source(self.recipe)
        writes = {self.ctx.base_path: self.base_bytes, self.ctx.base_info_path: 150}
        if source.kind in ("gguf", "pypi"):
            tensors = _source_tensors(self.ctx, source)
            already = all(t.type in (self.base_type, "F32") for t in tensors if t.type)
            seconds = 0.1 if already else (self.p.dequantize(tensors) + self.p.write(self.base_bytes)
                                            + self.rates.header_s_per_token * self.shape.n_vocab)
            mem = self.rss + 3 * self.largest_f32
            note = "linked, same type" if already else "dequantized"
        else:
            seconds = (est.CONVERT_STARTUP_S + est.CONVERT_S_PER_VOCAB_ENTRY * self.shape.n_vocab
                       + self.base_bytes / est.CONVERT_BYTES_PER_S)
            mem = int(est.CONVERT_RSS_FIXED + est.CONVERT_RSS_PER_LARGEST_F32 * self.largest_f32)
            note = "convert_hf_to_gguf.py; download not counted" if source.kind == "hub" else "convert_hf_to_gguf.py"
        return StepCost(step.key, step.stage, seconds, writes, mem, note=note)

    # imatrix -------------------------------------------------------------------------------
    def _imatrix(self, step: Step) -> StepCost:
        cal = self.recipe.calibration
        tokens = cal.chunks * cal.ctx
        n_seq = max(1, 2048 // cal.ctx)
        flops, size, _, _ = self.model_for(None)
        # priced as the blocks' work and the hook: measured on the three sizes of results/bench/scale.json, the
        # pass costs that, though it asks for every token's logits (the probe's hook rate, taken as
        # what is left of its own pass after the blocks, holds the rest)
        seconds = self.p.load() + self.p.forward(tokens, flops, False) + self.p.hook(
            tokens, self.shape.hooked_values_per_token())
        host, dev = self.mem(size, n_seq * cal.ctx, n_seq * cal.ctx)
        writes = {self.ctx.imatrix_path: est.imatrix_file_bytes(self.shape),
                  self.ctx.layers_path: 40 + 32 * self.shape.n_layers}
        return StepCost(step.key, step.stage, seconds, writes, host, dev,
                        note=f"{cal.chunks} x {cal.ctx} tokens through the base")

    # statistics ----------------------------------------------------------------------------
    def _statistics(self, step: Step) -> StepCost:
        n = sum(1 for t in self.shape.tensors if layer_of(t.name) is not None and t.shape and len(t.shape) >= 2)
        writes = {self.ctx.stats_csv_path: 200 + STATS_BYTES_PER_TENSOR["stats.csv"] * n,
                  self.ctx.stats_md_path: 2000 + STATS_BYTES_PER_TENSOR["stats.md"] * n,
                  self.ctx.stats_layers_csv_path: 40 + 36 * self.shape.n_layers}
        return StepCost(step.key, step.stage, STATISTICS_S, writes, self.rss + (64 << 20))

    # sensitivity ---------------------------------------------------------------------------
    def _probe_kld(self, n_probes: int, chunks: int, quantized: bool = False) -> float:
        """n_probes in-memory KLD measurements on `chunks` calibration chunks, after the base is
        loaded once and its distribution taken (pipeline.choose.memory_probe). What each probe
        quantizes is priced apart (_probe_quantize)."""
        cal = self.recipe.calibration
        ctx_len = cal.ctx if cal else self.recipe.score.ctx
        tokens, scored, outputs = _chunk_counts(chunks, ctx_len)
        flops = self.shape.flops_per_token()
        one = self.p.forward(tokens, flops, quantized, outputs, self.out_flops) + self.p.kld(scored, self.shape.n_vocab)
        base = (self.p.load() + self.p.forward(tokens, flops, False, outputs, self.out_flops)
                + self.p.sketch(scored, self.shape.n_vocab))
        return base + n_probes * one

    def _probe_quantize(self, types: dict[str, str], share: float = 1.0) -> float:
        """A probe's tensors quantized in memory (ggml_quantize_chunk) before it measures:
        `share` of these tensors at these types."""
        by_name = self.tensors_by_name
        self.keep_quantized(types)
        return share * sum(self.p.roundtrip(est.n_values(by_name[n].shape), ty) for n, ty in types.items()
                           if n in by_name and ty not in ("F32", "F16", "BF16"))

    def _quantizable(self, drop=()):
        return [t for t in self.shape.tensors if t.shape and len(t.shape) >= 2 and group_of(t.name) is not None
                and layer_of(t.name) not in set(drop)]

    def _weight_errors(self) -> tuple[float, int]:
        """(seconds, weights per type) of the sensitivity map's weight errors: every candidate type
        a tensor fits, on the rows pipeline.choose.weight_errors samples, quantized and back."""
        seconds, sampled = 0.0, 0
        for t in self._quantizable():
            mats = int(math.prod(t.shape[2:])) if len(t.shape) > 2 else 1
            rows = len(sampled_rows(int(t.shape[1]), row_limit(t.name, mats)))
            weights = mats * rows * int(t.shape[0])
            sampled += weights
            seconds += sum(self.p.roundtrip(weights, ty) for ty in CANDIDATE_TYPES if fits(t.shape, ty))
        return seconds, sampled

    def _sensitivity(self, step: Step) -> StepCost:
        n = self.shape.n_layers
        # per layer: removed, attention low, MLP low; the embedding low; each tensor kind low in every layer
        n_probes = 3 * n + 1 + len(kind_units(self.info)) if self.info is not None else 3 * n + 1 + 7
        # the probes quantize every block tensor twice at its low type (once in its layer's
        # attention or MLP probe, once in its kind's) and the embedding once
        low = {t.name: low_type_for(t.shape) for t in self._quantizable()}
        in_blocks = {nm: ty for nm, ty in low.items() if layer_of(nm) is not None}
        quantize = 2 * self._probe_quantize(in_blocks) + self._probe_quantize(
            {nm: ty for nm, ty in low.items() if nm not in in_blocks})
        errors, sampled = self._weight_errors()
        seconds = self._probe_kld(n_probes, PROBE_CHUNKS, True) + quantize + errors
        host, dev = self.probe_mem()
        return StepCost(step.key, step.stage, seconds, {}, host, dev,
                        note=f"{n_probes} in-memory KLD probes; weight errors for {len(CANDIDATE_TYPES)} types "
                             f"on {sampled / 1e6:.0f}M sampled weights")

    # prune ---------------------------------------------------------------------------------
    def _prune(self, step: Step) -> StepCost:
        tag = step.key.split(" ", 1)[1]
        v = next(v for v in self.recipe.plans if self.ctx.prune_tag(v) == tag)
        drop = self.drop_for(v)
        size = est.base_file_bytes(self.shape, self.base_type, drop)
        writes = {self.ctx.pruned_base_path(tag): size}
        if self.recipe.calibration is not None:  # the imatrix is renumbered with the base
            writes[self.ctx.pruned_imatrix_path(tag)] = est.imatrix_file_bytes(self.shape, drop)
        seconds = self.p.write(size)
        note = f"layers {list(drop)} dropped"
        host, dev = self.rss + 2 * self.largest_f32, 0
        if isinstance(v.prune, SearchedPrune):
            k = v.prune.k
            # in memory, no file per probe: removals only, nothing quantized (search_probes counts
            # the search's most, repeats aside)
            tries = search_probes(k, self.shape.n_layers)
            if any(x.budget for x in self.recipe.plans):
                tries -= self.shape.n_layers  # the sensitivity map measured the single layers
            seconds += self._probe_kld(tries, PROBE_CHUNKS)
            note = f"{k} layers picked from up to {tries} KLD probes"
            if isinstance(v.prune, UpToPrune):
                # prune or bits: keep every layer, or remove 1 ... K (the search's sets, whose
                # removals it measured already), each whole mix quantized and measured in memory
                mixes = k + 1
                types = self.variant_tensor_types.get(v.name) or self._mix_types(v)
                seconds += mixes * (self._probe_kld(1, PROBE_CHUNKS, True) - self._probe_kld(0, PROBE_CHUNKS)
                                    + self._probe_quantize(types))
                tries += mixes
                note = f"{k} layers picked from up to {tries - mixes} KLD probes; {mixes} whole mixes measured"
            writes[self.ctx.prune_choice_path(tag)] = 1500 + 40 * tries
            host, dev = self.probe_mem()  # base, writable
            host = max(host, self.rss + 2 * self.largest_f32)
        return StepCost(step.key, step.stage, seconds, writes, host, dev, note=note)

    def _mix_types(self, v: VariantPlan) -> dict[str, str]:
        self.variant_size(v)
        return self.variant_tensor_types[v.name]

    def _refinement(self, v: VariantPlan) -> tuple[float, int]:
        """(seconds, probes) of a budgeted variant's refinement (pipeline.choose.refine): the base
        loaded and its distribution taken; every round the whole chosen mix measured, and, but in
        the last round, the groups carrying GROUP_SHARE of the predicted KLD each measured alone at
        its types. Quantizing: the first round the whole mix; later rounds only the groups whose
        types changed (priced as the measured share, an upper bound); the groups' own probes use
        the mix's pairs, already quantized (pipeline.engine.quantized_tensors keeps them)."""
        rounds = self.recipe.select.refine_rounds
        if not rounds:
            return 0.0, 0
        drop = self.drop_for(v)
        types = {n: ty for n, ty in self._mix_types(v).items() if layer_of(n) not in set(drop)}
        groups = {group_of(t.name) for t in self._quantizable(drop)}
        per_round = math.ceil(REFINE_GROUP_FRACTION * len(groups)) if GROUP_SHARE < 1 else len(groups)
        n_groups = (rounds - 1) * per_round
        one = self._probe_kld(1, PROBE_CHUNKS, True) - self._probe_kld(0, PROBE_CHUNKS)
        seconds = (self._probe_kld(0, PROBE_CHUNKS) + (rounds + n_groups) * one
                   + self._probe_quantize(types)
                   + (rounds - 1) * self._probe_quantize(types, REFINE_GROUP_FRACTION))
        return seconds, rounds + n_groups

    # quantize ------------------------------------------------------------------------------
    def _quantize(self, step: Step) -> StepCost:
        v = self.recipe.variant(step.variant)
        size = self.variant_size(v)
        # (the probe's quantize rates include reading the source and writing the output)
        types = self.variant_tensor_types[v.name]
        refined = v.budget is not None and v.refine_rounds > 0
        if refined:  # the file is assembled from the mix its refinement just quantized: priced as a
            types = {n: "Q8_0" for n in types}  # write at the fastest quantize rate (an upper bound)
        seconds = self.p.quantize(self.shape, types)
        self.keep_quantized(self.variant_tensor_types[v.name])  # assembled from cached pairs (engine/assemble.py)
        writes = {self.ctx.variant_path(v.name): size,
                  self.ctx.tensor_types_path(v.name): 60 + 30 * sum(1 for _ in self._explicit(v))}
        # the source is mapped and every tensor read once: its pages stay resident while it is open
        source_bytes = est.base_file_bytes(self.shape, self.base_type, self.drop_for(v))
        mem, dev = self.rss + 3 * self.largest_f32 + source_bytes, 0
        note = f"{v.ftype}"
        if v.budget is not None:
            refine_s, probes = self._refinement(v)
            seconds += refine_s
            if probes:
                note += f"; refinement: {probes} in-memory KLD probes"
                host, dev = self.probe_mem()
                mem = max(mem, host)
        return StepCost(step.key, step.stage, seconds, writes, mem, dev, note=note)

    def _explicit(self, v: VariantPlan):
        if not self.shape.exact:
            return []
        return resolve_types(v, self.info)

    # score ---------------------------------------------------------------------------------
    def _score(self, step: Step) -> StepCost:
        kind, name = step.key.split(" ", 1)
        return getattr(self, "_score_" + kind)(step, None if name == "base" else name)

    def _score_score(self, step: Step, name: str | None) -> StepCost:
        s = self.recipe.score
        tokens, scored, outputs = _chunk_counts(s.chunks, s.ctx)
        n_seq = seqs_per_batch(s.ctx)
        flops, size, quantized, layers = self.model_for(name)
        seconds = self.p.load() + self.p.forward(tokens, flops, quantized, outputs, self.out_flops)
        dist_bytes = scored * (TOP_K * 8 + TAIL_SAMPLES * 6 + 12) + tokens * 4
        if name is None:
            seconds += self.p.sketch(scored, self.shape.n_vocab)
            writes = {self.ctx.base_distribution_path: dist_bytes}
        else:
            seconds += self.p.kld(scored, self.shape.n_vocab)
            writes = {}
        host, dev = self.mem(size, n_seq * s.ctx, n_seq * s.ctx, dist_bytes, layers)
        return StepCost(step.key, step.stage, seconds, writes, host, dev, note=f"{s.chunks} x {s.ctx} tokens")

    def _score_transfer(self, step: Step, name: str | None) -> StepCost:
        """Two reference changes (pipeline.choose.text_transfer), each quantized once in memory and
        measured on the probes' calibration chunks and on FACTOR_CHUNKS chunks of the scoring text
        held out from scoring, after one pass for the base's distribution on those."""
        s = self.recipe.score
        tokens, scored, outputs = _chunk_counts(FACTOR_CHUNKS, s.ctx)
        flops = self.shape.flops_per_token()
        on_scoring = self.p.forward(tokens, flops, True, outputs, self.out_flops) + self.p.kld(scored, self.shape.n_vocab)
        seconds = (self._probe_kld(2, PROBE_CHUNKS, quantized=True) + 3 * on_scoring
                   + self._probe_quantize({t.name: low_type_for(t.shape, REFERENCE_TYPE, REFERENCE_FALLBACK)
                                         for t in self._quantizable()}))
        host, dev = self.mem(self.base_bytes, seqs_per_batch(s.ctx) * s.ctx, seqs_per_batch(s.ctx) * s.ctx)
        return StepCost(step.key, step.stage, seconds, {self.ctx.text_transfer_path: 600}, host, dev,
                        note=f"4 probes: 2 on {PROBE_CHUNKS} calibration chunks, 2 on {FACTOR_CHUNKS} x {s.ctx} "
                             "held-out scoring chunks")

    def _score_tasks(self, step: Step, name: str | None) -> StepCost:
        t = self.recipe.score.tasks
        counts = [_task_tokens(self.ctx, b, t.count) for b in t.benchmarks]
        tokens, answers = sum(c[0] for c in counts), sum(c[1] for c in counts)
        flops, size, quantized, layers = self.model_for(name)
        # every token is evaluated; log-softmax rows only for the answers' tokens
        seconds = (self.p.load() + self.p.forward(tokens, flops, quantized, answers, self.out_flops)
                   + self.p.kld(answers, self.shape.n_vocab))
        host, dev = self.mem(size, t.ctx * 4, t.ctx * 4, layers=layers)
        return StepCost(step.key, step.stage, seconds, {}, host, dev, note=f"~{tokens:.0f} tokens")

    def _score_speed(self, step: Step, name: str | None) -> StepCost:
        sp = self.recipe.score.speed
        flops, size, quantized, layers = self.model_for(name)
        runs = sp.repetitions + 1  # and one warm-up, as llama-bench
        seconds = self.p.load() + runs * 2 * (self.p.forward(sp.pp, flops, quantized) + self.p.decode(sp.tg, size))
        host, dev = self.mem(size, sp.pp + sp.tg, sp.pp, layers=layers)
        return StepCost(step.key, step.stage, seconds, {}, host, dev)

    def _score_drift(self, step: Step, name: str | None) -> StepCost:
        d = self.recipe.score.drift
        n_prompts = len(drift_measure.PROMPTS) if d.prompts is None else 5
        flops, size, quantized, layers = self.model_for(name)
        decode = self.p.decode(n_prompts * d.tokens, size) + self.p.forward(n_prompts * DRIFT_PROMPT_TOKENS, flops,
                                                                            quantized)
        seconds = self.p.load() + decode
        forced_tokens = n_prompts * (DRIFT_PROMPT_TOKENS + d.tokens)
        extra = 0
        if name is not None:  # the base's continuation teacher-forced through both models, compared
            base_flops = self.shape.flops_per_token()
            forced_out = n_prompts * d.tokens  # logits of the continuation only
            seconds += (self.p.load(2) + self.p.forward(forced_tokens, base_flops, False, forced_out, self.out_flops)
                        + self.p.forward(forced_tokens, flops, quantized, forced_out, self.out_flops))
            seconds += 2 * self.p.kld(n_prompts * d.tokens, self.shape.n_vocab)
            extra = 2 * est.logits_bytes(n_prompts * d.tokens, self.shape.n_vocab)
            size = max(size, self.base_bytes)
        host, dev = self.mem(size, DRIFT_PROMPT_TOKENS + d.tokens, DRIFT_PROMPT_TOKENS + d.tokens, extra, layers)
        return StepCost(step.key, step.stage, seconds, {}, host, dev)

    # report --------------------------------------------------------------------------------
    def _report(self, step: Step) -> StepCost:
        return StepCost(step.key, step.stage, REPORT_S, {}, self.rss + (64 << 20))


def _chunk_counts(chunks: int, ctx: int) -> tuple[int, int, int]:
    """(tokens evaluated, tokens scored, tokens whose logits are read) for `chunks` chunks of
    `ctx`, scored as llama-perplexity does: logits from the chunk's middle on, each predicting
    the next token (pipeline.measure.perplexity.Chunks)."""
    first = ctx // 2
    return chunks * ctx, chunks * (ctx - 1 - first), chunks * (ctx - first)


def _budget_size(shape: Shape, budget: Budget, drop) -> int | None:
    if isinstance(budget, SizeBudget):
        return budget.bytes
    if not isinstance(budget, BitsBudget):
        return None  # the size a quality or memory target lands on is known once run: the ftype's stands in
    n = shape.n_params - sum(shape.layer_params(i) for i in set(drop))
    return int(budget.bpw * n / 8) + shape.metadata_bytes


def _small_file(path: Path) -> int:
    return SMALL_FILE_BYTES.get(Path(path).suffix, 1000)


# Mean characters a task evaluates (context once, then every answer) and of its answers alone,
# over the first 100 tasks each selection picks: used when a benchmark's file is not here.
TASK_CHARS = {"hellaswag": (735, 440), "winogrande": (207, 100), "arc-easy": (214, 110),
              "arc-challenge": (266, 130), "mmlu": (526, 90), "truthfulqa": (332, 250)}
_task_chars: dict[tuple, tuple[float, float]] = {}


def _task_tokens(ctx: RunContext, bench: str, count: int) -> tuple[float, float]:
    """(tokens evaluated, tokens of the answers) for a benchmark's selected tasks, from their
    characters (CHARS_PER_TOKEN each)."""
    key = (bench, count)
    if key not in _task_chars:
        try:
            tasks = load_selected(bench, resolve_dataset(BENCHMARKS[bench], ctx.recipe_dir), count)
        except SqueezeError:
            tasks = None
        if tasks is None:
            total, answers = TASK_CHARS.get(bench, (400, 150))
            _task_chars[key] = (total * count, answers * count)
        elif bench == "winogrande":  # both sentences in full, for either choice; scored after the blank
            _task_chars[key] = (sum(2 * len(t.first) + sum(map(len, t.choices)) + 2 * len(t.second) for t in tasks),
                                sum(2 * len(t.second) for t in tasks))
        else:
            ends = [sum(len(e) + 1 for e in t.endings) for t in tasks]
            _task_chars[key] = (sum(len(t.context) for t in tasks) + sum(ends), sum(ends))
    total, answers = _task_chars[key]
    return total / CHARS_PER_TOKEN, answers / CHARS_PER_TOKEN


def estimate_run(ctx: RunContext, steps: list[Step], rates: Rates, gpu: GPU | None = None,
                 params: int | None = None, vocab: int | None = None, cpu_threads: int | None = None,
                 active_params: int | None = None) -> RunEstimate:
    """Every step's cost. CPU work is priced for a host of `cpu_threads` threads; with `gpu` and
    no `cpu_threads`, for that GPU class's usual host (pipeline.cost.gpu_rates); else this machine."""
    if cpu_threads is not None and cpu_threads < 1:
        raise SqueezeError(f"--cpu-threads: expected a thread count of at least 1, got {cpu_threads}")
    shape = model_shape(ctx, params, vocab, active_params)
    threads = cpu_threads or (gpu.host_threads if gpu is not None else None)
    e = _Estimator(ctx, shape, rates, gpu, threads)
    costs = [e.cost(s) for s in steps]
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
        if ctx.recipe.model.n_gpu_layers == 0:
            notes.append("the recipe offloads no layers (model.n_gpu_layers: 0): priced as if it did; set it "
                         "(-1: every layer) to use the GPU")
    if ctx.recipe.model.n_gpu_layers != 0 and not supports_gpu_offload():
        notes.append(f"the recipe offloads (model.n_gpu_layers: {ctx.recipe.model.n_gpu_layers}) and this llama.cpp "
                     f"build has no GPU backend: `squeeze run` here would refuse it (make setup GPU=cuda)")
    if any(isinstance(v.prune, AutoPrune) for v in ctx.recipe.plans):
        notes.append("automatic pruning: sizes assume K middle layers are dropped")
    if gpu is not None:
        device = f"{gpu.name} with a {threads}-thread host" if threads else gpu.name
    elif threads is not None and threads != rates.threads:
        device = f"a {threads}-thread CPU (scaled from this machine's {rates.key.get('cpu')})"
    else:
        device = f"this machine's CPU ({rates.key.get('cpu')}, {rates.key.get('threads')} threads)"
    return RunEstimate(ctx.recipe.name, shape, costs, device, notes)


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
