"""What a run will cost before it runs: seconds, bytes written and peak memory per step, from the
model's shape and the rates measured on this machine (pipeline.cost.rates) or taken from a
GPU's specifications (pipeline.cost.gpu_rates).

The model of each kind of work:
- a batched forward pass (calibration, perplexity/KLD, tasks, speed pp) costs 2 FLOP per weight a
  token passes through (the output layer included, the embedding lookup not), at the FLOP rate
  measured for F16 or quantized weights; in a mixture-of-experts model a token passes through
  n_expert_used of the n_expert matrices of each expert tensor (the active parameters), while
  file sizes and quantizing count every weight (the total);
- a single-token decode (speed tg, drift) reads every weight once: model bytes / bandwidth;
- squeeze's numpy work on the logits costs per (token x vocabulary entry); the calibration
  hook per activation value it reads;
- quantizing costs per weight, dequantizing a GGUF per value of each source type, writing a file
  per byte;
- file sizes are exact for the bases (every tensor's shape and type, padding and metadata) and
  follow llama.cpp's quantization mixes for variants (VARIANT_MIXES below: the main type per
  file type and the tensors it gives more bits), so they are close, not exact.
CPU work is priced for a host of `threads` CPU threads (this machine's when not given): each
rate measured here is scaled by Amdahl's law with the parallel fraction measured here at 1 and
2 threads (pipeline.cost.rates). Work measured as serial (gguf-py's dequantization, the
calibration hook's Python callback, disk writes, opening a model) is not scaled.
It is an estimate: a busy machine, a cold disk or a model much larger than the probe's changes
the seconds; disk bytes are the firm part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from pipeline.cost.gpu_rates import GPU
from pipeline.cost.rates import Rates
from pipeline.errors import SqueezeError
from pipeline.formats import ggml_types
from pipeline.formats.model_info import ModelInfo, TensorInfo, synthetic_model_info
from pipeline.formats.tensor_names import OUTPUT, TOKEN_EMBD, kind_of, layer_of

ALIGNMENT = 32  # GGUF tensor data alignment
# A hub model's vocabulary in the GGUF header: token string, score and type per entry (typical).
HEADER_BYTES_PER_TOKEN = 24
HEADER_BYTES_FIXED = 32 << 10
# llama.cpp's quantize keeps these tensors as they are (norms, biases: every 1-D tensor).
_NOT_QUANTIZED_KINDS = ("ffn_gate_inp", "pos_embd", "token_types")

# HF conversion (convert_hf_to_gguf.py, lazy). Seconds: fitted to the three quiet runs of
# results/bench/scale.json (bf16 checkpoints of 245 MB, 549 MB and 1.9 GB, vocabularies of 50k and
# 262k): ~4 s of start-up (torch, transformers), ~17.5 s per million vocabulary entries (the
# tokenizer's vocabulary is read and written entry by entry in Python) and ~3 s per GB of weights.
# Memory: results/bench/convert.json, ~377 MiB + 1.53 x the largest tensor in f32. Downloading is
# not counted: it depends on the network.
CONVERT_STARTUP_S = 4.2
CONVERT_S_PER_VOCAB_ENTRY = 17.5e-6
CONVERT_BYTES_PER_S = 1e9 / 2.96
CONVERT_RSS_FIXED = 377 * (1 << 20)
CONVERT_RSS_PER_LARGEST_F32 = 1.53


# ---- the model's shape --------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """What costs depend on. `tensors` carry shapes (estimated ones for a model given by size)."""

    arch: str
    n_layers: int
    n_vocab: int
    n_embd: int
    tensors: tuple[TensorInfo, ...]
    metadata_bytes: int  # the GGUF header: key/values (the vocabulary is most of it) and tensor infos
    exact: bool = True  # False when the tensor shapes were derived from a parameter count
    n_expert: int = 0  # mixture of experts: experts per expert tensor (<arch>.expert_count) ...
    n_expert_used: int = 0  # ... and how many a token passes through (<arch>.expert_used_count)
    active_override: int | None = None  # active parameters given (--active-params), not derived

    @property
    def n_params(self) -> int:
        return sum(n_values(t.shape) for t in self.tensors)

    def layer_params(self, layer: int) -> int:
        return sum(n_values(t.shape) for t in self.tensors if layer_of(t.name) == layer)

    def active_values(self, t: TensorInfo) -> float:
        """Weights of `t` one token passes through: of an expert tensor (one matrix per expert,
        the last dimension), n_expert_used of its n_expert matrices."""
        n = n_values(t.shape)
        if self.n_expert > 1 and t.shape and len(t.shape) == 3 and int(t.shape[2]) == self.n_expert:
            return n * self.n_expert_used / self.n_expert
        return n

    def _block_share(self) -> float | None:
        """With active parameters given: the share of the blocks' weights a token passes through
        (everything outside the blocks, the embedding and output, is active)."""
        if self.active_override is None:
            return None
        outside = sum(n_values(t.shape) for t in self.tensors if layer_of(t.name) is None)
        blocks = self.n_params - outside
        return max(0.0, self.active_override - outside) / blocks if blocks else 1.0

    def layer_active(self, layer: int) -> float:
        share = self._block_share()
        if share is not None:
            return share * self.layer_params(layer)
        return sum(self.active_values(t) for t in self.tensors if layer_of(t.name) == layer)

    @property
    def n_active_params(self) -> int:
        if self.active_override is not None:
            return self.active_override
        return int(sum(self.active_values(t) for t in self.tensors))

    @property
    def tied_output(self) -> bool:
        return not any(t.name == OUTPUT for t in self.tensors)

    def flops_per_token(self, drop=()) -> float:
        """2 FLOP per block weight a token passes through. The output layer is priced apart
        (`output_flops_per_token`): llama.cpp runs it only for the tokens whose logits are asked
        for (the last one in prompt processing, half of each chunk when scoring, every token in
        the calibration pass), and over a 262k vocabulary it is as large as the blocks."""
        blocks = self.n_active_params - sum(self.layer_active(i) for i in set(drop))
        outside = sum(n_values(t.shape) for t in self.tensors if t.name in (TOKEN_EMBD, OUTPUT))
        return 2.0 * max(blocks - outside, 0)

    def output_flops_per_token(self) -> float:
        """2 FLOP per weight of the output layer (the embedding when tied), per token with logits."""
        return 2.0 * self.n_embd * self.n_vocab

    @property
    def kv_dim(self) -> int:
        for t in self.tensors:
            if kind_of(t.name) == "attn_k" and t.shape and len(t.shape) >= 2:
                return int(t.shape[1])
        return self.n_embd

    @property
    def n_gqa(self) -> int:
        """Query heads per KV head: the attention's query width over its key width."""
        q = next((t.shape[1] for t in self.tensors if kind_of(t.name) == "attn_q" and t.shape and len(t.shape) > 1), 0)
        return max(1, q // max(1, self.kv_dim))

    @property
    def largest_tensor_values(self) -> int:
        return max((n_values(t.shape) for t in self.tensors), default=0)

    def hooked_values_per_token(self) -> int:
        """Activation values the calibration hook reads per token: each block matmul's input row."""
        return sum(int(t.shape[0]) for t in self.tensors
                   if layer_of(t.name) is not None and t.shape and len(t.shape) >= 2)


def n_values(shape) -> int:
    return math.prod(shape) if shape else 0


def shape_from_info(info: ModelInfo, metadata_bytes: int | None = None, n_expert: int = 0,
                    n_expert_used: int = 0, active_params: int | None = None) -> Shape:
    """The shape of a model whose tensors are known (a GGUF here, or a HF folder's safetensors);
    for a mixture of experts, its expert counts or its active parameters."""
    embd = next((t for t in info.tensors if t.name == TOKEN_EMBD and t.shape), None)
    n_embd = int(embd.shape[0]) if embd else 0
    n_vocab = info.n_vocab or (int(embd.shape[1]) if embd and len(embd.shape) > 1 else 0)
    if metadata_bytes is None:
        metadata_bytes = HEADER_BYTES_FIXED + HEADER_BYTES_PER_TOKEN * n_vocab
    shape = Shape(info.arch, info.n_layers, n_vocab, n_embd, info.tensors, metadata_bytes,
                  n_expert=n_expert, n_expert_used=n_expert_used)
    return _with_active(shape, active_params)


def _with_active(shape: Shape, active_params: int | None) -> Shape:
    if active_params is None:
        return shape
    if not 0 < active_params <= shape.n_params:
        raise SqueezeError(f"--active-params: {active_params:,} is not between 1 and the model's "
                           f"{shape.n_params:,} parameters")
    return replace(shape, active_override=int(active_params))


def shape_from_size(arch: str, n_layers: int, n_params: int, n_vocab: int, active_params: int | None = None) -> Shape:
    """A model known only by its size: tensor names from gguf-py's templates for `arch`, widths
    from the rule of thumb that a block holds ~12 x n_embd^2 weights (attention 4 x, MLP 8 x)
    and the (tied) embedding n_vocab x n_embd: solved for n_embd. A mixture of experts is given
    by its active parameters too (its widths are those of the total: what the files hold)."""
    a, b = 12.0 * n_layers, float(n_vocab)
    e = (-b + math.sqrt(b * b + 4 * a * n_params)) / (2 * a)
    e = max(64, int(round(e / 64)) * 64)
    kv, ff = e // 2, 3 * e  # 2e^2 (q, o) + 2e*kv (k, v) + 3e*ff (gate, up, down) = 12 e^2
    names = synthetic_model_info(arch, n_layers).tensors
    kinds = {kind_of(t.name) for t in names}
    shapes = {"token_embd": (e, n_vocab), "output": (e, n_vocab), "attn_q": (e, e), "attn_output": (e, e),
              "attn_k": (e, kv), "attn_v": (e, kv), "ffn_gate": (e, ff), "ffn_up": (e, ff), "ffn_down": (ff, e)}
    tensors = []
    for t in names:
        kind = kind_of(t.name)
        if kind == "output":
            continue  # assumed tied to the embedding (as Gemma, and most small models); untied adds a copy
        if kind.endswith("_exps") and kind[:-len("_exps")] not in kinds:
            # an architecture whose MLP is experts only: the same weights as the dense MLP of the
            # rule, as one 2-D tensor (the total is what sizes need; --active-params the rest)
            kind = kind[:-len("_exps")]
        if kind in shapes:
            tensors.append(TensorInfo(t.name, shapes[kind], None))
        elif "norm" in kind:
            tensors.append(TensorInfo(t.name, (e,), None))
    return _with_active(Shape(arch, n_layers, n_vocab, e, tuple(tensors),
                              HEADER_BYTES_FIXED + HEADER_BYTES_PER_TOKEN * n_vocab, exact=False), active_params)


# ---- file sizes -----------------------------------------------------------------------------------
def tensor_nbytes(type_name: str, shape) -> int:
    qtype = ggml_types.tensor_type(type_name)
    rows = n_values(shape[1:]) if len(shape) > 1 else 1
    return ggml_types.bytes_per_row(qtype, int(shape[0])) * rows


def _padded(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def base_file_bytes(shape: Shape, base_type: str, drop=()) -> int:
    """The unquantized base (or a pruned copy): weights in `base_type`, 1-D tensors in F32."""
    drop = set(drop)
    total = shape.metadata_bytes
    for t in shape.tensors:
        if layer_of(t.name) in drop or not t.shape:
            continue
        total += _padded(tensor_nbytes("F32" if len(t.shape) == 1 else base_type, t.shape))
    return total


# llama.cpp's file types: the type most weights get, and the tensors the mix gives more bits
# (llama_tensor_get_type in src/llama-quant.cpp: 'more_bits' is its use_more_bits(i, n): the first
# and last eighth of the layers and every third in between; 'first' a count or fraction of the
# first layers; 'gqa' whether n_head / n_head_kv reaches a value). Types not listed use their main
# type everywhere.
VARIANT_MIXES: dict[str, dict] = {
    "Q2_K": {"main": "Q2_K", "attn_v": ("gqa", 4, "Q4_K", "Q3_K"), "ffn_down": ("all", "Q3_K"), "attn_output": ("all", "Q3_K")},
    "Q2_K_S": {"main": "Q2_K", "attn_v": ("gqa", 4, "Q4_K", "Q2_K"), "ffn_down": ("first", 1 / 8, "Q4_K", "Q2_K")},
    "Q3_K_S": {"main": "Q3_K"},
    "Q3_K_M": {"main": "Q3_K", "attn_v": ("first", 2, "Q5_K", "Q4_K"), "ffn_down": ("first", 1 / 16, "Q5_K", "Q4_K"),
               "attn_output": ("all", "Q4_K")},
    "Q3_K_L": {"main": "Q3_K", "attn_v": ("all", "Q5_K"), "ffn_down": ("all", "Q5_K"), "attn_output": ("all", "Q5_K")},
    "Q4_K_S": {"main": "Q4_K", "attn_v": ("first", 4, "Q5_K", "Q4_K"), "ffn_down": ("first", 1 / 8, "Q5_K", "Q4_K")},
    "Q4_K_M": {"main": "Q4_K", "attn_v": ("more_bits", "Q6_K"), "ffn_down": ("more_bits", "Q6_K")},
    "Q5_K_S": {"main": "Q5_K"},
    "Q5_K_M": {"main": "Q5_K", "attn_v": ("more_bits", "Q6_K"), "ffn_down": ("more_bits", "Q6_K")},
    "Q6_K": {"main": "Q6_K"},
    "IQ3_M": {"main": "IQ3_S", "attn_v": ("all", "Q4_K"), "attn_output": ("all", "Q4_K"),
              "ffn_down": ("first", 1 / 8, "Q4_K", "IQ3_S")},
    "IQ3_XS": {"main": "IQ3_XXS", "attn_v": ("all", "Q4_K")},
    "IQ3_XXS": {"main": "IQ3_XXS", "attn_v": ("all", "Q4_K")},
    "IQ2_M": {"main": "IQ2_S", "attn_v": ("all", "Q4_K")},
}
# When a row length is not a multiple of a type's block, llama.cpp falls back to a type that fits
# (measured on the installed engine for the K-quants).
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
             "IQ4_XS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ3_XXS": "IQ4_NL", "IQ2_S": "IQ4_NL", "IQ2_XS": "IQ4_NL",
             "IQ2_XXS": "IQ4_NL", "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL"}


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _mix_type(ftype: str, name: str, n_layers: int, tied: bool, n_gqa: int = 1) -> str:
    mix = VARIANT_MIXES.get(ftype, {"main": ftype if ftype in ggml_types.TENSOR_TYPES else "Q8_0"})
    main = mix["main"]
    if name == OUTPUT or (tied and name == TOKEN_EMBD):
        return main if main in ("Q8_0", "F16", "BF16", "F32") else "Q6_K"
    if name == TOKEN_EMBD:
        return main
    rule = mix.get(kind_of(name))
    i = layer_of(name)
    if rule is None or i is None:
        return main
    if rule[0] == "all":
        return rule[1]
    if rule[0] == "gqa":
        return rule[2] if n_gqa >= rule[1] else rule[3]
    if rule[0] == "more_bits":
        return rule[1] if _more_bits(i, n_layers) else main
    count = rule[1] if isinstance(rule[1], int) else int(n_layers * rule[1])  # n / 16 in integers
    return rule[2] if i < count else rule[3]


def _fitting(type_name: str, shape) -> str:
    seen = set()
    while not ggml_types.fits(shape, type_name) and type_name not in seen:
        seen.add(type_name)
        type_name = _FALLBACK.get(type_name, "Q8_0" if type_name != "Q8_0" else "F16")
    return type_name


def variant_types(shape: Shape, ftype: str, explicit: dict[str, str], drop=(),
                  output_type: str | None = None, token_embedding_type: str | None = None) -> dict[str, str]:
    """Each surviving tensor's type in a variant: the recipe's explicit choices, else llama.cpp's mix."""
    drop = set(drop)
    ftype = ftype.upper()
    n = shape.n_layers - len(drop)
    out = {}
    for t in shape.tensors:
        i = layer_of(t.name)
        if i in drop or not t.shape:
            continue
        if len(t.shape) == 1 or kind_of(t.name) in _NOT_QUANTIZED_KINDS:
            out[t.name] = "F32"
            continue
        if t.name in explicit:
            ty = explicit[t.name]
        elif t.name == TOKEN_EMBD and token_embedding_type:
            ty = token_embedding_type
        elif (t.name == OUTPUT or (shape.tied_output and t.name == TOKEN_EMBD)) and output_type:
            ty = output_type
        else:
            renumbered = t.name if i is None else t.name.replace(f"blk.{i}.", f"blk.{i - sum(d < i for d in drop)}.", 1)
            ty = _mix_type(ftype, renumbered, n, shape.tied_output, shape.n_gqa)
        out[t.name] = _fitting(ty.upper(), t.shape)
    return out


def variant_file_bytes(shape: Shape, types: dict[str, str]) -> int:
    by_name = {t.name: t for t in shape.tensors}
    # quantize adds a few keys (quantize.imatrix.*, general.quantization_version)
    return shape.metadata_bytes + 1024 + sum(_padded(tensor_nbytes(ty, by_name[n].shape)) for n, ty in types.items())


def imatrix_file_bytes(shape: Shape, drop=()) -> int:
    """llama.cpp's GGUF imatrix: per block matmul, in_sum2 (f32 per input column) and counts (one f32),
    each with a tensor info (~70 bytes) and padding."""
    drop = set(drop)
    total = 256  # header and key/values (type, datasets, chunk count and size)
    for t in shape.tensors:
        if layer_of(t.name) is None or layer_of(t.name) in drop or not t.shape or len(t.shape) < 2:
            continue
        total += _padded(4 * int(t.shape[0])) + _padded(4) + 2 * (len(t.name) + 8 + 40)
    return total


_LEGACY_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL")


def quantize_kind(type_name: str) -> str:
    """The quantize rate a type is priced at: Q8_0 (and unquantized copies), legacy blocks, K/IQ
    (IQ1-IQ3 search grids and are slower than the K-quants measured: an underestimate for them)."""
    t = type_name.upper()
    if t in ("Q8_0", "F16", "BF16", "F32"):
        return "Q8_0"
    return "legacy" if t in _LEGACY_TYPES else "K"


# ---- seconds --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pricer:
    """Seconds for each kind of work: CPU rates measured here, scaled to a host of `threads` CPU
    threads (None: this machine's), and model evaluation on `gpu` if given."""

    rates: Rates
    gpu: GPU | None = None
    threads: int | None = None

    def _x(self, kind: str) -> float:
        """How much faster `kind` of CPU work runs on the host than it was measured here."""
        return self.rates.thread_factor(kind, self.threads)

    def load(self, n_models: int = 1) -> float:
        return n_models * self.rates.load_s

    def forward(self, tokens: float, flops_per_token: float, quantized: bool, outputs: float = 0,
                output_flops: float = 0) -> float:
        """`tokens` through the blocks and `outputs` of them through the output layer."""
        if self.gpu is not None:
            rate = out_rate = self.gpu.pp_flops
        else:
            rate = (self.rates.pp_flops_quant if quantized else self.rates.pp_flops_f16) * self._x("pp")
            out_rate = self.rates.output_flops * self._x("pp") if self.rates.output_flops else rate
        return tokens * flops_per_token / rate + outputs * output_flops / out_rate

    def decode(self, tokens: float, model_bytes: float) -> float:
        rate = self.gpu.tg_bytes_per_s if self.gpu is not None else self.rates.tg_bytes_per_s * self._x("tg")
        return tokens * model_bytes / rate

    def sketch(self, tokens: float, n_vocab: int) -> float:
        return tokens * n_vocab * self.rates.sketch_s_per_entry / self._x("vocab")

    def kld(self, tokens: float, n_vocab: int) -> float:
        return tokens * n_vocab * self.rates.kld_s_per_entry / self._x("vocab")

    def hook(self, tokens: float, values_per_token: float) -> float:
        return tokens * values_per_token / self.rates.hook_values_per_s

    def quantize(self, shape: Shape, types: dict[str, str]) -> float:
        """llama_model_quantize writing these types (measured with an importance matrix)."""
        by_name = {t.name: t for t in shape.tensors}
        return sum(self.quantize_weights(n_values(by_name[n].shape), quantize_kind(ty)) for n, ty in types.items())

    def quantize_weights(self, weights: float, kind: str = "K") -> float:
        """Seconds to quantize `weights` values of one kind of type (pipeline.cost.estimate.quantize_kind)."""
        return weights / self.rates.quantize_weights_per_s[kind] / self._x("quantize")

    def roundtrip(self, weights: float, type_name: str) -> float:
        """ggml_quantize_chunk in memory (and back, for weight errors) of `weights` in a type:
        its measured rate; a type not measured at the slowest measured (the i-quants' grids)."""
        rates = self.rates.roundtrip_weights_per_s
        t = type_name.upper()
        rate = rates.get(t) or (rates.get("Q8_0") if t in ("F16", "BF16", "F32") else None) or min(rates.values())
        return weights / rate / self._x("quantize")

    def write(self, n_bytes: float) -> float:
        return n_bytes / self.rates.write_bytes_per_s

    def dense(self, flops: float) -> float:
        """numpy's float64 matrix products, at the threads it was measured with."""
        return flops / self.rates.dense_flops

    def gptq_columns(self, values: float) -> float:
        return values * self.rates.gptq_s_per_value

    def dequantize(self, tensors) -> float:
        """Seconds for gguf-py to dequantize these tensors (types it was not measured on: the slowest)."""
        rates = self.rates.dequantize_values_per_s
        slowest = min(rates.values())
        return sum(n_values(t.shape) / rates.get(t.type or "F16", slowest) for t in tensors if t.shape)


# ---- what one step costs --------------------------------------------------------------------------
@dataclass
class StepCost:
    key: str
    stage: str
    seconds: float
    writes: dict = field(default_factory=dict)  # output path -> predicted bytes
    memory_bytes: int = 0  # peak resident memory (host)
    gpu_memory_bytes: int = 0  # with --gpu: weights and KV cache on the device
    note: str = ""

    @property
    def bytes_written(self) -> int:
        return sum(self.writes.values())


def kv_cache_bytes(shape: Shape, n_tokens: int, n_layers: int | None = None) -> int:
    """K and V in F16 for every layer and cached token."""
    return 2 * 2 * (n_layers or shape.n_layers) * shape.kv_dim * n_tokens


def logits_bytes(n_outputs: int, n_vocab: int) -> int:
    return 4 * n_outputs * n_vocab


# llama.cpp's contexts evaluate in micro-batches of this many tokens (pipeline.engine.context)
N_UBATCH = 512


def compute_buffer_bytes(shape: Shape, n_tokens: int) -> int:
    """The compute buffer llama.cpp reserves for a context: the worst-case graph of one
    micro-batch, whose largest tensor is the output layer's logits (n_ubatch x n_vocab in F32;
    512 MiB at Gemma 3's 262,144 tokens, as its load report says), beside the activations of the
    widest layer. Reserved when the context is made, whatever the outputs asked for later."""
    n = min(N_UBATCH, max(n_tokens, 1))
    activations = 4 * n * 16 * shape.n_embd  # a few residual-width and FFN-width tensors live at once
    return logits_bytes(n, shape.n_vocab) + activations
