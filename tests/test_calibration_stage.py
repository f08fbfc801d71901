"""The imatrix and statistics stages inside a run: what a recipe with `calibration:` produces,
that variants are quantized with it, and the one-line answer to too little calibration text."""

from __future__ import annotations

import pytest

from pipeline.errors import SqueezeError
from pipeline.formats.imatrix_file import read_imatrix
from pipeline.formats.layers_csv import read_layers_csv
from pipeline.run.runner import Runner
from pipeline.stages.registry import build_steps, open_run
from tests.conftest import gguf_fields

RECIPE = """\
name: calib
model:
  source: {source}
  base_type: F16
calibration:
  datasets: [{text}]
  ctx: {ctx}
  chunks: 2
variants:
  Q2_K: {{ftype: Q2_K}}
score: {{chunks: 1}}
report: {{reference: Q2_K}}
"""

UP_TO_QUANTIZE = {"convert", "imatrix", "statistics", "quantize"}


def run_stages(recipe_path, stages=UP_TO_QUANTIZE):
    ctx = open_run(recipe_path, results=recipe_path.parent / "results")
    if "convert" not in stages:  # the base as convert would link it, without hashing 543 MB twice
        ctx.folder.mkdir(parents=True, exist_ok=True)
        ctx.base_path.symlink_to(ctx.recipe.model.source)
    log = []
    Runner(ctx.folder, echo=log.append).run([s for s in build_steps(ctx) if s.stage in stages])
    return ctx, log


@pytest.mark.slow
def test_run_writes_imatrix_layers_and_statistics_and_quantizes_with_them(base_f16, calibration_sample,
                                                                           write_recipe):
    recipe = write_recipe(RECIPE.format(source=base_f16, text=calibration_sample, ctx=256))
    ctx, log = run_stages(recipe)
    assert "imatrix: run, no previous result" in log and "statistics: run, no previous result" in log
    im = read_imatrix(ctx.imatrix_path)
    assert (im.chunk_count, im.chunk_size, im.datasets) == (2, 256, [str(calibration_sample)])
    assert len(im.entries) == 18 * 7
    assert [r.tokens for r in read_layers_csv(ctx.layers_path)] == [512] * 18
    stats = ctx.stats_csv_path.read_text().splitlines()
    assert stats[0].startswith("layer,tensor,name,sum_act2,min,max,mean,stddev,active_pct,n,entropy")
    assert len(stats) == 1 + 18 * 7
    assert len(ctx.stats_layers_csv_path.read_text().splitlines()) == 1 + 18
    assert "| Layer | μΣ(Act²) | μZD | μCosSim |" in ctx.stats_md_path.read_text()
    for png in (ctx.stats_heatmap_path, ctx.layers_plot_path):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the variant was quantized with this imatrix (llama-quantize's metadata keys say so)
    fields = gguf_fields(ctx.variant_path("Q2_K"))
    assert fields["quantize.imatrix.file"] == str(ctx.imatrix_path)
    assert fields["quantize.imatrix.chunks_count"] == 2
    # nothing left behind, and a second run has nothing to do
    assert not (ctx.folder / "imatrix.checkpoint.npz").exists()
    _, log = run_stages(recipe)
    assert all(line.endswith(": up to date") for line in log), log


@pytest.mark.slow
@pytest.mark.parametrize("text", ["", "Too short for a chunk."])
def test_too_little_calibration_text_is_one_line(base_f16, write_recipe, tmp_path, text):
    short = tmp_path / "short.txt"
    short.write_text(text)
    recipe = write_recipe(RECIPE.format(source=base_f16, text=short, ctx=64))
    with pytest.raises(SqueezeError) as exc:
        run_stages(recipe, {"imatrix"})
    n_tokens = 1 if not text else 7  # BOS, plus the words
    assert str(exc.value) == (f"{recipe}:6: calibration.datasets: {short} tokenize to {n_tokens} tokens, fewer "
                              f"than one chunk of calibration.ctx = 64; give more text or a smaller ctx")


@pytest.mark.slow
def test_imatrix_from_another_model_stops_the_run(base_f16, write_recipe, tmp_path):
    import numpy as np

    from pipeline.formats.imatrix_file import Imatrix, ImatrixEntry, write_imatrix

    other = tmp_path / "smollm2.imatrix.gguf"
    # SmolLM2-135M's first attention input: 576 columns, not Gemma 3 270M's 640
    write_imatrix(other, Imatrix(entries={"blk.0.attn_q.weight": ImatrixEntry(np.ones((1, 576), np.float32),
                                                                              np.array([512]))}))
    recipe = write_recipe(RECIPE.format(source=base_f16, text="groups_merged", ctx=512)
                          .replace("  chunks: 2\n", f"  chunks: 2\n  imatrix: {other}\n"))
    with pytest.raises(SqueezeError) as exc:
        run_stages(recipe, {"statistics"})
    assert str(exc.value) == (f"{other}: imatrix entry blk.0.attn_q.weight has 576 values, the model's tensor "
                              f"640x1024 needs 640; the imatrix was made for another model")


def test_imatrix_commands_combine_and_describe(tmp_path):
    import numpy as np
    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.formats.imatrix_file import Imatrix, ImatrixEntry, write_imatrix

    def part(scale):
        return Imatrix(entries={f"blk.{i}.ffn_up.weight": ImatrixEntry(np.full((1, 4), scale * (i + 1), np.float32),
                                                                       np.array([512])) for i in range(2)},
                       datasets=[f"part{scale}.txt"], chunk_count=1, chunk_size=512)
    write_imatrix(tmp_path / "a.gguf", part(1))
    write_imatrix(tmp_path / "b.gguf", part(2))
    out = CliRunner().invoke(main, ["imatrix-combine", str(tmp_path / "ab.gguf"), str(tmp_path / "a.gguf"),
                                    str(tmp_path / "b.gguf")])
    assert out.exit_code == 0 and out.output == f"{tmp_path / 'ab.gguf'}: 2 entries, 2 chunks of 512\n"
    ab = read_imatrix(tmp_path / "ab.gguf")
    assert ab.datasets == ["part1.txt", "part2.txt"]
    assert ab.entries["blk.1.ffn_up.weight"].sums.tolist() == [[6.0] * 4]
    assert ab.entries["blk.1.ffn_up.weight"].counts.tolist() == [1024]
    out = CliRunner().invoke(main, ["imatrix-stats", str(tmp_path / "ab.gguf"), "--out", str(tmp_path / "st")])
    assert out.exit_code == 0, out.output
    assert out.output.startswith("2 tensors, 2 layers -> ")
    assert (tmp_path / "st" / "stats.png").read_bytes()[:4] == b"\x89PNG"
    out = CliRunner().invoke(main, ["imatrix-stats", str(tmp_path / "missing.gguf")])
    assert out.exit_code == 1 and out.output == f"Error: {tmp_path / 'missing.gguf'}: imatrix file not found\n"
