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
    from pipeline.imatrix import imatrix_input

    recipe = ctx.recipe
    out = []
    for v in recipe.variants:
        prune = recipe.prune_for(v)
        imatrix = imatrix_input(ctx) if v.imatrix else None
        params = {
            f"variants.{v.name}.ftype": v.ftype.upper(),
            f"variants.{v.name}.rules": [vars(r) for r in v.rules],
            "select.rules": [vars(r) for r in recipe.select.rules],
            ("select.prune" if v.prune is None else f"variants.{v.name}.prune"): list(prune),
            f"variants.{v.name}.output_type": recipe.output_type_for(v),
            f"variants.{v.name}.token_embedding_type": recipe.token_embedding_type_for(v),
            f"variants.{v.name}.imatrix": v.imatrix,
        }
        inputs = [ctx.base_path] + ([imatrix] if imatrix else [])
        outputs = [ctx.variant_path(v.name), ctx.tensor_types_path(v.name)]
        what = f"{v.ftype.upper()}" + (f", layers {list(prune)} pruned" if prune else "") + \
               (", imatrix" if imatrix else "")
        out.append(Step(f"quantize {v.name}", "quantize", params, inputs, outputs,
                        _action(ctx, v, prune, imatrix), variant=v.name, versions=engine_versions(),
                        produces=f"variants/{v.name}.gguf ({what})"))
    return out


def _action(ctx: RunContext, v, prune, imatrix):
    def run(io):
        recipe = ctx.recipe
        choices = resolve_types(recipe, v, ctx.model_info)
        lines = tensor_type_file_lines(choices, prune)
        io.out(ctx.tensor_types_path(v.name)).write_text("".join(line + "\n" for line in lines))
        quantize_file(ctx.base_path, io.out(ctx.variant_path(v.name)), v.ftype,
                      imatrix_path=imatrix, overrides=overrides_for_llama(choices, prune), prune=prune,
                      output_type=recipe.output_type_for(v),
                      token_embedding_type=recipe.token_embedding_type_for(v), threads=ctx.threads)
        return {"explicit_types": {c.tensor: [c.type, c.why] for c in choices.values()}}
    return run
