"""Run a list of steps in order, skipping those whose recorded inputs, recipe values and engine
versions all still match, and saying why each one runs.

Every output is written under a temporary name and renamed when the step succeeds; the
manifest entry is dropped before a step starts, so a killed step never looks finished. A lock
file keeps a second run off the same results folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from pipeline.errors import SqueezeError
from pipeline.fsutil import partial_name, remove_partials
from pipeline.run.manifest import Manifest, StepRecord, params_diff, same_file


@dataclass
class Step:
    key: str  # unique and readable: "quantize Q4_K_M"
    stage: str
    params: dict  # recipe values (dotted names) this step's result depends on
    inputs: list[Path]
    outputs: list[Path]
    action: Callable[["StepIO"], dict | None]
    variant: str | None = None
    versions: dict = field(default_factory=dict)
    produces: str = ""  # one line for `squeeze plan`


class StepIO:
    """What a running step writes to: `io.out(final_path)` gives the temporary path to fill."""

    def __init__(self, step: Step):
        self.step = step
        self._temps: dict[Path, Path] = {}

    def out(self, path: Path) -> Path:
        path = Path(path)
        if path not in self.step.outputs:
            raise ValueError(f"{self.step.key}: {path} is not a declared output")
        tmp = partial_name(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._temps[path] = tmp
        return tmp

    def commit(self) -> None:
        missing = [p for p in self.step.outputs if p not in self._temps or not self._temps[p].exists()]
        if missing:
            raise SqueezeError(f"{self.step.key}: finished without writing {', '.join(str(p) for p in missing)}")
        for final, tmp in self._temps.items():
            os.replace(tmp, final)

    def discard(self) -> None:
        for tmp in self._temps.values():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def forced_stages(force: set[str], from_stage: str | None, stage_order: tuple[str, ...]) -> set[str]:
    """The stages `--force STAGE ...` and `--from STAGE` redo: `--from` means that stage and every
    later one in `stage_order` (the stage registry's order)."""
    redo = set(force)
    if from_stage is not None:
        if from_stage not in stage_order:
            raise ValueError(f"--from {from_stage}: not in the stage order {stage_order}")
        redo |= set(stage_order[stage_order.index(from_stage):])
    return redo


@dataclass
class Verdict:
    step: Step
    state: str  # "done" | "stale" | "missing"
    reason: str = ""


class Runner:
    def __init__(self, folder: Path, echo: Callable[[str], None] = print):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest(self.folder)
        self.echo = echo

    # ---- deciding -------------------------------------------------------------------------
    def verdict(self, step: Step) -> Verdict:
        rec = self.manifest.steps.get(step.key)
        if rec is None:
            return Verdict(step, "missing", "no previous result")
        for out in step.outputs:
            key = self.manifest.rel(out)
            if not out.exists():
                return Verdict(step, "stale", f"output {key} is missing")
        changed = params_diff(rec.params, step.params)
        if changed:
            return Verdict(step, "stale", f"{', '.join(changed)} changed")
        for name in sorted(set(rec.versions) | set(step.versions)):
            if rec.versions.get(name) != step.versions.get(name):
                return Verdict(step, "stale", f"{name} version changed "
                                              f"({rec.versions.get(name)} -> {step.versions.get(name)})")
        old_inputs = rec.inputs
        for inp in step.inputs:
            key = self.manifest.rel(inp)
            if key not in old_inputs:
                return Verdict(step, "stale", f"new input {key}")
            if not inp.exists():
                return Verdict(step, "stale", f"input {key} is missing")
            if not same_file(old_inputs[key], inp, self.manifest):
                return Verdict(step, "stale", f"input {key} changed")
        if set(old_inputs) != {self.manifest.rel(i) for i in step.inputs}:
            return Verdict(step, "stale", "its list of inputs changed")
        for out in step.outputs:
            key = self.manifest.rel(out)
            if not same_file(rec.outputs.get(key, {}), out, self.manifest):
                return Verdict(step, "stale", f"output {key} was modified")
        return Verdict(step, "done")

    # ---- running --------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self):
        path = self.folder / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                raise SqueezeError(f"{self.folder} is in use by another squeeze run ({holder}); "
                                   f"wait for it to finish") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}, started {datetime.now():%H:%M:%S}".encode(), 0)
            yield
        finally:
            os.close(fd)

    def run(self, steps: list[Step], force_stages: set[str] = frozenset(), from_stage: str | None = None,
            stage_order: tuple[str, ...] = ()) -> dict:
        """Run what is stale (and the forced stages); returns counts of steps run and skipped."""
        redo = forced_stages(force_stages, from_stage, stage_order)
        ran = skipped = 0
        with self.lock():
            remove_partials(self.folder)
            for step in steps:
                forced = step.stage in redo
                v = self.verdict(step)
                if v.state == "done" and not forced:
                    self.echo(f"{step.key}: up to date")
                    skipped += 1
                    continue
                reason = "forced" if forced and v.state == "done" else v.reason
                self.echo(f"{step.key}: {'run' if v.state == 'missing' else 'rerun'}, {reason}")
                self._execute(step)
                ran += 1
        return {"ran": ran, "skipped": skipped}

    def _execute(self, step: Step) -> None:
        for inp in step.inputs:
            if not inp.exists():
                raise SqueezeError(f"{step.key}: input {inp} does not exist")
        self.manifest.forget(step.key)
        self.manifest.save()
        io = StepIO(step)
        start = time.monotonic()
        try:
            extra = step.action(io) or {}
            io.commit()
        except BaseException:
            io.discard()
            raise
        seconds = time.monotonic() - start
        rec = StepRecord(
            stage=step.stage, params=step.params, versions=step.versions,
            inputs={self.manifest.rel(p): self.manifest.digest(p) for p in step.inputs},
            outputs={self.manifest.rel(p): self.manifest.digest(p) for p in step.outputs},
            seconds=round(seconds, 2), finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            extra=extra)
        self.manifest.steps[step.key] = rec
        self.manifest.save()
        self.echo(f"{step.key}: done in {seconds:.1f} s")

    def status(self, steps: list[Step]) -> list[Verdict]:
        """Each step's verdict; a step fed by a step that must rerun is stale too, since its
        input will change when the run gets there."""
        verdicts, pending = [], {}
        for step in steps:
            v = self.verdict(step)
            waits = [pending[i] for i in step.inputs if i in pending]
            if v.state == "done" and waits:
                v = Verdict(step, "stale", f"waits on {waits[0]}")
            if v.state != "done":
                pending.update({out: step.key for out in step.outputs})
            verdicts.append(v)
        return verdicts
