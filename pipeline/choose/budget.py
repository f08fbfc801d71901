"""What a size budget is spent on: the parameter count, the bytes no choice changes (metadata,
1-D tensors, tensors outside the measured groups) and the smallest file the candidate types allow."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.choose.groups import CANDIDATE_TYPES, group_of
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


def layout(info: ModelInfo, drop=(), base_path: Path | None = None) -> Layout:
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
            smallest += min(tensor_bytes(q, t.shape) for q in CANDIDATE_TYPES if fits(t.shape, q))
        else:
            # a model not converted yet has no types: llama.cpp keeps 1-D tensors in F32
            fixed += tensor_bytes(t.type or ("F32" if len(t.shape) == 1 else "F16"), t.shape)
    overhead = 0
    if base_path is not None and Path(base_path).exists():
        # metadata (the vocabulary is most of it) as the base file holds it
        overhead = Path(base_path).stat().st_size - sum(e.n_bytes for e in read_index(base_path).values())
    # each tensor's data is padded to the 32-byte alignment; quantize adds a few imatrix keys
    overhead += 32 * len(info.tensors) + 4096
    return Layout(n_params, overhead, fixed + overhead, smallest + fixed + overhead)
