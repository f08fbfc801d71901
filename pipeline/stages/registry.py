"""The one list of stages, in the order they run, and from a recipe to the ordered steps of a run.

`--force STAGE` and `--from STAGE` name these stages; `squeeze plan` prints the steps they declare.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.engine.backend import check_offload
from pipeline.errors import SqueezeError, did_you_mean
from pipeline.recipe.check import check_recipe_against_model
from pipeline.recipe.load import load_recipe
from pipeline.run.layout import RunContext, results_root
from pipeline.run.runner import Step
from pipeline.stages import convert, imatrix, prune, quantize, report, score, sensitivity, statistics

# name -> the module whose steps(run) declares that stage's steps; every step's `stage` is its name.
STAGES = {
    "convert": convert,
    "imatrix": imatrix,
    "statistics": statistics,
    "sensitivity": sensitivity,
    "prune": prune,
    "quantize": quantize,
    "score": score,
    "report": report,
}
STAGE_ORDER = tuple(STAGES)


def open_run(recipe_path: str | Path, results: str | Path | None = None, check_model: bool = True,
             check_gpu: bool = True) -> RunContext:
    """Load and validate a recipe (against the model's tensors too) and locate its results.
    `check_gpu=False` (plan --estimate): a recipe that offloads is priced, not refused, on a
    build without a GPU backend; running it is refused."""
    recipe = load_recipe(recipe_path)
    folder = Path(results) if results else results_root() / recipe.name
    run = RunContext(recipe, folder)
    if check_gpu:
        check_offload(recipe.model.n_gpu_layers, recipe.where("model", "n_gpu_layers").rstrip(": "))
    if check_model:
        check_recipe_against_model(recipe, run.model_info)
    return run


def build_steps(run: RunContext, variants: tuple[str, ...] = ()) -> list[Step]:
    steps = []
    for name, module in STAGES.items():
        declared = module.steps(run)
        assert all(s.stage == name for s in declared), f"stage {name} declared a step of another stage"
        steps += declared
    keys = [s.key for s in steps]
    assert len(keys) == len(set(keys)), "step keys must be unique"
    if not variants:
        return steps
    known = {v.name for v in run.recipe.plans}
    for name in variants:
        if name not in known:
            raise SqueezeError(f"--variant: unknown variant '{name}'{did_you_mean(name, known)} "
                               f"(the recipe has: {', '.join(sorted(known))})")
    kept = [s for s in steps if s.variant is None or s.variant in variants]
    produced = {o for s in kept for o in s.outputs}
    # The report reads every variant's scores: keep it only if the others are already there.
    return [s for s in kept if s.stage != "report" or all(i in produced or i.exists() for i in s.inputs)]


def check_stage(name: str | None, option: str) -> None:
    if name is not None and name not in STAGES:
        raise SqueezeError(f"{option}: unknown stage '{name}'{did_you_mean(name, STAGE_ORDER)} "
                           f"(stages: {', '.join(STAGE_ORDER)})")
