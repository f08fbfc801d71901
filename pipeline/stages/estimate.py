"""The disk checks of the stages that write large files (convert, prune, quantize): before
writing, the size of what they are about to write, from the cost model (pipeline.cost), against
the free space (pipeline.fsutil.ensure_free_space)."""

from __future__ import annotations

from pathlib import Path

from pipeline.cost import estimate as est
from pipeline.cost.estimate import Shape
from pipeline.cost.run_estimate import model_shape
from pipeline.errors import SqueezeError
from pipeline.fsutil import ensure_free_space
from pipeline.recipe.plan import VariantPlan
from pipeline.run.layout import RunContext


# ---- what the writing stages check the disk for -------------------------------------------------
def _known_shape(ctx: RunContext) -> Shape | None:
    try:
        return model_shape(ctx)
    except SqueezeError:
        return None  # a hub model before its download: the converter's output size is not known


def predicted_base_bytes(ctx: RunContext, drop=()) -> int | None:
    """The size of the base (or of a base with `drop` layers removed), None when not known yet."""
    shape = _known_shape(ctx)
    return None if shape is None else est.base_file_bytes(shape, ctx.recipe.model.base_type.upper(), drop)


def predicted_variant_bytes(ctx: RunContext, v: VariantPlan, explicit: dict[str, str], drop) -> int | None:
    shape = _known_shape(ctx)
    if shape is None:
        return None
    types = est.variant_types(shape, v.ftype, explicit, drop, v.type_of("output_type"),
                              v.type_of("token_embedding_type"))
    return est.variant_file_bytes(shape, types)


def check_room(what: str, folder: Path, needed: int | None) -> None:
    """Before writing a large file: one line when the disk lacks room (nothing written yet)."""
    if needed is not None:
        ensure_free_space(what, folder, needed)
