"""Whether a run's results are current: what `card`, `compare`, `report` and `publish` ask before
they show anything, so that a table edited out from under its recipe is never passed off as the
recipe's result.

A step is current when the runner would skip it (same recipe values, inputs, outputs, engine
versions) and nothing it reads waits on a step that must rerun. A variant's rows are stale when
any step of that variant is not current, or any shared step (convert, calibration, a shared prune)
is not; the report step alone only makes the tables and plot stale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import SqueezeError
from pipeline.fsutil import write_json_atomic
from pipeline.run.layout import RunContext
from pipeline.run.runner import Runner, Verdict
from pipeline.stages.registry import build_steps, open_run

_SHOWN_IN_ERROR = 3  # the first few steps named in the one-line refusal; `squeeze status` lists them all


@dataclass(frozen=True)
class Freshness:
    recipe: str
    unfinished: tuple[Verdict, ...]  # steps that are stale or missing, in run order
    started: bool  # some step has a result
    stale_variants: frozenset[str]  # variants whose rows would show old or missing results

    @property
    def current(self) -> bool:
        return not self.unfinished

    def summary(self) -> str:
        """'score Q3_K_M-pruned (waits on quantize Q3_K_M-pruned), ... and 2 more'."""
        named = [f"{v.step.key} ({v.reason})" for v in self.unfinished[:_SHOWN_IN_ERROR]]
        more = len(self.unfinished) - len(named)
        return ", ".join(named) + (f" and {more} more" if more else "")


def freshness(run: RunContext) -> Freshness:
    """The state of every step of the run, as `squeeze status` reports it."""
    verdicts = Runner(run.folder, echo=lambda _: None, read_only=True).status(build_steps(run))
    unfinished = tuple(v for v in verdicts if v.state != "done")
    names = [v.name for v in run.recipe.plans]
    stale: set[str] = set()
    for v in unfinished:
        if v.step.variant is not None:
            stale.add(v.step.variant)
        elif v.step.stage != "report":
            stale.update(names)  # a shared step feeds every variant
    started = len(unfinished) < len(verdicts) or any(v.state == "stale" for v in unfinished)
    return Freshness(str(run.recipe.path or run.recipe.name), unfinished, started, frozenset(stale))


def require_fresh(run: RunContext, command: str, allow_stale: bool, f: Freshness | None = None) -> set[str]:
    """Refuse, in one line naming the stale steps, unless every step is current or `allow_stale`;
    returns the variants whose rows must then be marked stale. `f`: the run's state when the
    caller has it already."""
    f = f or freshness(run)
    if not f.started:
        raise SqueezeError(f"{run.folder}: no scores yet; run `squeeze run {f.recipe}` first")
    if not f.current and not allow_stale:
        raise SqueezeError(f"{command}: the results in {run.folder} are not current: {f.summary()}; "
                           f"run `squeeze run {f.recipe}` first, or pass --allow-stale to mark them as stale")
    return set(f.stale_variants)


# ---- from a results folder back to its recipe -----------------------------------------------

RECIPE_RECORD = "recipe-path.json"  # written by `squeeze run`, read when a folder is named instead


def remember_recipe(run: RunContext) -> None:
    """Record which recipe fills this results folder, so a command given only the folder can
    still tell whether it is current."""
    if run.recipe.path:
        run.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run.folder / RECIPE_RECORD, {"recipe": str(Path(run.recipe.path).resolve())})


def run_context(path: str | Path) -> RunContext | None:
    """The run a recipe or a results folder stands for, or None when a folder's recipe is not
    recorded (made by another tool or an older squeeze) or no longer exists."""
    p = Path(path)
    if p.is_file():
        return open_run(p, check_model=False)
    record = p / RECIPE_RECORD
    if not record.exists():
        return None
    try:
        recipe = Path(json.loads(record.read_text())["recipe"])
    except (ValueError, KeyError, TypeError):
        return None
    return open_run(recipe, p, check_model=False) if recipe.is_file() else None
