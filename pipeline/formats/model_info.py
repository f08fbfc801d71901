"""What a model is made of (architecture, layer count, tensor names and shapes), read from a
GGUF header without loading weights, or named from gguf-py's templates for a model not here yet."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import gguf

from pipeline.errors import SqueezeError
from pipeline.formats.gguf_index import read_index, read_metadata
from pipeline.formats.gguf_io import check_gguf
from pipeline.formats.tensor_names import NEVER_QUANTIZED_KINDS, kind_of
from pipeline.fsutil import cache_dir, write_json_atomic


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...] | None  # ggml order: shape[0] is the row length (ne0)
    type: str | None


@dataclass(frozen=True)
class ModelInfo:
    arch: str
    n_layers: int
    tensors: tuple[TensorInfo, ...]
    n_vocab: int | None = None
    file_type: int | None = None  # general.file_type (a llama_ftype), where the GGUF states one

    def quantizable(self) -> list[TensorInfo]:
        """Tensors llama-quantize may change the type of: the 2-D (or 3-D expert) weights, less
        those it always keeps (the MoE router, ...: tensor_names.NEVER_QUANTIZED_KINDS)."""
        return [t for t in self.tensors if t.name.endswith(".weight") and (t.shape is None or len(t.shape) >= 2)
                and kind_of(t.name) not in NEVER_QUANTIZED_KINDS]


def read_model_info(path: Path) -> ModelInfo:
    """Header facts of a GGUF, cached by (path, size, mtime): plans, status and the base step ask
    for them often (a record without a key of today's is parsed again)."""
    path = Path(path)
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    cached = cache_dir("model-info") / f"{key}.json"
    try:
        data = json.loads(cached.read_text())
        return ModelInfo(data["arch"], data["n_layers"],
                         tuple(TensorInfo(n, tuple(s) if s is not None else None, t) for n, s, t in data["tensors"]),
                         data["n_vocab"], data["file_type"])
    except (OSError, ValueError, KeyError):
        pass
    info = _parse_model_info(path)
    write_json_atomic(cached, {"arch": info.arch, "n_layers": info.n_layers, "n_vocab": info.n_vocab,
                               "file_type": info.file_type,
                               "tensors": [[t.name, t.shape, t.type] for t in info.tensors]})
    return info


def _parse_model_info(path: Path) -> ModelInfo:
    # squeeze's own header parser, not gguf-py's reader: that one decodes every vocabulary string
    # (about 11 s for Gemma 3's 262k tokens, paid by whichever stage first asks).
    check_gguf(path)
    fields = {kv.key: kv for kv in read_metadata(path)[0]}
    arch_kv = fields.get(gguf.Keys.General.ARCHITECTURE)
    if arch_kv is None or not isinstance(arch_kv.value, str):
        raise SqueezeError(f"{path}: GGUF file has no general.architecture")
    arch = arch_kv.value
    blocks = fields.get(gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch))
    n_layers = blocks.value if blocks is not None and isinstance(blocks.value, int) else 0
    tensors = tuple(TensorInfo(e.name, e.shape, e.type.name) for e in read_index(path).values())
    tokens = fields.get(gguf.Keys.Tokenizer.LIST)
    ftype = fields.get(gguf.Keys.General.FILE_TYPE)
    return ModelInfo(arch, n_layers, tensors, tokens.count if tokens is not None else None,
                     ftype.value if ftype is not None and isinstance(ftype.value, int) else None)


def synthetic_model_info(arch: str, n_layers: int) -> ModelInfo:
    """Tensor names llama.cpp would give an `arch` model with `n_layers` blocks (shapes unknown).

    Lets `squeeze plan` validate a recipe for a model that is not on this machine."""
    try:
        march = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    except StopIteration:
        raise SqueezeError(f"model.arch: unknown architecture '{arch}'") from None
    names = []
    for t in gguf.MODEL_TENSORS[march]:
        template = gguf.TENSOR_NAMES[t]
        if "{bid}" in template:
            names += [template.format(bid=i) + ".weight" for i in range(n_layers)]
        else:
            names.append(template + ".weight")
    return ModelInfo(arch, n_layers, tuple(TensorInfo(n, None, None) for n in names))

