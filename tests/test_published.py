"""Published figures beside squeeze's: a card's Markdown or CSV table read exactly (and refused in
one line when it cannot be), shown in the report next to the run's own numbers, and accepted by
`squeeze compare` as a results source."""

from __future__ import annotations

import math
import re

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import SqueezeError
from pipeline.formats.score_table import read_score_table
from pipeline.recipe.load import load_recipe
from pipeline.report.tables import load_run, published_table, render_markdown
from pipeline.run.layout import RunContext
from tests.conftest import ROOT
from tests.test_report import RECIPE, write_run

CARD_12B = ROOT / "recipes" / "cards" / "eaddario-gemma-3-12b-it-pruned.md"

CARD = """\
Some prose before the table.

| Model | File size | PPL | KLD | 99% KLD | Same top p |
|---|---|---|---|---|---|
| **Q4_K_M** | 230 MiB | 21.50 ± 0.30 | 0.0061 +/- 0.0002 | 0.05 | 95.1% |
| Q3_K_M | 0.2 GB | 23.1 | – | 0.5 | - |
"""


SHARED_CARD = ROOT.parent / "shared" / "cards" / "eaddario-gemma-3-12b-it-pruned.md"
CARD_VARIANTS = ["IQ3_M", "IQ3_S", "IQ4_NL", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q4_K_M", "Q4_K_M-unpruned", "Q4_K_S",
                 "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0", "F16"]


def test_the_12b_card_table_reads_as_published():
    rows = {r.variant: r for r in read_score_table(CARD_12B)}
    assert list(rows) == CARD_VARIANTS
    q4 = rows["Q4_K_M"]
    assert (q4.size_bytes, q4.ppl, q4.cor_ln_ppl_pct, q4.mean_kld, q4.rms_dp_pct) == \
        (6.20e9, 31.219358, 80.83, 1.106608, 29.739)
    assert (q4.arc_pct, q4.hellaswag_pct, q4.mmlu_pct, q4.truthfulqa_pct, q4.winogrande_pct, q4.task_average_pct) == \
        (69.8667, 77.47, 43.6, 40.8, 68.4, 60.03)
    assert (q4.pp_tps, q4.tg_tps) == (523.27, 46.92)
    stock = rows["Q4_K_M-unpruned"]
    assert (stock.size_bytes, stock.mean_kld, stock.pp_tps, stock.winogrande_pct) == (7.30e9, 0.04556, 482.36, 75.7333)
    assert rows["F16"].ppl == 9.042786 and math.isnan(rows["F16"].mean_kld) and rows["F16"].hellaswag_pct == 81.2
    for name in CARD_VARIANTS[:-1]:  # no "-" left: every variant has every quality and task figure
        r = rows[name]
        assert not any(math.isnan(x) for x in (r.size_bytes, r.ppl, r.cor_ln_ppl_pct, r.mean_kld, r.rms_dp_pct,
                                               r.arc_pct, r.hellaswag_pct, r.mmlu_pct, r.truthfulqa_pct,
                                               r.winogrande_pct, r.task_average_pct)), name


@pytest.mark.skipif(not SHARED_CARD.exists(), reason="the project's shared copy of the card is not here")
def test_the_12b_card_holds_every_figure_of_the_published_card():
    """Each number the published card gives (sizes, PPL/KLD/RMS Δp with their ±, tasks, speed)
    is in the recipe's copy."""
    def numbers(text):
        return re.findall(r"(?<![\w.])\d+\.\d+|\d+(?:\.\d+)?%", text)

    published = set(numbers("\n".join(ln for ln in SHARED_CARD.read_text().splitlines() if ln.startswith("|"))))
    ours = set(numbers(CARD_12B.read_text()))
    assert len(published) > 200 and published <= ours, sorted(published - ours)


def test_units_errors_marks_and_columns_are_read_from_the_header(tmp_path):
    path = tmp_path / "card.md"
    path.write_text(CARD)
    q4, q3 = read_score_table(path)
    assert q4.variant == "Q4_K_M" and q4.size_bytes == 230 * 2**20
    assert (q4.ppl, q4.mean_kld, q4.same_top_pct) == (21.5, 0.0061, 95.1)  # "99% KLD" is not the mean
    assert q3.size_bytes == 0.2e9 and q3.ppl == 23.1 and math.isnan(q3.mean_kld) and math.isnan(q3.same_top_pct)
    csv = tmp_path / "card.csv"
    csv.write_text("Variant,Size (GiB),PPL\nQ8_0,0.25,20.1\n")
    (q8,) = read_score_table(csv)
    assert q8.size_bytes == 0.25 * 2**30 and q8.ppl == 20.1


@pytest.mark.parametrize("text, message", [
    ("no table here\n", "{path}: no table found (expected a Markdown or CSV table whose first column names the variants)"),
    ("| Variant | PPL |\n|---|---|\n| Q4_K_M | about 20 |\n",
     "{path}: line 3 (Q4_K_M), column 'PPL': expected a number (optionally '± error'), got 'about 20'"),
    ("| Variant | Size |\n|---|---|\n| Q4_K_M | 6.2 |\n",
     "{path}: line 3 (Q4_K_M), column 'Size': a size needs a unit (GB, GiB, MB, MiB) in the cell or the header"),
    ("| Variant | Notes |\n|---|---|\n| Q4_K_M | good |\n",
     "{path}: the table's header ['Variant', 'Notes'] names no column squeeze compares (Size, PPL, KLD, Same top p, "
     "RMS Δp, task benchmarks, pp/tg t/s)"),
    ("| Variant | PPL |\n|---|---|\n| Q4_K_M | 20 |\n\n| Variant | PPL |\n|---|---|\n| Q4_K_M | 21 |\n",
     "{path}: line 7 (Q4_K_M), column 'PPL': '21' differs from the same figure in an earlier table (20)"),
    ("| Variant | PPL |\n|---|---|\n| Q4_K_M | 20 | 3 |\n", "{path}: line 3 has 3 cells, its table's header 2"),
])
def test_a_bad_table_is_refused_in_one_line(tmp_path, text, message):
    path = tmp_path / "card.md"
    path.write_text(text)
    with pytest.raises(SqueezeError) as err:
        read_score_table(path)
    assert str(err.value) == message.format(path=path)


def published_recipe(write_recipe, tmp_path, base="F16", table="card.md"):
    (tmp_path / "card.md").write_text(CARD + "| F16 | 500 MiB | 20.0 | - | - | - |\n")
    return write_recipe(RECIPE.replace("report: {", f"report: {{published: {{table: {table}, base: {base}, "
                                                   "source: 'https://example.org/card'}, "))


def test_a_recipe_names_a_missing_table_or_row_in_one_line(write_recipe, tmp_path):
    path = published_recipe(write_recipe, tmp_path, table="gone.md")
    with pytest.raises(SqueezeError, match=rf"^{path}:\d+: report.published.table: {tmp_path / 'gone.md'}: no such file"):
        load_recipe(path)
    path = published_recipe(write_recipe, tmp_path, base="F32")
    with pytest.raises(SqueezeError) as err:
        load_recipe(path)
    assert str(err.value).endswith(f"report.published.base: 'F32' is not a row of {tmp_path / 'card.md'} "
                                   "(its rows: Q4_K_M, Q3_K_M, F16)")


def test_the_report_puts_the_published_figures_beside_the_runs(write_recipe, tmp_path):
    ctx = RunContext(load_recipe(published_recipe(write_recipe, tmp_path)), write_run(tmp_path / "results"))
    tables = load_run(ctx.folder, [v.name for v in ctx.recipe.variants])
    table = published_table(ctx, tables)
    rows = {r["Variant"]: r for _, r in table.iterrows()}
    assert rows["Q4_K_M"]["PPL"] == "20.0960" and rows["Q4_K_M"]["Published PPL"] == "21.5000"
    assert rows["Q4_K_M"]["Mean KLD"] == "0.00480" and rows["Q4_K_M"]["Published Mean KLD"] == "0.00610"
    assert rows["Q3_K_M-pruned"]["Published PPL"] == "-"  # not in the card
    assert rows["Base (F16)"]["PPL"] == "20.0000" and rows["Base (F16)"]["Published PPL"] == "20.0000"
    # the card gives Same top p, the run measures it: shown; the card has no tasks or speed: not shown
    assert rows["Q4_K_M"]["Same top p %"] == "96.50" and rows["Q4_K_M"]["Published Same top p %"] == "95.10"
    assert not [c for c in table.columns if "HellaSwag" in c or "t/s" in c or "RMS" in c]
    md = render_markdown(ctx, tables)
    assert "## Against the published figures" in md and "(https://example.org/card)" in md


FULL_CARD = """\
| Variant | Size (GB) | PPL | Cor(ln PPL) | Mean KLD | RMS Δp (%) |
|---|---|---|---|---|---|
| Q4_K_M | 0.25 | 21.5 ± 0.3 | 99.10% | 0.0061 ± 0.0002 | 3.100 ± 0.050 |
| F16 | - | 20.0 ± 0.2 | 100% | - | - |

| Variant | ARC | HellaSwag | MMLU | TruthfulQA | WinoGrande | Average |
|---|---|---|---|---|---|---|
| Q4_K_M | 60.0 ± 1.7 | 48.0 | 40.0 | 30.0 | 59.0 ± 1.7 | 47.4 |
| F16 | 61.0 ± 1.7 | 52.0 | 41.0 | 31.0 | 61.0 ± 1.6 | 49.2 |

| Variant | Model size (GiB) | pp512 t/s | tg128 t/s |
|---|---|---|---|
| Q4_K_M | 0.23 | 480.5 ± 3.0 | 44.1 ± 0.6 |
"""


def test_the_report_shows_every_figure_the_card_and_the_run_both_have(write_recipe, tmp_path):
    """Cor(ln PPL), RMS Δp, the task columns the run measured (HellaSwag, WinoGrande; not ARC, MMLU,
    TruthfulQA) and speed, from a card laid out as several tables."""
    recipe = published_recipe(write_recipe, tmp_path)
    (tmp_path / "card.md").write_text(FULL_CARD)
    ctx = RunContext(load_recipe(recipe), write_run(tmp_path / "results"))
    tables = load_run(ctx.folder, [v.name for v in ctx.recipe.variants])
    table = published_table(ctx, tables)
    assert list(table.columns) == [
        "Variant", "Size (GB)", "Published size (GB)", "PPL", "Published PPL", "Cor(ln PPL) %",
        "Published Cor(ln PPL) %", "Mean KLD", "Published Mean KLD", "RMS Δp %", "Published RMS Δp %", "HellaSwag %",
        "Published HellaSwag %", "WinoGrande %", "Published WinoGrande %", "pp t/s", "Published pp t/s",
        "tg t/s", "Published tg t/s"]
    rows = {r["Variant"]: r for _, r in table.iterrows()}
    q4 = rows["Q4_K_M"]
    assert (q4["Cor(ln PPL) %"], q4["Published Cor(ln PPL) %"]) == ("99.10", "99.10")
    assert (q4["RMS Δp %"], q4["Published RMS Δp %"]) == ("2.078", "3.100")
    assert (q4["HellaSwag %"], q4["Published HellaSwag %"]) == ("45.00", "48.00")  # hellaswag: 9 of 20 right
    assert (q4["WinoGrande %"], q4["pp t/s"], q4["Published pp t/s"], q4["Published tg t/s"]) == \
        ("60.00", "500.0", "480.5", "44.1")
    base = rows["Base (F16)"]  # the base's own task scores beside the card's base row
    assert (base["HellaSwag %"], base["Published HellaSwag %"], base["pp t/s"]) == ("50.00", "52.00", "-")
    md = render_markdown(ctx, tables)
    assert "Published RMS Δp %" in md and "speed on the machine it was measured on" in md


def compare_with_card(tmp_path, card_text: str) -> list[dict[str, str]]:
    """`squeeze compare` of a written run against a card, its Q4_K_M rows as column -> cell."""
    run = write_run(tmp_path / "results")
    card = tmp_path / "card.md"
    card.write_text(card_text)
    r = CliRunner().invoke(main, ["compare", str(run), str(card), "--variant", "Q4_K_M", "--allow-stale"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    return [dict(zip(header, [c.strip() for c in ln.split("|")[1:-1]])) for ln in lines[2:]]


def test_compare_shows_the_cards_task_and_speed_columns(tmp_path):
    rows = compare_with_card(tmp_path, FULL_CARD)
    assert rows[1]["RMS Δp %"] == "3.100 (+1.022 ▲ worse)"
    assert rows[1]["HellaSwag %"] == "48.00 (+3.00 ▲ better)"
    assert rows[1]["Cor(ln PPL) %"] == "99.10 (=)"
    assert rows[1]["pp t/s"] == "480.5 (-19.5 ▼ worse)" and rows[1]["tg t/s"] == "44.1 (+4.1 ▲ better)"
    # the run measured two of the card's five task sets: no average of five to compare
    assert rows[0]["ARC %"] == "-" and rows[1]["ARC %"] == "60.00" and rows[0]["Card task avg %"] == "-"


def test_compare_takes_a_published_table_as_a_run(tmp_path):
    rows = compare_with_card(tmp_path, CARD)
    assert [x["Run"] for x in rows] == ["results (reference)", "card.md"]
    assert rows[1]["PPL"] == "21.5000 (+1.4040 ▲ worse)"
    assert rows[1]["Size (MiB)"] == "230.0 (-11.0 ▼ better)"
    assert rows[1]["Mean KLD"] == "0.00610 (+0.00130 ▲ worse)"
    assert rows[1]["tg t/s"] == "-"  # the card gives no speed
