"""What a size budget is spent on: the parameter count, the bytes no choice changes (metadata,
1-D tensors, tensors outside the measured groups) and the smallest file the candidate types allow."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from pipeline.choose.groups import CANDIDATE_TYPES, group_of
from pipeline.engine.quantize import planned_types, quantize_params
from pipeline.formats import ggml_types
from pipeline.formats.ggml_types import fits
from pipeline.formats.gguf_index import read_index
from pipeline.formats.model_info import ModelInfo
from pipeline.formats.tensor_names import layer_of


@dataclass(frozen=True)
class Layout:
    n_params: int  # parameters of the tensors that stay
    overhead: int  # metadata and alignment padding
    fixed: int  # bytes no type choice changes, overhead included
    smallest: int  # the whole file with every chosen tensor at its smallest candidate type


def tensor_bytes(qtype: str, shape) -> int:
    rows = 1
    for d in shape[1:]:
        rows *= d
    return ggml_types.bytes_per_row(ggml_types.tensor_type(qtype), shape[0]) * rows


@functools.lru_cache(maxsize=16)
def _planned(path: str, mtime_ns: int, ftype: str, output_type: str | None) -> dict[str, str]:
    return planned_types(Path(path), quantize_params(ftype, output_type=output_type)).types


def kept_types(base_path: Path | None, ftype: str, output_type: str | None = None) -> dict[str, str]:
    """The types llama.cpp gives, in a file of `ftype` (with `output_type` for the output layer,
    as a recipe sets it), the tensors no choice changes (an untied output layer, a router): its
    own dry run, fallbacks included. Empty before the base exists."""
    if base_path is None or not Path(base_path).exists():
        return {}
    return _planned(str(base_path), Path(base_path).stat().st_mtime_ns, ftype.upper(), output_type)


def _smallest_fitting(shape, default: int | None = None) -> int:
    return min((tensor_bytes(q, shape) for q in CANDIDATE_TYPES if fits(shape, q)), default=default)


def layout(info: ModelInfo, drop=(), base_path: Path | None = None, kept: Mapping[str, str] | None = None) -> Layout:
    """`kept`: the types the tensors outside the chosen groups get in the file (kept_types). Those
    bytes are what a budget spends first; without `kept` they count at their type in the base
    (for an untied output layer in F16, several times what llama.cpp writes). The smallest file is
    a lower bound either way, so a budget is never refused that a file could meet: a 2-D tensor
    whose type in the file is not known yet counts at the smallest type its rows fit."""
    drop, kept = set(drop), dict(kept or {})
    n_params = fixed = smallest = 0
    for t in info.tensors:
        if layer_of(t.name) in drop or t.shape is None:
            continue
        n = 1
        for d in t.shape:
            n *= d
        n_params += n
        if group_of(t.name) is not None and len(t.shape) >= 2:
            smallest += _smallest_fitting(t.shape)
            continue
        # a model not converted yet has no types: llama.cpp keeps 1-D tensors in F32
        here = tensor_bytes(kept.get(t.name) or t.type or ("F32" if len(t.shape) == 1 else "F16"), t.shape)
        fixed += here
        unknown = t.name not in kept and len(t.shape) >= 2
        smallest += min(here, _smallest_fitting(t.shape, here)) if unknown else here
    overhead = 0
    if base_path is not None and Path(base_path).exists():
        # metadata (the vocabulary is most of it) as the base file holds it
        overhead = Path(base_path).stat().st_size - sum(e.n_bytes for e in read_index(base_path).values())
    # each tensor's data is padded to the 32-byte alignment; quantize adds a few imatrix keys
    overhead += 32 * len(info.tensors) + 4096
    return Layout(n_params, overhead, fixed + overhead, smallest + overhead)
