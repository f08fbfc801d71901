"""Turn a variant's type rules into one exact type per tensor.

Rules are written against the *original* model's tensor names (the layer numbers a user sees in
the statistics tables). llama.cpp applies `--tensor-type` patterns to the names *after* pruning
renumbers the layers, so a rule like `blk\\.17\\.ffn_down` would silently hit another layer or
nothing. squeeze therefore resolves every rule itself and hands llama.cpp one anchored pattern
per tensor under its final name.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import SqueezeError
from pipeline.formats import ggml_types
from pipeline.formats.model_info import ModelInfo
from pipeline.formats.tensor_names import OUTPUT, TOKEN_EMBD, exact_pattern, renumber
from pipeline.recipe.plan import VariantPlan
from pipeline.recipe.yaml_source import dotted


@dataclass(frozen=True)
class Choice:
    tensor: str  # original name
    type: str
    why: str  # the rule or option that chose it


def resolve_types(variant: VariantPlan, info: ModelInfo) -> dict[str, Choice]:
    """Explicit types for the tensors the recipe names (others follow the variant's ftype)."""
    w = variant.locate
    compiled = [(r.key, r.rule, r.rule.regex) for r in variant.rules]
    chosen: dict[str, Choice] = {}
    for t in info.quantizable():
        for path, rule, rx in compiled:
            if rx.search(t.name):
                _check_fits(t, rule.type, w(*path, "type"))
                chosen[t.name] = Choice(t.name, rule.type.upper(), f"rule '{rule.pattern}' ({dotted(path)})")
                break
    for name, key in ((TOKEN_EMBD, "token_embedding_type"), (OUTPUT, "output_type")):
        keyed = getattr(variant, key)
        tensor = next((t for t in info.tensors if t.name == name), None)
        if keyed and tensor is not None:
            _check_fits(tensor, keyed.type, w(*keyed.key))
            chosen[name] = Choice(name, keyed.type.upper(), dotted(keyed.key))
    return chosen


def _check_fits(tensor, qtype: str, where: str) -> None:
    t = ggml_types.tensor_type(qtype, where)
    if not ggml_types.fits(tensor.shape, qtype):
        bs = ggml_types.block_size(t)
        raise SqueezeError(f"{where}{t.name} packs rows in blocks of {bs} but {tensor.name} has rows of "
                           f"{tensor.shape[0]}; choose a type with a block size dividing {tensor.shape[0]} "
                           f"(e.g. Q8_0, Q5_0, Q4_0, IQ4_NL) or narrow the pattern")


def overrides_for_llama(choices: dict[str, Choice], prune: tuple[int, ...]) -> list[tuple[str, str]]:
    """(anchored regex on the final name, type) pairs for llama_model_tensor_override.

    token_embd/output go through their own quantize params, not through overrides."""
    out = []
    for name, c in choices.items():
        if name in (TOKEN_EMBD, OUTPUT):
            continue
        final = renumber(name, prune)
        if final is not None:
            out.append((exact_pattern(final), c.type))
    return out


def tensor_type_file_lines(types: dict[str, str], prune: tuple[int, ...] = ()) -> list[str]:
    """Tensor types (original name -> type) as `llama-quantize --tensor-type-file` reads them
    (name=type per line), under the names they have once `prune` is removed.

    The CLI lowercases the pattern and searches it unanchored; exact names with escaped dots keep
    that equivalent for these tensors."""
    lines = []
    for name, qtype in types.items():
        final = renumber(name, prune)
        if final is not None:
            lines.append(f"{exact_pattern(final)}={qtype.lower()}")
    return lines
