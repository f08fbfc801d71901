"""Stage sensitivity: what each layer and tensor costs (pipeline.choose.sensitivity), measured
only when a variant chooses its types for a size budget (allocation needs the alphas).

Every probe runs in memory on the base loaded once; each result is logged as it comes
(sensitivity.probes.jsonl in the results folder), so a killed step resumes where it stopped."""

from __future__ import annotations

import math

from pipeline.choose.groups import CANDIDATE_TYPES, LOW_TYPE, kind_units, low_type_for
from pipeline.choose.memory_probe import PROBE_CHUNKS
from pipeline.choose.sensitivity import run_sensitivity
from pipeline.choose.weight_errors import row_limit, sampled_rows
from pipeline.engine.backend import engine_versions
from pipeline.formats.ggml_types import fits
from pipeline.formats.tensor_names import layer_of
from pipeline.report.sensitivity import save_sensitivity
from pipeline.run.layout import RunContext
from pipeline.run.runner import Step
from pipeline.stages.imatrix import calibration_writes_layers, imatrix_input
from pipeline.stages.estimate import largest_probe, probe_resident, probe_session, quantizable
from pipeline.stages.probes import probe_for, probe_params, say_reuse
from pipeline.work import Note, Roundtrip, RoundtripWeights


def steps(run: RunContext) -> list[Step]:
    recipe = run.recipe
    if not any(v.budget for v in recipe.plans):
        return []
    imatrix = imatrix_input(run)
    inputs = [run.base_path] + ([imatrix] if imatrix else [])
    if calibration_writes_layers(run):
        inputs.append(run.layers_path)
    params = {"sensitivity.chunks": PROBE_CHUNKS, "sensitivity.types": list(CANDIDATE_TYPES),
              "sensitivity.low_type": LOW_TYPE, "sensitivity.probes": "in memory", **probe_params(run)}
    outputs = [run.sensitivity_csv_path, run.sensitivity_json_path, run.sensitivity_plot_path,
               run.sensitivity_md_path]

    def action(io):
        # The base distribution goes in a file in the results folder (which every Ray node sees):
        # the tasks that measure shares of the probes (io.map) each load it from there.
        cache = run.folder / "sensitivity.probe-base.npz"
        log_path = run.folder / "sensitivity.probes.jsonl"
        with probe_for(run, PROBE_CHUNKS, cache=cache, imatrix=imatrix) as probe:
            layers_csv = run.layers_path if run.layers_path.exists() else None
            result = run_sensitivity(probe, run.model_info, imatrix, layers_csv, log_path=log_path, map=io.map,
                                     echo=print)
            say_reuse(probe, "sensitivity")
        save_sensitivity(result, *(io.out(p) for p in outputs))
        log_path.unlink(missing_ok=True)
        cache.unlink(missing_ok=True)
        return {"correlations": result.correlations}

    return [Step("sensitivity", "sensitivity", params, inputs, outputs, action, versions=engine_versions(),
                 produces=f"sensitivity.csv/.json/.png/.md (per layer: KLD removed, attention/MLP at {LOW_TYPE}; "
                          f"per tensor: weight error for {len(CANDIDATE_TYPES)} types)",
                 work=lambda shape: _work(run, shape))]


def _work(run: RunContext, shape) -> list:
    """The probes (per layer: removed, attention low, MLP low; the embedding low; each tensor kind
    low in every layer), which quantize every block tensor twice at its low type (once in its
    layer's attention or MLP probe, once in its kind's) and the embedding once; and the weight
    errors of every candidate type a tensor fits, on the rows pipeline.choose.weight_errors samples."""
    n = shape.n_layers
    info = run.model_info
    n_probes = 3 * n + 1 + len(kind_units(info)) if info is not None else 3 * n + 1 + 7
    low = {t.name: low_type_for(t.shape) for t in quantizable(shape)}
    in_blocks = {name: ty for name, ty in low.items() if layer_of(name) is not None}
    work = probe_session(shape, run, n_probes, PROBE_CHUNKS, quantized=True)
    work += [Roundtrip(in_blocks, times=2), Roundtrip({name: ty for name, ty in low.items() if name not in in_blocks})]
    sampled = 0
    for t in quantizable(shape):
        mats = int(math.prod(t.shape[2:])) if len(t.shape) > 2 else 1
        weights = mats * len(sampled_rows(int(t.shape[1]), row_limit(t.name, mats))) * int(t.shape[0])
        sampled += weights
        work += [RoundtripWeights(weights, ty) for ty in CANDIDATE_TYPES if fits(t.shape, ty)]
    return work + [probe_resident(shape, run, largest_probe(shape, low)),
                   Note(f"{n_probes} in-memory KLD probes; weight errors for {len(CANDIDATE_TYPES)} types "
                        f"on {sampled / 1e6:.0f}M sampled weights")]
