"""The KLD probe the prune and sensitivity stages measure with: the base on a few chunks of the
calibration text (of the scoring text when the recipe has no calibration), and the recipe values
its result depends on."""

from __future__ import annotations

from pathlib import Path

from pipeline.fsutil import read_text
from pipeline.measure.sensitivity import KLDProbe
from pipeline.run.layout import RunContext
from pipeline.sources.datasets import resolve_dataset


def probe_params(ctx: RunContext) -> dict:
    if ctx.recipe.calibration is not None:
        return ctx.recipe.values("calibration.datasets", "calibration.ctx")
    return ctx.recipe.values("score.dataset", "score.ctx")


def probe_for(ctx: RunContext, chunks: int, cache: Path | None = None) -> KLDProbe:
    recipe = ctx.recipe
    cal = recipe.calibration
    if cal is not None and cal.datasets:
        path = resolve_dataset(cal.datasets[0], ctx.recipe_dir, recipe.where("calibration", "datasets", 0))
        n_ctx = cal.ctx
    else:
        path = resolve_dataset(recipe.score.dataset, ctx.recipe_dir, recipe.where("score", "dataset"))
        n_ctx = recipe.score.ctx
    return KLDProbe(ctx.base_path, read_text(path), n_ctx, chunks, ctx.threads, cache, recipe.model.n_gpu_layers)
