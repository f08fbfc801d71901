"""The CMake flags llama.cpp is built with, for the llama-cpp-python wheel and the reference CLI
tools alike (same flags, so both run the same kernels and numbers can be compared).

Why not GGML_NATIVE: -march=native turns on AMX when the CPU advertises it, and under some
hypervisors (this project's CI among them) the AMX tile state is not enabled, so Q4_K/Q8_0
matmuls die with SIGILL. An explicit x86-64-v3 set (AVX2, FMA, F16C, BMI2) runs everywhere
such a machine does. Runnable without dependencies: `python3 pipeline/engine/build_flags.py`.

GPU builds: `make setup GPU=cuda` adds llama.cpp's CUDA backend (GGML_CUDA). The choice is read
from $SQUEEZE_GPU, else from the file `squeeze-gpu` that setup leaves in the environment
(sys.prefix), so the wheel, the reference tools and their cache names agree without the user
repeating it. Metal on macOS needs nothing: llama.cpp enables it by default there.
"""

import hashlib
import os
import platform
import sys
from pathlib import Path

# The llama-cpp-python release squeeze runs on (pyproject.toml pins the same; a test checks).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"

_X86 = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
        "-DGGML_BMI2=ON", "-DGGML_AVX512=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF"]
_COMMON = ["-DLLAMA_CURL=OFF"]
_GPU = {"cuda": ["-DGGML_CUDA=ON"], "": []}
GPU_CHOICE_FILE = "squeeze-gpu"


def gpu() -> str:
    """'' (CPU only) or 'cuda'."""
    choice = os.environ.get("SQUEEZE_GPU")
    if choice is None:
        recorded = Path(sys.prefix) / GPU_CHOICE_FILE
        choice = recorded.read_text().strip() if recorded.exists() else ""
    choice = choice.strip().lower()
    if choice not in _GPU:
        raise SystemExit(f"GPU={choice}: expected one of: cuda (or nothing, for a CPU build)")
    return choice


def cmake_args() -> list[str]:
    machine = platform.machine().lower()
    return _COMMON + (_X86 if machine in ("x86_64", "amd64") else []) + _GPU[gpu()]


def flags_id() -> str:
    """Short hash naming a build with these flags (wheel cache and CLI build folders)."""
    return hashlib.sha256(" ".join(cmake_args()).encode()).hexdigest()[:10]


if __name__ == "__main__":
    arg = sys.argv[1] if len(sys.argv) > 1 else ""
    print({"--id": flags_id, "--version": lambda: LLAMA_CPP_PYTHON_VERSION,
           "--gpu": gpu}.get(arg, lambda: " ".join(cmake_args()))())
