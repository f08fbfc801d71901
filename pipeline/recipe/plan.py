"""One variant, resolved: what a recipe's variant and its `select` section mean together, as one
frozen object every stage, the report, the card and the estimate read.

A variant's own value replaces select's, key by key; the plan keeps which key each value came
from (`where`), so an error about it names the recipe file and line without a location string
being handed down the call chain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

from pipeline.recipe.schema import BUDGET_KEYS, MemoryTarget, Recipe, TypeRule, VariantSpec, plain
from pipeline.units import parse_size


# ---- budgets: what a variant's types are chosen for (at most one) -----------------------------
@dataclass(frozen=True, kw_only=True)
class Budget:
    key: ClassVar[str]  # the recipe key that sets it
    where: str = field(default="", compare=False)  # "file:line: variants.x.target_bpw: "

    @property
    def value(self):
        """The value as the recipe writes it."""
        raise NotImplementedError

    def text(self) -> str:
        """`4.5`, `180 MiB`, `0.05`, `8 GiB at ctx 8192 (f16 cache)`."""
        return f"{self.value}"


@dataclass(frozen=True, kw_only=True)
class BitsBudget(Budget):
    """`target_bpw`: the file's bits per weight."""

    key: ClassVar[str] = "target_bpw"
    bpw: float

    @property
    def value(self):
        return self.bpw


@dataclass(frozen=True, kw_only=True)
class SizeBudget(Budget):
    """`target_size`: the file's bytes ("180 MiB")."""

    key: ClassVar[str] = "target_size"
    size: str

    @property
    def value(self):
        return self.size

    @property
    def bytes(self) -> int:
        return parse_size(self.size, self.where)


@dataclass(frozen=True, kw_only=True)
class KldBudget(Budget):
    """`target_kld`: the smallest mix whose KLD measured in memory is at most this."""

    key: ClassVar[str] = "target_kld"
    kld: float

    @property
    def value(self):
        return self.kld


@dataclass(frozen=True, kw_only=True)
class MemoryBudget(Budget):
    """`target_memory`: the best mix that runs in this much memory at this context."""

    key: ClassVar[str] = "target_memory"
    memory: MemoryTarget

    @property
    def value(self):
        return self.memory

    def text(self) -> str:
        m = self.memory
        return f"{m.memory} at ctx {m.ctx} ({m.kv_type} cache)"


# Budgets that fix the file's bytes before any measurement: the ones removing layers can be
# weighed against (the bytes a removed layer frees go to bits).
FILE_BUDGETS = (BitsBudget, SizeBudget)
_BUDGETS = {b.key: b for b in (BitsBudget, SizeBudget, KldBudget, MemoryBudget)}
assert tuple(_BUDGETS) == BUDGET_KEYS


# ---- pruning: which layers a variant drops --------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Prune:
    where: str = field(default="", compare=False)
    searched: ClassVar[bool] = False  # chosen by the prune stage, not listed

    @property
    def listed(self) -> tuple[int, ...]:
        """The layers the recipe lists (none when the prune stage picks them)."""
        return ()


@dataclass(frozen=True, kw_only=True)
class ListedPrune(Prune):
    """`prune: [13, 15]` (or no prune at all: no layers)."""

    layers: tuple[int, ...] = ()

    @property
    def listed(self) -> tuple[int, ...]:
        return self.layers


@dataclass(frozen=True, kw_only=True)
class SearchedPrune(Prune):
    """Layers the prune stage picks, by measured KLD (pipeline.choose.prune_auto)."""

    searched: ClassVar[bool] = True
    k: int


@dataclass(frozen=True, kw_only=True)
class AutoPrune(SearchedPrune):
    """`prune: {auto: K}`: exactly K layers."""


@dataclass(frozen=True, kw_only=True)
class UpToPrune(SearchedPrune):
    """`prune: {up_to: K}` (`prune: auto`): 0 to K layers, whichever measures lower against
    spending the same bytes on bits (pipeline.choose.prune_or_bits)."""


# ---- the plan -----------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyedRule:
    """A type rule and the recipe key it was written under."""

    rule: TypeRule
    key: tuple  # ('variants', 'x', 'rules', 0) or ('select', 'rules', 2)


@dataclass(frozen=True)
class KeyedType:
    """An output or embedding type and the key it came from."""

    type: str
    key: tuple


@dataclass(frozen=True)
class VariantPlan:
    name: str
    ftype: str  # upper case
    imatrix: bool
    rules: tuple[KeyedRule, ...]  # the variant's own first: the first match wins
    output_type: KeyedType | None
    token_embedding_type: KeyedType | None
    prune: Prune
    budget: Budget | None
    refine_rounds: int  # measuring rounds of a budgeted choice (select.refine_rounds)
    rounding: KeyedType  # "llama.cpp" or "gptq", and the key that says so
    # the recipe values the variant's file is made from, named by their keys (the manifest's params)
    values: dict = field(compare=False, hash=False)
    locate: Callable[..., str] = field(compare=False, hash=False, repr=False)

    def where(self, *key) -> str:
        """'file:line: variants.<name>.<key>: ' for an error about one of the variant's own keys."""
        return self.locate("variants", self.name, *key)

    def type_of(self, which: str) -> str | None:
        """The output or token-embedding type the recipe fixes ('output_type', 'token_embedding_type')."""
        keyed = getattr(self, which)
        return keyed.type if keyed else None


def plan_variants(recipe: Recipe) -> tuple[VariantPlan, ...]:
    return tuple(plan_variant(recipe, v) for v in recipe.variants)


def plan_variant(recipe: Recipe, v: VariantSpec) -> VariantPlan:
    base = ("variants", v.name)
    rules = tuple(KeyedRule(r, base + ("rules", i)) for i, r in enumerate(v.rules)) + tuple(
        KeyedRule(r, ("select", "rules", i)) for i, r in enumerate(recipe.select.rules))
    keyed = {}
    for key in ("output_type", "token_embedding_type"):
        own, shared = getattr(v, key), getattr(recipe.select, key)
        keyed[key] = (KeyedType(own, base + (key,)) if own else
                      KeyedType(shared, ("select", key)) if shared else None)
    prune = _prune(recipe, v)
    budget = _budget(recipe, v)
    rounding = (KeyedType(v.rounding.lower(), base + ("rounding",)) if v.rounding is not None
                else KeyedType(recipe.select.rounding.lower(), ("select", "rounding")))
    return VariantPlan(name=v.name, ftype=v.ftype.upper(), imatrix=v.imatrix, rules=rules,
                       output_type=keyed["output_type"], token_embedding_type=keyed["token_embedding_type"],
                       prune=prune, budget=budget, refine_rounds=recipe.select.refine_rounds, rounding=rounding,
                       values=_values(recipe, v, prune, budget, keyed, rounding.type), locate=recipe.where)


def _prune(recipe: Recipe, v: VariantSpec) -> Prune:
    """The variant's own prune (a list, `auto: K` or `up_to: K`) replaces select's whole."""
    w, s = recipe.where, recipe.select
    own = v.prune is not None or v.prune_auto is not None or v.prune_up_to is not None
    spec, key = (v, ("variants", v.name)) if own else (s, ("select",))
    if spec.prune_auto is not None:
        return AutoPrune(k=spec.prune_auto, where=w(*key, "prune", "auto"))
    if spec.prune_up_to is not None:
        return UpToPrune(k=spec.prune_up_to, where=w(*key, "prune"))
    return ListedPrune(layers=tuple(sorted(set(spec.prune or ()))), where=w(*key, "prune"))


def _budget(recipe: Recipe, v: VariantSpec) -> Budget | None:
    """The variant's own budget replaces select's."""
    for spec, key in ((v, ("variants", v.name)), (recipe.select, ("select",))):
        for name, kind in _BUDGETS.items():
            value = getattr(spec, name)
            if value is not None:
                where = recipe.where(*key, name)
                if kind is BitsBudget:
                    return BitsBudget(bpw=float(value), where=where)
                if kind is SizeBudget:
                    return SizeBudget(size=value, where=where)
                if kind is KldBudget:
                    return KldBudget(kld=float(value), where=where)
                return MemoryBudget(memory=value, where=where)
    return None


def _values(recipe: Recipe, v: VariantSpec, prune: Prune, budget: Budget | None, keyed: dict, rounding: str) -> dict:
    """The values a variant's file is made from, each resolved and named by the key it came from,
    so changing select.prune reruns only the variants that inherit it."""
    name = f"variants.{v.name}"
    out = {f"{name}.ftype": v.ftype.upper(), f"{name}.rules": plain(v.rules),
           "select.rules": plain(recipe.select.rules),
           ("select.prune" if v.prune is None else f"{name}.prune"): list(prune.listed),
           f"{name}.output_type": keyed["output_type"].type if keyed["output_type"] else None,
           f"{name}.token_embedding_type": keyed["token_embedding_type"].type if keyed["token_embedding_type"] else None,
           f"{name}.imatrix": v.imatrix}
    if isinstance(prune, AutoPrune):
        out[f"{name}.prune_auto"] = prune.k
    if isinstance(prune, UpToPrune):
        out[f"{name}.prune_up_to"] = prune.k
    if budget is not None:
        out[f"{name}.{budget.key}"] = plain(budget.value)
    if rounding != "llama.cpp":  # only when asked: files made with llama.cpp's rounding stay up to date
        out[f"{name}.rounding"] = rounding
    return out
