"""A results folder with the real base and a made-up sensitivity map, for tests of the quantize
stage's budgets: every tensor's error shrinks 4x per bit of its type, each group weighs `alpha`.
What those tests check (sizes, fits, measured targets, the probe memo) does not depend on the
map being measured, and measuring one costs minutes."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.choose.budget import tensor_bytes
from pipeline.choose.groups import CANDIDATE_TYPES, group_of
from pipeline.choose.sensitivity import Sensitivity, TensorError
from pipeline.formats.ggml_types import bits_per_weight, fits, tensor_type
from pipeline.run.layout import RunContext
from pipeline.stages.registry import open_run


def run_with_made_up_map(base_f16: Path, recipe: Path, results: Path, alpha=lambda group: 1.0) -> RunContext:
    ctx = open_run(recipe.name, results)
    ctx.folder.mkdir(parents=True, exist_ok=True)
    os.link(base_f16, ctx.base_path)
    errors, groups = [], set()
    for t in ctx.model_info.quantizable():
        g = group_of(t.name)
        for q in CANDIDATE_TYPES:
            if g and fits(t.shape, q):
                errors.append(TensorError(t.name, g, q, tensor_bytes(q, t.shape),
                                          t.shape[0] * t.shape[1] * 4.0 ** -bits_per_weight(tensor_type(q))))
                groups.add(g)
    ctx.sensitivity_json_path.write_text(Sensitivity([], {}, {g: alpha(g) for g in groups}, errors, {}).to_json())
    return ctx
