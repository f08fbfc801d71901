"""Names of llama.cpp's tensor types and file types, pinned to gguf-py's enums.

Recipes name tensor types the way `llama-quantize --tensor-type` does (Q4_K, IQ3_S, F16, ...)
and variant mixtures the way `llama-quantize` takes its ftype (Q4_K_M, IQ3_M, ...).
"""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from pipeline.errors import SqueezeError, did_you_mean

# Types that cannot be a quantization target (integer types, or only used for activations).
_NOT_TARGETS = {"I8", "I16", "I32", "I64", "F64", "Q8_1", "Q8_K"}
# Types that llama.cpp needs an importance matrix for (llama_model_quantize refuses a tensor of
# these without one, as tensor_requires_imatrix says; so is Q2_K in a Q2_K_S file).
NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"}

TENSOR_TYPES = {t.name: t for t in GGMLQuantizationType if t.name not in _NOT_TARGETS}
FILE_TYPES = {
    ft.name.removeprefix("MOSTLY_"): ft
    for ft in LlamaFileType
    if ft.name.startswith("MOSTLY_") or ft.name == "ALL_F32"
}
FILE_TYPES["F32"] = FILE_TYPES.pop("ALL_F32")
BASE_TYPES = ("F16", "BF16", "F32")


def tensor_type(name: str, where: str = "") -> GGMLQuantizationType:
    """The ggml type called `name` (case-insensitive), or a one-line error naming `where`."""
    key = str(name).upper()
    if key in TENSOR_TYPES:
        return TENSOR_TYPES[key]
    raise SqueezeError(f"{where}unknown tensor type '{name}'{did_you_mean(key, TENSOR_TYPES)}")


def file_type(name: str, where: str = "") -> LlamaFileType:
    """The llama_ftype called `name` (Q4_K_M, IQ3_M, ...), or a one-line error naming `where`."""
    key = str(name).upper()
    if key in FILE_TYPES:
        return FILE_TYPES[key]
    raise SqueezeError(f"{where}unknown quant type '{name}'{did_you_mean(key, FILE_TYPES)}")


def block_size(t: GGMLQuantizationType) -> int:
    """Number of weights per block: a row length must be a multiple of it."""
    return GGML_QUANT_SIZES[t][0]


def fits(shape, qtype: str) -> bool:
    """Whether a tensor's rows (shape[0], ggml order) can be stored in `qtype`: the row length must
    be a multiple of its block size. Unknown shapes (a model not converted yet) fit."""
    return shape is None or shape[0] % block_size(tensor_type(qtype)) == 0


def bytes_per_row(t: GGMLQuantizationType, n_per_row: int) -> int:
    bs, ts = GGML_QUANT_SIZES[t]
    return n_per_row // bs * ts


def bits_per_weight(t: GGMLQuantizationType) -> float:
    bs, ts = GGML_QUANT_SIZES[t]
    return ts * 8 / bs


# The KV cache types llama.cpp takes for a context's type_k / type_v (a quantized V cache needs
# flash attention, llama.cpp's default where the backend has it).
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
