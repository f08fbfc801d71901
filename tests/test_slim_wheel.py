"""The slimmed engine wheel (pipeline/build/slim_wheel.py): one copy of each library the package
loads, RECORD true to what it holds, and, installed on its own, the same engine: a model loaded
through it gives the very logits the full install gives.

The wheel under test is rebuilt here from the installed engine, in the shape `pip wheel` gives
before slimming (each library also under its fully versioned name, CMake's lib/ and include/
beside the package), so the tests read no cache: a machine whose cached wheel was already slimmed
by `make setup`, or whose cache was emptied, tests the same thing."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from pipeline.build.slim_wheel import PACKAGE_LIB, needed_libraries, slim
from tests.tiny_models import tiny_model

LOGITS = """
import hashlib, sys, llama_cpp
from llama_cpp import Llama
m = Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, logits_all=True, verbose=False)
m.eval([1, 2, 3, 4, 5])
print(llama_cpp.__file__)
print(hashlib.sha256(m.scores[:5].tobytes()).hexdigest())
"""


def _wheel_tag(dist) -> str:
    wheel_meta = dist.read_text("WHEEL") or ""
    return next(line.split(":", 1)[1].strip() for line in wheel_meta.splitlines() if line.startswith("Tag:"))


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> Path:
    """A full-size engine wheel made from the installed distribution's own files."""
    dist = metadata.distribution("llama_cpp_python")
    out = tmp_path_factory.mktemp("built") / f"llama_cpp_python-{dist.version}-{_wheel_tag(dist)}.whl"
    files = [f for f in dist.files if "__pycache__" not in f.parts and f.suffix != ".pyc"]
    record = next(str(f) for f in files if f.name == "RECORD")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as w:
        for f in files:
            if str(f) == record:
                continue
            data = Path(f.locate()).read_bytes()
            w.writestr(str(f), data)
            name = str(f)
            if name.startswith(PACKAGE_LIB) and ".so" in name:
                # what a wheel stores for CMake's link chain, and the second set CMake installs
                w.writestr(name + ".9.9", data)
                w.writestr("lib/" + f.name, data)
        w.writestr("include/llama.h", b"/* CMake installs headers beside the package */\n")
        w.writestr(record, "")
    out.chmod(0o644)
    return out


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


def test_slimming_a_slim_wheel_changes_nothing(slim_wheel, tmp_path):
    again = tmp_path / slim_wheel.name
    slim(slim_wheel, again)
    with zipfile.ZipFile(slim_wheel) as a, zipfile.ZipFile(again) as b:
        assert sorted(a.namelist()) == sorted(b.namelist())
        assert all(a.read(n) == b.read(n) for n in a.namelist())
