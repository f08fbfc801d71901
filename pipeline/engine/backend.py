"""llama.cpp's process-wide state: backend initialisation, its log (kept quiet, errors saved for
messages), the versions every result depends on, and the default thread count."""

from __future__ import annotations

import ctypes
import os
from importlib.metadata import version

import llama_cpp

from pipeline import __version__
from pipeline.errors import SqueezeError

_LOG_LEVEL_ERROR = 4  # GGML_LOG_LEVEL_ERROR
_log_lines: list[str] = []


@llama_cpp.llama_log_callback
def _quiet_log(level, text, user_data):
    # llama.cpp logs every tensor it loads; keep errors only, for messages on failure.
    if level >= _LOG_LEVEL_ERROR and text:
        _log_lines.append(text.decode("utf-8", "replace"))
        del _log_lines[:-50]


_initialized = False


def init_backend() -> None:
    global _initialized
    if not _initialized:
        if os.environ.get("SQUEEZE_LLAMA_LOG") != "1":
            llama_cpp.llama_log_set(_quiet_log, ctypes.c_void_p())
        llama_cpp.llama_backend_init()
        _initialized = True


def clear_errors() -> None:
    _log_lines.clear()


def last_error(default: str) -> str:
    """The last error line llama.cpp logged since clear_errors(), else `default`."""
    return _log_lines[-1].strip() if _log_lines else default


def engine_version() -> str:
    return llama_cpp.__version__


def engine_versions() -> dict[str, str]:
    """What a stage's results depend on besides its inputs: the engine and squeeze itself."""
    return {"llama-cpp-python": engine_version(), "gguf": version("gguf"), "squeeze": __version__}


def supports_gpu_offload() -> bool:
    """Whether this llama.cpp build has a backend that can take layers (CUDA, Metal, Vulkan...)."""
    init_backend()
    return bool(llama_cpp.llama_supports_gpu_offload())


def check_offload(n_gpu_layers: int, key: str) -> None:
    """Refuse before any work when layers are to be offloaded and the build cannot: llama.cpp would
    otherwise run everything on the CPU without a word."""
    if n_gpu_layers != 0 and not supports_gpu_offload():
        raise SqueezeError(f"{key}: {n_gpu_layers} asks for GPU offload, but this llama.cpp build has no GPU "
                           "backend (llama_supports_gpu_offload() is false); rebuild it with "
                           "`make setup GPU=cuda`, or set it to 0")


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)
