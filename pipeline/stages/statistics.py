"""Stage statistics: what the importance matrix says about each tensor and layer, as tables and
plots (pipeline.measure.statistics computes, pipeline.report.statistics writes)."""

from __future__ import annotations

from pipeline.engine.backend import engine_versions
from pipeline.formats.imatrix_file import check_against_model, read_imatrix
from pipeline.formats.layers_csv import read_layers_csv
from pipeline.report.statistics import write_layers_plot, write_statistics
from pipeline.run.layout import RunContext
from pipeline.run.runner import Step
from pipeline.stages.imatrix import calibration_writes_layers, imatrix_input


def steps(ctx: RunContext) -> list[Step]:
    cal = ctx.recipe.calibration
    if cal is None:
        return []
    source = imatrix_input(ctx)
    has_layers = calibration_writes_layers(ctx)
    inputs = [source] + ([ctx.layers_path] if has_layers else [])
    outputs = [ctx.stats_csv_path, ctx.stats_layers_csv_path, ctx.stats_md_path, ctx.stats_heatmap_path]
    if has_layers:
        outputs.append(ctx.layers_plot_path)

    def action(io):
        im = read_imatrix(source)
        check_against_model(im, source, ctx.model_info)
        rows, layers = write_statistics(source, im, io.out(ctx.stats_csv_path), io.out(ctx.stats_layers_csv_path),
                                        io.out(ctx.stats_md_path), io.out(ctx.stats_heatmap_path))
        extra = {"tensors": len(rows), "layers": len(layers)}
        if has_layers:
            layer_rows = read_layers_csv(ctx.layers_path)
            write_layers_plot(io.out(ctx.layers_plot_path), layer_rows, "Layer similarity")
            ranked = sorted(layer_rows, key=lambda r: r.block_influence)
            extra["least_influential_layers"] = [r.layer for r in ranked[:4]]
        return extra

    return [Step("statistics", "statistics", {}, inputs, outputs, action, versions=engine_versions(),
                 produces="stats.csv + stats.md + stats.png" + (" + layers.png" if has_layers else ""))]
