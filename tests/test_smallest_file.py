"""The smallest-file check of a size budget on a model whose rows llama.cpp cannot store in every
type: a tiny Qwen3-MoE (random weights) with expert rows of 160, which no K-quant's 256-wide block
fits, and an untied output layer, which no budget chooses and llama.cpp writes at its own type.
The check is a lower bound: a budget that a stock llama.cpp file meets is never refused."""

from __future__ import annotations

import pytest

from pipeline.choose.budget import kept_types, layout
from pipeline.choose.groups import group_of
from pipeline.engine.quantize import quantize_file
from pipeline.errors import SqueezeError
from pipeline.formats.gguf_index import read_index
from pipeline.formats.model_info import read_model_info
from tests.tiny_models import tiny_model

STOCK = ("Q2_K", "Q3_K_M")


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    model = tiny_model("qwen3moe-narrow")
    folder = tmp_path_factory.mktemp("stock")
    files = {}
    for ftype in STOCK:
        files[ftype] = folder / f"{ftype}.gguf"
        quantize_file(model, files[ftype], ftype)
    return model, read_model_info(model), files


def test_the_smallest_file_counts_each_kept_tensor_as_llama_cpp_writes_it(narrow):
    model, info, files = narrow
    assert any(t.name.endswith("ffn_down_exps.weight") and t.shape[0] == 160 for t in info.tensors)
    assert any(t.name == "output.weight" for t in info.tensors)
    for ftype, path in files.items():
        lay = layout(info, (), model, kept_types(model, ftype))
        assert lay.smallest <= path.stat().st_size, ftype
        # the bytes no choice changes are exactly those llama.cpp wrote for those tensors
        index = read_index(path)
        written = sum(e.n_bytes for name, e in index.items() if group_of(name) is None)
        assert lay.fixed - lay.overhead == written, ftype
    # counted at the base's F16 instead, the untied output layer alone makes the fixed part
    # larger than the stock file's: the refusal the check used to give
    assert layout(info, (), model).fixed > layout(info, (), model, kept_types(model, "Q3_K_M")).fixed * 1.5


def _plan(write_recipe, tmp_path, model, variant):
    from pipeline.stages.registry import build_steps, open_run

    path = write_recipe(f"""
        version: 1
        model: {{source: "{model}", base_type: F16}}
        calibration: {{datasets: [groups_merged], ctx: 128, chunks: 2}}
        variants:
          auto: {variant}
        """)
    return build_steps(open_run(str(path), tmp_path / "results"))


def test_a_budget_a_stock_file_meets_is_never_refused(narrow, write_recipe, tmp_path, monkeypatch):
    model, info, files = narrow
    monkeypatch.chdir(tmp_path)
    n_params = layout(info).n_params
    for ftype, path in files.items():
        bpw = round(path.stat().st_size * 8 / n_params, 2) + 0.01
        assert _plan(write_recipe, tmp_path, model, f"{{ftype: Q4_0, target_bpw: {bpw}}}")  # planned, not refused
        size = f"{path.stat().st_size / 2**20 + 0.01:.2f} MiB"
        assert _plan(write_recipe, tmp_path, model, f"{{ftype: Q4_0, target_size: {size}}}")
    with pytest.raises(SqueezeError) as e:
        _plan(write_recipe, tmp_path, model, "{ftype: Q4_0, target_bpw: 0.5}")
    assert str(e.value).startswith(f"{tmp_path / 'recipe.yaml'}:5: variants.auto.target_bpw: the budget of 0.5 bits "
                                   "per weight (")
    assert "is smaller than the smallest possible file" in str(e.value)
