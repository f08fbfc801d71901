"""Stage convert: make the unquantized base GGUF (F16/BF16/F32) every variant is built from, and
base-<type>.json, what is known of its origin (pipeline.sources.model_source.make_base)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pipeline.engine.backend import engine_versions
from pipeline.build.toolchain import converter_label
from pipeline.run.layout import RunContext
from pipeline.run.runner import Step
from pipeline.sources.hf_convert import folder_inputs
from pipeline.sources.hub import cached_model
from pipeline.sources.model_source import Source, make_base, parse_source
from pipeline.stages.estimate import check_room, predicted_base_bytes


def steps(ctx: RunContext) -> list[Step]:
    recipe = ctx.recipe
    source = parse_source(recipe)
    params = recipe.values("model.source", "model.revision", "model.base_type", "model.sha256")
    if recipe.model.dither:  # only when asked: existing runs stay up to date
        params["model.dither"] = True
    inputs: list[Path] = []
    if source.kind == "gguf":
        inputs = [Path(source.ref)]
    elif source.kind == "pypi":
        try:
            params["package_version"] = version(source.ref)
        except PackageNotFoundError:
            params["package_version"] = None
    elif source.kind == "hf-folder":
        inputs = folder_inputs(Path(source.ref))

    def action(io):
        check_room("convert", ctx.folder, predicted_base_bytes(ctx))
        info, extra = make_base(recipe, source, io.out(ctx.base_path), ctx.folder / "logs" / "convert.log")
        info.save(io.out(ctx.base_info_path))
        return {"source": source.describe(), **extra}

    versions = dict(engine_versions())
    if source.kind in ("hf-folder", "hub"):
        versions["convert_hf_to_gguf"] = converter_label()
    return [Step("convert", "convert", params, inputs, [ctx.base_path, ctx.base_info_path], action,
                 versions=versions, produces=_produces(ctx, source))]


def _produces(ctx: RunContext, source: Source) -> str:
    base = f"{ctx.base_path.name} + {ctx.base_info_path.name} ({ctx.recipe.model.base_type.upper()} base from " \
           f"{source.describe()}"
    if source.kind in ("hf-folder", "hub"):
        base += ", by llama.cpp's convert_hf_to_gguf.py"
        if source.kind == "hub":
            base += "; downloaded already" if cached_model(source.ref, source.revision) else "; downloaded first"
    return base + ")"
