"""The work a step declares it will do, in small records the cost model prices without knowing
which stage declared them (pipeline.cost.run_estimate).

A step's `work(shape)` (pipeline.run.runner.Step) returns these for the model's shape (the
exact tensors, or shapes derived from a parameter count before a download). A new stage is
priced by declaring its work: the cost model has no per-stage code.

Time: each record but `Resident`, `Note` and `Memory` is priced in seconds at this machine's
measured rates (pipeline.cost.rates), scaled to the host or GPU priced for. Bytes: `Write`
sizes the outputs. Memory: a step's peak is the largest `Resident` or `Memory` it declares,
plus what the run's quantized-tensor cache holds by then (`Roundtrip` and `Quantize` fill it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


# The quantized-tensor cache keys each tensor by the file it came from (and its type): tensors
# quantized from a pruned base are kept beside the base's own, so records name their source.
BASE = "base"


@dataclass(frozen=True)
class ModelRef:
    """A model a pass runs: the base or a variant, as the cost model needs it."""

    bytes: int  # its file
    flops_per_token: float  # through the blocks it keeps
    quantized: bool
    layers: int  # the layers it keeps (its KV cache)


@dataclass(frozen=True)
class Load:
    """Loading models (llama.cpp's mmap and context setup)."""

    models: int = 1


@dataclass(frozen=True)
class Forward:
    """`tokens` through the blocks (prompt processing), `logits` of them through the output layer.
    `quantized`: at quantized types (a probe quantizes the base in memory: the base's FLOPs at
    quantized rates)."""

    tokens: float
    flops_per_token: float
    quantized: bool
    logits: float = 0


@dataclass(frozen=True)
class Decode:
    """`tokens` generated one at a time: each reads the model's weights once."""

    tokens: float
    model_bytes: int


@dataclass(frozen=True)
class Kld:
    """Rows of logits compared with the base's distribution (log-softmax, top-k, KLD)."""

    rows: float


@dataclass(frozen=True)
class Sketch:
    """Rows of the base's logits kept as a distribution (top-k and sampled tail)."""

    rows: float


@dataclass(frozen=True)
class Hook:
    """Tokens whose every linear input the cb_eval hook accumulates (the imatrix)."""

    tokens: float


@dataclass(frozen=True)
class Dense:
    """numpy matrix products (float64) of `flops` floating-point operations: the second moments'
    x^T x, GPTQ's inverse factors and its error feedback past each block."""

    flops: float


@dataclass(frozen=True)
class GptqColumns:
    """Values GPTQ rounds one input column at a time (pipeline.choose.gptq_rounding): the block's
    scales from ggml, the grid search and the feedback inside each block."""

    values: float


@dataclass(frozen=True)
class Roundtrip:
    """Tensors quantized in memory (ggml_quantize_chunk) at these types, `times` over (a share of
    them when below 1); kept in the run's quantized-tensor cache."""

    types: dict = field(hash=False)  # tensor name -> type
    times: float = 1.0
    source: str = BASE  # the file they are read from, as the cache keys them


@dataclass(frozen=True)
class RoundtripWeights:
    """`weights` values quantized in one type and back (sampled rows' weight errors)."""

    weights: float
    type: str


@dataclass(frozen=True)
class Quantize:
    """llama_model_quantize writing these types; `fastest` prices every tensor at the fastest
    measured rate (a file assembled from tensors the cache already holds)."""

    types: dict = field(hash=False)
    fastest: bool = False
    source: str = BASE  # the file quantized: the base, or a pruned base's name


@dataclass(frozen=True)
class Dequantize:
    """gguf-py dequantizing these tensors (with their source types)."""

    tensors: tuple


@dataclass(frozen=True)
class VocabHeader:
    """gguf-py writing a GGUF header that holds a vocabulary of `tokens` entries."""

    tokens: int


@dataclass(frozen=True)
class Write:
    """An output and its bytes; `timed`: written at the disk's measured rate (large files)."""

    path: Path
    bytes: int
    timed: bool = False


@dataclass(frozen=True)
class Fixed:
    """Seconds of work measured once and taken as constant (tables, plots, a converter's start)."""

    seconds: float


@dataclass(frozen=True)
class Resident:
    """What is in memory at once while a model runs: its file mapped, a KV cache and compute
    buffer over `ctx_tokens`, `logits` rows of output, and `extra` bytes beside them."""

    model: ModelRef
    ctx_tokens: int = 0
    logits: int = 0
    extra: int = 0


@dataclass(frozen=True)
class Memory:
    """Resident bytes without a running model: `bytes` beside the process's own (or alone, when
    not `beside_process`: a child process)."""

    bytes: int
    beside_process: bool = True


@dataclass(frozen=True)
class Note:
    text: str
