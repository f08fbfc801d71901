"""Stage 1, convert: make the unquantized base GGUF (F16/BF16/F32) every variant is built from.

A GGUF source is dequantized tensor by tensor (or linked as is when it already has the base
type); a Hugging Face folder or hub model goes through llama.cpp's convert_hf_to_gguf.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import gguf

from pipeline.context import RunContext
from pipeline.dequantize import dequantize_gguf
from pipeline.engine import engine_versions
from pipeline.errors import SqueezeError
from pipeline.model_info import ModelInfo, read_model_info, synthetic_model_info
from pipeline.runner import Step
from pipeline.sources import Source, fetch_pypi_gguf, parse_source


def source_gguf(ctx: RunContext, source: Source) -> Path:
    if source.kind == "gguf":
        path = Path(source.ref)
        if not path.is_file():
            raise SqueezeError(f"{ctx.recipe.where('model', 'source')}no such file '{path}'")
        return path
    if source.kind == "pypi":
        return fetch_pypi_gguf(source.ref, ctx.recipe.model.sha256)
    raise ValueError(source.kind)


def model_info_for(ctx: RunContext) -> ModelInfo:
    """The model's tensors before any work: from the base if built, else from the source."""
    if ctx.base_path.exists():
        return read_model_info(ctx.base_path)
    source = parse_source(ctx.recipe)
    if source.kind in ("gguf", "pypi"):
        return read_model_info(source_gguf(ctx, source))
    from pipeline.hf_convert import hf_model_info  # the convert extra's code path

    info = hf_model_info(ctx, source)
    if info is not None:
        return info
    m = ctx.recipe.model
    if m.arch and m.layers:
        return synthetic_model_info(m.arch, m.layers)
    raise SqueezeError(f"{ctx.recipe.where('model')}the model is not on this machine yet; give model.arch "
                       f"and model.layers so the recipe can be checked before downloading")


def steps(ctx: RunContext) -> list[Step]:
    recipe = ctx.recipe
    source = parse_source(recipe)
    params = {"model.source": recipe.model.source, "model.revision": recipe.model.revision,
              "model.base_type": recipe.model.base_type.upper(), "model.sha256": recipe.model.sha256}
    inputs: list[Path] = []
    if source.kind == "gguf":
        inputs = [Path(source.ref)]
    elif source.kind == "pypi":
        from importlib.metadata import PackageNotFoundError, version

        try:
            params["package_version"] = version(source.ref)
        except PackageNotFoundError:
            params["package_version"] = None
    elif source.kind == "hf-folder":
        from pipeline.hf_convert import folder_inputs

        inputs = folder_inputs(Path(source.ref))

    def action(io):
        out = io.out(ctx.base_path)
        extra = {"source": source.describe()}
        if source.kind in ("gguf", "pypi"):
            src = source_gguf(ctx, source)
            _gguf_to_base(src, out, recipe.model.base_type.upper())
        else:
            from pipeline.hf_convert import convert_to_base

            extra.update(convert_to_base(ctx, source, out))
        return extra

    versions = dict(engine_versions())
    if source.kind in ("hf-folder", "hub"):
        from pipeline.toolchain import converter_label

        versions["convert_hf_to_gguf"] = converter_label()
    return [Step("convert", "convert", params, inputs, [ctx.base_path], action,
                 versions=versions,
                 produces=_produces(ctx, source))]


def _produces(ctx: RunContext, source: Source) -> str:
    base = f"{ctx.base_path.name} ({ctx.recipe.model.base_type.upper()} base from {source.describe()}"
    if source.kind in ("hf-folder", "hub"):
        base += ", by llama.cpp's convert_hf_to_gguf.py"
        if source.kind == "hub":
            from pipeline.hub import cached_model

            base += "; downloaded already" if cached_model(source.ref, source.revision) else "; downloaded first"
    return base + ")"


def _gguf_to_base(src: Path, dst: Path, base_type: str) -> None:
    reader = gguf.GGUFReader(str(src), "r")
    field = reader.get_field("general.file_type")
    ftype = int(field.parts[field.data[0]][0]) if field is not None else None
    wanted = {"F16": 1, "F32": 0, "BF16": 32}[base_type]
    del reader
    if ftype == wanted:
        try:
            os.link(src, dst)  # same bytes, no copy
        except OSError:
            shutil.copyfile(src, dst)
        return
    dequantize_gguf(src, dst, base_type)
