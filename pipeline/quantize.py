"""Stage quantize: one GGUF per variant, in-process through llama_model_quantize with the
imatrix, tensor-override and prune-layer structs that llama-quantize builds from its flags.

Given the same imatrix, overrides and prune list the output tensors are bit-identical to the
CLI's; the `quantize.imatrix.*` keys are written the same way (through kv overrides).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp

from pipeline import ggml_types
from pipeline.context import RunContext
from pipeline.engine import default_threads, engine_versions, init_backend
from pipeline.errors import SqueezeError
from pipeline.imatrix_file import read_imatrix
from pipeline.runner import Step
from pipeline.selection import overrides_for_llama, resolve_types, tensor_type_file_lines

_KV_INT, _KV_STR = 0, 3  # LLAMA_KV_OVERRIDE_TYPE_INT / _STR


def quantize_file(src: Path, dst: Path, ftype: str, *, imatrix_path: Path | None = None,
                  overrides: list[tuple[str, str]] = (), prune: tuple[int, ...] = (),
                  output_type: str | None = None, token_embedding_type: str | None = None,
                  threads: int | None = None) -> None:
    """Quantize `src` into `dst` as llama-quantize would with the equivalent flags."""
    init_backend()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads or default_threads()
    params.ftype = int(ggml_types.file_type(ftype))
    if output_type:
        params.output_tensor_type = int(ggml_types.tensor_type(output_type))
    if token_embedding_type:
        params.token_embedding_type = int(ggml_types.tensor_type(token_embedding_type))

    keep_alive = []  # ctypes buffers referenced by params must outlive the call
    kv = []
    if imatrix_path is not None:
        im = read_imatrix(imatrix_path)
        data = im.normalized()
        arr = (llama_cpp.llama_model_imatrix_data * (len(data) + 1))()
        for i, (name, values) in enumerate(data.items()):
            buf = (ctypes.c_float * len(values)).from_buffer_copy(values.tobytes())
            keep_alive.append(buf)
            arr[i].name = name.encode()
            arr[i].data = ctypes.cast(buf, ctypes.POINTER(ctypes.c_float))
            arr[i].size = len(values)
        arr[len(data)].name = None
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep_alive.append(arr)
        kv.append(("quantize.imatrix.file", _KV_STR, str(imatrix_path)))
        if im.datasets:
            kv.append(("quantize.imatrix.dataset", _KV_STR, im.datasets[0]))
        kv.append(("quantize.imatrix.entries_count", _KV_INT, len(data)))
        if im.chunk_count > 0:
            kv.append(("quantize.imatrix.chunks_count", _KV_INT, im.chunk_count))
    if kv:
        arr = (llama_cpp.llama_model_kv_override * (len(kv) + 1))()
        for i, (key, tag, value) in enumerate(kv):
            arr[i].key = key.encode()
            arr[i].tag = tag
            if tag == _KV_STR:
                arr[i].value.val_str = value.encode()[:127]
            else:
                arr[i].value.val_i64 = value
        arr[len(kv)].key = b""
        params.kv_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_kv_override))
        keep_alive.append(arr)
    if overrides:
        arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, qtype) in enumerate(overrides):
            arr[i].pattern = pattern.encode()
            arr[i].type = int(ggml_types.tensor_type(qtype))
        arr[len(overrides)].pattern = None
        params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        keep_alive.append(arr)
    if prune:
        arr = (ctypes.c_int32 * (len(prune) + 1))(*sorted(prune), -1)
        params.prune_layers = ctypes.cast(arr, ctypes.POINTER(ctypes.c_int32))
        keep_alive.append(arr)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SqueezeError(f"quantizing {src.name} to {ftype} failed (llama_model_quantize returned {rc}); "
                           f"set SQUEEZE_LLAMA_LOG=1 to see llama.cpp's log")


def steps(ctx: RunContext) -> list[Step]:
    from pipeline import prune as prune_stage
    from pipeline.imatrix import imatrix_input

    recipe = ctx.recipe
    out = []
    for v in recipe.variants:
        prune = recipe.prune_for(v)
        auto_k = recipe.prune_auto_for(v)
        tag = prune_stage.variant_prune_tag(ctx, v)
        imatrix = imatrix_input(ctx) if v.imatrix else None
        budget = recipe.budget_for(v)
        params = {
            f"variants.{v.name}.ftype": v.ftype.upper(),
            f"variants.{v.name}.rules": [vars(r) for r in v.rules],
            "select.rules": [vars(r) for r in recipe.select.rules],
            ("select.prune" if v.prune is None else f"variants.{v.name}.prune"): list(prune),
            f"variants.{v.name}.output_type": recipe.output_type_for(v),
            f"variants.{v.name}.token_embedding_type": recipe.token_embedding_type_for(v),
            f"variants.{v.name}.imatrix": v.imatrix,
        }
        if auto_k is not None:
            params[f"variants.{v.name}.prune_auto"] = auto_k
        if budget is not None:
            params[f"variants.{v.name}.{budget[0]}"] = budget[1]
            check_budget_reachable(ctx, v, budget)
        # A pruned variant is quantized from its pruned base (pipeline.prune), not pruned here.
        src = ctx.pruned_base_path(tag) if tag else ctx.base_path
        if imatrix and tag:
            imatrix = ctx.pruned_imatrix_path(tag)
        inputs = [src] + ([imatrix] if imatrix else [])
        if tag and auto_k is not None:
            inputs.append(ctx.prune_choice_path(tag))
        if budget is not None:
            inputs.append(ctx.sensitivity_json_path)
        outputs = [ctx.variant_path(v.name), ctx.tensor_types_path(v.name)]
        if budget is not None:
            outputs.append(ctx.allocation_md_path(v.name))
        what = (f"types for {budget[0]} {budget[1]}" if budget else f"{v.ftype.upper()}") + \
               (f", layers {list(prune)} pruned" if prune else "") + \
               (f", {auto_k} layers pruned (picked by KLD)" if auto_k else "") + (", imatrix" if imatrix else "")
        out.append(Step(f"quantize {v.name}", "quantize", params, inputs, outputs,
                        _action(ctx, v, src, imatrix, budget), variant=v.name, versions=engine_versions(),
                        produces=f"variants/{v.name}.gguf ({what})"))
    return out


def _budget_where(ctx: RunContext, v, budget) -> str:
    key = budget[0]
    if getattr(v, key) is not None:
        return ctx.recipe.where("variants", v.name, key)
    return ctx.recipe.where("select", key)


def budget_bytes(ctx: RunContext, v, budget, n_params: int, overhead: int) -> int:
    from pipeline.allocate import parse_size

    key, value = budget
    if key == "target_size":
        return parse_size(value, _budget_where(ctx, v, budget))
    return int(float(value) * n_params / 8) + overhead


def _tensor_bytes(qtype: str, shape) -> int:
    rows = 1
    for d in shape[1:]:
        rows *= d
    return ggml_types.bytes_per_row(ggml_types.tensor_type(qtype), shape[0]) * rows


def layout(info, drop=(), base_path: Path | None = None) -> dict:
    """What a budget is spent on: parameter count, bytes outside the chosen tensors (metadata
    plus tensors not chosen here), and the smallest total the candidate types allow."""
    from pipeline.model_info import layer_of
    from pipeline.sensitivity import CANDIDATE_TYPES, fits, group_of

    drop = set(drop)
    n_params = fixed = smallest = 0
    for t in info.tensors:
        if layer_of(t.name) in drop or t.shape is None:
            continue
        n = 1
        for d in t.shape:
            n *= d
        n_params += n
        if group_of(t.name) is not None and len(t.shape) >= 2:
            smallest += min(_tensor_bytes(q, t.shape) for q in CANDIDATE_TYPES if fits(t.shape, q))
        else:
            fixed += _tensor_bytes(t.type, t.shape)
    overhead = 0
    if base_path is not None and Path(base_path).exists():
        from pipeline.gguf_index import read_index

        # metadata (the vocabulary is most of it) as the base file holds it
        overhead = Path(base_path).stat().st_size - sum(e.n_bytes for e in read_index(base_path).values())
    # each tensor's data is padded to the 32-byte alignment; quantize adds a few imatrix keys
    overhead += 32 * len(info.tensors) + 4096
    return {"n_params": n_params, "fixed": fixed + overhead, "overhead": overhead, "smallest": smallest + fixed + overhead}


def check_budget_reachable(ctx: RunContext, v, budget) -> None:
    """A budget below the smallest file the candidate types allow is refused before any work."""
    from pipeline.allocate import MiB

    info = ctx.model_info
    lay = layout(info, ctx.recipe.prune_for(v), ctx.base_path)
    want = budget_bytes(ctx, v, budget, lay["n_params"], lay["overhead"])
    if want < lay["smallest"]:
        label = f"{budget[1]} bits per weight ({want / MiB:.1f} MiB)" if budget[0] == "target_bpw" else f"{budget[1]!r}"
        raise SqueezeError(f"{_budget_where(ctx, v, budget)}the budget of {label} is smaller than the smallest "
                           f"possible file, {lay['smallest'] / MiB:.1f} MiB (every tensor at its smallest type)")


def _action(ctx: RunContext, v, src: Path, imatrix, budget):
    def run(io):
        from pipeline import prune as prune_stage

        recipe = ctx.recipe
        layers = prune_stage.variant_layers(ctx, v)
        choices = resolve_types(recipe, v, ctx.model_info)
        extra = {}
        token_embd_type = recipe.token_embedding_type_for(v)
        if budget is not None:
            choices, alloc = _budget_choices(ctx, v, budget, layers, choices)
            token_embd_type = choices.pop("token_embd.weight").type if "token_embd.weight" in choices else token_embd_type
            extra = {"predicted_kld": alloc.predicted_kld, "predicted_bytes": alloc.total_bytes,
                     "budget_bytes": alloc.budget_bytes}
            from pipeline.allocate import explain_markdown

            note = (f"Types chosen for `{budget[0]}: {budget[1]}` from measured sensitivities "
                    f"(sensitivity.json)" + (f"; layers {list(layers)} pruned first." if layers else "."))
            io.out(ctx.allocation_md_path(v.name)).write_text(explain_markdown(alloc, f"{v.name}: every tensor's type", note))
        lines = tensor_type_file_lines(choices, layers)
        if budget is not None and token_embd_type:
            lines.append(f"^token_embd\\.weight$={token_embd_type.lower()}")
        io.out(ctx.tensor_types_path(v.name)).write_text("".join(line + "\n" for line in lines))
        quantize_file(src, io.out(ctx.variant_path(v.name)), v.ftype,
                      imatrix_path=imatrix, overrides=overrides_for_llama(choices, layers),
                      output_type=recipe.output_type_for(v),
                      token_embedding_type=token_embd_type, threads=ctx.threads)
        return {**extra, "pruned_layers": list(layers),
                "explicit_types": {c.tensor: [c.type, c.why] for c in choices.values()}}
    return run


def _budget_choices(ctx: RunContext, v, budget, layers, rule_choices):
    """Every tensor's type for the budget; recipe rules still win for the tensors they name."""
    from pipeline.allocate import allocate
    from pipeline.model_info import layer_of
    from pipeline.selection import Choice
    from pipeline.sensitivity import load_sensitivity

    sens = load_sensitivity(ctx.sensitivity_json_path)
    info = ctx.model_info
    lay = layout(info, layers, ctx.base_path)
    want = budget_bytes(ctx, v, budget, lay["n_params"], lay["overhead"])
    errors = [e for e in sens["errors"] if layer_of(e["tensor"]) not in set(layers)
              and e["tensor"] not in rule_choices]
    fixed = lay["fixed"]
    by_name = {t.name: t for t in info.tensors}
    for name, c in rule_choices.items():  # tensors a rule pins are spent first
        if layer_of(name) not in set(layers) and name in by_name:
            fixed += _tensor_bytes(c.type, by_name[name].shape)
    alloc = allocate(errors, sens["alphas"], want, fixed, _budget_where(ctx, v, budget),
                     budget_label=f"{budget[1]}")
    choices = dict(rule_choices)
    for t, ty in alloc.types.items():
        o = alloc.options[t][alloc.chosen[t]]
        choices[t] = Choice(t, ty, f"{budget[0]} {budget[1]}: predicted KLD {o.kld:.2e}")
    return choices, alloc
