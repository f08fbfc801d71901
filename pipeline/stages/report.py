"""Stage report: the score tables (CSV and scores.md), the size/KLD plot and, when drift is
measured, the drift KLD-by-position plot from every variant's scores (pipeline.report.tables). Every file the report reads is one of the step's inputs."""

from __future__ import annotations

from pipeline.report.tables import (DRIFT_PLOT_FILE, PLOT_FILE, PUBLISHED_FILE, TABLE_FILES, load_run, published_path,
                                    write_report)
from pipeline.run.layout import BASE, RunContext
from pipeline.run.runner import Step
from pipeline.work import Fixed, Memory

REPORT_S = 0.2  # seconds its tables and plots take, measured on the default recipe (pipeline/cost/FITTED.md)


def steps(run: RunContext) -> list[Step]:
    return [_report_step(run, {})]


def _report_step(run: RunContext, failed: dict[str, str]) -> Step | None:
    """The report of every variant but the `failed` ones (variant -> reason, listed in scores.md
    instead; --keep-going); None when none is left."""
    recipe = run.recipe
    s = recipe.score
    names = [v.name for v in recipe.plans if v.name not in failed]
    if not names:
        return None
    inputs = [run.base_info_path] + [run.score_path(n) for n in names]
    if s.tasks.benchmarks and s.tasks.count > 0:
        inputs += [run.tasks_path(n) for n in [BASE] + names]
    if s.speed.repetitions > 0:
        inputs += [run.speed_path(n) for n in names]
    if s.drift.tokens > 0:
        inputs += [run.drift_path(n) for n in names]
    # the automatic choices the report links to
    kept = [v for v in recipe.plans if v.name in names]
    inputs += [run.allocation_md_path(v.name) for v in kept if v.budget]
    inputs += sorted({run.prune_choice_path(run.prune_choice_tag(v)) for v in kept
                      if run.prune_choice_tag(v) is not None})
    outputs = [run.report_path(f) for f in ("scores.csv", "scores.md", *TABLE_FILES, PLOT_FILE)]
    if published_path(run) is not None:
        inputs.append(published_path(run))
        outputs.append(run.report_path(PUBLISHED_FILE))
    if s.drift.tokens > 0:
        outputs.append(run.report_path(DRIFT_PLOT_FILE))
    params = recipe.values("report.reference", "report.title")
    if failed:
        params["report.failed"] = dict(failed)

    def action(io):
        tables = load_run(run.folder, names)
        write_report(run, tables, io.out, failed)
        return {"variants": len(tables.scores), **({"failed": dict(failed)} if failed else {})}

    return Step("report", "report", params, inputs, outputs, action,
                produces="scores.md + sizes/ppl-kld/kld-percentiles/tasks/speed/drift .csv, kld-vs-size.png"
                         + (f", {DRIFT_PLOT_FILE}" if s.drift.tokens > 0 else ""),
                without_variants=lambda more: _report_step(run, {**failed, **more}),
                work=lambda shape: [Fixed(REPORT_S), Memory(64 << 20)])
