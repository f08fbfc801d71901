"""Stage prune: one pruned F16 base (and imatrix renamed to its numbering) per distinct set of
layers the variants drop; for `prune: {auto: K}` the K layers are picked first, by measured KLD
(pipeline.measure.prune_auto). How a layer is removed from a GGUF: pipeline.formats.prune.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.engine.backend import engine_versions
from pipeline.errors import SqueezeError
from pipeline.formats.imatrix_file import read_imatrix, write_imatrix
from pipeline.formats.layers_csv import block_influence
from pipeline.formats.prune import check_prune_set, prune_gguf, remap_imatrix
from pipeline.measure.prune_auto import choose_layers, default_candidates, proxy_ranking
from pipeline.measure.sensitivity import imatrix_layer_stats
from pipeline.run.layout import RunContext
from pipeline.run.runner import Step
from pipeline.stages.estimate import check_room, predicted_base_bytes
from pipeline.stages.imatrix import calibration_writes_layers, imatrix_input
from pipeline.stages.probes import probe_for, probe_params

# Calibration chunks the automatic choice measures each candidate set on (few: the runs multiply).
AUTO_PROBE_CHUNKS = 4


def prune_sets(ctx: RunContext) -> dict[str, tuple[int, ...] | int]:
    """tag -> explicit layer set, or tag -> K for `prune: {auto: K}`, over all variants."""
    recipe = ctx.recipe
    out: dict[str, tuple[int, ...] | int] = {}
    for v in recipe.variants:
        k = recipe.prune_auto_for(v)
        if k is not None:
            out[f"auto{k}"] = k
        elif recipe.prune_for(v):
            out[ctx.prune_tag(v)] = recipe.prune_for(v)
    return out


def _auto_where(ctx, v=None) -> str:
    w = ctx.recipe.where
    for v in ([v] if v else []) + list(ctx.recipe.variants):
        if v.prune_auto is not None:
            return w("variants", v.name, "prune", "auto")
    return w("select", "prune", "auto")


def steps(ctx: RunContext) -> list[Step]:
    imatrix = imatrix_input(ctx)
    n_layers = ctx.model_info.n_layers
    out = []
    for tag, what in prune_sets(ctx).items():
        outputs = [ctx.pruned_base_path(tag)] + ([ctx.pruned_imatrix_path(tag)] if imatrix else [])
        inputs = [ctx.base_path] + ([imatrix] if imatrix else [])
        if isinstance(what, int):
            if what >= n_layers:
                raise SqueezeError(f"{_auto_where(ctx)}cannot prune {what} of the model's {n_layers} layers; "
                                   f"K must be at most {n_layers - 1}")
            outputs.append(ctx.prune_choice_path(tag))
            if calibration_writes_layers(ctx) or ctx.layers_path.exists():
                inputs.append(ctx.layers_path)
            params = {"prune.auto": what, "prune.auto.chunks": AUTO_PROBE_CHUNKS, **probe_params(ctx)}
            produces = f"pruned/{ctx.pruned_base_path(tag).name} ({what} layers picked by measured KLD)"
        else:
            check_prune_set(what, n_layers, f"{ctx.recipe.where('select', 'prune')}")
            params = {"prune.layers": list(what)}
            produces = f"pruned/{ctx.pruned_base_path(tag).name} (layers {list(what)} dropped, " \
                       f"sliding-window pattern kept)"
        out.append(Step(f"prune {tag}", "prune", params, inputs, outputs, _action(ctx, tag, what, imatrix),
                        versions=engine_versions(), produces=produces))
    return out


def _action(ctx: RunContext, tag: str, what, imatrix: Path | None):
    def run(io):
        n_layers = ctx.model_info.n_layers
        extra = {}
        if isinstance(what, int):
            cossim = {}
            if imatrix:
                cossim = {k: v["cossim"] for k, v in imatrix_layer_stats(read_imatrix(imatrix)).items()}
            bi = block_influence(ctx.layers_path)
            ranking = proxy_ranking(n_layers, cossim, bi)
            probe = probe_for(ctx, AUTO_PROBE_CHUNKS)
            choice = choose_layers(ctx.base_path, what, n_layers, probe, ranking,
                                   default_candidates(what, n_layers), ctx.folder, _auto_where(ctx))
            choice.proxies = {"cossim": cossim, "block_influence": bi}
            io.out(ctx.prune_choice_path(tag)).write_text(choice.to_json())
            layers = tuple(choice.layers)
            extra = {"layers": list(layers), "probe_kld": choice.kld}
        else:
            layers = what
        check_room(f"prune {tag}", ctx.pruned_base_path(tag).parent, predicted_base_bytes(ctx, layers))
        info = prune_gguf(ctx.base_path, io.out(ctx.pruned_base_path(tag)), layers)
        if imatrix:
            write_imatrix(io.out(ctx.pruned_imatrix_path(tag)), remap_imatrix(read_imatrix(imatrix), n_layers, layers))
        return {**extra, "swa_after": info.swa_after}
    return run
