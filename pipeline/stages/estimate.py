"""What the stages' steps declare about the models they run (pipeline.work): each model's file,
FLOPs and layers, the types a variant will get, an in-memory probe session's passes; and the disk
checks of the stages that write large files (convert, prune, quantize): before writing, the size
of what they are about to write against the free space (pipeline.fsutil.ensure_free_space)."""

from __future__ import annotations

from pathlib import Path

from pipeline.choose.gptq_rounding import supports as gptq_supports
from pipeline.choose.groups import group_of
from pipeline.choose.memory_probe import PROBE_CHUNKS
from pipeline.cost import estimate as est
from pipeline.cost.estimate import Shape
from pipeline.cost.run_estimate import UNQUANTIZED, model_shape
from pipeline.errors import SqueezeError
from pipeline.formats import ggml_types
from pipeline.formats.tensor_names import input_of, kind_of, layer_of
from pipeline.fsutil import ensure_free_space
from pipeline.recipe.plan import BitsBudget, SearchedPrune, SizeBudget, VariantPlan
from pipeline.recipe.rules import resolve_types
from pipeline.run.layout import RunContext
from pipeline.work import Dense, Forward, GptqColumns, Kld, Load, ModelRef, Resident, Sketch


# ---- the models a run's steps evaluate ---------------------------------------------------------
def base_model(shape: Shape, run: RunContext) -> ModelRef:
    return ModelRef(est.base_file_bytes(shape, run.recipe.model.base_type.upper()), shape.flops_per_token(), False,
                    shape.n_layers)


def dropped_layers(shape: Shape, v: VariantPlan) -> tuple[int, ...]:
    """The layers a variant drops: listed; or, for a choice the prune stage makes at run time, K of
    the middle layers (which K is not known before)."""
    if not isinstance(v.prune, SearchedPrune):
        return v.prune.listed
    mid = shape.n_layers // 2
    return tuple(range(mid - v.prune.k // 2, mid - v.prune.k // 2 + v.prune.k))


def variant_types(shape: Shape, run: RunContext, v: VariantPlan) -> dict[str, str]:
    """Every tensor's type in the variant's file: its ftype's mix with the recipe's rules."""
    explicit = {n: c.type for n, c in resolve_types(v, run.model_info).items()} if shape.exact else {}
    return est.variant_types(shape, v.ftype, explicit, dropped_layers(shape, v), v.type_of("output_type"),
                             v.type_of("token_embedding_type"))


def variant_model(shape: Shape, run: RunContext, v: VariantPlan) -> ModelRef:
    """The variant's file: the ftype's size, or the budget's where the budget fixes the bytes (the
    size a KLD or memory target lands on is known once run: the ftype's stands in)."""
    drop = dropped_layers(shape, v)
    size = est.variant_file_bytes(shape, variant_types(shape, run, v))
    if isinstance(v.budget, SizeBudget):
        size = v.budget.bytes
    elif isinstance(v.budget, BitsBudget):
        n = shape.n_params - sum(shape.layer_params(i) for i in set(drop))
        size = int(v.budget.bpw * n / 8) + shape.metadata_bytes
    return ModelRef(size, shape.flops_per_token(drop), True, shape.n_layers - len(drop))


def quantizable(shape: Shape, drop=()) -> list:
    """The tensors squeeze chooses types for (2-D and up, in a group), less dropped layers'."""
    return [t for t in shape.tensors if t.shape and len(t.shape) >= 2 and group_of(t.name) is not None
            and layer_of(t.name) not in set(drop)]


def chunk_counts(chunks: int, n_ctx: int) -> tuple[int, int, int]:
    """(tokens evaluated, tokens scored, tokens whose logits are read) for `chunks` chunks of
    `n_ctx` tokens, scored as llama-perplexity does: logits from the chunk's middle on, each predicting
    the next token (pipeline.measure.perplexity.Chunks)."""
    first = n_ctx // 2
    return chunks * n_ctx, chunks * (n_ctx - 1 - first), chunks * (n_ctx - first)


# ---- in-memory probes (pipeline.choose.memory_probe) ----------------------------------------------
def _probe_chunks(run: RunContext, chunks: int) -> tuple[int, int, int]:
    cal = run.recipe.calibration
    return chunk_counts(chunks, cal.ctx if cal else run.recipe.score.ctx)


def probe_session(shape: Shape, run: RunContext, n_probes: int, chunks: int = PROBE_CHUNKS,
                  quantized: bool = False) -> list:
    """n_probes KLD measurements on `chunks` calibration chunks, after the base is loaded once and
    its distribution taken. What each probe quantizes is declared apart (Roundtrip)."""
    tokens, scored, outputs = _probe_chunks(run, chunks)
    return ([Load(), Forward(tokens, shape.flops_per_token(), False, outputs), Sketch(scored)]
            + probe_measurements(shape, run, n_probes, chunks, quantized))


def probe_measurements(shape: Shape, run: RunContext, n_probes: int, chunks: int = PROBE_CHUNKS,
                       quantized: bool = True) -> list:
    """n_probes more KLD measurements in a session already open."""
    if not n_probes:
        return []
    tokens, scored, outputs = _probe_chunks(run, chunks)
    return [Forward(n_probes * tokens, shape.flops_per_token(), quantized, n_probes * outputs), Kld(n_probes * scored)]


def probe_resident(shape: Shape, run: RunContext, changed=()) -> Resident:
    """In-memory probes: the base loaded writable, a context over the probe chunks; and, while the
    largest change a probe makes is applied (`changed`: its tensors' names), the original bytes of
    every tensor it overwrote, kept to restore them (pipeline.engine.weights). Beside those, one at
    a time: the float32 values of the largest changed tensor while it is quantized, or numpy's
    copy of the logits (the rows from each chunk's middle on) while their KLD is taken."""
    _, scored, _ = chunk_counts(PROBE_CHUNKS, 512)
    saved, quantizing = probe_change_bytes(shape, run, changed)
    return Resident(base_model(shape, run), PROBE_CHUNKS * 512, PROBE_CHUNKS * 512,
                    saved + max(quantizing, est.logits_bytes(scored, shape.n_vocab)))


def probe_change_bytes(shape: Shape, run: RunContext, changed) -> tuple[int, int]:
    """(the original bytes a probe changing the tensors `changed` keeps to restore them, the
    float32 values of the largest of them while it is being quantized)."""
    base_type = run.recipe.model.base_type.upper()
    by_name = {t.name: t for t in shape.tensors}
    tensors = [by_name[n] for n in changed if n in by_name]
    saved = sum(est.tensor_nbytes(base_type, t.shape) for t in tensors)
    return saved, 4 * max((est.n_values(t.shape) for t in tensors), default=0)


def quantized_in(types: dict[str, str]) -> list[str]:
    """The tensors a mix changes: those at a quantized type."""
    return [n for n, ty in types.items() if ty not in UNQUANTIZED]


def largest_probe(shape: Shape, types: dict[str, str]) -> list[str]:
    """Of the sensitivity probes over `types` (every tensor of a kind in all layers, a layer's
    attention or MLP, each tensor outside the blocks), the tensors of the one changing the most
    values: which probe that is depends on the shapes, so each is a candidate."""
    sets: dict[str, list[str]] = {}
    for name in types:
        layer = layer_of(name)
        sets.setdefault(f"kind {kind_of(name)}" if layer is not None else name, []).append(name)
        if layer is not None:
            sets.setdefault(f"group {group_of(name)}", []).append(name)
    values = {t.name: est.n_values(t.shape) for t in shape.tensors}
    return max(sets.values(), key=lambda names: sum(values.get(n, 0) for n in names), default=[])


# ---- error-compensated rounding (pipeline.choose.gptq_rounding) -------------------------------

def moment_inputs(shape: Shape) -> dict[str, tuple[int, int]]:
    """The distinct inputs of the blocks' weights, by the name the calibration pass keys their
    second moment with: (width, matrices), one matrix for a dense input, one per routed expert."""
    return {input_of(t.name): (int(t.shape[0]), int(t.shape[2]) if len(t.shape) == 3 else 1)
            for t in shape.tensors if input_of(t.name) is not None and t.shape and len(t.shape) in (2, 3)}


def moment_layer_bytes(shape: Shape) -> list[int]:
    """Each block's second moments in float64, as the calibration pass holds them."""
    out = [0] * shape.n_layers
    for key, (n, matrices) in moment_inputs(shape).items():
        layer = layer_of(key + ".weight")
        if layer is not None and layer < shape.n_layers:
            out[layer] += 8 * matrices * n * n
    return out


def moments_work(shape: Shape, tokens: float) -> list:
    """The calibration pass summing x^T x (float64) for every distinct input over `tokens` (an
    expert's over the tokens routed to it: all of them together, at most)."""
    return [Dense(2.0 * tokens * sum(n * n for n, _ in moment_inputs(shape).values()))]


def gptq_work(shape: Shape, types: dict[str, str], times: float = 1.0) -> tuple[list, int]:
    """Rounding `types` with GPTQ where it rounds (block weights at a type with a grid; the rest
    keeps llama.cpp's rounding, priced with the file): per distinct input (per expert) its factor
    (a Cholesky and a triangular inverse, about 4/3 n^3 FLOPs); per matrix its columns rounded in
    blocks, then the feedback past each block, 2 x rows x block x the columns after it, about
    rows x n x (n - block) in all. With it, the bytes held beside the step's own at the peak: the
    largest input's H (float32, every expert's) and its float64 copy, the two factors kept, and
    the tensor's float64 values twice. `times`: the rounding done that many times over
    (refinement rounds)."""
    by_name = {t.name: t for t in shape.tensors}
    inputs, values, flops, peak = {}, 0.0, 0.0, 0
    for name, ty in types.items():
        t = by_name.get(name)
        if t is None or input_of(name) is None or not t.shape or len(t.shape) not in (2, 3) or not gptq_supports(ty):
            continue
        n, rows = int(t.shape[0]), int(t.shape[1])
        matrices = int(t.shape[2]) if len(t.shape) == 3 else 1
        block = ggml_types.block_size(ggml_types.tensor_type(ty))
        inputs[input_of(name)] = (n, matrices)
        values += matrices * rows * n
        flops += matrices * rows * n * max(n - block, 0)
        peak = max(peak, 4 * matrices * n * n + 8 * n * n + 2 * 8 * n * n + 2 * 8 * rows * n)
    if not inputs:
        return [], 0
    flops += sum(matrices * 4 / 3 * n ** 3 for n, matrices in inputs.values())
    return [GptqColumns(times * values), Dense(times * flops)], peak


# ---- what the writing stages check the disk for -------------------------------------------------
def _known_shape(run: RunContext) -> Shape | None:
    try:
        return model_shape(run)
    except SqueezeError:
        return None  # a hub model before its download: the converter's output size is not known


def predicted_base_bytes(run: RunContext, drop=()) -> int | None:
    """The size of the base (or of a base with `drop` layers removed), None when not known yet."""
    shape = _known_shape(run)
    return None if shape is None else est.base_file_bytes(shape, run.recipe.model.base_type.upper(), drop)


def predicted_variant_bytes(run: RunContext, v: VariantPlan, explicit: dict[str, str], drop) -> int | None:
    """The size of the variant's file with these explicit types, None when the shape is not known yet."""
    shape = _known_shape(run)
    if shape is None:
        return None
    types = est.variant_types(shape, v.ftype, explicit, drop, v.type_of("output_type"),
                              v.type_of("token_embedding_type"))
    return est.variant_file_bytes(shape, types)


def check_room(what: str, folder: Path, needed: int | None) -> None:
    """Before writing a large file: one line when the disk lacks room (nothing written yet)."""
    if needed is not None:
        ensure_free_space(what, folder, needed)
