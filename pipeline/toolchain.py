"""Which llama.cpp squeeze runs, and the matching source and reference CLI tools.

squeeze runs the llama.cpp vendored in the installed llama-cpp-python. Its source (with
convert_hf_to_gguf.py and tools/quantize, imatrix, perplexity, llama-bench) is the sdist of the
same llama-cpp-python version, fetched from the package registry into squeeze's cache. The
reference tools are built from it with the same CMake flags as the wheel
(pipeline/build_flags.py). A user with their own llama.cpp build (CUDA, Metal) points
$SQUEEZE_LLAMA_CPP_BIN at its bin folder instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from pipeline.build_flags import LLAMA_CPP_PYTHON_VERSION, cmake_args, flags_id
from pipeline.errors import SqueezeError
from pipeline.fsutil import cache_dir

REFERENCE_TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")


def installed_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def toolchain_dir(version: str | None = None) -> Path:
    return cache_dir("toolchain", version or installed_version())


def source_dir(version: str | None = None) -> Path:
    """The extracted llama-cpp-python sdist (its llama.cpp is under vendor/llama.cpp)."""
    return toolchain_dir(version) / "src"


def llama_cpp_source(version: str | None = None) -> Path:
    return source_dir(version) / "vendor" / "llama.cpp"


def build_dir(version: str | None = None) -> Path:
    return toolchain_dir(version) / f"build-{flags_id()}"


def reference_bin_dir() -> Path | None:
    """Folder holding the reference CLI tools, or None when they are not built."""
    user = os.environ.get("SQUEEZE_LLAMA_CPP_BIN")
    candidates = [Path(user)] if user else [build_dir() / "bin"]
    for folder in candidates:
        if all((folder / tool).is_file() for tool in REFERENCE_TOOLS):
            return folder
    if user:
        raise SqueezeError(f"$SQUEEZE_LLAMA_CPP_BIN={user}: expected {', '.join(REFERENCE_TOOLS)} there")
    return None


def fetch_source(version: str | None = None, echo=print) -> Path:
    """Download (once) and extract the llama-cpp-python sdist matching the installed version."""
    version = version or installed_version()
    src = source_dir(version)
    if (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return src
    tdir = toolchain_dir(version)
    sdist = tdir / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        echo(f"downloading the llama-cpp-python {version} sdist (llama.cpp source)")
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               f"llama-cpp-python=={version}", "-d", str(tdir)], capture_output=True, text=True)
        if proc.returncode != 0 or not sdist.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise SqueezeError(f"could not download the llama-cpp-python {version} sdist: {last}")
    partial = tdir / "src.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(partial, filter="data")
    (top,) = list(partial.iterdir())
    shutil.rmtree(src, ignore_errors=True)
    top.rename(src)
    shutil.rmtree(partial, ignore_errors=True)
    return src


def build_reference(echo=print, jobs: int | None = None) -> Path:
    """Build the reference CLI tools (about 4-6 minutes on 2 cores); returns their folder."""
    existing = reference_bin_dir()
    if existing is not None:
        return existing
    src = llama_cpp_source() if (llama_cpp_source() / "CMakeLists.txt").is_file() else \
        fetch_source(echo=echo) / "vendor" / "llama.cpp"
    build = build_dir()
    echo(f"building {', '.join(REFERENCE_TOOLS)} from {src} into {build}")
    configure = ["cmake", "-S", str(src), "-B", str(build), *cmake_args(), "-DCMAKE_BUILD_TYPE=Release",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
    compile_ = ["cmake", "--build", str(build), "-j", str(jobs or os.cpu_count() or 2),
                "--target", *REFERENCE_TOOLS]
    for cmd in (configure, compile_):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.splitlines()[-5:] + proc.stderr.splitlines()[-10:])
            raise SqueezeError(f"building the reference tools failed ({' '.join(cmd[:3])} ...):\n{tail}")
    folder = reference_bin_dir()
    if folder is None:
        raise SqueezeError(f"build finished but {build / 'bin'} lacks some of {', '.join(REFERENCE_TOOLS)}")
    return folder


def describe() -> dict[str, str]:
    """What `squeeze toolchain` prints."""
    from pipeline.engine import engine_versions

    info = dict(engine_versions())
    info["llama.cpp source"] = str(llama_cpp_source()) if llama_cpp_source().is_dir() else "not fetched"
    ref = reference_bin_dir()
    info["reference tools"] = str(ref) if ref else "not built (squeeze toolchain --build)"
    info["cmake flags"] = " ".join(cmake_args())
    return info
