"""The KLD probe the prune, sensitivity and quantize (allocation) stages measure with: the base
loaded once in memory, its distribution on a few chunks of the calibration text (of the scoring
text when the recipe has no calibration), and the recipe values its result depends on."""

from __future__ import annotations

from pathlib import Path

from pipeline.choose.gptq_rounding import GptqRounder
from pipeline.choose.memory_probe import MemoryProbe
from pipeline.engine.assemble import Rounder
from pipeline.engine.quantized_tensors import file_identity
from pipeline.formats.moments_file import read_moments
from pipeline.fsutil import read_text
from pipeline.recipe.plan import VariantPlan
from pipeline.run.layout import RunContext
from pipeline.sources.datasets import resolve_dataset


def probe_params(run: RunContext) -> dict:
    if run.recipe.calibration is not None:
        return run.recipe.values("calibration.datasets", "calibration.ctx")
    return run.recipe.values("score.dataset", "score.ctx")


def probe_text(run: RunContext) -> tuple[str, int]:
    """The text the probes measure on and its context length."""
    recipe = run.recipe
    cal = recipe.calibration
    if cal is not None and cal.datasets:
        path = resolve_dataset(cal.datasets[0], run.recipe_dir, recipe.where("calibration", "datasets", 0))
        return read_text(path), cal.ctx
    path = resolve_dataset(recipe.score.dataset, run.recipe_dir, recipe.where("score", "dataset"))
    return read_text(path), recipe.score.ctx


def probe_for(run: RunContext, chunks: int, cache: Path | None = None, imatrix: Path | None = None,
              rounder: Rounder | None = None) -> MemoryProbe:
    """A MemoryProbe of the run's base; `imatrix` is what its quantized tensors are made with, and
    `rounder` how they are rounded (None: llama.cpp's rounding). Every probe it measures goes to
    the run's memo, so no step measures a change twice. Close it when done (it holds the loaded
    model)."""
    text, n_ctx = probe_text(run)
    return MemoryProbe(run.base_path, text, n_ctx, chunks, run.threads, cache, run.recipe.model.n_gpu_layers, imatrix,
                       memo=run.probe_memo_path, rounder=rounder)


def rounder_for(run: RunContext, v: VariantPlan) -> Rounder | None:
    """How variant `v`'s tensors are rounded where llama.cpp's own rounding is not kept: with the
    calibration pass's second moments for `rounding: gptq`; None for llama.cpp's."""
    if v.rounding.type != "gptq":
        return None
    return GptqRounder(read_moments(run.moments_path), file_identity(run.moments_path))


def say_reuse(probe: MemoryProbe, step: str) -> None:
    """One log line: how many probes a step measured and how many an earlier step had."""
    if probe.reused:
        print(f"{step}: {probe.measured} probes measured, {probe.reused} reused from {probe.memo.path.name}")
