"""Stage quantize: one GGUF per variant (pipeline.engine.assemble: llama_model_quantize's file,
from tensors quantized once per run), with one exact type per tensor
the recipe's rules name (pipeline.recipe.rules) or, under a size budget, one for every tensor
(pipeline.choose.allocate). Pruned variants start from their pruned base.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.choose.allocate import check_budget_fits, explain_markdown
from pipeline.choose.budget import Layout, kept_types, layout, tensor_bytes
from pipeline.choose.groups import group_of
from pipeline.choose.measured_allocation import GROUP_SHARE, TargetChoice, choose_types, choose_types_for_kld
from pipeline.choose.memory_budget import check_fits, file_budget, kv_lower_bound, margin_bytes, memory_bytes
from pipeline.choose.memory_probe import PROBE_CHUNKS
from pipeline.choose.sensitivity import load_sensitivity
from pipeline.choose.text_transfer import class_shares
from pipeline.cost import estimate as est
from pipeline.engine.assemble import PrunedFrom, Rounder, assemble_file
from pipeline.engine.backend import engine_versions
from pipeline.engine.runtime_memory import runtime_memory
from pipeline.errors import SqueezeError
from pipeline.formats.gguf_index import read_metadata
from pipeline.formats.tensor_names import TOKEN_EMBD, exact_pattern, layer_of
from pipeline.recipe.rules import Choice, overrides_for_llama, resolve_types, tensor_type_file_lines
from pipeline.recipe.plan import (AutoPrune, BitsBudget, Budget, KldBudget, MemoryBudget, SizeBudget, UpToPrune,
                                  VariantPlan)
from pipeline.run.layout import RunContext
from pipeline.run.runner import Step
from pipeline.sources.model_source import parse_source, source_gguf
from pipeline.stages.estimate import (check_room, dropped_layers, gptq_work, predicted_variant_bytes, probe_resident,
                                      probe_session, quantizable, quantized_in, variant_model, variant_types)
from pipeline.stages.imatrix import imatrix_input
from pipeline.stages.probes import probe_for, probe_params, rounder_for, say_reuse
from pipeline.units import MiB
from pipeline.work import BASE, Memory, Note, Quantize, Roundtrip, Write

# A memory target: tries at choosing, quantizing and loading the file before giving up, and bytes
# taken off beyond the overshoot each time (llama.cpp rounds buffers up).
MEMORY_TRIES = 3
MEMORY_SHRINK_STEP = 256 << 10


def steps(run: RunContext) -> list[Step]:
    recipe = run.recipe
    out = []
    for v in recipe.plans:
        prune = v.prune
        tag = run.prune_tag(v)
        imatrix = imatrix_input(run) if v.imatrix else None
        budget = v.budget
        params = v.values
        if budget is not None and not isinstance(budget, KldBudget):  # a KLD target is checked against the measured map
            check_budget_reachable(run, v)
            params = {**params, **recipe.values("select.refine_rounds")}
            if recipe.select.refine_rounds:
                params.update({"refine.chunks": PROBE_CHUNKS, **probe_params(run)})
        # A pruned variant is quantized from its pruned base (pipeline.stages.prune), not pruned here.
        src = run.pruned_base_path(tag) if tag else run.base_path
        if imatrix and tag:
            imatrix = run.pruned_imatrix_path(tag)
        inputs = [src] + ([imatrix] if imatrix else [])
        if tag and run.prune_choice_tag(v) is not None:
            inputs.append(run.prune_choice_path(tag))
        if v.rounding.type == "gptq":
            inputs.append(run.moments_path)
        if budget is not None:
            inputs.append(run.sensitivity_json_path)
        outputs = [run.variant_path(v.name), run.tensor_types_path(v.name)]
        if budget is not None:
            outputs.append(run.allocation_md_path(v.name))
        if isinstance(budget, KldBudget):
            outputs.append(run.target_path(v.name))
        if isinstance(budget, MemoryBudget):
            outputs.append(run.memory_fit_path(v.name))
        what = (f"types for {budget.key} {budget.text()}" if budget else f"{v.ftype}") + \
               (f", layers {list(prune.listed)} pruned" if prune.listed else "") + \
               (f", {prune.k} layers pruned (picked by KLD)" if isinstance(prune, AutoPrune) else "") + \
               (f", up to {prune.k} layers pruned where that beats bits" if isinstance(prune, UpToPrune) else "") + \
               (", imatrix" if imatrix else "")
        out.append(Step(f"quantize {v.name}", "quantize", params, inputs, outputs,
                        _action(run, v, src, imatrix), variant=v.name, versions=engine_versions(),
                        work=lambda shape, v=v: _work(run, shape, v),
                        produces=f"variants/{v.name}.gguf ({what})"))
    return out


def _kld_target_choice(run: RunContext, rounder: Rounder | None, sens, target: float, fixed: int, layers, rule_choices,
                       imatrix, where: str):
    """The smallest mix meeting a KLD target, measured in memory (a map-only prediction when the
    recipe trusts the map: select.refine_rounds 0)."""
    exclude = {n: c.type for n, c in rule_choices.items()}
    rounds = run.recipe.select.refine_rounds
    if rounds == 0:
        return choose_types_for_kld(sens, target, fixed, drop=layers, exclude=exclude, rounds=0, where=where)
    with probe_for(run, PROBE_CHUNKS, imatrix=imatrix_input(run) if imatrix else None, rounder=rounder) as probe:
        chosen = choose_types_for_kld(sens, target, fixed, probe=probe, drop=layers, exclude=exclude, rounds=rounds,
                                      where=where, echo=print)
        say_reuse(probe, "quantize")
    return chosen


def _work(run: RunContext, shape, v: VariantPlan) -> list:
    """The file written (its source mapped, every tensor read once: its pages stay resident while
    it is open); under a budget, the refinement's rounds measured in memory first, whose last mix
    the file is then assembled from (priced at the fastest quantize rate: an upper bound)."""
    types = variant_types(shape, run, v)
    drop = dropped_layers(shape, v)
    refined = v.budget is not None and v.refine_rounds > 0
    explicit = resolve_types(v, run.model_info) if shape.exact else {}
    source_bytes = est.base_file_bytes(shape, run.recipe.model.base_type.upper(), drop)
    source = run.prune_tag(v) or BASE  # a pruned variant is quantized from its pruned base
    gptq, gptq_bytes = gptq_work(shape, types) if v.rounding.type == "gptq" else ([], 0)
    work = [Quantize(types, fastest=refined, source=source), Write(run.variant_path(v.name), variant_model(shape, run, v).bytes),
            Write(run.tensor_types_path(v.name), 60 + 30 * len(explicit)),
            Memory(3 * 4 * shape.largest_tensor_values + source_bytes + gptq_bytes), Note(v.ftype)]
    if gptq:
        work.append(Note("rounding: gptq"))
    if refined:
        kept = {n: ty for n, ty in types.items() if layer_of(n) not in set(drop)}
        # the refinement's probes round as the file will (the first round the whole mix, later
        # rounds the changed groups' share); the file is then assembled from what they rounded
        times = 1 + (v.refine_rounds - 1) * REFINE_GROUP_FRACTION
        work += _refinement_work(shape, run, v, kept) + (gptq_work(shape, kept, times)[0] if gptq else [])
    else:
        work += gptq
    return work


# Refinement (pipeline.choose.refine) measures, in every round but the last, the groups whose
# predicted KLD adds up to GROUP_SHARE (80 %) of the total. How many groups that is depends on the
# map: on Gemma 3 270M's (its sensitivity stage, 2026-11; the map was kept as
# results/bench/sensitivity-map.csv until commit e8a66bd), 25 of its 36 layer groups carry 80 %
# of the KLD at the probe's low types, so this share of the groups is priced per round. Later
# rounds measure only the groups whose types changed, and refinement stops early once a round's
# prediction is within tolerance: pricing every round in full makes this an upper bound.
REFINE_GROUP_FRACTION = 25 / 36


def _refinement_work(shape, run: RunContext, v: VariantPlan, types: dict[str, str]) -> list:
    """The base loaded and its distribution taken; every round the whole chosen mix measured, and,
    but in the last round, the groups carrying GROUP_SHARE of the predicted KLD each measured alone
    at its types. Quantizing: the first round the whole mix; later rounds only the groups whose
    types changed (priced as the measured share, an upper bound); the groups' own probes use the
    mix's pairs, already quantized (pipeline.engine.quantized_tensors keeps them)."""
    rounds = v.refine_rounds
    groups = {group_of(t.name) for t in quantizable(shape, dropped_layers(shape, v))}
    per_round = math.ceil(REFINE_GROUP_FRACTION * len(groups)) if GROUP_SHARE < 1 else len(groups)
    probes = rounds + (rounds - 1) * per_round
    return (probe_session(shape, run, probes, PROBE_CHUNKS, quantized=True)
            + [Roundtrip(types), Roundtrip(types, times=(rounds - 1) * REFINE_GROUP_FRACTION),
               probe_resident(shape, run, quantized_in(types)),
               Note(f"refinement: {probes} in-memory KLD probes")])


def target_note(chosen: TargetChoice) -> str:
    """What allocation.md says of a KLD target: met or not, and the next cheaper mix's KLD."""
    mib = chosen.allocation.total_bytes / MiB
    if chosen.measured_kld is None:
        return (f"Target KLD {chosen.target_kld:g}: the smallest mix the sensitivity map predicts to meet it, "
                f"{mib:.2f} MiB (predicted {chosen.predicted_kld:.4f}; not measured: select.refine_rounds is 0).")
    lines = [f"Target KLD {chosen.target_kld:g}: **{'met' if chosen.met else 'missed'}** on the calibration text, "
             f"{chosen.measured_kld:.4f} measured in memory at {mib:.2f} MiB (predicted {chosen.predicted_kld:.4f})."]
    lines.append(f"{chosen.measurements} distinct mixes measured; the chosen one sits {chosen.slack:.4f} below the "
                 "target.")
    c = chosen.next_cheaper
    if c is not None:
        lowered = c.get("changes") or {}
        steps = ", ".join(f"`{t}` {ty}" for t, ty in list(lowered.items())[:6]) + (" ..." if len(lowered) > 6 else "")
        lines.append(f"The next cheaper mix measured on the allocator's path, {c['bytes'] / MiB:.2f} MiB, measures "
                     f"{c['measured']:.4f}: above the target, so this is the smallest mix found that meets it. "
                     f"It cannot land nearer the target because the next cheaper mix differs in {len(lowered)} "
                     f"tensor type{'s' if len(lowered) != 1 else ''} (cheaper -> chosen: {steps}), the finest step "
                     "the types those tensors can take allow on this path.")
    else:
        lines.append("Every cheaper mix measured also met it, down to the smallest the candidate types allow.")
    return " ".join(lines)


def budget_bytes(budget: Budget, lay: Layout, runtime_bytes: int | None = None) -> int:
    """The file's bytes for a size budget; for a memory target, what is left beside `runtime_bytes`."""
    if isinstance(budget, SizeBudget):
        return budget.bytes
    if isinstance(budget, MemoryBudget):
        return file_budget(budget.memory, runtime_bytes or 0, budget.where)
    return int(budget.bpw * lay.n_params / 8) + lay.overhead


def check_budget_reachable(run: RunContext, v: VariantPlan) -> None:
    """A budget below the smallest file the candidate types allow is refused before any work."""
    budget = v.budget
    kept = kept_types(run.base_path, v.ftype, v.type_of("output_type"))
    lay = layout(run.model_info, v.prune.listed, run.base_path, kept)
    if isinstance(budget, MemoryBudget):
        _check_memory_reachable(run, v, budget, lay)
        return
    want = budget_bytes(budget, lay)
    label = f"{budget.bpw} bits per weight ({want / MiB:.1f} MiB)" if isinstance(budget, BitsBudget) else f"{budget.size!r}"
    check_budget_fits(want, lay.smallest, budget.where, label)


def _check_memory_reachable(run: RunContext, v: VariantPlan, budget: MemoryBudget, lay: Layout) -> None:
    """Before any work: the smallest file plus a KV cache no layer can go below must fit (the
    compute buffers are known once llama.cpp makes the context, at run time)."""
    target, where = budget.memory, budget.where
    info = run.model_info
    keys = next((t for t in info.tensors if t.name.endswith("attn_k.weight") and t.shape), None)
    if keys is None or len(keys.shape) < 2:
        return  # a model not here yet: its shapes come with it
    n_layers = info.n_layers - len(v.prune.listed)
    kv = kv_lower_bound(n_layers, int(keys.shape[1]), target.ctx, target.kv_type, _sliding_window(run))
    check_fits(target, lay.smallest + kv, f"the smallest file, {lay.smallest / MiB:.1f} MiB, and a KV cache of at "
               f"least {kv / MiB:.1f} MiB at ctx {target.ctx} ({target.kv_type})", where)


def _sliding_window(run: RunContext) -> int | None:
    """The model's sliding attention window (GGUF metadata), None without one or before the model is here."""
    path = run.base_path if run.base_path.exists() else None
    if path is None:
        source = parse_source(run.recipe)
        path = source_gguf(run.recipe, source) if source.kind in ("gguf", "pypi") else None
    if path is None:
        return None
    key = f"{run.model_info.arch}.attention.sliding_window"
    return next((int(kv.value) for kv in read_metadata(path)[0] if kv.key == key and isinstance(kv.value, int)), None)


def _action(run: RunContext, v: VariantPlan, src: Path, imatrix):
    budget = v.budget
    if not isinstance(budget, MemoryBudget):
        return lambda io: _quantize(run, v, src, imatrix, io)

    def act(io):
        """Choose for the bytes the memory leaves beside the context's buffers (read back from
        llama.cpp on the variant's source, which has the layers the variant keeps); then load the
        file as it will run and read back what llama.cpp allocates. If it does not fit (a file's
        buffers differ a little from its base's), choose again with the overshoot taken off."""
        target, where = budget.memory, budget.where
        runtime = runtime_memory(src, target.ctx, target.kv_type, threads=run.threads).runtime
        room = memory_bytes(target, where) - margin_bytes(target, where)
        shrink = 0
        for _ in range(MEMORY_TRIES):
            extra = _quantize(run, v, src, imatrix, io, runtime + shrink)
            fit = runtime_memory(io.out(run.variant_path(v.name)), target.ctx, target.kv_type, threads=run.threads)
            if fit.total <= room:
                record = {"memory_bytes": memory_bytes(target, where), "margin_bytes": margin_bytes(target, where),
                          "ctx": target.ctx, "kv_type": target.kv_type,
                          "runtime_bytes_of_source": runtime, **fit.to_json()}
                io.out(run.memory_fit_path(v.name)).write_text(json.dumps(record, indent=1) + "\n")
                return {**extra, "memory_fit": {k: v_ for k, v_ in record.items() if k != "llama_cpp_says"}}
            shrink += fit.total - room + MEMORY_SHRINK_STEP
        raise SqueezeError(f"{where}no mix fits {target.memory} at ctx {target.ctx} after {MEMORY_TRIES} tries: "
                           f"llama.cpp allocates {fit.total / MiB:.1f} MiB for the last, {room / MiB:.1f} MiB allowed")
    return act


def _quantize(run: RunContext, v: VariantPlan, src: Path, imatrix, io, runtime_bytes: int | None = None):
    budget = v.budget
    layers = run.variant_layers(v)
    choices = resolve_types(v, run.model_info)
    extra = {}
    token_embd_type = v.type_of("token_embedding_type")
    rounder = rounder_for(run, v)  # one for the refinement's probes and the file: the moments read once
    if budget is not None:
        choices, chosen = _budget_choices(run, v, layers, choices, imatrix, rounder, runtime_bytes)
        alloc = chosen.allocation
        token_embd_type = choices.pop(TOKEN_EMBD).type if TOKEN_EMBD in choices else token_embd_type
        extra = {"predicted_kld": chosen.predicted_kld, "predicted_bytes": alloc.total_bytes,
                 "budget_bytes": alloc.budget_bytes, "calibration_kld": chosen.measured_kld,
                 "refinement": chosen.history}
        note = (f"Types chosen for `{budget.key}: {budget.text()}` from measured sensitivities "
                f"(sensitivity.json)" + (f"; layers {list(layers)} pruned first." if layers else "."))
        if isinstance(chosen, TargetChoice):
            extra.update({"target_kld": chosen.target_kld, "target_met_on_calibration": chosen.met,
                          "next_cheaper": chosen.next_cheaper})
            note += "\n\n" + target_note(chosen)
            io.out(run.target_path(v.name)).write_text(json.dumps(
                {"target_kld": chosen.target_kld, "calibration_kld": chosen.measured_kld,
                 "predicted_kld": chosen.predicted_kld, "bytes": alloc.total_bytes,
                 "slack": chosen.slack, "measurements": chosen.measurements,
                 "next_cheaper": chosen.next_cheaper,
                 # how the mix's KLD splits between embedding and blocks: what carries it to the
                 # scoring text (pipeline.choose.text_transfer)
                 "class_shares": class_shares(alloc.group_kld())}, indent=1) + "\n")
        weighed = _prune_or_bits_note(run, v)
        if weighed:
            note += "\n\n" + weighed
        io.out(run.allocation_md_path(v.name)).write_text(
            explain_markdown(alloc, f"{v.name}: every tensor's type", note, history=chosen.history))
    lines = tensor_type_file_lines({n: c.type for n, c in choices.items()}, layers)
    if budget is not None and token_embd_type:
        lines.append(f"{exact_pattern(TOKEN_EMBD)}={token_embd_type.lower()}")
    io.out(run.tensor_types_path(v.name)).write_text("".join(line + "\n" for line in lines))
    needed = extra.get("predicted_bytes") or predicted_variant_bytes(run, v, {n: c.type for n, c in choices.items()},
                                                                      layers)
    check_room(f"quantize {v.name}", run.variant_path(v.name).parent, needed)
    # the file llama_model_quantize writes, from the tensors this run already quantized (the
    # refinement's last mix, earlier variants) where it has them (pipeline.engine.assemble)
    pruned_from = PrunedFrom(run.base_path, imatrix_input(run) if imatrix else None, tuple(layers)) if layers else None
    made = assemble_file(src, io.out(run.variant_path(v.name)), v.ftype,
                         imatrix_path=imatrix, overrides=overrides_for_llama(choices, layers),
                         output_type=v.type_of("output_type"), token_embedding_type=token_embd_type,
                         threads=run.threads, pruned_from=pruned_from, rounder=rounder)
    if rounder is not None:
        extra["rounding"] = dict(sorted(made.rounding.items()))
    return {**extra, "pruned_layers": list(layers), "tensors_quantized": made.quantized,
            "tensors_reused": made.reused, "tensors_copied": made.copied,
            "explicit_types": {c.tensor: [c.type, c.why] for c in choices.values()}}


def _prune_or_bits_note(run: RunContext, v: VariantPlan) -> str:
    """The prune stage's reasoning for `prune: {up_to: K}` (pipeline.choose.prune_or_bits)."""
    if not isinstance(v.prune, UpToPrune):
        return ""
    tag = run.prune_choice_tag(v)
    return json.loads(run.prune_choice_path(tag).read_text()).get("prune_or_bits", {}).get("markdown", "")


def _budget_choices(run: RunContext, v: VariantPlan, layers, rule_choices, imatrix, rounder: Rounder | None,
                    runtime_bytes: int | None = None):
    """Every tensor's type for the budget; recipe rules still win for the tensors they name. The
    choice is refined by measuring it in memory on the unpruned base (pruned layers removed in
    memory) with the imatrix of the whole model, as the sensitivity map was measured."""
    sens = load_sensitivity(run.sensitivity_json_path)
    info = run.model_info
    budget = v.budget
    kept = kept_types(run.base_path, v.ftype, v.type_of("output_type"))
    lay = layout(info, layers, run.base_path, kept)
    # removing layers was weighed against bits at the unpruned model's bytes: the budget stays that
    sized = layout(info, (), run.base_path, kept) if isinstance(v.prune, UpToPrune) else lay
    want = budget_bytes(budget, sized, runtime_bytes) if not isinstance(budget, KldBudget) else None
    fixed = lay.fixed
    by_name = {t.name: t for t in info.tensors}
    for name, c in rule_choices.items():  # tensors a rule pins are spent first
        if layer_of(name) not in set(layers) and name in by_name:
            fixed += tensor_bytes(c.type, by_name[name].shape)
    rounds = v.refine_rounds
    where, label = budget.where, budget.text()
    if isinstance(budget, KldBudget):
        chosen = _kld_target_choice(run, rounder, sens, budget.kld, fixed, layers, rule_choices, imatrix, where)
    elif rounds == 0:
        chosen = choose_types(sens, want, fixed, drop=layers, exclude={n: c.type for n, c in rule_choices.items()}, where=where,
                              budget_label=label)
    else:
        with probe_for(run, PROBE_CHUNKS, imatrix=imatrix_input(run) if imatrix else None,
                       rounder=rounder) as probe:
            chosen = choose_types(sens, want, fixed, probe=probe, drop=layers, exclude={n: c.type for n, c in rule_choices.items()},
                                  rounds=rounds, where=where, budget_label=label, echo=print)
            say_reuse(probe, f"quantize {v.name}")
    choices = dict(rule_choices)
    alloc = chosen.allocation
    for t, ty in alloc.types.items():
        o = alloc.options[t][alloc.chosen[t]]
        choices[t] = Choice(t, ty, f"{budget.key} {budget.text()}: predicted KLD {o.kld:.2e}")
    return choices, chosen
