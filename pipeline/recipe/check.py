"""The recipe checks that need the model's tensors: every rule matches a tensor, every type fits
the rows it is given, every pruned layer exists. `squeeze plan` runs them before any work."""

from __future__ import annotations

from pipeline.errors import SqueezeError
from pipeline.formats.model_info import ModelInfo
from pipeline.formats.prune import check_prune_set
from pipeline.recipe.rules import resolve_types
from pipeline.recipe.schema import Recipe


def info_type(info: ModelInfo, name: str) -> str:
    return next((t.type for t in info.tensors if t.name == name), None) or "its type"


def check_recipe_against_model(recipe: Recipe, info: ModelInfo) -> None:
    """Rules must match a tensor, types must fit its rows, prune layers must exist."""
    w = recipe.where
    if recipe.model.layers is not None and info.n_layers and recipe.model.layers != info.n_layers:
        raise SqueezeError(f"{w('model', 'layers')}recipe says {recipe.model.layers} layers, "
                           f"the model has {info.n_layers}")
    names = [t.name for t in info.quantizable()]
    rule_sets = [(("select", "rules"), recipe.select.rules)] + [
        (("variants", v.name, "rules"), v.rules) for v in recipe.variants]
    for path, rules in rule_sets:
        for i, rule in enumerate(rules):
            if not any(rule.regex.search(n) for n in names):
                kept = [t.name for t in info.tensors if t.name not in names and rule.regex.search(t.name)
                        and len(t.shape or ()) >= 2]
                if kept:
                    raise SqueezeError(f"{w(*path, i, 'pattern')}'{rule.pattern}' matches only tensors llama.cpp "
                                       f"never quantizes (e.g. '{kept[0]}', kept at {info_type(info, kept[0])})")
                example = names[len(names) // 2] if names else "?"
                raise SqueezeError(f"{w(*path, i, 'pattern')}'{rule.pattern}' matches no tensor of the "
                                   f"{info.arch} model (names look like '{example}')")
    prune_sets = [(("select", "prune"), recipe.select.prune)] + [
        (("variants", v.name, "prune"), v.prune) for v in recipe.variants if v.prune is not None]
    for path, layers in prune_sets:
        check_prune_set(layers, info.n_layers, w(*path), lambda i, path=path: w(*path, i))
    for v in recipe.plans:
        resolve_types(v, info)  # raises on a type that cannot hold a tensor's rows
