"""`squeeze publish`: a scored run to a Hugging Face model repository.

What goes up, under which name:
  <recipe name>-<variant>.gguf   every variant, at the top of the repository as GGUF repos have them
  README.md                      the model card (pipeline.report.card), written into the results folder first
  scores.md, scores.csv, the tables and plots the report step writes, the allocation notes a budget
  variant's rows link to, and the layer/statistics/sensitivity plots the run made: at their paths
  inside the results folder, so the links in scores.md hold on the hub too.

A run is published only when it is current (pipeline.stages.freshness; --allow-stale publishes
stale rows marked as such) and every variant is built and scored: a variant whose quantize or
score step never finished (not run yet, or failed) is refused in one line, even with --allow-stale.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from pipeline.errors import SqueezeError
from pipeline.report.card import write_card
from pipeline.report.tables import report_markdown
from pipeline.run.layout import RunContext
from pipeline.publish.hub_upload import LocalFile, Published, check_repo_id, publish_files
from pipeline.run.manifest import Manifest
from pipeline.stages import report
from pipeline.stages.freshness import Freshness, freshness, require_fresh


def gguf_name(run: RunContext, variant: str) -> str:
    return f"{run.recipe.name}-{variant}.gguf"


def publish(run: RunContext, repo_id: str, private: bool = False, allow_stale: bool = False,
            echo: Callable[[str], None] = print) -> Published:
    check_repo_id(repo_id)
    state = freshness(run)  # every step's verdict once: it hashes inputs and outputs
    stale = require_fresh(run, "publish", allow_stale, state)
    _refuse_unfinished(run, state)
    if stale:
        echo(f"publish: stale results for {', '.join(sorted(stale))} (--allow-stale); their rows are marked")
    write_card(run, None, stale)
    names = ", ".join(v.name for v in run.recipe.plans)
    description = f"Made with squeeze from the recipe {run.recipe.name}: {names}."
    if stale:
        description += f" Published with stale results for {', '.join(sorted(stale))}."
    with tempfile.TemporaryDirectory(prefix="squeeze-publish-") as tmp:
        files = published_files(run)
        if stale:  # the report step's scores.md does not mark stale rows; the page on the hub must
            marked = Path(tmp) / "scores.md"
            marked.write_text(report_markdown(run, stale), encoding="utf-8")
            files = [LocalFile(f.path_in_repo, marked) if f.path_in_repo == "scores.md" else f for f in files]
        return publish_files(repo_id, files, private=private, message=f"squeeze publish {run.recipe.name}",
                             description=description, echo=echo)


def published_files(run: RunContext) -> list[LocalFile]:
    """The files of a finished run that go to the hub, with the sha256 the run's hash cache holds
    for the big ones (no GGUF is hashed twice)."""
    hashes = Manifest(run.folder, read_only=True).hashes  # publishing never sets a manifest aside
    files = []
    for v in run.recipe.plans:
        path = run.variant_path(v.name)
        files.append(LocalFile(gguf_name(run, v.name), path, hashes.digest(path)["sha256"]))
    hashes.save()
    extras = [run.folder / "README.md", *report.steps(run)[0].outputs,
              *(run.allocation_md_path(v.name) for v in run.recipe.plans if v.budget),
              run.layers_plot_path, run.stats_heatmap_path, run.sensitivity_plot_path]
    for path in extras:
        if path.exists() and path.read_bytes().strip():  # a table with no rows is left out
            files.append(LocalFile(path.relative_to(run.folder).as_posix(), path))
    return files


def _refuse_unfinished(run: RunContext, state: Freshness) -> None:
    """One line naming every variant that is not built, not scored or whose step failed."""
    failed, unfinished = {}, {}
    for v in state.unfinished:
        if v.step.variant is not None and v.state == "failed":  # recorded by `squeeze run --keep-going`
            failed.setdefault(v.step.variant, v.step.key)
        elif v.step.variant is not None and v.state == "missing":  # never run, or killed or failed without a record
            unfinished.setdefault(v.step.variant, v.step.key)
    problems = []
    for v in run.recipe.plans:
        if v.name in failed:
            problems.append(f"{v.name} ({failed[v.name]} failed)")
        elif not run.variant_path(v.name).exists():
            problems.append(f"{v.name} (not built)")
        elif not run.score_path(v.name).exists():
            problems.append(f"{v.name} (not scored)")
        elif v.name in unfinished:
            problems.append(f"{v.name} ({unfinished[v.name]} did not finish)")
    if problems:
        raise SqueezeError(f"publish: not every variant is built and scored in {run.folder}: "
                           f"{', '.join(problems)}; run `squeeze run {run.recipe.path or run.recipe.name}` first")
    missing = [p for p in report.steps(run)[0].outputs if not p.exists()]
    if missing:
        raise SqueezeError(f"publish: the report is missing ({Path(missing[0]).name}); run "
                           f"`squeeze run {run.recipe.path or run.recipe.name}` first")
