"""Stage imatrix: the importance matrix (and per-layer similarity) from one calibration pass
(pipeline.measure.calibration).

When the recipe names an existing imatrix file (`calibration.imatrix`), that file is used as is
and no pass runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.engine.backend import engine_versions
from pipeline.errors import SqueezeError
from pipeline.formats.imatrix_file import write_imatrix
from pipeline.formats.layers_csv import write_layers_csv
from pipeline.measure.calibration import calibration_tokens, collect, layer_rows, to_imatrix
from pipeline.run.layout import RunContext
from pipeline.run.runner import Step
from pipeline.sources.datasets import resolve_dataset


def imatrix_input(ctx: RunContext) -> Path | None:
    """The imatrix file variants are quantized with, or None when the recipe has no calibration."""
    cal = ctx.recipe.calibration
    if cal is None:
        return None
    if cal.imatrix:
        return resolve_dataset(cal.imatrix, ctx.recipe_dir, ctx.recipe.where("calibration", "imatrix"))
    return ctx.imatrix_path


def calibration_writes_layers(ctx: RunContext) -> bool:
    """layers.csv comes from squeeze's own calibration pass only (not from a given imatrix)."""
    cal = ctx.recipe.calibration
    return cal is not None and not cal.imatrix


def calibration_files(ctx: RunContext) -> list[Path]:
    cal = ctx.recipe.calibration
    return [resolve_dataset(name, ctx.recipe_dir, ctx.recipe.where("calibration", "datasets", i))
            for i, name in enumerate(cal.datasets)]


def steps(ctx: RunContext) -> list[Step]:
    if not calibration_writes_layers(ctx):
        return []
    cal = ctx.recipe.calibration
    files = calibration_files(ctx)
    params = ctx.recipe.values("calibration.datasets", "calibration.ctx", "calibration.chunks")
    outputs = [ctx.imatrix_path, ctx.layers_path]
    return [Step("imatrix", "imatrix", params, [ctx.base_path, *files], outputs, lambda io: _calibrate(ctx, files, io),
                 versions=engine_versions(),
                 produces=f"imatrix.gguf + layers.csv ({cal.chunks} chunks of {cal.ctx} from "
                          f"{', '.join(cal.datasets)})")]


def _calibrate(ctx: RunContext, files: list[Path], io) -> dict:
    cal = ctx.recipe.calibration
    tokens = calibration_tokens(ctx.base_path, files)
    available = len(tokens) // cal.ctx
    if available < 1:
        raise SqueezeError(f"{ctx.recipe.where('calibration', 'datasets')}{', '.join(map(str, cal.datasets))} "
                           f"tokenize to {len(tokens)} tokens, fewer than one chunk of calibration.ctx = "
                           f"{cal.ctx}; give more text or a smaller ctx")
    n_chunks = min(cal.chunks, available)
    if n_chunks < cal.chunks:
        print(f"imatrix: the calibration text has {available} chunks of {cal.ctx} tokens, "
              f"not calibration.chunks = {cal.chunks}; using {available}", file=sys.stderr)
    checkpoint = ctx.folder / "imatrix.checkpoint.npz"
    totals, extra = collect(ctx.base_path, tokens, cal.ctx, n_chunks, threads=ctx.threads, checkpoint=checkpoint,
                            n_gpu_layers=ctx.recipe.model.n_gpu_layers)
    write_imatrix(io.out(ctx.imatrix_path), to_imatrix(totals, cal.ctx, list(cal.datasets)))
    write_layers_csv(io.out(ctx.layers_path), layer_rows(totals))
    checkpoint.unlink(missing_ok=True)
    return extra
