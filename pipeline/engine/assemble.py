"""A variant's GGUF written from quantized tensors that were already made, byte for byte the file
llama_model_quantize writes from the same source, flags and imatrix.

Why: the variants of a run share most (tensor, type) pairs, and a budgeted variant has just
measured its whole mix in memory (pipeline.choose.refine), so llama_model_quantize would quantize
again what the run already holds. Here every pair comes from the process-wide cache
(pipeline.engine.quantized_tensors) or is quantized once into it with ggml_quantize_chunk, the
function llama_model_quantize calls.

What llama.cpp decides stays llama.cpp's: each tensor's type comes from llama_model_quantize's own
dry run (its mix rules, the overrides, its fallbacks). The layout follows llama_model_quantize
(src/llama-quant.cpp): the source's metadata in its order, general.quantization_version and
general.file_type set (a set removes the key and appends it), the split keys removed, the kv
overrides it is given (the imatrix's provenance) appended; the tensors sorted by layer number, then
name (the model loader's weight_name_comparer); data padded to the alignment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import llama_cpp
import numpy as np

from pipeline.engine.quantize import planned_types, quantize_params, quantize_with
from pipeline.engine.quantized_tensors import QuantizedCache, file_identity, quantized_bytes, shared_cache
from pipeline.errors import SqueezeError
from pipeline.formats import ggml_types
from pipeline.formats.gguf_index import encode_kv, read_index, read_metadata, tensor_values, write_gguf_tensors
from pipeline.formats.tensor_names import OUTPUT, TOKEN_EMBD, layer_map, layer_of, with_layer

_SPLIT_KEYS = {gguf.Keys.Split.LLM_KV_SPLIT_NO, gguf.Keys.Split.LLM_KV_SPLIT_COUNT,
               gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT}


@dataclass(frozen=True)
class PrunedFrom:
    """The unpruned base and imatrix a pruned source was cut from. pipeline.formats.prune copies
    tensors and imatrix entries verbatim under new layer numbers, so a pair the run quantized from
    the base (the refinement measures pruned variants on it, layers removed in memory) is the same
    bytes as the pruned file's: it is looked up under the tensor's original name."""

    base: Path
    imatrix: Path | None
    dropped: tuple[int, ...]

    def keys(self, names) -> tuple[str, str, dict[str, str]]:
        """(base identity, imatrix identity, pruned name -> original name)."""
        n_layers = len({layer_of(n) for n in names if layer_of(n) is not None}) + len(self.dropped)
        original = {new: old for old, new in layer_map(n_layers, self.dropped).items()}
        return (file_identity(self.base), file_identity(self.imatrix),
                {n: n if layer_of(n) is None else with_layer(n, original[layer_of(n)]) for n in names})


class Rounder:
    """Rounding other than llama.cpp's for some tensors: `round(name, values, shape, qtype, column
    weights)` gives the tensor's bytes in `qtype`, or None to keep llama.cpp's rounding;
    `describe(name, shape, qtype)` says which of the two the tensor gets (also when its bytes come
    from the cache); `identity` keys what it makes in the quantized-tensor cache apart from
    llama.cpp's."""

    identity: str = "-"

    def describe(self, name: str, shape: tuple[int, ...], qtype: str) -> str:
        raise NotImplementedError

    def round(self, name: str, values: np.ndarray, shape: tuple[int, ...], qtype: str,
              column_weights: np.ndarray | None) -> np.ndarray | None:
        raise NotImplementedError


@dataclass
class Assembled:
    tensors: int
    quantized: int  # pairs quantized here
    reused: int  # pairs the cache already held
    copied: int  # tensors kept in their source type
    rounding: dict = field(default_factory=dict)  # tensor -> its rounding, with a Rounder


def loader_order(name: str) -> tuple[int, str]:
    """llama_model_loader's weight_name_comparer: layer number (-1 outside blocks), then name."""
    layer = layer_of(name)
    return (-1 if layer is None else layer, name)


def _u32(key: str, value: int) -> bytes:
    return encode_kv(key, abs(int(value)) & 0xFFFFFFFF, int(gguf.GGUFValueType.UINT32))


def output_metadata(src: Path, ftype: str, kv: list[tuple[str, int, object]]) -> tuple[list[bytes], int]:
    """The metadata entries llama_model_quantize writes, in its order, and the alignment."""
    entries, alignment = read_metadata(src)
    out = [(e.key, e.raw) for e in entries if e.key not in _SPLIT_KEYS]

    def set_value(key: str, raw: bytes) -> None:
        out[:] = [(k, r) for k, r in out if k != key] + [(key, raw)]

    set_value(gguf.Keys.General.QUANTIZATION_VERSION, _u32(gguf.Keys.General.QUANTIZATION_VERSION,
                                                           gguf.GGML_QUANT_VERSION))
    set_value(gguf.Keys.General.FILE_TYPE, _u32(gguf.Keys.General.FILE_TYPE, int(ggml_types.file_type(ftype))))
    for key, tag, value in kv:
        if tag == llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR:
            set_value(key, encode_kv(key, value, int(gguf.GGUFValueType.STRING)))
        elif tag == llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT:  # llama.cpp writes these as u32 of the absolute value
            set_value(key, _u32(key, value))
        else:
            raise SqueezeError(f"{key}: a metadata override of this kind is not written by squeeze's assembler")
    return [raw for _, raw in out], alignment


def _ggml_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The dimensions gguf_add_tensor writes: ggml_n_dims drops trailing ones (at least one stays)."""
    dims = list(shape)
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return tuple(dims)


def assemble_file(src: Path, dst: Path, ftype: str, *, imatrix_path: Path | None = None,
                  cache: QuantizedCache | None = None, pruned_from: PrunedFrom | None = None,
                  rounder: Rounder | None = None, **flags) -> Assembled:
    """Write `dst` as quantize_file(src, dst, ftype, imatrix_path=..., **flags) would, from the
    cache's quantized tensors where it holds them (`pruned_from`: where a pruned source's tensors
    came from, so the pairs quantized from the unpruned base count too). `rounder`: other values on
    llama.cpp's grid for the tensors it takes (error-compensated rounding); same types and sizes."""
    src, cache = Path(src), cache or shared_cache()
    qp = quantize_params(ftype, imatrix_path=imatrix_path, **flags)
    planned = planned_types(src, qp)
    types, columns = planned.types, qp.columns
    index = read_index(src)
    missing = sorted(set(index) - set(types))
    if missing:
        raise SqueezeError(f"{src}: llama.cpp's dry run planned no type for {', '.join(missing[:3])}")
    if planned.refused or any(_needs_imatrix(n, t, ftype) and n not in columns for n, t in types.items()):
        # llama_model_quantize refuses these (a type that needs an imatrix, none for the tensor):
        # let it, so the refusal is its own
        quantize_with(src, dst, qp)
        raise SqueezeError(f"llama_model_quantize quantized {src.name} to {ftype} where squeeze expected a refusal")
    metadata, alignment = output_metadata(src, ftype, qp.kv)
    names = sorted(index, key=loader_order)
    source_id, imatrix_id, original = file_identity(src), file_identity(imatrix_path), {n: n for n in index}
    if pruned_from is not None and (pruned_from.imatrix is None) == (imatrix_path is None):
        source_id, imatrix_id, original = pruned_from.keys(index)
    plan, counts, rounding = [], {"quantized": 0, "reused": 0, "copied": 0}, {}
    for name in names:
        e = index[name]
        new = gguf.GGMLQuantizationType[types[name]]
        plan.append((name, _ggml_shape(e.shape), new,
                     ggml_types.bytes_per_row(new, e.shape[0]) * math.prod(e.shape[1:])))
    src_data = np.memmap(src, dtype=np.uint8, mode="r")

    def produce(i: int):
        name, _, new, _ = plan[i]
        e = index[name]
        if new == e.type:
            counts["copied"] += 1
            return memoryview(src_data[e.offset:e.offset + e.n_bytes])
        weights = _column_weights(columns, name, e.shape)
        made = []

        def make() -> np.ndarray:
            made.append(True)
            values = tensor_values(src, e)
            rounded = rounder.round(original[name], values, e.shape, new.name, weights) if rounder else None
            return rounded if rounded is not None else quantized_bytes(values, e.shape, new.name, weights)

        rounding_id = f"|{rounder.identity}" if rounder else ""
        if rounder:
            rounding[name] = rounder.describe(original[name], e.shape, new.name)
        data = cache.get_or_quantize(source_id, original[name], new.name, imatrix_id + rounding_id, make)
        counts["quantized" if made else "reused"] += 1
        return data

    write_gguf_tensors(dst, metadata, plan, produce, alignment)
    return Assembled(len(plan), **counts, rounding=rounding)


def _needs_imatrix(name: str, qtype: str, ftype: str) -> bool:
    """llama.cpp's tensor_requires_imatrix: the 1-3 bit i-quants, and Q2_K in a Q2_K_S file, except
    in the token embedding and the output (only a guard: llama.cpp then decides, see above)."""
    if name in (TOKEN_EMBD, f"per_layer_{TOKEN_EMBD}", OUTPUT):
        return False
    return qtype in ggml_types.NEEDS_IMATRIX or (qtype == "Q2_K" and ftype.upper() == "Q2_K_S")


def _column_weights(columns: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The imatrix entry llama_model_quantize uses for a tensor: none without one; an entry of the
    wrong size is an error, except for the token embedding, which then goes without."""
    values = columns.get(name)
    if values is None:
        return None
    expected = shape[0] * (shape[2] if len(shape) > 2 else 1)
    if values.size != expected:
        if name in (TOKEN_EMBD, f"per_layer_{TOKEN_EMBD}"):  # llama.cpp's tensor_name_match_token_embd
            return None
        raise SqueezeError(f"imatrix entry {name} has {values.size} values, the tensor needs {expected}")
    return values

