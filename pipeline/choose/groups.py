"""The units a sensitivity is measured for, and the types a probe and the allocator use.

A group is what one KLD probe changes as a whole: a layer's attention tensors, a layer's MLP
tensors, or the token embedding. The low type of a probe is Q2_K, or for rows whose length is
not a multiple of 256 (K-quants' block) the smallest 32-block type.
"""

from __future__ import annotations

from pipeline.formats.ggml_types import fits
from pipeline.formats.model_info import ModelInfo
from pipeline.formats.tensor_names import ATTN_KINDS, FFN_KINDS, TOKEN_EMBD, kind_of, layer_of, parse

LOW_TYPE = "Q2_K"
LOW_FALLBACK = "Q4_0"
# Types whose per-tensor error is measured (and that pipeline.choose.allocate may choose from).
# The i-quants between 2 and 3.5 bits give rows of 256 a finer ladder than Q2_K -> Q3_K -> Q4_K.
CANDIDATE_TYPES = ("IQ2_S", "Q2_K", "IQ3_XXS", "IQ3_S", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "IQ4_NL", "Q4_1",
                   "Q5_0", "Q5_1", "Q8_0")


def group_of(name: str) -> str | None:
    """'token_embd', '<layer>.attn' or '<layer>.mlp': the unit a KLD is measured for. An MoE
    layer's routed and shared experts are its MLP; its router is never quantized."""
    if name == TOKEN_EMBD:
        return "token_embd"
    n = parse(name)
    if n.layer is None:
        return None
    if n.kind in ATTN_KINDS:
        return f"{n.layer}.attn"
    if n.kind in FFN_KINDS:
        return f"{n.layer}.mlp"
    return None


def low_type_for(shape, low: str = LOW_TYPE, fallback: str = LOW_FALLBACK) -> str:
    return low if fits(shape, low) else fallback


def low_types(info: ModelInfo, layer: int, kinds) -> dict[str, str]:
    return {t.name: low_type_for(t.shape) for t in info.quantizable()
            if layer_of(t.name) == layer and kind_of(t.name) in kinds}


# What one probe changes in the base: a layer removed, or a group of tensors at the low type.
LAYER_PROBES = ("removed", "attn", "mlp")
EMBEDDING = (None, "token_embd")  # the probe of the token embedding at the low type
KIND_PREFIX = "kind:"  # (None, "kind:ffn_down"): that kind at the low type in every layer


def kind_units(info: ModelInfo) -> list[tuple[None, str]]:
    """One probe per tensor kind of the blocks' attention and MLP (attn_q ... ffn_down, and an
    MoE's ffn_*_exps and ffn_*_shexp): how much KLD a unit of that kind's weight error loses,
    compared across kinds, so routed experts, shared experts and attention each get their own."""
    present = {kind_of(t.name) for t in info.quantizable() if layer_of(t.name) is not None}
    return [(None, KIND_PREFIX + k) for k in ATTN_KINDS + FFN_KINDS if k in present]


def probe_types(info: ModelInfo, unit: tuple[int | None, str]) -> dict[str, str]:
    """The tensors a probe quantizes (name -> type); empty for a layer removed."""
    layer, what = unit
    if what.startswith(KIND_PREFIX):
        kind = what[len(KIND_PREFIX):]
        return {t.name: low_type_for(t.shape) for t in info.quantizable()
                if layer_of(t.name) is not None and kind_of(t.name) == kind}
    if what == "token_embd":
        return {t.name: low_type_for(t.shape) for t in info.quantizable() if t.name == TOKEN_EMBD}
    if what == "removed":
        return {}
    return low_types(info, layer, ATTN_KINDS if what == "attn" else FFN_KINDS)
