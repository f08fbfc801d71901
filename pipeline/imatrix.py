"""Stage imatrix: the importance matrix (and per-layer similarity) from one calibration pass.

When the recipe names an existing imatrix file (`calibration.imatrix`), that file is used as is
and no pass runs.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.context import RunContext
from pipeline.datasets import resolve_dataset
from pipeline.engine import engine_versions
from pipeline.runner import Step


def imatrix_input(ctx: RunContext) -> Path | None:
    """The imatrix file variants are quantized with, or None when the recipe has no calibration."""
    cal = ctx.recipe.calibration
    if cal is None:
        return None
    if cal.imatrix:
        return resolve_dataset(cal.imatrix, Path(ctx.recipe.path).parent, ctx.recipe.where("calibration", "imatrix"))
    return ctx.imatrix_path


def calibration_files(ctx: RunContext) -> list[Path]:
    cal = ctx.recipe.calibration
    return [resolve_dataset(name, Path(ctx.recipe.path).parent, ctx.recipe.where("calibration", "datasets", i))
            for i, name in enumerate(cal.datasets)]


def steps(ctx: RunContext) -> list[Step]:
    cal = ctx.recipe.calibration
    if cal is None or cal.imatrix:
        return []
    files = calibration_files(ctx)
    params = {"calibration.datasets": list(cal.datasets), "calibration.ctx": cal.ctx,
              "calibration.chunks": cal.chunks}
    outputs = [ctx.imatrix_path, ctx.layers_path]

    def action(io):
        from pipeline.activations import run_calibration

        return run_calibration(ctx, files, io)

    return [Step("imatrix", "imatrix", params, [ctx.base_path, *files], outputs, action,
                 versions=engine_versions(),
                 produces=f"imatrix.gguf + layers.csv ({cal.chunks} chunks of {cal.ctx} from "
                          f"{', '.join(cal.datasets)})")]
