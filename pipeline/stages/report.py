"""Stage report: the score tables (CSV and scores.md) and the size/KLD plot from every variant's
scores (pipeline.report.tables). Every file the report reads is one of the step's inputs."""

from __future__ import annotations

from pipeline.report.tables import PLOT_FILE, TABLE_FILES, load_run, write_report
from pipeline.run.layout import BASE, RunContext
from pipeline.run.runner import Step


def steps(ctx: RunContext) -> list[Step]:
    recipe = ctx.recipe
    s = recipe.score
    names = [v.name for v in recipe.variants]
    inputs = [ctx.base_info_path] + [ctx.score_path(n) for n in names]
    if s.tasks.benchmarks and s.tasks.count > 0:
        inputs += [ctx.tasks_path(n) for n in [BASE] + names]
    if s.speed.repetitions > 0:
        inputs += [ctx.speed_path(n) for n in names]
    if s.drift.tokens > 0:
        inputs += [ctx.drift_path(n) for n in names]
    # the automatic choices the report links to
    inputs += [ctx.allocation_md_path(v.name) for v in recipe.variants if recipe.budget_for(v)]
    inputs += sorted({ctx.prune_choice_path(ctx.prune_tag(v)) for v in recipe.variants
                      if recipe.prune_auto_for(v) is not None})
    outputs = [ctx.report_path(f) for f in ("scores.csv", "scores.md", *TABLE_FILES, PLOT_FILE)]
    params = recipe.values("report.reference", "report.title")

    def action(io):
        tables = load_run(ctx.folder, names)
        write_report(ctx, tables, io.out)
        return {"variants": len(tables.scores)}

    return [Step("report", "report", params, inputs, outputs, action,
                 produces="scores.md + sizes/ppl-kld/kld-percentiles/tasks/speed/drift .csv, kld-vs-size.png")]
