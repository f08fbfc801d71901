"""When a step may run: once every step that makes one of its inputs is done. Both executors
(the local runner, one step at a time in declared order, and the Ray executor, every ready step at
once) ask this one scheduler.

With `--keep-going` a failed step does not stop the run: the steps that need its outputs are
blocked (and said to be), everything else goes on. A step that gathers all variants (the report)
may declare how it runs without the variants that failed (`Step.without_variants`), so it still
reports the ones that succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RUNNING, DONE, FAILED, BLOCKED = "running", "done", "failed", "blocked"
_FINISHED = (DONE, FAILED, BLOCKED)


# Steps are pipeline.run.runner.Step (this module is below the runner, which schedules with it).

@dataclass
class Blocked:
    step: object
    root: str  # key of the failed step it waits on

    def line(self) -> str:
        return f"{self.step.key}: skipped, blocked by {self.root} (failed)"


@dataclass
class Dag:
    steps: list
    ran: int = 0
    skipped: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # failed step key -> one-line reason
    blocked: dict[str, str] = field(default_factory=dict)  # blocked step key -> failed step it waits on

    def __post_init__(self):
        self.by_key = {s.key: s for s in self.steps}
        self.order = [s.key for s in self.steps]
        self._producer = {out: s.key for s in self.steps for out in s.outputs}
        self.needs = {s.key: self._needs_of(s) for s in self.steps}
        self.state: dict[str, str] = {}

    def _needs_of(self, step) -> set[str]:
        return {self._producer[i] for i in step.inputs if self._producer.get(i, step.key) != step.key}

    # ---- what may run now ---------------------------------------------------------------------
    def advance(self) -> tuple[list, list[Blocked]]:
        """The steps not yet started whose inputs are all made (in declared order), and the steps
        newly found blocked by a failure (finished as such)."""
        ready, blocked = [], []
        changed = True
        while changed:
            changed = False
            ready = []
            for key in self.order:
                if key in self.state:
                    continue
                needs = self.needs[key]
                if any(self.state.get(n) not in _FINISHED for n in needs):
                    continue
                bad = [n for n in needs if self.state[n] != DONE]
                if bad:
                    step = self._without_failed(key, bad)
                    if step is None:
                        self.state[key] = BLOCKED
                        self.blocked[key] = self._root(bad[0])
                        blocked.append(Blocked(self.by_key[key], self.blocked[key]))
                        changed = True
                        continue
                ready.append(self.by_key[key])
        return ready, blocked

    def _without_failed(self, key: str, bad: list[str]):
        """The step rebuilt without the failed variants, when it declares how and nothing else it
        needs failed; None when it cannot run."""
        step = self.by_key[key]
        if step.without_variants is None or step.variant is not None:
            return None
        if any(self.by_key[n].variant is None for n in bad):
            return None
        rebuilt = step.without_variants(self.failed_variants())
        if rebuilt is None:
            return None
        needs = self._needs_of(rebuilt)
        if any(self.state.get(n) != DONE for n in needs):
            return None
        self.by_key[key] = rebuilt
        self.needs[key] = needs
        return rebuilt

    def _root(self, key: str) -> str:
        return self.blocked.get(key, key)

    def failed_variants(self) -> dict[str, str]:
        """variant -> why it has no result: its failed step and that step's reason."""
        out: dict[str, str] = {}
        for key in self.order:
            variant = self.by_key[key].variant
            if variant is None or variant in out or self.state.get(key) not in (FAILED, BLOCKED):
                continue
            root = self._root(key)
            out[variant] = f"{root} failed: {self.failures[root]}"
        return out

    # ---- what happened ------------------------------------------------------------------------
    def start(self, key: str) -> None:
        self.state[key] = RUNNING

    def done(self, key: str, ran: bool) -> None:
        self.state[key] = DONE
        if ran:
            self.ran += 1
        else:
            self.skipped += 1

    def fail(self, key: str, reason: str) -> None:
        self.state[key] = FAILED
        self.failures[key] = reason

    def counts(self, keep_going: bool) -> dict:
        """Steps run and skipped as up to date; with keep_going also the failed ones (key ->
        reason) and the blocked ones (key -> the failed step they wait on)."""
        out = {"ran": self.ran, "skipped": self.skipped}
        if keep_going:
            out.update(failed=dict(self.failures), blocked=dict(self.blocked))
        return out
