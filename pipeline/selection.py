"""Turn a variant's type rules into one exact type per tensor.

Rules are written against the *original* model's tensor names (the layer numbers a user sees in
the statistics tables). llama.cpp applies `--tensor-type` patterns to the names *after* pruning
renumbers the layers, so a rule like `blk\\.17\\.ffn_down` would silently hit another layer or
nothing. squeeze therefore resolves every rule itself and hands llama.cpp one anchored pattern
per tensor under its final name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline import ggml_types
from pipeline.errors import SqueezeError
from pipeline.model_info import BLOCK_RE, ModelInfo, layer_of

TOKEN_EMBD = "token_embd.weight"
OUTPUT = "output.weight"


@dataclass(frozen=True)
class Choice:
    tensor: str  # original name
    type: str
    why: str  # the rule or option that chose it


def resolve_types(recipe, variant, info: ModelInfo) -> dict[str, Choice]:
    """Explicit types for the tensors the recipe names (others follow the variant's ftype)."""
    w = recipe.where
    rules = [(("variants", variant.name, "rules", i), r) for i, r in enumerate(variant.rules)] + [
        (("select", "rules", i), r) for i, r in enumerate(recipe.select.rules)]
    compiled = [(path, r, re.compile(r.pattern)) for path, r in rules]
    chosen: dict[str, Choice] = {}
    for t in info.quantizable():
        for path, rule, rx in compiled:
            if rx.search(t.name):
                _check_fits(t, rule.type, w(*path, "type"))
                chosen[t.name] = Choice(t.name, rule.type.upper(), f"rule '{rule.pattern}' ({_dot(path)})")
                break
    for name, key in ((TOKEN_EMBD, "token_embedding_type"), (OUTPUT, "output_type")):
        qtype = getattr(variant, key) or getattr(recipe.select, key)
        tensor = next((t for t in info.tensors if t.name == name), None)
        if qtype and tensor is not None:
            where = ("variants", variant.name, key) if getattr(variant, key) else ("select", key)
            _check_fits(tensor, qtype, w(*where))
            chosen[name] = Choice(name, qtype.upper(), _dot(where))
    return chosen


def _dot(path) -> str:
    from pipeline.yaml_source import dotted

    return dotted(path)


def _check_fits(tensor, qtype: str, where: str) -> None:
    t = ggml_types.tensor_type(qtype, where)
    if tensor.shape is None:
        return
    bs = ggml_types.block_size(t)
    if tensor.shape[0] % bs:
        raise SqueezeError(f"{where}{t.name} packs rows in blocks of {bs} but {tensor.name} has rows of "
                           f"{tensor.shape[0]}; choose a type with a block size dividing {tensor.shape[0]} "
                           f"(e.g. Q8_0, Q5_0, Q4_0, IQ4_NL) or narrow the pattern")


def renumbered(name: str, prune: tuple[int, ...]) -> str | None:
    """The tensor's name once `prune` is removed and later layers move up; None if pruned."""
    layer = layer_of(name)
    if layer is None or not prune:
        return name
    if layer in prune:
        return None
    new = layer - sum(1 for p in prune if p < layer)
    return BLOCK_RE.sub(f"blk.{new}.", name, count=1)


def overrides_for_llama(choices: dict[str, Choice], prune: tuple[int, ...]) -> list[tuple[str, str]]:
    """(anchored regex on the final name, type) pairs for llama_model_tensor_override.

    token_embd/output go through their own quantize params, not through overrides."""
    out = []
    for name, c in choices.items():
        if name in (TOKEN_EMBD, OUTPUT):
            continue
        final = renumbered(name, prune)
        if final is not None:
            out.append(("^" + re.escape(final) + "$", c.type))
    return out


def tensor_type_file_lines(choices: dict[str, Choice], prune: tuple[int, ...]) -> list[str]:
    """The same choices as `llama-quantize --tensor-type-file` reads them (name=type per line).

    The CLI lowercases the pattern and searches it unanchored; exact names with escaped dots keep
    that equivalent for these tensors."""
    lines = []
    for name, c in choices.items():
        final = renumbered(name, prune)
        if final is not None:
            lines.append(f"^{re.escape(final)}$={c.type.lower()}")
    return lines
