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
_captured: list[str] | None = None  # every line while capture_log() is on


@llama_cpp.llama_log_callback
def _quiet_log(level, text, user_data):
    # llama.cpp logs every tensor it loads; keep errors only, for messages on failure.
    if _captured is not None and text:
        _captured.append(text.decode("utf-8", "replace"))
    if level >= _LOG_LEVEL_ERROR and text:
        _log_lines.append(text.decode("utf-8", "replace"))
        del _log_lines[:-50]


class capture_log:
    """Within `with capture_log() as lines:`, every line llama.cpp logs is appended to `lines`
    (what it reports of itself and nowhere else, e.g. the size of each buffer it allocates)."""

    def __enter__(self) -> list[str]:
        global _captured
        init_backend()
        if os.environ.get("SQUEEZE_LLAMA_LOG") == "1":  # the log goes to stderr, not through here
            llama_cpp.llama_log_set(_quiet_log, ctypes.c_void_p())
        _captured = []
        return _captured

    def __exit__(self, *exc):
        global _captured
        _captured = None


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
    """Whether this llama.cpp build can take layers here: a GPU backend (CUDA, Metal, Vulkan...)
    that found a device."""
    init_backend()
    return bool(llama_cpp.llama_supports_gpu_offload())


def gpu_backends() -> dict[str, int]:
    """The backends built into this llama.cpp other than the CPU's, with the devices each found:
    a CUDA build on a machine without a GPU (or driver) has {'CUDA': 0}."""
    init_backend()
    from llama_cpp._ggml import libggml  # libggml, as llama_cpp loaded it

    libggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    libggml.ggml_backend_reg_get.argtypes = [ctypes.c_size_t]
    libggml.ggml_backend_reg_get.restype = ctypes.c_void_p
    libggml.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
    libggml.ggml_backend_reg_name.restype = ctypes.c_char_p
    libggml.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    libggml.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    regs = [libggml.ggml_backend_reg_get(i) for i in range(libggml.ggml_backend_reg_count())]
    found = {libggml.ggml_backend_reg_name(r).decode(): libggml.ggml_backend_reg_dev_count(r) for r in regs}
    return {name: n for name, n in found.items() if name not in ("CPU", "BLAS")}


def offload_refusal(n_gpu_layers: int, key: str, can_offload: bool, backends: dict[str, int],
                    why: str = "no device, or no driver") -> str | None:
    """Why offloading n_gpu_layers cannot happen with this build on this machine, or None; `why`
    is what the backend said when it looked for devices."""
    if n_gpu_layers == 0 or can_offload:
        return None
    asks = f"{key}: {n_gpu_layers} asks for GPU offload, but"
    if backends:
        names = "/".join(sorted(backends))
        return (f"{asks} this llama.cpp build's {names} backend found no GPU on this machine "
                f"({why}); run it where one is, or set it to 0")
    return (f"{asks} this llama.cpp build has no GPU backend (llama_supports_gpu_offload() is false); "
            "rebuild it with `make setup GPU=cuda`, or set it to 0")


def check_offload(n_gpu_layers: int, key: str) -> None:
    """Refuse before any work when layers are to be offloaded and the build or the machine cannot:
    llama.cpp would otherwise run everything on the CPU without a word."""
    if n_gpu_layers != 0 and not supports_gpu_offload():
        backends = gpu_backends()
        # the backend logged why it found no device when it registered (no driver, no GPU)
        said = [line.strip() for line in _log_lines if any(name in line for name in backends)]
        raise SqueezeError(offload_refusal(n_gpu_layers, key, False, backends, *said[-1:]))


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)
