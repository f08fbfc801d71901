"""Run a list of steps in order, skipping those whose recorded inputs, recipe values and engine
versions all still match, and saying why each one runs.

Every output is written under a temporary name and renamed when the step succeeds; the
manifest entry is dropped before a step starts, so a killed step never looks finished. A lock
file keeps a second run off the same results folder. SIGINT and SIGTERM (inside
`signals_interrupt()`) unwind like an error, so they leave what SIGKILL leaves, minus the
temporary files.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from pipeline.errors import DamagedFile, SqueezeError
from pipeline.fsutil import PARTIAL_MARK, partial_name, remove_partials
from pipeline.progress import serial_map
from pipeline.run.dag import Dag
from pipeline.run.heap import release_freed_memory
from pipeline.run.manifest import Manifest, StepRecord, params_diff, same_file
from pipeline.run.peak_memory import StepPeak


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
    gpu: bool = False  # runs llama.cpp with layers offloaded (a Ray task then asks for a GPU)
    # For a step that reads every variant's results (the report): the step rebuilt without the
    # variants that failed (variant -> reason) under --keep-going, or None when it cannot run.
    without_variants: Callable[[dict[str, str]], "Step | None"] | None = None
    # The work it will do, for the model's shape (pipeline.work records): what `plan --estimate`
    # prices (pipeline.cost.run_estimate); None: nothing worth pricing.
    work: Callable[[object], list] | None = None


# How an executor spreads `io.map`: (fn, items, desc) -> (results in the items' order, shares run).
Spread = Callable[[Callable, list, str], "tuple[list, int]"]


class StepIO:
    """What a running step writes to: `io.out(final_path)` gives the temporary path to fill.
    `temps` (final -> temporary path) lets whoever runs the step hand the commit to another
    process: a Ray worker fills them, the driver commits.

    `io.map(fn, items)` is how a step hands out independent pieces of its work (the sensitivity
    probes): here they run one after another; an executor that gives a `spread` runs them in
    shares elsewhere (pipeline.run.ray_executor). `fn` and the items must then pickle."""

    def __init__(self, step: Step, temps: dict[Path, Path] | None = None, spread: Spread | None = None):
        self.step = step
        self._temps: dict[Path, Path] = dict(temps or {})
        self._spread = spread
        self.fanouts: list[dict] = []  # per io.map: what, how many items, in how many shares

    def map(self, fn: Callable, items, desc: str = "") -> list:
        """`fn` over `items`, results in the items' order."""
        items = list(items)
        if self._spread is None or len(items) < 2:
            results, shares = serial_map(fn, items, desc), min(len(items), 1)
        else:
            results, shares = self._spread(fn, items, desc)
        self.fanouts.append({"what": desc, "items": len(items), "shares": shares})
        return results

    def extra(self, extra: dict | None) -> dict:
        """What the step's action returned, and how its `io.map` calls were spread (the manifest's
        `extra` of the step)."""
        extra = dict(extra or {})
        if self.fanouts:
            extra["fanout"] = list(self.fanouts)
        return extra

    @property
    def temps(self) -> dict[Path, Path]:
        return dict(self._temps)

    def discard_leftovers(self) -> None:
        """Remove what an earlier attempt at this step left, killed before it could discard
        (temporary names carry the writer's pid, so a retry cannot overwrite them)."""
        for out in self.step.outputs:
            for tmp in out.parent.glob(f".{out.name}{PARTIAL_MARK}*"):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()

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


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived. Raised in the main thread, so every `finally` (temporary outputs
    discarded, models freed, the lock released) runs as for an error; `step` is the step it stopped."""

    def __init__(self, signum: int, step: str | None = None):
        super().__init__(signum)
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM

    def __str__(self) -> str:
        where = f" during {self.step}" if self.step else ""
        return f"Interrupted ({signal.Signals(self.signum).name}){where}; rerun to resume"


@contextlib.contextmanager
def signals_interrupt(exiting: bool = False):
    """SIGINT and SIGTERM raise Interrupted inside the block. After the first, further ones are
    ignored: a second Ctrl-C must not cut the cleanup short. On the way out the old handlers come
    back, unless `exiting` (a command about to exit after an interruption keeps ignoring them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def handler(signum, frame):
        if not caught:
            caught.append(signum)
            raise Interrupted(signum)

    names = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, handler) for s in names}
    try:
        yield
    finally:
        for s in names:
            signal.signal(s, signal.SIG_IGN if caught and exiting else old[s])


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
    state: str  # "done" | "stale" | "missing" | "failed" (--keep-going recorded a failure)
    reason: str = ""


class Runner:
    def __init__(self, folder: Path, echo: Callable[[str], None] = print, read_only: bool = False):
        """`read_only`: only verdicts are asked for (`status`, freshness checks): a damaged
        manifest is reported and left where it is, and the folder is not created."""
        self.folder = Path(folder)
        if not read_only:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest(self.folder, read_only=read_only)
        self.echo = echo
        if self.manifest.notice:
            echo(self.manifest.notice)

    # ---- deciding -------------------------------------------------------------------------
    def verdict(self, step: Step) -> Verdict:
        if step.key in self.manifest.failures:  # until it succeeds (--keep-going records it)
            return Verdict(step, "failed", self.manifest.failures[step.key])
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
            stage_order: tuple[str, ...] = (), keep_going: bool = False) -> dict:
        """Run what is stale (and the forced stages), in order; returns counts of steps run and
        skipped. With `keep_going` a failed step is recorded and the steps needing it are skipped
        as blocked (pipeline.run.dag), the counts then naming both."""
        redo = forced_stages(force_stages, from_stage, stage_order)
        dag = Dag(steps)
        with self.lock():
            remove_partials(self.folder)
            while (step := self.next_ready(dag)) is not None:
                try:
                    # Deciding is inside: a signal just after "imatrix: run" is printed still
                    # names the step it stopped.
                    if not self.decide(step, redo):
                        dag.done(step.key, ran=False)
                        continue
                    self._execute(step)
                except Interrupted as exc:
                    exc.step = exc.step or step.key
                    raise
                except KeyboardInterrupt:  # SIGINT with Python's own handler (the library without the CLI)
                    raise Interrupted(signal.SIGINT, step.key) from None
                except DamagedFile as exc:
                    maker = next((s for s in steps if any(_same_path(exc.path, o) for o in s.outputs)), None)
                    if maker is not None:
                        exc.remedy = f"rerun with --force {maker.stage}"
                    if not keep_going:
                        raise
                    self.record_failure(dag, step, exc)
                except Exception as exc:
                    if not keep_going:
                        raise
                    self.record_failure(dag, step, exc)
                else:
                    dag.done(step.key, ran=True)
        return dag.counts(keep_going)

    def next_ready(self, dag: Dag) -> Step | None:
        """The first step in declared order whose inputs are made, saying which are blocked."""
        ready, blocked = dag.advance()
        for b in blocked:
            self.echo(b.line())
        return ready[0] if ready else None

    def decide(self, step: Step, redo: set[str]) -> bool:
        """Whether the step runs (it is stale, missing or its stage forced), saying why."""
        v = self.verdict(step)
        if v.state == "done" and step.stage not in redo:
            self.echo(f"{step.key}: up to date")
            return False
        reason = {"done": "forced", "failed": "it failed last time"}.get(v.state, v.reason)
        self.echo(f"{step.key}: {'run' if v.state in ('missing', 'failed') else 'rerun'}, {reason}")
        return True

    def record_failure(self, dag: Dag, step: Step, exc: BaseException) -> None:
        """--keep-going: the failure goes in the log and the manifest (`squeeze status` shows it
        until the step succeeds), and the run goes on."""
        reason = one_line(exc)
        self.manifest.failures[step.key] = reason
        self.manifest.save()
        dag.fail(step.key, reason)
        self.echo(f"{step.key}: failed, {reason}")

    def _execute(self, step: Step) -> None:
        self.begin(step)
        io = StepIO(step)
        start = time.monotonic()
        try:
            with StepPeak() as peak:
                extra = io.extra(step.action(io))
            io.commit()
        except BaseException:
            io.discard()
            raise
        finally:
            release_freed_memory()  # what the step freed is not carried into the next one
        self.record(step, extra, time.monotonic() - start, peak.bytes)

    def begin(self, step: Step) -> None:
        """Before a step's action runs (here or on a worker): its inputs exist, its old record is gone."""
        for inp in step.inputs:
            if not inp.exists():
                raise SqueezeError(f"{step.key}: input {inp} does not exist")
        self.manifest.forget(step.key)
        self.manifest.save()

    def record(self, step: Step, extra: dict, seconds: float, peak_rss: int = 0) -> None:
        """After a step's outputs are committed: what they were made from, in the manifest."""
        self.manifest.failures.pop(step.key, None)
        rec = StepRecord(
            stage=step.stage, params=step.params, versions=step.versions,
            inputs={self.manifest.rel(p): self.manifest.digest(p) for p in step.inputs},
            outputs={self.manifest.rel(p): self.manifest.digest(p) for p in step.outputs},
            seconds=round(seconds, 2), finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            peak_rss_bytes=peak_rss, extra=extra)
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


def _same_path(a, b) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def one_line(exc: BaseException) -> str:
    """A failure's reason in one line: squeeze's own message, else the exception's type and message."""
    text = str(exc).strip()
    if not isinstance(exc, SqueezeError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__
