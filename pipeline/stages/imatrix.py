"""Stage imatrix: the importance matrix (and per-layer similarity) from one calibration pass
(pipeline.measure.calibration).

When the recipe names an existing imatrix file (`calibration.imatrix`), that file is used as is
and no pass runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.cost import estimate as est
from pipeline.engine.backend import engine_versions
from pipeline.errors import SqueezeError
from pipeline.formats.imatrix_file import write_imatrix
from pipeline.formats.layers_csv import write_layers_csv
from pipeline.formats.moments_file import MomentsWriter
from pipeline.measure.calibration import calibration_tokens, collect, layer_rows, moment_groups, to_imatrix
from pipeline.run.layout import RunContext
from pipeline.run.runner import Step
from pipeline.sources.datasets import resolve_dataset
from pipeline.cost.estimate import shape_from_info
from pipeline.stages.estimate import base_model, moment_inputs, moment_layer_bytes, moments_work
from pipeline.work import Forward, Hook, Load, Memory, Note, Resident, Write


def imatrix_input(run: RunContext) -> Path | None:
    """The imatrix file variants are quantized with, or None when the recipe has no calibration."""
    cal = run.recipe.calibration
    if cal is None:
        return None
    if cal.imatrix:
        return resolve_dataset(cal.imatrix, run.recipe_dir, run.recipe.where("calibration", "imatrix"))
    return run.imatrix_path


def calibration_writes_layers(run: RunContext) -> bool:
    """layers.csv comes from squeeze's own calibration pass only (not from a given imatrix)."""
    cal = run.recipe.calibration
    return cal is not None and not cal.imatrix


def calibration_files(run: RunContext) -> list[Path]:
    cal = run.recipe.calibration
    return [resolve_dataset(name, run.recipe_dir, run.recipe.where("calibration", "datasets", i))
            for i, name in enumerate(cal.datasets)]


def steps(run: RunContext) -> list[Step]:
    if not calibration_writes_layers(run):
        return []
    cal = run.recipe.calibration
    files = calibration_files(run)
    params = run.recipe.values("calibration.datasets", "calibration.ctx", "calibration.chunks")
    outputs = [run.imatrix_path, run.layers_path]
    if wants_moments(run):  # only when asked: existing runs stay up to date
        params["calibration.second_moments"] = True
        outputs.append(run.moments_path)
    return [Step("imatrix", "imatrix", params, [run.base_path, *files], outputs, lambda io: _calibrate(run, files, io),
                 versions=engine_versions(),
                 produces=f"imatrix.gguf + layers.csv ({cal.chunks} chunks of {cal.ctx} from "
                          f"{', '.join(cal.datasets)})", work=lambda shape: _work(run, shape))]


def wants_moments(run: RunContext) -> bool:
    """Whether a variant rounds with gptq, which needs the inputs' second moments."""
    return any(v.rounding.type == "gptq" for v in run.recipe.plans)


def _work(run: RunContext, shape) -> list:
    """The calibration tokens through the base, every linear input accumulated by the hook. (The
    pass asks for every token's logits; measured on the sizes of results/bench/scale.json it costs
    the blocks' work and the hook's: the rate benchmark's hook rate holds the rest.)"""
    cal = run.recipe.calibration
    tokens, n_seq = cal.chunks * cal.ctx, max(1, 2048 // cal.ctx)
    base = base_model(shape, run)
    work = [Load(), Forward(tokens, base.flops_per_token, False), Hook(tokens),
            Resident(base, n_seq * cal.ctx, n_seq * cal.ctx),
            Write(run.imatrix_path, est.imatrix_file_bytes(shape)), Write(run.layers_path, 40 + 32 * shape.n_layers),
            Note(f"{cal.chunks} x {cal.ctx} tokens through the base")]
    if wants_moments(run):
        # float64 while collected (a few blocks per pass where they do not fit at once), float32
        # on disk; a later pass runs the blocks up to its last one and keeps nothing else
        n_bytes, per_layer = moments_bytes(shape), moment_layer_bytes(shape)
        groups = moment_groups(per_layer)
        for layers in groups[1:]:
            work += [Load(), Forward(tokens, base.flops_per_token * (layers[-1] + 1) / shape.n_layers, False)]
        held = max(sum(per_layer[i] for i in layers) for layers in groups)
        work += [*moments_work(shape, tokens), Write(run.moments_path, n_bytes), Memory(held + held // 2),
                 Note(f"input second moments collected in {len(groups)} pass{'es' if len(groups) > 1 else ''}")]
    return work


def moments_bytes(shape) -> int:
    """The second moments' file: n_in^2 float32 per distinct input of a block matrix (q/k/v share
    one, gate/up one; a routed expert tensor's input one per expert)."""
    return sum(4 * matrices * n * n + 64 for n, matrices in moment_inputs(shape).values())


def _calibrate(run: RunContext, files: list[Path], io) -> dict:
    cal = run.recipe.calibration
    tokens = calibration_tokens(run.base_path, files)
    available = len(tokens) // cal.ctx
    if available < 1:
        raise SqueezeError(f"{run.recipe.where('calibration', 'datasets')}{', '.join(map(str, cal.datasets))} "
                           f"tokenize to {len(tokens)} tokens, fewer than one chunk of calibration.ctx = "
                           f"{cal.ctx}; give more text or a smaller ctx")
    n_chunks = min(cal.chunks, available)
    if n_chunks < cal.chunks:
        print(f"imatrix: the calibration text has {available} chunks of {cal.ctx} tokens, "
              f"not calibration.chunks = {cal.chunks}; using {available}", file=sys.stderr)
    checkpoint = run.folder / "imatrix.checkpoint.npz"
    groups = moment_groups(moment_layer_bytes(shape_from_info(run.model_info))) if wants_moments(run) else []
    totals, extra = collect(run.base_path, tokens, cal.ctx, n_chunks, threads=run.threads, checkpoint=checkpoint,
                            n_gpu_layers=run.recipe.model.n_gpu_layers, second_moments=bool(groups),
                            moment_layers=groups[0] if groups else None)
    write_imatrix(io.out(run.imatrix_path), to_imatrix(totals, cal.ctx, list(cal.datasets)))
    write_layers_csv(io.out(run.layers_path), layer_rows(totals))
    parts = [checkpoint]
    if groups:
        with MomentsWriter(io.out(run.moments_path)) as writer:
            writer.add(totals.moments, totals.moment_of)
            totals.moments.clear()
            # the later passes: each resumes from its own checkpoint, as the first does
            for k, layers in enumerate(groups[1:], start=2):
                parts.append(run.folder / f"imatrix.checkpoint.moments-{k}.npz")
                part, _ = collect(run.base_path, tokens, cal.ctx, n_chunks, threads=run.threads, checkpoint=parts[-1],
                                  n_gpu_layers=run.recipe.model.n_gpu_layers, moment_layers=layers, moments_only=True,
                                  progress_desc=f"moments {k}/{len(groups)}")
                writer.add(part.moments, part.moment_of)
        extra["moment_passes"] = len(groups)
    for path in parts:
        path.unlink(missing_ok=True)
    return extra
