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
from pathlib import Path

from pipeline.choose.budget import kept_types, layout
from pipeline.choose.measured_allocation import choose_types
from pipeline.choose.memory_probe import PROBE_CHUNKS
from pipeline.choose.prune_auto import SEARCH, PruneChoice, choose_layers, search_probes
from pipeline.choose.prune_or_bits import PruneCandidate, choose_prune_or_bits
from pipeline.choose.sensitivity import imatrix_layer_stats, load_sensitivity
from pipeline.engine.backend import engine_versions
from pipeline.engine.layer_kinds import sliding_window_layers
from pipeline.errors import SqueezeError
from pipeline.formats.imatrix_file import read_imatrix, write_imatrix
from pipeline.formats.layers_csv import block_influence
from pipeline.formats.prune import check_prune_set, prune_gguf, remap_imatrix
from pipeline.formats.tensor_names import residual_outputs
from pipeline.recipe.plan import Prune, SearchedPrune, UpToPrune, VariantPlan
from pipeline.run.layout import RunContext
from pipeline.run.runner import Step
from pipeline.cost import estimate as est
from pipeline.stages.estimate import (check_room, dropped_layers, predicted_base_bytes, probe_measurements,
                                      probe_resident, probe_session, quantized_in, variant_types)
from pipeline.work import Memory, Note, Roundtrip, Write
from pipeline.stages.imatrix import calibration_writes_layers, imatrix_input
from pipeline.stages.probes import probe_for, probe_params, rounder_for, say_reuse
from pipeline.stages.quantize import budget_bytes


def prune_sets(run: RunContext) -> dict[str, tuple[Prune, VariantPlan]]:
    """tag -> (what is pruned, the first variant asking for it), over all variants that drop layers
    or may: a listed set, `prune: {auto: K}` (shared by the variants asking for the same K) or
    `prune: {up_to: K}` (one per variant: it is weighed under that variant's budget)."""
    out: dict[str, tuple[Prune, VariantPlan]] = {}
    for v in run.recipe.plans:
        tag = run.prune_tag(v)
        if tag is not None:
            out.setdefault(tag, (v.prune, v))
    return out


def _sensitivity_known(run: RunContext) -> bool:
    """Whether this run measures the sensitivity map, whose single-layer removals (the same
    probe) the search need not measure again."""
    return any(v.budget for v in run.recipe.plans)


def steps(run: RunContext) -> list[Step]:
    imatrix = imatrix_input(run)
    n_layers = run.model_info.n_layers
    out = []
    for tag, (what, v) in prune_sets(run).items():
        outputs = [run.pruned_base_path(tag)] + ([run.pruned_imatrix_path(tag)] if imatrix else [])
        inputs = [run.base_path] + ([imatrix] if imatrix else [])
        if isinstance(what, SearchedPrune):
            k = what.k
            if k >= n_layers:
                raise SqueezeError(f"{what.where}cannot prune {k} of the model's {n_layers} layers; "
                                   f"K must be at most {n_layers - 1}")
            outputs.append(run.prune_choice_path(tag))
            if calibration_writes_layers(run) or run.layers_path.exists():
                inputs.append(run.layers_path)
            if _sensitivity_known(run):
                inputs.append(run.sensitivity_json_path)
            params = {"prune.auto": k, "prune.auto.chunks": PROBE_CHUNKS, "prune.auto.search": SEARCH,
                      **probe_params(run)}
            produces = (f"pruned/{run.pruned_base_path(tag).name} ({k} layers picked by KLD measured in memory: "
                        f"SLEB-style greedy or the best {k} consecutive layers, proxies compared; "
                        f"pruned/{run.prune_choice_path(tag).name} says which and why)")
            if isinstance(what, UpToPrune):
                params = {**params, "prune.up_to": k, **v.values,
                          **run.recipe.values("select.refine_rounds")}
                if v.rounding.type == "gptq":  # its whole mixes are measured rounded so
                    inputs.append(run.moments_path)
                produces = (f"pruned/{run.pruned_base_path(tag).name} (0 to {k} layers removed, whichever measures "
                            f"lower than spending the same bytes on bits under {v.name}'s budget; "
                            f"pruned/{run.prune_choice_path(tag).name} says which and why)")
        else:
            check_prune_set(what.listed, n_layers, what.where)
            params = {"prune.layers": list(what.listed)}
            produces = f"pruned/{run.pruned_base_path(tag).name} (layers {list(what.listed)} dropped, " \
                       f"sliding-window pattern kept)"
        out.append(Step(f"prune {tag}", "prune", params, inputs, outputs, _action(run, tag, what, v, imatrix),
                        versions=engine_versions(), produces=produces,
                        work=lambda shape, tag=tag, v=v: _work(run, shape, tag, v)))
    return out


def _work(run: RunContext, shape, tag: str, v: VariantPlan) -> list:
    """The pruned base written; for a search, its in-memory probes (removals only, nothing
    quantized: search_probes counts the search's most, repeats aside, less the single layers the
    sensitivity map measured); for prune or bits, K + 1 whole mixes quantized and measured (keep
    every layer, or remove 1 ... K: the search's sets, whose removals it measured already)."""
    drop = dropped_layers(shape, v)
    largest_f32 = 4 * shape.largest_tensor_values
    work = [Write(run.pruned_base_path(tag), est.base_file_bytes(shape, run.recipe.model.base_type.upper(), drop),
                  timed=True), Memory(2 * largest_f32)]
    if run.recipe.calibration is not None:  # the imatrix is renumbered with the base
        work.append(Write(run.pruned_imatrix_path(tag), est.imatrix_file_bytes(shape, drop)))
    if not isinstance(v.prune, SearchedPrune):
        return work + [Note(f"layers {list(drop)} dropped")]
    k = v.prune.k
    tries = search_probes(k, shape.n_layers)
    if _sensitivity_known(run):
        tries -= shape.n_layers  # the sensitivity map measured the single layers
    work += probe_session(shape, run, tries, PROBE_CHUNKS)
    note = f"{k} layers picked from up to {tries} KLD probes"
    changed = residual_outputs((t.name for t in shape.tensors), drop)  # removals only
    if isinstance(v.prune, UpToPrune):
        mixes = k + 1
        types = variant_types(shape, run, v)
        work += probe_measurements(shape, run, mixes, PROBE_CHUNKS, quantized=True)
        work.append(Roundtrip(types, times=mixes))
        changed = quantized_in(types)  # a whole mix at once
        tries += mixes
        note = f"{k} layers picked from up to {tries - mixes} KLD probes; {mixes} whole mixes measured"
    return work + [Write(run.prune_choice_path(tag), 1500 + 40 * tries), probe_resident(shape, run, changed),
                   Note(note)]


def _action(run: RunContext, tag: str, what: Prune, v: VariantPlan, imatrix: Path | None):
    def act(io):
        n_layers = run.model_info.n_layers
        extra = {}
        if isinstance(what, SearchedPrune):
            k = what.k
            cossim = {}
            if imatrix:
                cossim = {k: v["cossim"] for k, v in imatrix_layer_stats(read_imatrix(imatrix)).items()}
            bi = block_influence(run.layers_path)
            known = None
            if _sensitivity_known(run):
                known = {(r.layer,): r.kld_removed for r in load_sensitivity(run.sensitivity_json_path).rows}
            probe = probe_for(run, PROBE_CHUNKS, imatrix=imatrix)
            try:
                choice = choose_layers(probe, k, n_layers, cossim, bi, where=what.where, known=known)
                choice.probe = {"ctx": probe.ctx, "chunks": len(probe.base["tokens"]),
                                "text": probe_params(run), "removal": "residual outputs zeroed in memory"}
                data = json.loads(choice.to_json())
                if isinstance(what, UpToPrune):
                    data.update(_prune_or_bits(run, v, choice, probe))
                say_reuse(probe, f"prune {tag}")
            finally:
                probe.close()
            io.out(run.prune_choice_path(tag)).write_text(json.dumps(data, indent=2) + "\n")
            layers = tuple(data["layers"])
            extra = {"layers": list(layers), "method": choice.method, "probe_kld": choice.kld,
                     "probes": choice.probes}
        else:
            layers = what.listed
        check_room(f"prune {tag}", run.pruned_base_path(tag).parent, predicted_base_bytes(run, layers))
        info = prune_gguf(run.base_path, io.out(run.pruned_base_path(tag)), layers,
                          swa_layers=sliding_window_layers(run.base_path))
        if imatrix:
            write_imatrix(io.out(run.pruned_imatrix_path(tag)), remap_imatrix(read_imatrix(imatrix), n_layers, layers))
        return {**extra, "swa_after": info.swa_after}
    return act


def _prune_or_bits(run: RunContext, v: VariantPlan, choice: PruneChoice, probe) -> dict:
    """Keep every layer, or remove 1 ... K (the search's sets: SLEB's first picks, then the set
    chosen for K), each with the types for the same bytes allocated around it; every whole mix
    measured in memory. The lowest KLD decides."""
    info, base = run.model_info, run.base_path
    sens = load_sensitivity(run.sensitivity_json_path)
    kept = kept_types(base, v.ftype, v.type_of("output_type"))
    want = budget_bytes(v.budget, layout(info, (), base, kept))
    sleb = choice.methods.get("sleb")
    picked = [s["picked"] for s in sleb.steps] if sleb is not None else []
    sets = [()] + [tuple(sorted(picked[:i])) for i in range(1, choice.k)] + [tuple(choice.layers)]
    # the mixes are rounded as the variant's file will be; the removals alone quantize nothing
    rounder = rounder_for(run, v)
    mixes = probe if rounder is None else probe_for(run, PROBE_CHUNKS, imatrix=probe.imatrix_path, rounder=rounder)
    try:
        candidates = _prune_or_bits_candidates(run, v, sets, probe, mixes, sens, want, kept)
    finally:
        if mixes is not probe:
            mixes.close()
    best, markdown = choose_prune_or_bits(candidates)
    print(f"prune or bits ({v.name}): {best.label}"
          + (f" {list(best.removed_layers)}" if best.removed_layers else "") + f", KLD {best.deciding_kld:.4f}")
    return {"layers": list(best.removed_layers), "search_layers": choice.layers,
            "prune_or_bits": {"markdown": markdown, "budget_bytes": want, "candidates": [
                {"label": c.label, "layers": list(c.removed_layers), "prune_kld": c.prune_kld,
                 "predicted_quant_kld": c.quant_kld if c.allocation is not None else None,
                 "measured_kld": c.measured_kld, "bytes": c.allocation.total_bytes if c.allocation else None}
                for c in candidates]}}


def _prune_or_bits_candidates(run: RunContext, v: VariantPlan, sets, probe, mixes, sens, want: int,
                              kept) -> list[PruneCandidate]:
    """Each set of removed layers with the types for the same bytes allocated around it: the
    removal alone measured on `probe`, the whole mix on `mixes` (the same probe, or one rounding as
    the variant does)."""
    info, base = run.model_info, run.base_path
    candidates = []
    for removed in dict.fromkeys(sets):
        label = "keep every layer" if not removed else f"remove {len(removed)} layer{'s' * (len(removed) > 1)}"
        prune_kld = probe.kld(removed=list(removed)) if removed else 0.0
        try:
            chosen = choose_types(sens, want, layout(info, removed, base, kept).fixed, drop=removed,
                                  where=v.prune.where, budget_label=v.budget.text())
        except SqueezeError:
            candidates.append(PruneCandidate(label, removed, prune_kld, None))
            continue
        together = mixes.kld(chosen.allocation.types, removed=list(removed))
        candidates.append(PruneCandidate(label, removed, prune_kld, chosen.allocation, together))
    return candidates
