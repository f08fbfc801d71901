"""What llama.cpp allocates to run a model at a given context: the weights, the KV cache, the
output (logits) buffer and the compute buffers, read back from llama.cpp itself.

llama.cpp reports each buffer it allocates, and the size it gives is ggml_backend_buffer_get_size
of that buffer (src/llama-model.cpp, llama-kv-cache.cpp, llama-context.cpp: "<name> model buffer
size", "KV buffer size", "output buffer size", "compute buffer size", in MiB to two decimals). So
the model is loaded and a context made exactly as a user would run it (one sequence of `n_ctx`
tokens, llama.cpp's default batch sizes, the cache type asked for, a sliding-window cache the size
of the window as llama.cpp's tools keep it), and those lines are summed. An architecture's own
layout of its cache comes with it: Gemma 3's sliding-window layers hold the window, not the
context (a separate, smaller SWA cache), which a formula would have to know.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

from pipeline.engine.backend import capture_log, default_threads
from pipeline.engine.model import Model
from pipeline.errors import SqueezeError
from pipeline.formats import ggml_types

MiB = 1 << 20
_BUFFER = re.compile(r"^(?P<who>\w+):\s+(?P<device>\S+)\s+(?P<what>model|KV|output|compute|RS|state)\s+"
                     r"buffer size\s*=\s*(?P<mib>[\d.]+) MiB")


@dataclass(frozen=True)
class RuntimeMemory:
    """Bytes llama.cpp allocated, by kind (each rounded to 0.01 MiB, as it reports them)."""

    model: int
    kv: int
    output: int
    compute: int
    lines: tuple[str, ...]  # what llama.cpp said, for the record

    @property
    def runtime(self) -> int:
        """Everything but the weights: what the context costs at this size."""
        return self.kv + self.output + self.compute

    @property
    def total(self) -> int:
        return self.model + self.runtime

    def to_json(self) -> dict:
        return {"model_bytes": self.model, "kv_bytes": self.kv, "output_bytes": self.output,
                "compute_bytes": self.compute, "total_bytes": self.total, "llama_cpp_says": list(self.lines)}


def kv_type_id(name: str, where: str = "") -> int:
    if name.lower() not in ggml_types.KV_CACHE_TYPES:
        raise SqueezeError(f"{where}unknown KV cache type '{name}'; expected one of "
                           f"{', '.join(ggml_types.KV_CACHE_TYPES)}")
    return int(ggml_types.tensor_type(name.upper(), where).value)


def runtime_memory(path: Path, n_ctx: int, kv_type: str = "f16", n_gpu_layers: int = 0,
                   threads: int | None = None) -> RuntimeMemory:
    """Load `path`, make a context of `n_ctx` tokens with a `kv_type` cache, and sum what llama.cpp
    says it allocated. Nothing is evaluated: the buffers are reserved when the context is made."""
    type_id = kv_type_id(kv_type)
    with capture_log() as lines:
        model = Model(path, n_gpu_layers)
        try:
            params = llama_cpp.llama_context_default_params()
            params.n_ctx = n_ctx
            params.n_seq_max = 1
            params.type_k = params.type_v = type_id
            # llama.cpp's tools (llama-server, llama-cli) keep a sliding-window layer's cache at the
            # window, not the context (their --swa-full is off); the library's default is full
            params.swa_full = False
            params.n_threads = params.n_threads_batch = threads or default_threads()
            context = llama_cpp.llama_init_from_model(model.ptr, params)
            if not context:
                raise SqueezeError(f"{path}: llama.cpp could not make a context of {n_ctx} tokens with a {kv_type} "
                                   "KV cache")
            llama_cpp.llama_free(context)
        finally:
            model.close()
        said = list(lines)
    sizes = {"model": 0, "KV": 0, "output": 0, "compute": 0, "RS": 0, "state": 0}
    kept = []
    for line in said:
        m = _BUFFER.match(line.strip())
        if m:
            sizes[m["what"]] += round(float(m["mib"]) * MiB)
            kept.append(line.strip())
    if not sizes["model"] or not sizes["compute"]:
        raise SqueezeError(f"{path}: llama.cpp did not report its buffer sizes (model, compute); this llama.cpp "
                           "build logs them differently")
    return RuntimeMemory(sizes["model"], sizes["KV"] + sizes["RS"] + sizes["state"], sizes["output"], sizes["compute"],
                         tuple(kept))
