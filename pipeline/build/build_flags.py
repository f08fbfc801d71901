"""The CMake flags llama.cpp is built with, for the llama-cpp-python wheel and the reference CLI
tools alike (same flags, so both run the same kernels and numbers can be compared).

Why not GGML_NATIVE: -march=native turns on AMX when the CPU advertises it, and under some
hypervisors (this project's CI among them) the AMX tile state is not enabled, so Q4_K/Q8_0
matmuls die with SIGILL. An explicit x86-64-v3 set (AVX2, FMA, F16C, BMI2) runs everywhere
such a machine does. Runnable without dependencies: `python3 pipeline/build/build_flags.py`.

GPU builds: `make setup GPU=cuda` adds llama.cpp's CUDA backend (GGML_CUDA). The choice is read
from $SQUEEZE_GPU, else from the file `squeeze-gpu` that setup leaves in the environment
(sys.prefix), so the wheel, the reference tools and their cache names agree without the user
repeating it. Metal on macOS needs nothing: llama.cpp enables it by default there.

CUDA architectures: `make setup GPU=cuda CUDA_ARCHS=86,90` (recorded in `squeeze-cuda-archs`
beside it). Left alone, ggml compiles 7 targets, several times the compile time and wheel size of
one; squeeze builds machine code for the H100/H200 alone (90-real) unless told otherwise.

cuBLAS: ggml's CUDA backend links it, and a toolkit installed from pip (or a minimal one) may not
have it. `cuda_paths()` finds it in the toolkit or in the environment's `nvidia-cublas` wheel and
returns the CMake arguments that point at it; they name folders of this machine, so they are kept
out of the flags id. `--cublas` prints them, or says in one line what is missing.
"""

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

# The llama-cpp-python release squeeze runs on (pyproject.toml pins the same; a test checks).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"

_X86 = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
        "-DGGML_BMI2=ON", "-DGGML_AVX512=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF"]
_COMMON = ["-DLLAMA_CURL=OFF"]
# GGML_CUDA_NO_VMM: ggml's virtual-memory pool links the driver library (libcuda.so) itself, so a
# CUDA build would not even import on a machine without an NVIDIA driver, and toolkits from pip
# have no libcuda stub to link against. Without it the engine loads everywhere, runs on the CPU
# where there is no GPU, and cudart finds the driver at run time; the plain pool costs a little
# more device memory, nothing in speed that squeeze's single-sequence work notices.
_GPU = {"cuda": ["-DGGML_CUDA=ON", "-DGGML_CUDA_NO_VMM=ON"], "": []}
GPU_CHOICE_FILE = "squeeze-gpu"
CUDA_ARCHS_FILE = "squeeze-cuda-archs"
# Machine code for sm_90 (H100, H200) only: PTX beside it would let other GPUs JIT-compile
# ggml's thousands of kernels at first use (minutes), and doubles the wheel.
DEFAULT_CUDA_ARCHS = "90-real"
_ARCH = re.compile(r"^([0-9]{2,3}[af]?(-real|-virtual)?|native|all|all-major)$")


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


def cuda_archs() -> str:
    """CMake's list of CUDA architectures: $SQUEEZE_CUDA_ARCHS, else the recorded choice, else
    DEFAULT_CUDA_ARCHS; commas or semicolons between them."""
    choice = os.environ.get("SQUEEZE_CUDA_ARCHS")
    if not choice:
        recorded = Path(sys.prefix) / CUDA_ARCHS_FILE
        choice = recorded.read_text().strip() if recorded.exists() else ""
    archs = [a.strip() for a in re.split(r"[,;]", choice or DEFAULT_CUDA_ARCHS) if a.strip()]
    if not archs or not all(_ARCH.match(a) for a in archs):
        raise SystemExit(f"CUDA_ARCHS={choice}: expected CUDA architectures such as 90 or 86,90 "
                         "(90-real: machine code only; the H100/H200 is 90, an RTX 4090 89, an A100 80)")
    return ";".join(archs)


def cmake_args() -> list[str]:
    machine = platform.machine().lower()
    args = _COMMON + (_X86 if machine in ("x86_64", "amd64") else []) + _GPU[gpu()]
    if gpu() == "cuda":
        args.append(f"-DCMAKE_CUDA_ARCHITECTURES={cuda_archs()}")
    return args


def flags_id() -> str:
    """Name of a build with these flags (wheel cache and CLI build folders): a short hash, after
    the GPU and its architectures where there is one, so a cache listing says which is which."""
    digest = hashlib.sha256(" ".join(cmake_args()).encode()).hexdigest()[:10]
    if gpu() == "cuda":
        return f"cuda{re.sub(r'[^0-9a-z]+', '_', cuda_archs())}-{digest}"
    return digest


def cuda_toolkit_root(nvcc: str) -> Path:
    """The toolkit folder nvcc compiles against (its TOP), which the `nvcc` on PATH may only wrap."""
    with tempfile.TemporaryDirectory() as scratch:
        dry = subprocess.run([nvcc, "--dryrun", "-c", str(Path(scratch) / "x.cu")],
                             capture_output=True, text=True)
    top = re.search(r"^#\$ TOP=(.*)$", dry.stdout + dry.stderr, re.M)
    return Path(top.group(1)).resolve() if top else Path(nvcc).resolve().parent.parent


def cuda_release(nvcc: str) -> tuple[int, int]:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+)\.(\d+)", out)
    if not found:
        raise SystemExit(f"GPU=cuda: `{nvcc} --version` does not say which CUDA release it is")
    return int(found.group(1)), int(found.group(2))


def cublas_wheel(release: tuple[int, int]) -> str:
    """The pip requirement that brings cuBLAS for this CUDA release (the wheels' versions follow
    the toolkit's: nvidia-cublas 13.0.x ships with CUDA 13.0)."""
    major, minor = release
    name = "nvidia-cublas" if major >= 13 else f"nvidia-cublas-cu{major}"
    return f"{name}=={major}.{minor}.*"


def _cublas_folders(root: Path, release: tuple[int, int]) -> list[tuple[Path, Path]]:
    """(include, lib) folder pairs where cuBLAS may be: the toolkit's, then this environment's
    nvidia-cublas wheel (nvidia/cu13/ from CUDA 13 on, nvidia/cublas/ before)."""
    pairs = [(root / "include", root / lib) for lib in ("lib64", "lib")]
    pairs += [(t / "include", t / "lib") for t in sorted((root / "targets").glob("*"))]
    wheel = Path(sysconfig.get_paths()["purelib"]) / "nvidia"
    sub = wheel / (f"cu{release[0]}" if release[0] >= 13 else "cublas")
    return pairs + [(sub / "include", sub / "lib")]


def _library(folder: Path, name: str) -> Path | None:
    found = sorted(folder.glob(f"lib{name}.so*"), key=lambda p: len(p.name))
    return found[0] if found else None


def cuda_paths(nvcc: str) -> list[str]:
    """CMake arguments pointing ggml's CUDA backend at cuBLAS where FindCUDAToolkit would not look
    (a pip wheel); [] when the toolkit has it. One line, and exit, when there is none."""
    root, release = cuda_toolkit_root(nvcc), cuda_release(nvcc)
    for include, lib in _cublas_folders(root, release):
        cublas, cublas_lt = _library(lib, "cublas"), _library(lib, "cublasLt")
        if not ((include / "cublas_v2.h").is_file() and cublas and cublas_lt):
            continue
        if include == root / "include" or include.parent.parent == root / "targets":
            return []
        # The wheel's libraries lie in site-packages/nvidia/cu13/lib, and llama-cpp-python's
        # libraries in site-packages/llama_cpp/lib with RUNPATH $ORIGIN: add the wheel's folder,
        # relative to them, so any environment with nvidia-cublas installed loads them. A response
        # file, because no quoting of $ORIGIN survives both CMake's generators and the shell.
        rsp = Path(tempfile.gettempdir()) / f"squeeze-cublas-rpath-{os.getuid()}.rsp"
        rsp.write_text(f"-Wl,-rpath,$ORIGIN/../../nvidia/{lib.parent.name}/lib\n")
        return [f"-DCUDA_cublas_LIBRARY={cublas}", f"-DCUDA_cublasLt_LIBRARY={cublas_lt}",
                f"-DCMAKE_CUDA_FLAGS=-I{include}", f"-DCMAKE_SHARED_LINKER_FLAGS=@{rsp}"]
    raise SystemExit(f"GPU=cuda: cuBLAS not found (cublas_v2.h and libcublas.so) in the CUDA toolkit at "
                     f"{root} nor in this environment: `{Path(sys.executable).name} -m pip install "
                     f"'{cublas_wheel(release)}'`, or install the toolkit's cuBLAS, or drop GPU=cuda")


def nvcc() -> str:
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc")
    if not nvcc:
        raise SystemExit("GPU=cuda: no nvcc (set CUDACXX, or put the CUDA toolkit's bin/ on PATH)")
    return nvcc


if __name__ == "__main__":
    arg = sys.argv[1] if len(sys.argv) > 1 else ""
    print({"--id": flags_id, "--version": lambda: LLAMA_CPP_PYTHON_VERSION, "--gpu": gpu,
           "--cuda-archs": cuda_archs, "--cublas": lambda: " ".join(cuda_paths(nvcc())),
           "--cublas-wheel": lambda: cublas_wheel(cuda_release(nvcc()))}.get(
        arg, lambda: " ".join(cmake_args()))())
