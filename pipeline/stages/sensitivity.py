"""Stage sensitivity: what each layer and tensor costs (pipeline.choose.sensitivity), measured
only when a variant chooses its types for a size budget (allocation needs the alphas).

Every probe runs in memory on the base loaded once; each result is logged as it comes
(sensitivity.probes.jsonl in the results folder), so a killed step resumes where it stopped."""

from __future__ import annotations

from pipeline.choose.groups import CANDIDATE_TYPES, LOW_TYPE
from pipeline.choose.memory_probe import PROBE_CHUNKS
from pipeline.choose.sensitivity import run_sensitivity
from pipeline.engine.backend import engine_versions
from pipeline.report.sensitivity import save_sensitivity
from pipeline.run.layout import RunContext
from pipeline.run.runner import Step
from pipeline.stages.imatrix import calibration_writes_layers, imatrix_input
from pipeline.stages.probes import probe_for, probe_params, say_reuse


def steps(ctx: RunContext) -> list[Step]:
    recipe = ctx.recipe
    if not any(v.budget for v in recipe.plans):
        return []
    imatrix = imatrix_input(ctx)
    inputs = [ctx.base_path] + ([imatrix] if imatrix else [])
    if calibration_writes_layers(ctx):
        inputs.append(ctx.layers_path)
    params = {"sensitivity.chunks": PROBE_CHUNKS, "sensitivity.types": list(CANDIDATE_TYPES),
              "sensitivity.low_type": LOW_TYPE, "sensitivity.probes": "in memory", **probe_params(ctx)}
    outputs = [ctx.sensitivity_csv_path, ctx.sensitivity_json_path, ctx.sensitivity_plot_path,
               ctx.sensitivity_md_path]

    def action(io):
        # The base distribution goes in a file in the results folder (which every Ray node sees):
        # the tasks that measure shares of the probes (io.map) each load it from there.
        cache = ctx.folder / "sensitivity.probe-base.npz"
        log_path = ctx.folder / "sensitivity.probes.jsonl"
        with probe_for(ctx, PROBE_CHUNKS, cache=cache, imatrix=imatrix) as probe:
            layers_csv = ctx.layers_path if ctx.layers_path.exists() else None
            result = run_sensitivity(probe, ctx.model_info, imatrix, layers_csv, log_path=log_path, map=io.map,
                                     echo=print)
            say_reuse(probe, "sensitivity")
        save_sensitivity(result, *(io.out(p) for p in outputs))
        log_path.unlink(missing_ok=True)
        cache.unlink(missing_ok=True)
        return {"correlations": result.correlations}

    return [Step("sensitivity", "sensitivity", params, inputs, outputs, action, versions=engine_versions(),
                 produces=f"sensitivity.csv/.json/.png/.md (per layer: KLD removed, attention/MLP at {LOW_TYPE}; "
                          f"per tensor: weight error for {len(CANDIDATE_TYPES)} types)")]
