"""The Ray executor (`squeeze run --executor ray [--address ADDR]`): every step whose inputs are
made runs at once as a Ray task, on a node with the CPU, GPU and memory the step asks for.

The driver (this process) alone decides what runs, holds the results folder's lock and writes
the manifest. A task runs one step's action on a worker, filling the step's temporary (partial)
paths, and returns them; the driver commits (renames) and records them as the local runner does.
A worker that dies during a step (killed, out of memory) is retried by Ray, and the retry first
removes what the dead attempt left. Every node must see the results folder at the same path
(shared storage): that is checked before any step runs.

A step that hands out independent pieces of its work with `io.map` (the sensitivity probes, the
weight errors per type) gets them spread over the cluster (Fanout): shares of the items, one run
in the step's own task and each other one as a Ray task of its own.

Ray is an optional extra (`pip install 'squeeze[ray]'`): it is imported only when this executor
runs, so the local runner never needs it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from pathlib import Path

from pipeline.errors import SqueezeError
from pipeline.fsutil import remove_partials
from pipeline.progress import serial_map
from pipeline.run.dag import Dag
from pipeline.run.heap import release_freed_memory
from pipeline.run.peak_memory import StepPeak
from pipeline.run.runner import Runner, Step, StepIO, forced_stages

# A task's memory: its largest input (the model it loads, quantizes or prunes) times this, as a
# Ray `memory` resource, so two steps on big models are not put on one node that holds one.
MEMORY_FACTOR = 2.0
MAX_RETRIES = 2  # further attempts when the worker running a step dies
PROBE_TIMEOUT_S = 120
CONNECT_TIMEOUT_S = 10
# The driver's environment the workers need (dataset folders, caches, hub token and mirror).
_ENV_PREFIXES = ("SQUEEZE_", "HF_")


def ray_module():
    try:
        import ray
    except ImportError:
        raise SqueezeError("--executor ray needs Ray: pip install 'squeeze[ray]'") from None
    return ray


def run_step(step: Step, cwd: str, options: dict) -> dict:
    """On a worker: one step's action into its temporary paths, which the driver commits. It runs
    in the driver's working directory, so relative recipe and dataset paths mean the same. What
    the step hands out with `io.map` is spread over the cluster (Fanout), each share asking for
    the step's own `options`."""
    os.chdir(cwd)
    io = StepIO(step, spread=Fanout(options, cwd))
    io.discard_leftovers()
    start = time.monotonic()
    try:
        with StepPeak() as peak:  # the worker's own peak for this step (workers are reused)
            extra = io.extra(step.action(io))
    except BaseException:
        io.discard()
        raise
    finally:
        release_freed_memory()  # the worker runs later steps too
    return {"temps": io.temps, "extra": extra, "seconds": time.monotonic() - start, "peak_rss_bytes": peak.bytes}


def run_share(fn, items: list, cwd: str) -> list:
    """On a worker: `fn` over one share of an `io.map`'s items. Unpickling `fn` loads what every
    item needs (a KLD probe's base distribution) once for the share."""
    os.chdir(cwd)
    return [fn(item) for item in items]


class Fanout:
    """`io.map` inside a step running on Ray: the items dealt round-robin into N shares, N the
    CPUs of the cluster (GPUs for a step that offloads layers), at most one per item and no more
    than the cluster's memory holds at the step's request. Share 0 runs here, in the step's own
    task (which already holds its CPU or GPU and has loaded what the items need), each other share
    as one Ray task; results come back in the items' order, the same values the local runner
    gets, since every item is computed alone from the same files."""

    def __init__(self, options: dict, cwd: str):
        self.options = dict(options)
        self.cwd = cwd

    def shares(self, ray, n_items: int) -> int:
        total = ray.cluster_resources()
        n = int(total.get("GPU" if self.options.get("num_gpus") else "CPU", 0))
        memory = self.options.get("memory")
        if memory:
            n = min(n, int(total.get("memory", 0) // memory))
        return max(1, min(n, n_items))

    def __call__(self, fn, items: list, desc: str = "") -> tuple[list, int]:
        ray = ray_module()
        n = self.shares(ray, len(items))
        if n < 2:
            return serial_map(fn, items, desc), 1
        index = [list(range(k, len(items), n)) for k in range(n)]
        task = ray.remote(run_share).options(**self.options)
        refs = [task.remote(fn, [items[i] for i in share], self.cwd) for share in index[1:]]
        try:
            parts = [serial_map(fn, [items[i] for i in index[0]], desc)]
            parts += ray.get(refs)
        except BaseException as exc:
            for ref in refs:  # the other shares stop too (a finished one is left as it is)
                ray.cancel(ref, force=True)
            if isinstance(exc, Exception):
                raise _cause(ray, exc) from None
            raise
        results = [None] * len(items)
        for share, values in zip(index, parts):
            for i, value in zip(share, values):
                results[i] = value
        return results, n


def probe_node(probe: str, token: str, cwd: str) -> tuple[str, str | None]:
    """On one node: read the driver's probe file and write this node's beside it; (node address,
    what went wrong or None)."""
    ray = ray_module()
    node = ray.util.get_node_ip_address()
    try:
        os.chdir(cwd)
        if Path(probe).read_text() != token:
            return node, f"{probe} there is another file"
        Path(f"{probe}-{ray.get_runtime_context().get_node_id()}").write_text(token)
    except OSError as exc:
        return node, f"cannot use {exc.filename or cwd}: {exc.strerror}"
    return node, None


def check_shared_folder(ray, folder: Path, cwd: str) -> None:
    """Every alive node reads a file the driver wrote in `folder` and writes one the driver reads."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    probe = folder / f".ray-probe-{token}"
    probe.write_text(token)
    problems = []
    try:
        task = ray.remote(probe_node)
        refs = {n["NodeID"]: task.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(str(probe), token, cwd) for n in ray.nodes() if n["Alive"]}
        for node_id, ref in refs.items():
            try:
                node, problem = ray.get(ref, timeout=PROBE_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                node, problem = node_id[:12], f"no answer in {PROBE_TIMEOUT_S} s"
            seen = Path(f"{probe}-{node_id}")
            if problem is None and not (seen.exists() and seen.read_text() == token):
                problem = "what it writes there does not show up here"
            if problem is not None:
                problems.append(f"node {node}: {problem}")
    finally:
        for p in folder.glob(f"{probe.name}*"):
            p.unlink(missing_ok=True)
    if problems:
        raise SqueezeError(f"{folder} is not on storage every Ray node sees ({'; '.join(problems)}); "
                           f"give --results a folder on a shared filesystem, mounted at the same path on every node")


class RayExecutor:
    """Runs a list of steps as Runner.run does (same verdicts, log lines, manifest and counts),
    each on a Ray worker as soon as the steps making its inputs are done."""

    def __init__(self, runner: Runner, address: str | None = None):
        self.runner = runner
        self.address = address

    def run(self, steps: list[Step], force_stages: set[str] = frozenset(), from_stage: str | None = None,
            stage_order: tuple[str, ...] = (), keep_going: bool = False) -> dict:
        ray = ray_module()
        redo = forced_stages(force_stages, from_stage, stage_order)
        dag = Dag(steps)
        with self.runner.lock(), self._connected(ray):
            cwd = os.getcwd()
            check_shared_folder(ray, self.runner.folder.resolve(), cwd)
            remove_partials(self.runner.folder)
            self._schedule(ray, dag, redo, keep_going, cwd)
        return dag.counts(keep_going)

    @contextlib.contextmanager
    def _connected(self, ray):
        """Use the Ray session this process has, else join `address` (None: start a local one)."""
        if ray.is_initialized():
            yield
            return
        _check_reachable(self.address)
        env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}
        # A cluster of this machine alone, started for this run: no dashboard to serve.
        local = {"include_dashboard": False} if not (self.address or os.environ.get("RAY_ADDRESS")) else {}
        try:
            ray.init(address=self.address, runtime_env={"env_vars": env} if env else None, **local)
        except ConnectionError as exc:
            raise SqueezeError(f"--address {self.address}: no Ray cluster there ({str(exc).splitlines()[0]})") \
                from None
        try:
            yield
        finally:
            ray.shutdown()

    def _schedule(self, ray, dag: Dag, redo: set[str], keep_going: bool, cwd: str) -> None:
        runner = self.runner
        task = ray.remote(run_step)
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        max_memory = int(max((r.get("memory", 0) for r in nodes), default=0))
        has_gpu = any(r.get("GPU", 0) >= 1 for r in nodes)
        running: dict = {}  # ObjectRef -> Step
        try:
            while True:
                for step in self._ready(dag, redo):
                    try:
                        if step.gpu and not has_gpu:
                            raise SqueezeError(f"{step.key}: model.n_gpu_layers offloads layers to a GPU, "
                                               f"but no node of the Ray cluster has one")
                        runner.begin(step)
                    except Exception as exc:
                        if not keep_going:
                            raise
                        runner.record_failure(dag, step, exc)
                        continue
                    options = self._options(step, max_memory)
                    ref = task.options(**options).remote(step, cwd, options)
                    running[ref] = step
                    dag.start(step.key)
                if not running:
                    return
                [ref], _ = ray.wait(list(running), num_returns=1)
                step = running.pop(ref)
                try:
                    result = ray.get(ref)
                    StepIO(step, result["temps"]).commit()
                except Exception as exc:
                    StepIO(step).discard_leftovers()
                    exc = _cause(ray, exc)
                    if not keep_going:
                        raise exc from None
                    runner.record_failure(dag, step, exc)
                    continue
                runner.record(step, result["extra"], result["seconds"], result["peak_rss_bytes"])
                dag.done(step.key, ran=True)
        finally:
            if running:
                _cancel(ray, running)

    def _ready(self, dag: Dag, redo: set[str]):
        """Steps to start now: those whose inputs are made and are not up to date (the up-to-date
        ones are passed over, which may make more ready)."""
        while True:
            ready, blocked = dag.advance()
            for b in blocked:
                self.runner.echo(b.line())
            if not ready:
                return
            for step in ready:
                if self.runner.decide(step, redo):
                    yield step
                else:
                    dag.done(step.key, ran=False)

    @staticmethod
    def _options(step: Step, max_memory: int) -> dict:
        biggest = max((p.stat().st_size for p in step.inputs if p.exists()), default=0)
        options = {"num_cpus": 1, "max_retries": MAX_RETRIES}
        memory = int(biggest * MEMORY_FACTOR)
        if memory and max_memory:
            options["memory"] = min(memory, max_memory)  # the largest node is the most there is
        if step.gpu:
            options["num_gpus"] = 1
        return options


def _check_reachable(address: str | None) -> None:
    """A `host:port` nobody listens on is said at once (Ray itself keeps retrying for minutes)."""
    host, sep, port = (address or "").rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # None, "auto", "ray://...": Ray resolves those itself
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise SqueezeError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc})") from None


def _cause(ray, exc: BaseException) -> BaseException:
    """The step's own exception, not Ray's wrapper around it (whose message is a traceback)."""
    if isinstance(exc, ray.exceptions.RayTaskError) and getattr(exc, "cause", None) is not None:
        return exc.cause
    return exc


def _cancel(ray, running: dict) -> None:
    """Stop the steps still running (the run failed or was interrupted) and remove what they wrote."""
    for ref in running:
        ray.cancel(ref, force=True)
    ray.wait(list(running), num_returns=len(running), timeout=60)
    for step in running.values():
        StepIO(step).discard_leftovers()
