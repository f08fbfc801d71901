"""Stage prune: one pruned F16 base (and imatrix renamed to its numbering) per distinct set of
layers the variants drop; for `prune: {auto: K}` the K layers are picked first, by KLD measured
on the base with layers removed in memory (pipeline.choose.prune_auto: SLEB-style greedy and
contiguous windows searched, the proxies measured for comparison), then pruned from the file
once. How a layer is removed from a GGUF: pipeline.formats.prune.

For `prune: {up_to: K}` (or `prune: auto`) under a variant's size budget, removing layers is weighed
against spending the same bytes on bits: for 0, 1, ... K layers (the search's sets), the types for
the budget are allocated with those layers gone, and each whole mix - layers removed and types
applied together - is measured in memory; the lowest KLD wins (pipeline.choose.prune_or_bits),
and the choice JSON keeps every candidate and the reasoning allocation.md quotes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.choose.budget import kept_types, layout
from pipeline.choose.measured_allocation import choose_types
from pipeline.choose.memory_probe import PROBE_CHUNKS
from pipeline.choose.prune_auto import SEARCH, PruneChoice, choose_layers
from pipeline.choose.prune_or_bits import PruneCandidate, choose_prune_or_bits
from pipeline.choose.sensitivity import imatrix_layer_stats, load_sensitivity
from pipeline.engine.backend import engine_versions
from pipeline.engine.layer_kinds import sliding_window_layers
from pipeline.errors import SqueezeError
from pipeline.formats.imatrix_file import read_imatrix, write_imatrix
from pipeline.formats.layers_csv import block_influence
from pipeline.formats.prune import check_prune_set, prune_gguf, remap_imatrix
from pipeline.run.layout import RunContext
from pipeline.run.runner import Step
from pipeline.stages.estimate import check_room, predicted_base_bytes
from pipeline.stages.imatrix import calibration_writes_layers, imatrix_input
from pipeline.stages.probes import probe_for, probe_params, say_reuse
from pipeline.stages.quantize import budget_bytes


@dataclass(frozen=True)
class UpTo:
    """`prune: {up_to: K}` for one variant: 0 to K layers, weighed against bits under its budget."""

    k: int
    variant: str


def prune_sets(ctx: RunContext) -> dict[str, tuple[int, ...] | int | UpTo]:
    """tag -> explicit layer set, tag -> K for `prune: {auto: K}`, or tag -> UpTo, over all variants."""
    recipe = ctx.recipe
    out: dict[str, tuple[int, ...] | int | UpTo] = {}
    for v in recipe.variants:
        k = recipe.prune_auto_for(v)
        up_to = recipe.prune_up_to_for(v)
        if k is not None:
            out[f"auto{k}"] = k
        elif up_to is not None:
            out[ctx.prune_tag(v)] = UpTo(up_to, v.name)
        elif recipe.prune_for(v):
            out[ctx.prune_tag(v)] = recipe.prune_for(v)
    return out


def _sensitivity_known(ctx: RunContext) -> bool:
    """Whether this run measures the sensitivity map, whose single-layer removals (the same
    probe) the search need not measure again."""
    return any(ctx.recipe.budget_for(v) for v in ctx.recipe.variants)


def _auto_where(ctx, v=None) -> str:
    w = ctx.recipe.where
    for v in ([v] if v else []) + list(ctx.recipe.variants):
        if v.prune_auto is not None:
            return w("variants", v.name, "prune", "auto")
        if v.prune_up_to is not None:
            return w("variants", v.name, "prune")
    return w("select", "prune", "auto") if ctx.recipe.select.prune_auto is not None else w("select", "prune")


def steps(ctx: RunContext) -> list[Step]:
    imatrix = imatrix_input(ctx)
    n_layers = ctx.model_info.n_layers
    out = []
    for tag, what in prune_sets(ctx).items():
        outputs = [ctx.pruned_base_path(tag)] + ([ctx.pruned_imatrix_path(tag)] if imatrix else [])
        inputs = [ctx.base_path] + ([imatrix] if imatrix else [])
        if isinstance(what, (int, UpTo)):
            k = what if isinstance(what, int) else what.k
            if k >= n_layers:
                raise SqueezeError(f"{_auto_where(ctx)}cannot prune {k} of the model's {n_layers} layers; "
                                   f"K must be at most {n_layers - 1}")
            outputs.append(ctx.prune_choice_path(tag))
            if calibration_writes_layers(ctx) or ctx.layers_path.exists():
                inputs.append(ctx.layers_path)
            if _sensitivity_known(ctx):
                inputs.append(ctx.sensitivity_json_path)
            params = {"prune.auto": k, "prune.auto.chunks": PROBE_CHUNKS, "prune.auto.search": SEARCH,
                      **probe_params(ctx)}
            produces = (f"pruned/{ctx.pruned_base_path(tag).name} ({k} layers picked by KLD measured in memory: "
                        f"SLEB-style greedy or the best {k} consecutive layers, proxies compared; "
                        f"pruned/{ctx.prune_choice_path(tag).name} says which and why)")
            if isinstance(what, UpTo):
                v = ctx.recipe.variant(what.variant)
                params = {**params, "prune.up_to": k, **ctx.recipe.variant_values(v),
                          **ctx.recipe.values("select.refine_rounds")}
                produces = (f"pruned/{ctx.pruned_base_path(tag).name} (0 to {k} layers removed, whichever measures "
                            f"lower than spending the same bytes on bits under {v.name}'s budget; "
                            f"pruned/{ctx.prune_choice_path(tag).name} says which and why)")
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
        if isinstance(what, (int, UpTo)):
            k = what if isinstance(what, int) else what.k
            cossim = {}
            if imatrix:
                cossim = {k: v["cossim"] for k, v in imatrix_layer_stats(read_imatrix(imatrix)).items()}
            bi = block_influence(ctx.layers_path)
            known = None
            if _sensitivity_known(ctx):
                known = {(r.layer,): r.kld_removed for r in load_sensitivity(ctx.sensitivity_json_path).rows}
            probe = probe_for(ctx, PROBE_CHUNKS, imatrix=imatrix)
            try:
                choice = choose_layers(probe, k, n_layers, cossim, bi, where=_auto_where(ctx), known=known)
                choice.probe = {"ctx": probe.ctx, "chunks": len(probe.base["tokens"]),
                                "text": probe_params(ctx), "removal": "residual outputs zeroed in memory"}
                data = json.loads(choice.to_json())
                if isinstance(what, UpTo):
                    data.update(_prune_or_bits(ctx, ctx.recipe.variant(what.variant), choice, probe))
                say_reuse(probe, f"prune {tag}")
            finally:
                probe.close()
            io.out(ctx.prune_choice_path(tag)).write_text(json.dumps(data, indent=2) + "\n")
            layers = tuple(data["layers"])
            extra = {"layers": list(layers), "method": choice.method, "probe_kld": choice.kld,
                     "probes": choice.probes}
        else:
            layers = what
        check_room(f"prune {tag}", ctx.pruned_base_path(tag).parent, predicted_base_bytes(ctx, layers))
        info = prune_gguf(ctx.base_path, io.out(ctx.pruned_base_path(tag)), layers,
                          swa_layers=sliding_window_layers(ctx.base_path))
        if imatrix:
            write_imatrix(io.out(ctx.pruned_imatrix_path(tag)), remap_imatrix(read_imatrix(imatrix), n_layers, layers))
        return {**extra, "swa_after": info.swa_after}
    return run


def _prune_or_bits(ctx: RunContext, v, choice: PruneChoice, probe) -> dict:
    """Keep every layer, or remove 1 ... K (the search's sets: SLEB's first picks, then the set
    chosen for K), each with the types for the same bytes allocated around it; every whole mix
    measured in memory. The lowest KLD decides."""
    info, base = ctx.model_info, ctx.base_path
    sens = load_sensitivity(ctx.sensitivity_json_path)
    budget = ctx.recipe.budget_for(v)
    kept = kept_types(base, v.ftype, ctx.recipe.output_type_for(v))
    want = budget_bytes(ctx, v, budget, layout(info, (), base, kept))
    sleb = choice.methods.get("sleb")
    picked = [s["picked"] for s in sleb.steps] if sleb is not None else []
    sets = [()] + [tuple(sorted(picked[:i])) for i in range(1, choice.k)] + [tuple(choice.layers)]
    candidates = []
    for removed in dict.fromkeys(sets):
        label = "keep every layer" if not removed else f"remove {len(removed)} layer{'s' * (len(removed) > 1)}"
        prune_kld = probe.kld(removed=list(removed)) if removed else 0.0
        try:
            chosen = choose_types(sens, want, layout(info, removed, base, kept).fixed, drop=removed,
                                  where=_auto_where(ctx, v), budget_label=f"{budget[1]}")
        except SqueezeError:
            candidates.append(PruneCandidate(label, removed, prune_kld, None))
            continue
        together = probe.kld(chosen.allocation.types, removed=list(removed))
        candidates.append(PruneCandidate(label, removed, prune_kld, chosen.allocation, together))
    best, markdown = choose_prune_or_bits(candidates)
    print(f"prune or bits ({v.name}): {best.label}"
          + (f" {list(best.removed_layers)}" if best.removed_layers else "") + f", KLD {best.deciding_kld:.4f}")
    return {"layers": list(best.removed_layers), "search_layers": choice.layers,
            "prune_or_bits": {"markdown": markdown, "budget_bytes": want, "candidates": [
                {"label": c.label, "layers": list(c.removed_layers), "prune_kld": c.prune_kld,
                 "predicted_quant_kld": c.quant_kld if c.allocation is not None else None,
                 "measured_kld": c.measured_kld, "bytes": c.allocation.total_bytes if c.allocation else None}
                for c in candidates]}}
