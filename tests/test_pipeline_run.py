"""The whole backbone on the real Gemma 3 270M: `squeeze run` end to end, resume, partial reruns,
exact tensor types, and a run killed with SIGKILL in the middle of quantizing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.engine.model import Model
from tests.conftest import ROOT, gguf_tensor_types, run_squeeze

pytestmark = pytest.mark.slow

RECIPE = """
version: 1
model: {{source: '{base}'}}
select:
  rules:
    - {{pattern: 'attn_v\\.weight', type: Q8_0}}
variants:
  Q4_K_M: {{ftype: Q4_K_M}}
  Q2_K:
    ftype: Q2_K
    token_embedding_type: Q4_0
    rules: [{{pattern: 'blk\\.1\\.ffn_down', type: Q5_K}}]
  Q4_K_M-pruned:
    ftype: Q4_K_M
    prune: {prune}
    rules: [{{pattern: 'blk\\.6\\.ffn_down', type: Q8_0}}]
score: {{dataset: wikitext-2, ctx: 256, chunks: {chunks}}}
report: {{reference: Q4_K_M}}
"""


@pytest.fixture(scope="module")
def first_run(base_f16, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    recipe = folder / "mini.yaml"
    recipe.write_text(RECIPE.format(base=base_f16, prune="[3, 5]", chunks=2))
    results = folder / "results"
    proc = run_squeeze("run", str(recipe), "--results", str(results))
    assert proc.returncode == 0, proc.stderr
    return recipe, results, proc.stdout


def test_run_writes_a_score_table_for_every_variant(first_run):
    recipe, results, out = first_run
    table = (results / "scores.md").read_text()
    for name in ("Q4_K_M", "Q2_K", "Q4_K_M-pruned"):
        assert f"| {name} " in table
        score = json.loads((results / "scores" / f"{name}.json").read_text())
        assert score["ppl"] > 1 and score["mean_kld"] >= 0 and 0 < score["bpw"] < 16
    scores = {n: json.loads((results / "scores" / f"{n}.json").read_text()) for n in ("Q4_K_M", "Q2_K", "Q4_K_M-pruned")}
    # Sanity that cannot hold by accident: fewer bits or fewer layers cost more than Q4_K_M.
    assert scores["Q2_K"]["mean_kld"] > scores["Q4_K_M"]["mean_kld"]
    assert scores["Q4_K_M-pruned"]["mean_kld"] > scores["Q4_K_M"]["mean_kld"]
    assert scores["Q4_K_M-pruned"]["n_params"] < scores["Q4_K_M"]["n_params"]
    assert not list(results.rglob("*.partial-*"))


def test_tensor_types_are_exactly_what_the_rules_asked(first_run):
    _, results, _ = first_run
    q2 = gguf_tensor_types(results / "variants" / "Q2_K.gguf")
    assert q2["token_embd.weight"] == "Q4_0"
    assert q2["blk.1.ffn_down.weight"] == "Q5_K"
    assert all(q2[f"blk.{i}.attn_v.weight"] == "Q8_0" for i in range(18))
    assert q2["blk.2.ffn_down.weight"] != "Q5_K"  # the rule names layer 1 only

    pruned = gguf_tensor_types(results / "variants" / "Q4_K_M-pruned.gguf")
    assert not any(n.startswith("blk.16.") for n in pruned)  # 18 - 2 layers
    # The rule names original layer 6; after pruning 3 and 5 that layer is blk.4.
    assert pruned["blk.4.ffn_down.weight"] == "Q8_0"
    assert pruned["blk.6.ffn_down.weight"] != "Q8_0"
    written = (results / "variants" / "Q4_K_M-pruned.tensor-types.txt").read_text().splitlines()
    assert "^blk\\.4\\.ffn_down\\.weight$=q8_0" in written


def test_second_run_does_no_work(first_run):
    recipe, results, _ = first_run
    proc = run_squeeze("run", str(recipe), "--results", str(results))
    assert proc.returncode == 0, proc.stderr
    assert "every stage is up to date" in proc.stdout
    assert ": run" not in proc.stdout and ": rerun" not in proc.stdout
    status = run_squeeze("status", str(recipe), "--results", str(results)).stdout
    assert status.count(" done") == len(status.splitlines())


def test_changing_one_variants_prune_reruns_only_that_variant(first_run):
    recipe, results, _ = first_run
    recipe.write_text(RECIPE.format(base=first_run_base(recipe), prune="[3, 4]", chunks=2))
    status = run_squeeze("status", str(recipe), "--results", str(results)).stdout
    assert "quantize Q4_K_M-pruned" in status and "variants.Q4_K_M-pruned.prune changed" in status
    proc = run_squeeze("run", str(recipe), "--results", str(results))
    assert proc.returncode == 0, proc.stderr
    reran = [line.split(":")[0] for line in proc.stdout.splitlines() if ": rerun" in line or ": run," in line]
    # The new layer set gets its own pruned F16 base; nothing of the other variants reruns.
    assert reran == ["prune p3-4", "quantize Q4_K_M-pruned", "score Q4_K_M-pruned", "report"]
    assert "quantize Q4_K_M-pruned: rerun, variants.Q4_K_M-pruned.prune changed" in proc.stdout


def first_run_base(recipe_path) -> str:
    import yaml

    return yaml.safe_load(recipe_path.read_text())["model"]["source"]


def test_sigkill_during_quantize_then_rerun_gives_a_complete_result(base_f16, tmp_path):
    recipe = tmp_path / "kill.yaml"
    recipe.write_text(RECIPE.format(base=base_f16, prune="[3, 5]", chunks=1))
    results = tmp_path / "results"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(recipe), "--results", str(results)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("quantize Q2_K: run"):
            break
    # Kill while llama_model_quantize is writing Q2_K (quantizing takes seconds; wait for its file).
    partial = None
    for _ in range(400):
        partial = next((results / "variants").glob(".Q2_K.gguf.partial-*"), None)
        if partial is not None and partial.stat().st_size > 0:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert partial is not None, "".join(seen)
    assert not (results / "variants" / "Q2_K.gguf").exists()  # nothing half-written looks finished
    status = run_squeeze("status", str(recipe), "--results", str(results)).stdout
    assert [l for l in status.splitlines() if l.startswith("quantize Q2_K")][0].split()[-1] == "missing"

    rerun = run_squeeze("run", str(recipe), "--results", str(results))
    assert rerun.returncode == 0, rerun.stderr
    assert "quantize Q4_K_M: up to date" in rerun.stdout
    assert "quantize Q2_K: run, no previous result" in rerun.stdout
    assert not list(results.rglob("*.partial-*"))
    with Model(results / "variants" / "Q2_K.gguf") as model:
        assert len(model.tokenize("Hello world")) > 1
    assert json.loads((results / "scores" / "Q2_K.json").read_text())["ppl"] > 1
