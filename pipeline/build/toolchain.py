"""Which llama.cpp squeeze runs, and the matching source and reference CLI tools.

squeeze runs the llama.cpp vendored in the installed llama-cpp-python. Its source (with
convert_hf_to_gguf.py and tools/quantize, imatrix, perplexity, llama-bench) is the sdist of the
same llama-cpp-python version, fetched from the package registry into squeeze's cache. The
reference tools are built from it with the same CMake flags as the wheel
(pipeline/build/build_flags.py). A user with their own llama.cpp build (CUDA, Metal) points
$SQUEEZE_LLAMA_CPP_BIN at its bin folder (`squeeze toolchain --bin DIR`) and, to convert with
that checkout's converter too, $SQUEEZE_LLAMA_CPP_SRC at its source folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from pipeline.engine.backend import engine_version, engine_versions
from pipeline.build.build_flags import LLAMA_CPP_PYTHON_VERSION, cmake_args, cuda_paths, flags_id, gpu, nvcc
from pipeline.errors import SqueezeError
from pipeline.fsutil import cache_dir

REFERENCE_TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")


def toolchain_dir(version: str | None = None) -> Path:
    return cache_dir("toolchain", version or engine_version())


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


@contextlib.contextmanager
def using_bin(folder: str | None):
    """Use a user's llama.cpp bin folder (as $SQUEEZE_LLAMA_CPP_BIN does) for the duration."""
    if not folder:
        yield
        return
    before = os.environ.get("SQUEEZE_LLAMA_CPP_BIN")
    os.environ["SQUEEZE_LLAMA_CPP_BIN"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SQUEEZE_LLAMA_CPP_BIN", None)
        else:
            os.environ["SQUEEZE_LLAMA_CPP_BIN"] = before


def fetch_source(version: str | None = None, echo=print) -> Path:
    """Download (once) and extract the llama-cpp-python sdist matching the installed version."""
    version = version or engine_version()
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
    # A CUDA build links cuBLAS from wherever setup found it (the toolkit or a pip wheel).
    gpu_paths = cuda_paths(nvcc()) if gpu() == "cuda" else []
    configure = ["cmake", "-S", str(src), "-B", str(build), *cmake_args(), *gpu_paths, "-DCMAKE_BUILD_TYPE=Release",
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


def user_source() -> Path | None:
    """A llama.cpp checkout named by $SQUEEZE_LLAMA_CPP_SRC (its converter replaces the pinned one)."""
    user = os.environ.get("SQUEEZE_LLAMA_CPP_SRC")
    if not user:
        return None
    folder = Path(user).expanduser()
    if not (folder / CONVERT_SCRIPT).is_file():
        raise SqueezeError(f"$SQUEEZE_LLAMA_CPP_SRC={user}: expected a llama.cpp source folder with {CONVERT_SCRIPT}")
    return folder


CONVERT_SCRIPT = "convert_hf_to_gguf.py"


def converter_root(echo=print) -> Path:
    """The llama.cpp folder whose convert_hf_to_gguf.py (and gguf-py beside it) squeeze runs;
    the pinned version's source is fetched on first use."""
    root = user_source()
    if root is None:
        root = llama_cpp_source()
        if not (root / CONVERT_SCRIPT).is_file():
            root = fetch_source(echo=echo) / "vendor" / "llama.cpp"
    if not (root / CONVERT_SCRIPT).is_file():
        raise SqueezeError(f"{root}: has no {CONVERT_SCRIPT}; the llama.cpp source is incomplete "
                           f"(delete {toolchain_dir()} and run `squeeze toolchain --fetch`)")
    return root


def converter_label() -> str:
    """Which converter a convert step ran, for the manifest: switching it makes the base stale."""
    user = os.environ.get("SQUEEZE_LLAMA_CPP_SRC")
    return f"{user} ($SQUEEZE_LLAMA_CPP_SRC)" if user else f"llama-cpp-python {engine_version()} sdist"


def convert_script(echo=print) -> Path:
    return converter_root(echo) / CONVERT_SCRIPT


def llama_cpp_commit(version: str | None = None) -> str | None:
    """The llama.cpp commit vendored in a llama-cpp-python release, from the sdist's changelog
    (the sdist has no .git, so llama.cpp's own build info says 'unknown')."""
    version = version or engine_version()
    changelog = source_dir(version) / "CHANGELOG.md"
    try:
        text = changelog.read_text(encoding="utf-8")
    except OSError:
        return None
    section = text.split(f"## [{version}]", 1)
    if len(section) < 2:
        return None
    body = section[1].split("\n## [", 1)[0]
    m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", body)
    return m.group(1) if m else None


def source_gguf_version(root: Path) -> str | None:
    """Version of the gguf-py shipped beside the converter (it runs with that one, not the installed)."""
    try:
        text = (root / "gguf-py" / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    return m.group(1) if m else None


def tool_version(folder: Path) -> str:
    """What a bin folder's tools say they are: '0.5.0-dev (build 1, commit 0c1e570)'.
    (llama-perplexity takes llama.cpp's common --version; llama-quantize has no such flag.)"""
    try:
        proc = subprocess.run([str(folder / "llama-perplexity"), "--version"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    m = re.search(r"version:\s*(.+)", proc.stdout + proc.stderr)
    return m.group(1).strip() if m else "unknown"


def describe() -> dict[str, str]:
    """What `squeeze toolchain` prints: the versions every manifest records, then the files."""
    versions = engine_versions()
    info = {"squeeze": versions.get("squeeze", "?"), "llama-cpp-python": versions.get("llama-cpp-python", "?")}
    if info["llama-cpp-python"] != LLAMA_CPP_PYTHON_VERSION:  # someone installed another release by hand
        info["llama-cpp-python"] += f" (squeeze pins {LLAMA_CPP_PYTHON_VERSION}: make setup)"
    info["llama.cpp commit"] = llama_cpp_commit() or "unknown until fetched (squeeze toolchain --fetch)"
    info["gguf (installed)"] = versions.get("gguf", "?")
    user_src = user_source()
    root = user_src or llama_cpp_source()
    if (root / CONVERT_SCRIPT).is_file():
        info["gguf (converter)"] = source_gguf_version(root) or "unknown"
        info["converter"] = str(root / CONVERT_SCRIPT) + (" ($SQUEEZE_LLAMA_CPP_SRC)" if user_src else "")
    else:
        info["converter"] = "not fetched (squeeze toolchain --fetch)"
    ref = reference_bin_dir()
    if ref:
        user = " ($SQUEEZE_LLAMA_CPP_BIN)" if os.environ.get("SQUEEZE_LLAMA_CPP_BIN") else ""
        info["reference tools"] = f"{ref}{user}, version {tool_version(ref)}"
    else:
        info["reference tools"] = "not built (squeeze toolchain --build)"
    info["cmake flags"] = " ".join(cmake_args())
    return info
