"""Published figures beside squeeze's: a card's Markdown or CSV table read exactly (and refused in
one line when it cannot be), shown in the report next to the run's own numbers, and accepted by
`squeeze compare` as a results source."""

from __future__ import annotations

import math

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


def test_the_12b_card_table_reads_as_published():
    rows = {r.variant: r for r in read_score_table(CARD_12B)}
    assert len(rows) == 13
    assert (rows["Q4_K_M"].ppl, rows["Q4_K_M"].mean_kld, rows["Q4_K_M"].size_bytes) == (31.22, 1.107, 6.20e9)
    assert (rows["Q8_0"].ppl, rows["Q8_0"].mean_kld, rows["Q8_0"].size_bytes) == (30.01, 1.004, 10.98e9)
    assert rows["F16"].ppl == 9.04 and math.isnan(rows["F16"].mean_kld)
    assert math.isnan(rows["IQ3_M"].ppl) and rows["IQ3_M"].size_bytes == 5.21e9


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
     "{path}: row 2 (Q4_K_M), column 'PPL': expected a number (optionally '± error'), got 'about 20'"),
    ("| Variant | Size |\n|---|---|\n| Q4_K_M | 6.2 |\n",
     "{path}: row 2 (Q4_K_M), column 'Size': a size needs a unit (GB, GiB, MB, MiB) in the cell or the header"),
    ("| Variant | Notes |\n|---|---|\n| Q4_K_M | good |\n",
     "{path}: the table's header ['Variant', 'Notes'] names no column squeeze compares (Size, PPL, KLD, Same top p)"),
    ("| Variant | PPL |\n|---|---|\n| Q4_K_M | 20 | 3 |\n", "{path}: table row 2 has 3 cells, the header 2"),
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
    table = published_table(ctx, tables.scores)
    rows = {r["Variant"]: r for _, r in table.iterrows()}
    assert rows["Q4_K_M"]["PPL"] == "20.0960" and rows["Q4_K_M"]["Published PPL"] == "21.50"
    assert rows["Q4_K_M"]["KLD"] == "0.00480" and rows["Q4_K_M"]["Published KLD"] == "0.006"
    assert rows["Q3_K_M-pruned"]["Published PPL"] == "-"  # not in the card
    assert rows["Base (F16)"]["PPL"] == "20.0000" and rows["Base (F16)"]["Published PPL"] == "20.00"
    md = render_markdown(ctx, tables)
    assert "## Against the published figures" in md and "(https://example.org/card)" in md


def test_compare_takes_a_published_table_as_a_run(tmp_path):
    run = write_run(tmp_path / "results")
    card = tmp_path / "card.md"
    card.write_text(CARD)
    r = CliRunner().invoke(main, ["compare", str(run), str(card), "--variant", "Q4_K_M", "--allow-stale"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    rows = [dict(zip(header, [c.strip() for c in ln.split("|")[1:-1]])) for ln in lines[2:]]
    assert [x["Run"] for x in rows] == ["results (reference)", "card.md"]
    assert rows[1]["PPL"] == "21.5000 (+1.4040 ▲ worse)"
    assert rows[1]["Size (MiB)"] == "230.0 (-11.0 ▼ better)"
    assert rows[1]["Mean KLD"] == "0.00610 (+0.00130 ▲ worse)"
    assert rows[1]["tg t/s"] == "-"  # the card gives no speed
