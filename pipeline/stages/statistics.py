"""Stage statistics: what the importance matrix says about each tensor and layer, as tables and
plots (pipeline.measure.statistics computes, pipeline.report.statistics writes)."""

from __future__ import annotations

from pipeline.engine.backend import engine_versions
from pipeline.formats.imatrix_file import check_against_model, read_imatrix
from pipeline.formats.layers_csv import read_layers_csv
from pipeline.formats.tensor_names import layer_of
from pipeline.report.statistics import write_layers_plot, write_statistics
from pipeline.run.layout import RunContext
from pipeline.run.runner import Step
from pipeline.stages.imatrix import calibration_writes_layers, imatrix_input
from pipeline.work import Fixed, Memory, Write

# Bytes per tensor of the tables, and the seconds tables and plots take: measured on the default
# recipe (pipeline/cost/FITTED.md).
STATS_BYTES_PER_TENSOR = {"stats.csv": 139, "stats.md": 123}
STATISTICS_S = 0.7


def steps(run: RunContext) -> list[Step]:
    cal = run.recipe.calibration
    if cal is None:
        return []
    source = imatrix_input(run)
    has_layers = calibration_writes_layers(run)
    inputs = [source] + ([run.layers_path] if has_layers else [])
    outputs = [run.stats_csv_path, run.stats_layers_csv_path, run.stats_md_path, run.stats_heatmap_path]
    if has_layers:
        outputs.append(run.layers_plot_path)

    def action(io):
        im = read_imatrix(source)
        check_against_model(im, source, run.model_info)
        rows, layers = write_statistics(source, im, io.out(run.stats_csv_path), io.out(run.stats_layers_csv_path),
                                        io.out(run.stats_md_path), io.out(run.stats_heatmap_path))
        extra = {"tensors": len(rows), "layers": len(layers)}
        if has_layers:
            layer_rows = read_layers_csv(run.layers_path)
            write_layers_plot(io.out(run.layers_plot_path), layer_rows, "Layer similarity")
            ranked = sorted(layer_rows, key=lambda r: r.block_influence)
            extra["least_influential_layers"] = [r.layer for r in ranked[:4]]
        return extra

    return [Step("statistics", "statistics", {}, inputs, outputs, action, versions=engine_versions(),
                 produces="stats.csv + stats.md + stats.png" + (" + layers.png" if has_layers else ""),
                 work=lambda shape: _work(run, shape))]


def _work(run: RunContext, shape) -> list:
    n = sum(1 for t in shape.tensors if layer_of(t.name) is not None and t.shape and len(t.shape) >= 2)
    return [Fixed(STATISTICS_S), Memory(64 << 20),
            Write(run.stats_csv_path, 200 + STATS_BYTES_PER_TENSOR["stats.csv"] * n),
            Write(run.stats_md_path, 2000 + STATS_BYTES_PER_TENSOR["stats.md"] * n),
            Write(run.stats_layers_csv_path, 40 + 36 * shape.n_layers)]
