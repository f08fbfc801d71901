"""Stale results are never shown as current: `card`, `compare` and `report` check the run's status
first, refuse in one line naming the stale steps, and with --allow-stale mark what is stale.

The sequence is the one a user hit: run, change a variant's prune list and run, put the old list
back without running. The recipe now says one thing and the scores another.
"""

from __future__ import annotations

import textwrap

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.report.tables import STALE_MARK
from tests.tiny_gemma import build_tiny_gemma3, calibration_text

RECIPE = """\
    model: {{source: {hf}, base_type: F16}}
    variants:
      Q4_0: Q4_0
      Q4_0-pruned: {{ftype: Q4_0, prune: {prune}}}
    score: {{ctx: 128, chunks: 2}}
    report: {{title: Tiny stale test}}
    """


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def edited_run(tmp_path_factory):
    """Run with prune [2, 4], run again with [1, 4], then put [2, 4] back without running."""
    folder = tmp_path_factory.mktemp("stale")
    hf = build_tiny_gemma3(folder / "tiny-gemma3", calibration_text(), n_layers=6)
    recipe, results = folder / "tiny.yaml", folder / "results"
    for prune in ("[2, 4]", "[1, 4]"):
        recipe.write_text(textwrap.dedent(RECIPE.format(hf=hf, prune=prune)))
        done = invoke("run", recipe, "--results", results)
        assert done.exit_code == 0, done.output
    recipe.write_text(textwrap.dedent(RECIPE.format(hf=hf, prune="[2, 4]")))
    return recipe, results


def test_status_calls_the_variant_stale(edited_run):
    recipe, results = edited_run
    out = invoke("status", recipe, "--results", results).output
    assert "quantize Q4_0-pruned" in out and "stale (variants.Q4_0-pruned.prune changed)" in out


@pytest.mark.parametrize("command", ["card", "report"])
def test_card_and_report_refuse_stale_results_in_one_line(edited_run, command):
    recipe, results = edited_run
    r = invoke(command, recipe, "--results", results)
    assert r.exit_code == 1
    assert r.output.count("\n") == 1
    assert r.output.startswith(f"Error: {command}: the results in {results} are not current: ")
    assert "quantize Q4_0-pruned (variants.Q4_0-pruned.prune changed)" in r.output
    assert r.output.endswith(f"run `squeeze run {recipe}` first, or pass --allow-stale to mark them as stale\n")
    assert not (results / "README.md").exists()


def test_compare_refuses_a_stale_folder_through_the_recipe_it_records(edited_run):
    _, results = edited_run
    r = invoke("compare", results)
    assert r.exit_code == 1
    assert r.output.startswith(f"Error: compare: the results in {results} are not current: ")


def test_allow_stale_card_warns_and_marks_the_rows(edited_run, tmp_path):
    recipe, results = edited_run
    out = tmp_path / "README.md"
    r = invoke("card", recipe, "--results", results, "-o", out, "--allow-stale")
    assert r.exit_code == 0, r.output
    assert r.output == f"model card: {out} (marked stale: Q4_0-pruned)\n"
    text = out.read_text()
    assert "> **Stale results.** The recipe changed after Q4_0-pruned was last scored" in text
    # The row shows what was measured (layers 1 and 4), and says it is stale.
    row = next(line for line in text.splitlines() if line.startswith(f"| Q4_0-pruned{STALE_MARK}"))
    assert "| 1 4 " in row
    assert f"| Q4_0{STALE_MARK}" not in text and "| Q4_0 " in text  # the current variant is not marked


def test_allow_stale_compare_and_report_mark_the_rows(edited_run):
    recipe, results = edited_run
    r = invoke("compare", results, "--allow-stale")
    assert r.exit_code == 0, r.output
    variants = [line.split("|")[1].strip() for line in r.output.splitlines()[2:]]
    assert variants == ["Q4_0 (reference)", f"Q4_0-pruned{STALE_MARK}"]
    r = invoke("report", recipe, "--results", results, "--allow-stale")
    assert r.exit_code == 0, r.output
    assert "> **Stale results.**" in r.output and f"| Q4_0-pruned{STALE_MARK} " in r.output


def test_a_folder_without_a_recorded_recipe_cannot_be_vouched_for(edited_run, tmp_path):
    _, results = edited_run
    copy = tmp_path / "copied"
    copy.mkdir()
    (copy / "scores").symlink_to(results / "scores")
    r = invoke("compare", copy)
    assert r.exit_code == 1
    assert r.output == (f"Error: compare: cannot tell whether {copy} is current: it records no recipe "
                        "(or the recipe is gone); name the recipe instead, or pass --allow-stale\n")
    r = invoke("compare", copy, "--allow-stale")
    assert r.exit_code == 0 and f"Q4_0-pruned{STALE_MARK}" in r.output and f"Q4_0{STALE_MARK} (reference)" in r.output


def test_after_running_again_nothing_is_marked(edited_run, tmp_path):
    recipe, results = edited_run
    assert invoke("run", recipe, "--results", results).exit_code == 0
    out = tmp_path / "README.md"
    r = invoke("card", recipe, "--results", results, "-o", out)
    assert r.output == f"model card: {out}\n"
    assert STALE_MARK not in out.read_text() and "Stale results" not in out.read_text()
    r = invoke("compare", results)
    assert r.exit_code == 0 and STALE_MARK not in r.output
