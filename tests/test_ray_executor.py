"""`squeeze run --executor ray` on a local Ray cluster the tests start (loopback only, 2 CPUs):
the same outputs, bit for bit, as the local runner; a worker killed in the middle of quantizing
is retried and leaves no partial file; --keep-going works the same way there; the sensitivity
probes fan out over the cluster and give the same numbers."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import textwrap

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import SqueezeError
from pipeline.run.ray_executor import RayExecutor
from pipeline.run.runner import Runner, Step
from pipeline.stages.registry import build_steps, open_run

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

RECIPE = """\
model: {{source: {hf}, base_type: F16}}
calibration: {{datasets: [groups_merged], ctx: 128, chunks: 2}}
variants:
  Q8_0: Q8_0
  Q4_K_M: Q4_K_M
  Q4_K_M-pruned: {{ftype: Q4_K_M, prune: [1]}}
score: {{ctx: 128, chunks: 2}}
"""
# Outputs that differ between any two runs, whichever executor: numpy's .npz is a zip whose entries
# carry the time they were written.
NOT_REPRODUCIBLE = {"scores/base-topk.npz"}


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 * 2**20,
             log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny_gemma import build_tiny_gemma3, calibration_text

    folder = tmp_path_factory.mktemp("ray")
    hf = build_tiny_gemma3(folder / "tiny-gemma3", calibration_text(), n_layers=3)
    recipe = folder / "tiny-ray.yaml"
    recipe.write_text(textwrap.dedent(RECIPE.format(hf=hf)))
    return recipe, folder


def squeeze(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def moved(results, name):
    """Every run writes to the same folder (quantized files record the imatrix's path), then is
    moved aside under `name`."""
    return results.rename(results.with_name(name))


def outputs(results) -> dict[str, dict]:
    """step key -> {output path: sha256} from a results folder's manifest."""
    steps = json.loads((results / "manifest.json").read_text())["steps"]
    return {k: {p: d["sha256"] for p, d in s["outputs"].items()} for k, s in steps.items()}


@pytest.fixture(scope="module")
def local_run(tiny):
    recipe, folder = tiny
    out = squeeze("run", recipe, "--results", folder / "results")
    assert out.exit_code == 0, out.output
    return outputs(moved(folder / "results", "local"))


def test_ray_gives_the_local_runners_outputs(cluster, tiny, local_run):
    recipe, folder = tiny
    results = folder / "results"
    out = squeeze("run", recipe, "--results", results, "--executor", "ray")
    assert out.exit_code == 0, out.output
    on_ray = outputs(results)
    assert set(on_ray) == set(local_run)
    assert len(on_ray) == 12  # convert, imatrix, statistics, prune, 3 quantize, 4 score, report
    for key, files in local_run.items():
        for path, digest in files.items():
            if path not in NOT_REPRODUCIBLE:
                assert on_ray[key][path] == digest, f"{key}: {path}"
    assert not list(results.rglob("*.partial-*")) and not list(results.glob(".ray-probe-*"))

    again = squeeze("run", recipe, "--results", results, "--executor", "ray")
    assert again.exit_code == 0, again.output
    assert "every stage is up to date (12 steps)" in again.output
    moved(results, "on-ray")


def killed_once(action, marker, target):
    """The step's action, but the first time its worker writes part of the file and dies."""
    def run(io):
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            io.out(target).write_bytes(b"half a model")
            os.kill(os.getpid(), signal.SIGKILL)
        return action(io)
    return run


def test_a_worker_killed_while_quantizing_is_retried_and_leaves_no_partial_file(cluster, tiny, local_run):
    recipe, folder = tiny
    ctx = open_run(recipe, folder / "results")
    marker = folder / "killed-once"
    target = ctx.variant_path("Q4_K_M")
    steps = [dataclasses.replace(s, action=killed_once(s.action, marker, target)) if s.key == "quantize Q4_K_M" else s
             for s in build_steps(ctx)]
    lines = []
    counts = RayExecutor(Runner(ctx.folder, echo=lines.append)).run(steps)
    assert counts == {"ran": 12, "skipped": 0}
    assert marker.exists()  # it was killed once
    assert "quantize Q4_K_M: run, no previous result" in lines
    assert not list(ctx.folder.rglob("*.partial-*"))
    done = outputs(ctx.folder)
    assert done["quantize Q4_K_M"] == local_run["quantize Q4_K_M"]
    assert done["score Q4_K_M"] == local_run["score Q4_K_M"]
    moved(ctx.folder, "killed")


def test_keep_going_on_ray(cluster, tiny):
    recipe, folder = tiny
    broken = folder / "broken.yaml"
    broken.write_text(recipe.read_text().replace("Q8_0: Q8_0", "Q8_0: Q8_0\n  broken: {ftype: Q2_K_S, imatrix: false}"))
    results = folder / "keep-going"
    out = squeeze("run", broken, "--results", results, "--executor", "ray", "--keep-going")
    assert out.exit_code == 1
    lines = out.output.splitlines()
    refused = "quantizing base-f16.gguf to Q2_K_S failed (llama_model_quantize returned 1)"
    assert any(line.startswith(f"quantize broken: failed, {refused}") for line in lines), out.output
    assert "score broken: skipped, blocked by quantize broken (failed)" in lines
    assert lines[-1].startswith(f"Error: 1 step failed: quantize broken ({refused}")
    table = (results / "scores.md").read_text()
    assert all(f"| {name} " in table for name in ("Q8_0", "Q4_K_M", "Q4_K_M-pruned"))
    assert f"- broken: quantize broken failed: {refused}" in table
    status = squeeze("status", broken, "--results", results).output
    assert any(line.startswith("quantize broken") and f"failed ({refused}" in line for line in status.splitlines())


BUDGET_VARIANTS = """\
variants:
  auto: {ftype: Q4_0, target_bpw: 5.0}
"""
UP_TO_SENSITIVITY = ("convert", "imatrix", "statistics", "sensitivity")


def test_sensitivity_probes_fan_out_over_the_cluster_with_the_same_results(cluster, tiny):
    """The sensitivity step hands its in-memory probes (3 per layer, the embedding's, one per
    tensor kind) to io.map: the local runner measures them one after another, on Ray they are
    dealt into 2 shares (2 CPUs), one measured in the step's task and one in a task of its own,
    which loads the base writable itself. sensitivity.json comes out the same, byte for byte:
    every probe is computed alone from the same model, restored after each, and the base
    distribution the second task loads from the step's .npz holds the very arrays the step
    computed. (The weight errors are computed in-process, in the step's task.)"""
    recipe, folder = tiny
    budget = folder / "budget.yaml"
    head = recipe.read_text().split("variants:")[0]
    budget.write_text(head + BUDGET_VARIANTS + "score: {ctx: 128, chunks: 2}\n")
    ctx = open_run(budget, folder / "budget")
    steps = [s for s in build_steps(ctx) if s.stage in UP_TO_SENSITIVITY]
    assert [s.key for s in steps] == list(UP_TO_SENSITIVITY)

    assert Runner(ctx.folder, echo=lambda line: None).run(steps) == {"ran": 4, "skipped": 0}
    local_json = ctx.sensitivity_json_path.read_bytes()
    local_extra = json.loads((ctx.folder / "manifest.json").read_text())["steps"]["sensitivity"]["extra"]
    n_probes = 3 * 3 + 1 + 7  # 3 layers, the token embedding, the 7 tensor kinds
    assert local_extra["fanout"] == [{"what": "sensitivity probes", "items": n_probes, "shares": 1}]

    lines = []
    counts = RayExecutor(Runner(ctx.folder, echo=lines.append)).run(steps, force_stages={"sensitivity"})
    assert counts == {"ran": 1, "skipped": 3}
    assert "sensitivity: rerun, forced" in lines
    extra = json.loads((ctx.folder / "manifest.json").read_text())["steps"]["sensitivity"]["extra"]
    assert extra["fanout"] == [{"what": "sensitivity probes", "items": n_probes, "shares": 2}]
    assert ctx.sensitivity_json_path.read_bytes() == local_json
    assert not list(ctx.folder.glob(".sensitivity-*")) and not list(ctx.folder.rglob("*.partial-*"))


def square(x: int) -> int:
    if x == 3:
        raise SqueezeError(f"item {x} refused")
    return x * x


def squares_step(folder, n: int) -> Step:
    out = folder / f"squares-{n}.json"

    def action(io):
        io.out(out).write_text(json.dumps(io.map(square, range(n), "squares")))
    return Step(f"squares {n}", "statistics", {}, [], [out], action)


def test_io_map_on_ray_keeps_the_order_and_a_share_fails_with_its_own_error(cluster, tmp_path):
    """Items dealt into 2 shares (0, 2 in the step's task; 1, 3 in a task of its own): results come
    back in the items' order, and an item failing in the other task fails the step with its own
    message, as it would under the local runner."""
    runner = Runner(tmp_path / "results", echo=lambda line: None)
    assert RayExecutor(runner).run([squares_step(runner.folder, 3)]) == {"ran": 1, "skipped": 0}
    assert json.loads((runner.folder / "squares-3.json").read_text()) == [0, 1, 4]
    extra = json.loads((runner.folder / "manifest.json").read_text())["steps"]["squares 3"]["extra"]
    assert extra == {"fanout": [{"what": "squares", "items": 3, "shares": 2}]}

    with pytest.raises(SqueezeError, match="^item 3 refused$"):
        RayExecutor(runner).run([squares_step(runner.folder, 4)])
    with pytest.raises(SqueezeError, match="^item 3 refused$"):
        Runner(runner.folder, echo=lambda line: None).run([squares_step(runner.folder, 4)])
    assert not (runner.folder / "squares-4.json").exists() and not list(runner.folder.rglob("*.partial-*"))
