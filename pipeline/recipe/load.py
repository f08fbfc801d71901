"""Recipes: YAML in, frozen dataclasses out (pipeline.recipe.schema), every mistake rejected
before any work starts.

`extends: other.yaml` inherits another recipe; mappings merge key by key and lists are replaced
whole. Errors read `recipes/x.yaml:12: select.rules[0].type: unknown tensor type 'Q4_KK'; did
you mean 'Q4_K'?` -- file, line, key, what was expected.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
import warnings
from pathlib import Path

import yaml

from pipeline.errors import SqueezeError, did_you_mean
from pipeline.formats import ggml_types
from pipeline.formats.ggml_types import KV_CACHE_TYPES
from pipeline.formats.score_table import read_score_table
from pipeline.formats.task_data import check_benchmark
from pipeline.recipe.plan import FILE_BUDGETS, KldBudget, MemoryBudget, UpToPrune, plan_variants
from pipeline.recipe.schema import (BUDGET_KEYS, NOT_KEYS, SCHEMA_VERSION, Recipe, SelectSpec, TypeRule, VariantSpec,
                                    plain)
from pipeline.recipe.yaml_source import Located, dotted, load_yaml, merge
from pipeline.units import parse_size

# Keys that hold the recipe's structure, not values; `extends` is resolved while loading.
_RESERVED = {"extends"}


def load_recipe(path: str | Path) -> Recipe:
    """Load, merge `extends:`, convert and validate a recipe (everything but model-dependent checks)."""
    path = Path(path)
    if not path.is_file():
        raise SqueezeError(f"{path}: recipe file not found")
    doc = _load_with_extends(path, seen=())
    if not isinstance(doc.value, dict):
        raise SqueezeError(f"{path}:1: a recipe is a mapping of sections (model, variants, ...)")
    value = {k: v for k, v in doc.value.items() if k not in _RESERVED}
    value.setdefault("name", path.stem)
    recipe = _build(Recipe, value, (), doc, path)
    recipe = dataclasses.replace(recipe, path=str(path), locations=doc.where)
    recipe = dataclasses.replace(recipe, plans=plan_variants(recipe))
    validate(recipe)
    return recipe


def _load_with_extends(path: Path, seen: tuple) -> Located:
    if path.resolve() in seen:
        raise SqueezeError(f"{path}: `extends` loops back to itself")
    doc = load_yaml(path)
    parent = doc.value.get("extends") if isinstance(doc.value, dict) else None
    if parent is None:
        return doc
    if not isinstance(parent, str):
        f, line = doc.where[("extends",)]
        raise SqueezeError(f"{f}:{line}: extends: expected a recipe file name")
    parent_path = (path.parent / parent) if not Path(parent).is_absolute() else Path(parent)
    if not parent_path.is_file() and parent_path.suffix == "":
        parent_path = parent_path.with_suffix(".yaml")
    if not parent_path.is_file():
        f, line = doc.where[("extends",)]
        raise SqueezeError(f"{f}:{line}: extends: recipe '{parent}' not found (looked for {parent_path})")
    return merge(_load_with_extends(parent_path, seen + (path.resolve(),)), doc)


def _fail(doc: Located, path: tuple, message: str, fallback: Path) -> typing.NoReturn:
    loc = doc.line_of(path)
    prefix = f"{loc[0]}:{loc[1]}" if loc else str(fallback)
    raise SqueezeError(f"{prefix}: {dotted(path)}: {message}")


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is tuple:
        item = _type_name(typing.get_args(tp)[0]).removeprefix("an ").removeprefix("a ")
        return f"a list of {item}s"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, str(tp))


def _build(tp, value, path: tuple, doc: Located, fpath: Path):
    """Convert a YAML value to `tp`, naming the key and what was expected when it does not fit."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _build(args[0], value, path, doc, fpath)
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, list):
            _fail(doc, path, f"expected {_type_name(tp)}, got {value!r}", fpath)
        return tuple(_build(item_tp, v, path + (i,), doc, fpath) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path, doc, fpath)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(doc, path, f"expected true or false, got {value!r}", fpath)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(doc, path, f"expected an integer, got {value!r}", fpath)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(doc, path, f"expected a number, got {value!r}", fpath)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(doc, path, f"expected a string, got {value!r}", fpath)
        return value
    raise TypeError(f"unsupported recipe field type {tp}")


def _build_dataclass(tp, value, path, doc, fpath):
    if tp is TypeRule and isinstance(value, dict) and len(value) == 1 and "pattern" not in value:
        # short form: `- attn_v: Q6_K`
        (pattern, qtype), = value.items()
        value = {"pattern": pattern, "type": qtype}
    if not isinstance(value, dict):
        _fail(doc, path, f"expected a mapping, got {value!r}", fpath)
    if tp in (SelectSpec, VariantSpec) and (isinstance(value.get("prune"), dict) or value.get("prune") == "auto"):
        value = _prune_search_form(value, path, doc, fpath)
    hints = typing.get_type_hints(tp)
    fields = {f.name: f for f in dataclasses.fields(tp) if f.name not in NOT_KEYS}
    if tp is VariantSpec:
        fields.pop("name")
    for key in value:
        if key not in fields:
            _fail(doc, path + (key,), f"unknown key{did_you_mean(key, fields)}"
                  f" (expected one of: {', '.join(fields)})", fpath)
    kwargs = {}
    for name, f in fields.items():
        if name not in value:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                _fail(doc, path, f"missing required key '{name}'", fpath)
            continue
        if tp is Recipe and name == "variants":
            kwargs[name] = _build_variants(value[name], path + (name,), doc, fpath)
        else:
            kwargs[name] = _build(hints[name], value[name], path + (name,), doc, fpath)
    return tp(**kwargs)


# `prune: auto`: remove at most this many layers, where that beats spending the bytes on bits
PRUNE_AUTO_UP_TO = 2


def _prune_search_form(value: dict, path, doc, fpath) -> dict:
    """`prune: {auto: K}` -> prune_auto: K (K layers picked by measured KLD); `prune: {up_to: K}`
    or `prune: auto` -> prune_up_to: K (0 to K layers, against spending the bytes on bits)."""
    spec = value["prune"]
    if spec == "auto":
        spec = {"up_to": PRUNE_AUTO_UP_TO}
    keys = list(spec)
    for key in keys:
        if key not in ("auto", "up_to"):
            _fail(doc, path + ("prune", key), "unknown key; expected `prune: {auto: K}` (K layers picked "
                  "automatically), `prune: {up_to: K}` or `prune: auto` (at most K layers, where that beats "
                  "spending the bytes on bits) or a list of layer numbers", fpath)
    if len(keys) != 1:
        _fail(doc, path + ("prune",), "give one of `auto: K` and `up_to: K`, not both", fpath)
    key = keys[0]
    k = spec[key]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        _fail(doc, path + ("prune", key), f"expected a number of layers of at least 1, got {k!r}", fpath)
    field_name = "prune_auto" if key == "auto" else "prune_up_to"
    if field_name in value:
        _fail(doc, path + ("prune",), f"give either `prune: {{{key}: K}}` or `{field_name}`, not both", fpath)
    out = {k_: v for k_, v in value.items() if k_ != "prune"}
    out[field_name] = k
    return out


def _build_variants(value, path, doc, fpath):
    if not isinstance(value, dict) or not value:
        _fail(doc, path, "expected a mapping of variant names to {ftype: ..., ...}", fpath)
    out = []
    for name, spec in value.items():
        if isinstance(spec, str):  # short form: `Q4_K_M: Q4_K_M`
            spec = {"ftype": spec}
        v = _build(VariantSpec, spec, path + (name,), doc, fpath)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", str(name)):
            _fail(doc, path + (name,), "variant names may hold letters, digits and _ . + - only", fpath)
        out.append(dataclasses.replace(v, name=str(name)))
    return tuple(out)


def validate(recipe: Recipe) -> None:
    """Checks that need only the recipe: types, regexes, layer lists, references."""
    w = recipe.where
    if recipe.version != SCHEMA_VERSION:
        raise SqueezeError(f"{w('version')}unsupported recipe version {recipe.version} (this squeeze reads {SCHEMA_VERSION})")
    if recipe.model.base_type.upper() not in ggml_types.BASE_TYPES:
        raise SqueezeError(f"{w('model', 'base_type')}expected one of {', '.join(ggml_types.BASE_TYPES)}, "
                           f"got '{recipe.model.base_type}'{did_you_mean(recipe.model.base_type, ggml_types.BASE_TYPES)}")
    if recipe.model.layers is not None and recipe.model.layers < 1:
        raise SqueezeError(f"{w('model', 'layers')}expected a positive layer count")
    if recipe.model.n_gpu_layers < -1:
        raise SqueezeError(f"{w('model', 'n_gpu_layers')}expected a layer count, or -1 for all layers, "
                           f"got {recipe.model.n_gpu_layers}")
    for section, spec in (("calibration", recipe.calibration), ("score", recipe.score)):
        if spec is None:
            continue
        if spec.ctx < 8:
            raise SqueezeError(f"{w(section, 'ctx')}expected a context of at least 8 tokens, got {spec.ctx}")
        if spec.chunks < 1:
            raise SqueezeError(f"{w(section, 'chunks')}expected at least 1 chunk, got {spec.chunks}")
    _check_rules(recipe.select.rules, ("select", "rules"), w)
    for key in ("output_type", "token_embedding_type"):
        if getattr(recipe.select, key):
            ggml_types.tensor_type(getattr(recipe.select, key), w("select", key))
    _check_prune(recipe.select.prune, ("select", "prune"), w)
    _check_budget(recipe.select, ("select",), w)
    names = set()
    for v in recipe.variants:
        base = ("variants", v.name)
        ggml_types.file_type(v.ftype, w(*base, "ftype"))
        _check_rules(v.rules, base + ("rules",), w)
        for key in ("output_type", "token_embedding_type"):
            if getattr(v, key):
                ggml_types.tensor_type(getattr(v, key), w(*base, key))
        if v.prune is not None:
            _check_prune(v.prune, base + ("prune",), w)
        _check_budget(v, base, w)
        _check_prune_budget(recipe.variant(v.name))
        _check_rounding(recipe, recipe.variant(v.name))
        names.add(v.name)
    _check_score(recipe.score, w)
    ref = recipe.report.reference
    if ref is not None and ref not in names:
        raise SqueezeError(f"{w('report', 'reference')}unknown variant '{ref}'{did_you_mean(ref, names)}")
    _check_published(recipe, w)


ROUNDINGS = {"llama.cpp": "its own rounding", "gptq": "error-compensated with the calibration text's input "
             "second moments"}


def _check_rounding(recipe: Recipe, plan) -> None:
    r = plan.rounding
    where = recipe.where(*r.key)
    if r.type not in ROUNDINGS:
        raise SqueezeError(f"{where}expected one of: " + ", ".join(f"{k} ({v})" for k, v in ROUNDINGS.items())
                           + f"; got {r.type!r}{did_you_mean(r.type, ROUNDINGS)}")
    if r.type == "llama.cpp":
        return
    cal = recipe.calibration
    if cal is None or cal.imatrix:
        raise SqueezeError(f"{where}gptq rounds with the second moments of squeeze's own calibration pass: give "
                           "variant " + plan.name + " a `calibration:` section with datasets (not an imatrix file)")


def _check_prune_budget(plan) -> None:
    """`prune: {up_to: K}` trades removed layers against bits at the same bytes: it needs a file budget."""
    prune, budget = plan.prune, plan.budget
    if not isinstance(prune, UpToPrune) or isinstance(budget, FILE_BUDGETS):
        return
    if isinstance(budget, (KldBudget, MemoryBudget)):
        raise SqueezeError(f"{prune.where}removing up to {prune.k} layers is weighed against bits "
                           f"at the same bytes, which {budget.key} does not fix: give variant {plan.name} a size "
                           "budget (target_bpw or target_size), or a prune list / prune: {auto: K}")
    raise SqueezeError(f"{prune.where}removing up to {prune.k} layers is weighed against "
                       f"spending the same bytes on bits, so variant {plan.name} needs a size budget "
                       "(target_bpw or target_size)")


def _check_published(recipe: Recipe, w) -> None:
    """The published table parses, and the base row it names is in it."""
    spec = recipe.report.published
    if spec is None:
        return
    path = recipe.beside(spec.table)
    if not path.is_file():
        raise SqueezeError(f"{w('report', 'published', 'table')}{path}: no such file (a Markdown or CSV table "
                           "of published figures)")
    rows = [r.variant for r in read_score_table(path)]
    if spec.base is not None and spec.base not in rows:
        raise SqueezeError(f"{w('report', 'published', 'base')}'{spec.base}' is not a row of {path}"
                           f"{did_you_mean(spec.base, rows)} (its rows: {', '.join(rows)})")


def _check_score(score, w):
    for i, name in enumerate(score.tasks.benchmarks):
        check_benchmark(name, w('score', 'tasks', 'benchmarks', i))
    for path, value, least in ((("tasks", "count"), score.tasks.count, 0), (("tasks", "ctx"), score.tasks.ctx, 16),
                               (("speed", "pp"), score.speed.pp, 1), (("speed", "tg"), score.speed.tg, 1),
                               (("speed", "repetitions"), score.speed.repetitions, 0),
                               (("drift", "tokens"), score.drift.tokens, 0)):
        if value < least:
            raise SqueezeError(f"{w('score', *path)}expected at least {least}, got {value}")
    if score.drift.prompts is not None and not score.drift.prompts.strip():
        raise SqueezeError(f"{w('score', 'drift', 'prompts')}expected the name of a prompts file, got an empty string")


def _check_rules(rules, path, w):
    for i, rule in enumerate(rules):
        try:
            with warnings.catch_warnings():  # "possible nested set" for '[[:alpha:]]': compiled (and cached) quietly
                warnings.simplefilter("ignore")
                rule.regex
        except (re.error, OverflowError) as exc:  # OverflowError: a repeat count like a{99999999999}
            raise SqueezeError(f"{w(*path, i, 'pattern')}invalid regex '{rule.pattern}': {exc}") from None
        except RecursionError:
            raise SqueezeError(f"{w(*path, i, 'pattern')}invalid regex: groups nested too deeply") from None
        ggml_types.tensor_type(rule.type, w(*path, i, "type"))


def _check_budget(spec, path, w):
    if spec.prune_auto is not None and spec.prune_auto < 1:
        raise SqueezeError(f"{w(*path, 'prune_auto')}expected a number of layers of at least 1, got {spec.prune_auto}")
    if spec.prune_up_to is not None and spec.prune_up_to < 1:
        raise SqueezeError(f"{w(*path, 'prune_up_to')}expected a number of layers of at least 1, got {spec.prune_up_to}")
    given = [k for k in BUDGET_KEYS if getattr(spec, k) is not None]
    if len(given) > 1:
        raise SqueezeError(f"{w(*path, given[1])}give one budget ({', '.join(BUDGET_KEYS[:-1])} or "
                           f"{BUDGET_KEYS[-1]}), not both {given[0]} and {given[1]}")
    if spec.target_kld is not None and not (isinstance(spec.target_kld, (int, float)) and 0 < spec.target_kld < 100):
        raise SqueezeError(f"{w(*path, 'target_kld')}expected a mean KLD above 0 (e.g. 0.05, in nats per token), "
                           f"got {spec.target_kld}")
    if spec.target_bpw is not None and not 0 < spec.target_bpw <= 32:
        raise SqueezeError(f"{w(*path, 'target_bpw')}expected bits per weight between 0 and 32, got {spec.target_bpw}")
    if getattr(spec, "refine_rounds", 0) < 0:
        raise SqueezeError(f"{w(*path, 'refine_rounds')}expected a number of rounds of at least 0, got {spec.refine_rounds}")
    if spec.target_size is not None:
        if parse_size(spec.target_size, w(*path, "target_size")) <= 0:
            raise SqueezeError(f"{w(*path, 'target_size')}expected a size above zero, got {spec.target_size!r}")
    if spec.target_memory is not None:
        _check_memory_target(spec.target_memory, path + ("target_memory",), w)


def _check_memory_target(t, path, w):
    if parse_size(t.memory, w(*path, "memory")) <= 0:
        raise SqueezeError(f"{w(*path, 'memory')}expected a size above zero, got {t.memory!r}")
    if not isinstance(t.ctx, int) or t.ctx < 1:
        raise SqueezeError(f"{w(*path, 'ctx')}expected a context of at least 1 token, got {t.ctx!r}")
    if str(t.kv_type).lower() not in KV_CACHE_TYPES:
        raise SqueezeError(f"{w(*path, 'kv_type')}unknown KV cache type {t.kv_type!r}; expected one of "
                           f"{', '.join(KV_CACHE_TYPES)}")
    margin = str(t.margin).strip()
    if margin.endswith("%"):
        try:
            share = float(margin[:-1])
        except ValueError:
            share = -1.0
        if not 0 <= share < 100:
            raise SqueezeError(f"{w(*path, 'margin')}expected a share from 0% to 99% or a size, got {t.margin!r}")
    elif parse_size(margin, w(*path, "margin")) < 0:
        raise SqueezeError(f"{w(*path, 'margin')}expected a share like '5%' or a size, got {t.margin!r}")


def _check_prune(layers, path, w):
    for i, layer in enumerate(layers):
        if layer < 0:
            raise SqueezeError(f"{w(*path, i)}layer {layer} is negative")
    if len(set(layers)) != len(layers):
        raise SqueezeError(f"{w(*path)}a layer is listed twice: {list(layers)}")


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML, `extends:` resolved, as `load_recipe` reads it back (`squeeze plan --dump`)."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def recipe_to_dict(recipe: Recipe) -> dict:
    out = plain(recipe)
    out["variants"] = {v.name: plain(v) for v in recipe.variants}
    return out
