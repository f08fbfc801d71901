"""The one grammar of llama.cpp tensor names, built on gguf-py's name templates.

A block's tensors are `blk.<layer>.<kind>.<suffix>` (`blk.3.ffn_down.weight`), the others
`<kind>.<suffix>` (`token_embd.weight`, `output_norm.weight`). Everything that parses a name,
groups tensors by layer or kind, or renumbers layers after a prune does it here, so a type rule
written against layer 17 can never land on another layer because two copies disagreed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gguf

_T = gguf.MODEL_TENSOR


def _kind(t: gguf.MODEL_TENSOR) -> str:
    return gguf.TENSOR_NAMES[t].rsplit(".", 1)[-1]  # "blk.{bid}.attn_q" -> "attn_q"


BLOCK_PREFIX = re.compile(r"^blk\.(\d+)\.")
TOKEN_EMBD = gguf.TENSOR_NAMES[_T.TOKEN_EMBD] + ".weight"
OUTPUT = gguf.TENSOR_NAMES[_T.OUTPUT] + ".weight"
# The kinds a layer's attention and MLP are made of (pruning probes, per-group sensitivities).
ATTN_KINDS = tuple(_kind(t) for t in (_T.ATTN_Q, _T.ATTN_K, _T.ATTN_V, _T.ATTN_OUT))
MLP_KINDS = tuple(_kind(t) for t in (_T.FFN_GATE, _T.FFN_UP, _T.FFN_DOWN))
# A mixture-of-experts layer's MLP: the routed experts (one 3-D tensor per kind, an expert per
# slice; 80-95 % of an MoE's bytes) and the shared experts every token goes through. Each is a
# kind of its own, with its own measured gain (pipeline.choose.groups.kind_units).
EXPERT_KINDS = tuple(_kind(t) for t in (_T.FFN_GATE_EXP, _T.FFN_UP_EXP, _T.FFN_DOWN_EXP, _T.FFN_GATE_UP_EXP))
SHARED_EXPERT_KINDS = tuple(_kind(t) for t in (_T.FFN_GATE_SHEXP, _T.FFN_UP_SHEXP, _T.FFN_DOWN_SHEXP))
FFN_KINDS = MLP_KINDS + SHARED_EXPERT_KINDS + EXPERT_KINDS
# 2-D weights llama-quantize keeps at their type whatever it is asked (llama-quant.cpp): the
# router (ffn_gate_inp), positional and token-type embeddings, and small recurrent-state weights.
# A rule or an allocation never gives them a type llama.cpp would refuse or ignore.
NEVER_QUANTIZED_KINDS = tuple(_kind(getattr(_T, t)) for t in (
    "FFN_GATE_INP", "POS_EMBD", "TOKEN_TYPES", "SSM_CONV1D", "ATTN_REL_B", "TIME_MIX_FIRST", "TIME_MIX_W0",
    "TIME_MIX_W1", "TIME_MIX_W2", "TIME_MIX_DECAY_W1", "TIME_MIX_DECAY_W2", "TIME_MIX_LERP_FUSED")
    if hasattr(_T, t))
# The kinds that write a block's result into the residual stream: zeroed, the block adds nothing
# (a layer removed in memory, pipeline.choose.memory_probe).
RESIDUAL_OUT_KINDS = tuple(_kind(t) for t in (_T.ATTN_OUT, _T.FFN_DOWN, _T.FFN_DOWN_EXP, _T.FFN_DOWN_SHEXP))
# The order tensor families are shown in (statistics heatmaps); unknown kinds follow, sorted.
FAMILY_ORDER = tuple(_kind(t) for t in (_T.ATTN_Q, _T.ATTN_K, _T.ATTN_V, _T.ATTN_QKV, _T.ATTN_OUT, _T.FFN_GATE,
                                         _T.FFN_UP, _T.FFN_DOWN, _T.FFN_GATE_EXP, _T.FFN_UP_EXP, _T.FFN_DOWN_EXP))


@dataclass(frozen=True)
class TensorName:
    layer: int | None  # None outside the blocks
    kind: str  # "attn_q", "token_embd", ...
    suffix: str  # "weight", "bias", ... ("" when the name has none)


def parse(name: str) -> TensorName:
    m = BLOCK_PREFIX.match(name)
    rest = name[m.end():] if m else name
    kind, _, suffix = rest.partition(".")
    return TensorName(int(m.group(1)) if m else None, kind, suffix)


def layer_of(name: str) -> int | None:
    m = BLOCK_PREFIX.match(name)
    return int(m.group(1)) if m else None


def kind_of(name: str) -> str:
    return parse(name).kind


def residual_outputs(names, layers) -> list[str]:
    """The tensors among `names` of the blocks `layers` that write into the residual stream (what
    removing a layer in memory zeroes)."""
    layers = set(layers)
    return [n for n in names if layer_of(n) in layers and kind_of(n) in RESIDUAL_OUT_KINDS]


# Block weights that read one input (attention's q/k/v, the MLP's gate and up) share its second
# moment (pipeline.measure.calibration keys it by the first of them the graph reaches).
_SHARES_INPUT_WITH = {_kind(_T.ATTN_K): _kind(_T.ATTN_Q), _kind(_T.ATTN_V): _kind(_T.ATTN_Q),
                      _kind(_T.FFN_UP): _kind(_T.FFN_GATE), _kind(_T.FFN_UP_SHEXP): _kind(_T.FFN_GATE_SHEXP)}


def input_of(name: str) -> str | None:
    """The input a block weight reads, named after the first weight that reads it
    ("blk.3.attn_q" for blk.3.attn_v.weight); None outside the blocks."""
    p = parse(name)
    if p.layer is None:
        return None
    return f"blk.{p.layer}.{_SHARES_INPUT_WITH.get(p.kind, p.kind)}"


def with_layer(name: str, layer: int) -> str:
    """The same tensor in another block: `blk.3.ffn_down.weight` -> `blk.<layer>.ffn_down.weight`."""
    return BLOCK_PREFIX.sub(f"blk.{layer}.", name, count=1)


def sort_key(name: str) -> tuple:
    """Non-block tensors first, then by layer and kind."""
    n = parse(name)
    return (-1, name) if n.layer is None else (n.layer, n.kind)


def exact_pattern(name: str) -> str:
    """A regex matching exactly this name (llama.cpp searches tensor-type patterns unanchored)."""
    return "^" + re.escape(name) + "$"


# ---- renumbering after a prune ------------------------------------------------------------------

def new_layer(layer: int, drop) -> int | None:
    """A layer's number once the layers in `drop` (original numbers) are removed and later layers
    move up; None when it is dropped itself. llama.cpp renumbers the same way."""
    dropped = set(drop)
    return None if layer in dropped else layer - sum(1 for d in dropped if d < layer)


def renumber(name: str, drop) -> str | None:
    """The tensor's name under the new numbering; None when its layer is dropped."""
    layer = layer_of(name)
    if layer is None or not drop:
        return name
    new = new_layer(layer, drop)
    return None if new is None else with_layer(name, new)


def layer_map(n_layers: int, drop) -> dict[int, int]:
    """Original layer number -> new number, for the layers that stay."""
    return {i: new for i in range(n_layers) if (new := new_layer(i, drop)) is not None}
