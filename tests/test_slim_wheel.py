"""The slimmed engine wheel (pipeline/engine/slim_wheel.py): one copy of each library the package
loads, RECORD true to what it holds, and, installed on its own, the same engine: a model loaded
through it gives the very logits the full install gives. Run on the wheel `make setup` built and
keeps in pip's cache (CI builds it there first)."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pipeline.engine import build_flags
from pipeline.engine.slim_wheel import PACKAGE_LIB, needed_libraries, slim
from tests.tiny_models import tiny_model

LOGITS = """
import hashlib, sys, llama_cpp
from llama_cpp import Llama
m = Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, logits_all=True, verbose=False)
m.eval([1, 2, 3, 4, 5])
print(llama_cpp.__file__)
print(hashlib.sha256(m.scores[:5].tobytes()).hexdigest())
"""


@pytest.fixture(scope="module")
def built_wheel() -> Path:
    cache = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True).stdout.strip()
    folder = Path(cache) / "squeeze-wheels" / f"llama-cpp-python-{build_flags.LLAMA_CPP_PYTHON_VERSION}-" \
                                               f"{build_flags.flags_id()}"
    wheels = sorted(folder.glob("llama_cpp_python-*.whl"))
    if not wheels:
        pytest.skip(f"no engine wheel in {folder}: this environment was not set up by `make setup`")
    return wheels[0]


@pytest.fixture(scope="module")
def slim_wheel(built_wheel, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slim") / built_wheel.name
    slim(built_wheel, out)
    return out


def test_needed_libraries_agree_with_readelf(built_wheel):
    with zipfile.ZipFile(built_wheel) as w:
        elf = w.read(PACKAGE_LIB + "libllama.so")
    needed = needed_libraries(elf)
    assert "libggml-base.so.0" in needed
    if shutil.which("readelf"):
        lib = Path(os.path.dirname(__import__("llama_cpp").__file__)) / "lib" / "libllama.so"
        out = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
        assert needed == [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


def test_the_slim_wheel_keeps_each_loaded_library_once_and_a_true_record(built_wheel, slim_wheel):
    assert slim_wheel.stat().st_size < built_wheel.stat().st_size
    with zipfile.ZipFile(slim_wheel) as w:
        names = w.namelist()
        libs = [n for n in names if n.startswith(PACKAGE_LIB)]
        assert not [n for n in names if n.startswith(("lib/", "include/", "bin/"))]
        assert {PACKAGE_LIB + "libllama.so", PACKAGE_LIB + "libggml.so", PACKAGE_LIB + "libggml-base.so.0"} <= set(libs)
        assert not [n for n in libs if n.count(".so.") and n.rsplit(".so.", 1)[1].count(".") >= 1], \
            "a fully versioned copy nothing loads by name was kept"
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        rows = [line.split(",") for line in w.read(record).decode().splitlines()]
        assert {r[0] for r in rows} == set(names)
        for name, digest, size in rows:
            if name == record:
                continue
            data = w.read(name)
            assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert int(size) == len(data)


def test_the_slim_wheel_installed_alone_gives_the_same_logits(slim_wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(site), str(slim_wheel)], check=True)
    model = str(tiny_model("phi3"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    slim_run = subprocess.run([sys.executable, "-c", LOGITS, model], capture_output=True, text=True, check=True,
                              env={**env, "PYTHONPATH": str(site)}, cwd=tmp_path).stdout.split()
    full_run = subprocess.run([sys.executable, "-c", LOGITS, model], capture_output=True, text=True, check=True,
                              env=env, cwd=tmp_path).stdout.split()
    assert slim_run[0].startswith(str(site)) and not full_run[0].startswith(str(site))
    assert slim_run[1] == full_run[1]


def test_the_slim_wheel_keeps_the_built_wheels_permissions(built_wheel, slim_wheel):
    assert slim_wheel.stat().st_mode & 0o777 == built_wheel.stat().st_mode & 0o777
