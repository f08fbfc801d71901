"""From a recipe to the ordered list of steps a run executes (the run order, written out)."""

from __future__ import annotations

from pathlib import Path

from pipeline import convert, imatrix, prune, quantize, report, score, sensitivity, statistics
from pipeline.context import RunContext, results_root
from pipeline.errors import SqueezeError, did_you_mean
from pipeline.model_info import check_recipe_against_model
from pipeline.recipe import load_recipe
from pipeline.runner import STAGE_ORDER, Step

# One module per stage, in the order they run (STAGE_ORDER names them).
STAGE_MODULES = (convert, imatrix, statistics, sensitivity, prune, quantize, score, report)


def open_run(recipe_path: str | Path, results: str | Path | None = None, check_model: bool = True) -> RunContext:
    """Load and validate a recipe (against the model's tensors too) and locate its results."""
    recipe = load_recipe(recipe_path)
    folder = Path(results) if results else results_root() / recipe.name
    ctx = RunContext(recipe, folder)
    if check_model:
        check_recipe_against_model(recipe, ctx.model_info)
    return ctx


def build_steps(ctx: RunContext, variants: tuple[str, ...] = ()) -> list[Step]:
    steps = [s for module in STAGE_MODULES for s in module.steps(ctx)]
    keys = [s.key for s in steps]
    assert len(keys) == len(set(keys)), "step keys must be unique"
    if not variants:
        return steps
    known = {v.name for v in ctx.recipe.variants}
    for name in variants:
        if name not in known:
            raise SqueezeError(f"--variant: unknown variant '{name}'{did_you_mean(name, known)} "
                               f"(the recipe has: {', '.join(sorted(known))})")
    kept = [s for s in steps if s.variant is None or s.variant in variants]
    produced = {o for s in kept for o in s.outputs}
    # The report reads every variant's scores: keep it only if the others are already there.
    return [s for s in kept if s.stage != "report" or all(i in produced or i.exists() for i in s.inputs)]


def check_stage(name: str | None, option: str) -> None:
    if name is not None and name not in STAGE_ORDER:
        raise SqueezeError(f"{option}: unknown stage '{name}'{did_you_mean(name, STAGE_ORDER)} "
                           f"(stages: {', '.join(STAGE_ORDER)})")
