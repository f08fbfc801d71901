"""A device as a budget (`target_memory`): the bytes a model file may take so that it, and what
llama.cpp allocates to run it at a context, fit a memory size less a margin.

The runtime part (KV cache, output and compute buffers) is read back from llama.cpp at run time
(pipeline.engine.runtime_memory); before any work, `squeeze plan` can only check a lower bound,
the smallest file plus a KV cache no layer can go below: every layer holds at least the context,
or the sliding window where the model has one, in the cache type asked for.

The margin (default 5 % of the memory) is for what a running process holds beyond llama.cpp's
buffers: the program and its libraries, the allocator's rounding, the graph's metadata. A GPU
driver's own context (a few hundred MiB on CUDA) is not in it: state as `memory` what is free
once the driver is up.
"""

from __future__ import annotations

import gguf

from pipeline.errors import SqueezeError
from pipeline.formats.ggml_types import tensor_type
from pipeline.units import MiB, parse_size


def memory_bytes(target, where: str = "") -> int:
    return parse_size(target.memory, where)


def margin_bytes(target, where: str = "") -> int:
    """The margin kept below `memory`: a share of it ("5%") or a size."""
    margin = str(target.margin).strip()
    if margin.endswith("%"):
        return int(memory_bytes(target, where) * float(margin[:-1]) / 100)
    return parse_size(margin, where)


def file_budget(target, runtime_bytes: int, where: str = "") -> int:
    """Bytes the file may take beside `runtime_bytes` of context buffers."""
    return memory_bytes(target, where) - margin_bytes(target, where) - runtime_bytes


def kv_bytes_per_value(kv_type: str) -> float:
    qtype = tensor_type(kv_type.upper())
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return size / block


def kv_lower_bound(n_layers: int, kv_dim: int, ctx: int, kv_type: str, window: int | None = None) -> int:
    """K and V of every layer for at least min(ctx, window) tokens (the whole context without a
    sliding window): what any layer's cache holds at the least."""
    tokens = min(ctx, window) if window else ctx
    return int(2 * n_layers * kv_dim * tokens * kv_bytes_per_value(kv_type))


def check_fits(target, need_bytes: int, what: str, where: str = "") -> None:
    """One line when `need_bytes` (a file and its context buffers) cannot fit the target."""
    room = memory_bytes(target, where) - margin_bytes(target, where)
    if need_bytes > room:
        raise SqueezeError(f"{where}{target.memory} less its {target.margin} margin ({room / MiB:.1f} MiB) cannot "
                           f"hold {what} ({need_bytes / MiB:.1f} MiB)")
