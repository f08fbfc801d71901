"""Stage report: the score tables (CSV and scores.md), the size/KLD plot and, when drift is
measured, the drift KLD-by-position plot from every variant's scores (pipeline.report.tables). Every file the report reads is one of the step's inputs."""

from __future__ import annotations

from pipeline.report.tables import (DRIFT_PLOT_FILE, PLOT_FILE, PUBLISHED_FILE, TABLE_FILES, load_run, published_path,
                                    write_report)
from pipeline.run.layout import BASE, RunContext
from pipeline.run.runner import Step


def steps(ctx: RunContext) -> list[Step]:
    return [_report_step(ctx, {})]


def _report_step(ctx: RunContext, failed: dict[str, str]) -> Step | None:
    """The report of every variant but the `failed` ones (variant -> reason, listed in scores.md
    instead; --keep-going); None when none is left."""
    recipe = ctx.recipe
    s = recipe.score
    names = [v.name for v in recipe.plans if v.name not in failed]
    if not names:
        return None
    inputs = [ctx.base_info_path] + [ctx.score_path(n) for n in names]
    if s.tasks.benchmarks and s.tasks.count > 0:
        inputs += [ctx.tasks_path(n) for n in [BASE] + names]
    if s.speed.repetitions > 0:
        inputs += [ctx.speed_path(n) for n in names]
    if s.drift.tokens > 0:
        inputs += [ctx.drift_path(n) for n in names]
    # the automatic choices the report links to
    kept = [v for v in recipe.plans if v.name in names]
    inputs += [ctx.allocation_md_path(v.name) for v in kept if v.budget]
    inputs += sorted({ctx.prune_choice_path(ctx.prune_choice_tag(v)) for v in kept
                      if ctx.prune_choice_tag(v) is not None})
    outputs = [ctx.report_path(f) for f in ("scores.csv", "scores.md", *TABLE_FILES, PLOT_FILE)]
    if published_path(ctx) is not None:
        inputs.append(published_path(ctx))
        outputs.append(ctx.report_path(PUBLISHED_FILE))
    if s.drift.tokens > 0:
        outputs.append(ctx.report_path(DRIFT_PLOT_FILE))
    params = recipe.values("report.reference", "report.title")
    if failed:
        params["report.failed"] = dict(failed)

    def action(io):
        tables = load_run(ctx.folder, names)
        write_report(ctx, tables, io.out, failed)
        return {"variants": len(tables.scores), **({"failed": dict(failed)} if failed else {})}

    return Step("report", "report", params, inputs, outputs, action,
                produces="scores.md + sizes/ppl-kld/kld-percentiles/tasks/speed/drift .csv, kld-vs-size.png"
                         + (f", {DRIFT_PLOT_FILE}" if s.drift.tokens > 0 else ""),
                without_variants=lambda more: _report_step(ctx, {**failed, **more}))
