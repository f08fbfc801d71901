"""Quantize-once assembly (pipeline.engine.assemble): a variant's file written from tensors quantized
once per run is byte for byte the file llama_model_quantize writes from the same source, flags and
imatrix -- metadata, tensor order, types chosen by llama.cpp's mix rules, padding and data -- for an
allocated mix, a pruned variant, experts and i-quants; a pair asked for again is not quantized
again; what llama_model_quantize refuses is refused with its own message."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from pipeline.engine.assemble import PrunedFrom, assemble_file, loader_order
from pipeline.engine.quantize import quantize_file
from pipeline.engine.quantized_tensors import QuantizedCache
from pipeline.errors import SqueezeError
from pipeline.formats.ggml_types import fits
from pipeline.formats.gguf_index import read_index
from pipeline.formats.imatrix_file import read_imatrix, write_imatrix
from pipeline.formats.prune import prune_gguf, remap_imatrix
from pipeline.formats.tensor_names import exact_pattern
from pipeline.measure import calibration as activations
from tests.tiny_models import tiny_model


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, calibration_sample):
    """family -> (F16 base, its imatrix from 2 x 128 tokens of the calibration sample)."""
    made = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in made:
            base = tiny_model(family)
            tokens = activations.calibration_tokens(base, [calibration_sample])
            totals, _ = activations.collect(base, tokens, 128, 2, threads=2)
            im = tmp_path_factory.mktemp(f"assemble-{family}") / "imatrix.gguf"
            write_imatrix(im, activations.to_imatrix(totals, 128, [calibration_sample.name]))
            made[family] = base, im
        return made[family]
    return get


def same_file(src: Path, tmp_path: Path, ftype: str, cache: QuantizedCache | None = None, pruned_from=None, **flags):
    reference, assembled = tmp_path / "llama.gguf", tmp_path / "assembled.gguf"
    quantize_file(src, reference, ftype, threads=2, **flags)
    made = assemble_file(src, assembled, ftype, threads=2, cache=cache or QuantizedCache(1 << 30),
                         pruned_from=pruned_from, **flags)
    assert reference.stat().st_size == assembled.stat().st_size
    assert filecmp.cmp(reference, assembled, shallow=False), f"{ftype} {flags}: the files differ"
    out, before = read_index(assembled), read_index(src)
    changed = sum(out[n].type != e.type for n, e in before.items())
    assert (made.quantized + made.reused, made.copied, made.tensors) == (changed, len(before) - changed, len(before))
    return made


@pytest.mark.parametrize("family", ["phi3", "qwen3moe"])
def test_an_allocated_mix_is_byte_identical_to_llama_model_quantize(family, calibrated, tmp_path):
    base, im = calibrated(family)
    names = [n for n, e in read_index(base).items() if len(e.shape) >= 2 and n != "token_embd.weight"]
    ladder = ["Q6_K", "Q3_K", "Q5_K", "Q4_K", "Q8_0", "Q2_K"]
    overrides = [(exact_pattern(n), ladder[i % len(ladder)]) for i, n in enumerate(names)]
    made = same_file(base, tmp_path, "Q8_0", imatrix_path=im, overrides=overrides, token_embedding_type="Q5_0")
    assert made.reused == 0


@pytest.mark.parametrize("family", ["phi3", "qwen3moe"])
def test_a_pruned_variant_is_byte_identical_to_llama_model_quantize(family, calibrated, tmp_path):
    base, im = calibrated(family)
    pruned, pruned_im = tmp_path / "pruned-f16.gguf", tmp_path / "pruned-imatrix.gguf"
    prune_gguf(base, pruned, [1], swa_layers=None)
    write_imatrix(pruned_im, remap_imatrix(read_imatrix(im), 3, [1]))
    same_file(pruned, tmp_path, "Q4_K_M", imatrix_path=pruned_im)


def test_stock_mixes_and_i_quants_match_and_shared_pairs_are_quantized_once(calibrated, tmp_path):
    base, im = calibrated("phi3")
    cache = QuantizedCache(1 << 30)
    first = same_file(base, tmp_path, "Q4_K_M", cache, imatrix_path=im)
    again = same_file(base, tmp_path, "Q4_K_M", cache, imatrix_path=im)
    assert first.quantized > 0 and again.quantized == 0 and again.reused == first.quantized
    mixed = same_file(base, tmp_path, "Q3_K_M", cache, imatrix_path=im)
    assert mixed.reused > 0 and mixed.quantized > 0  # Q3_K_M keeps some of Q4_K_M's types
    same_file(base, tmp_path, "IQ2_XS", cache, imatrix_path=im)
    same_file(base, tmp_path, "Q8_0", cache)  # no imatrix: other keys, other pairs


def test_what_llama_model_quantize_refuses_is_refused_with_its_message(tmp_path):
    base = tiny_model("phi3")
    with pytest.raises(SqueezeError) as llama:
        quantize_file(base, tmp_path / "a.gguf", "Q2_K_S", threads=2)
    with pytest.raises(SqueezeError) as assembled:
        assemble_file(base, tmp_path / "b.gguf", "Q2_K_S", threads=2)
    assert str(assembled.value) == str(llama.value)
    assert "llama_model_quantize returned" in str(assembled.value)


def test_tensors_are_written_in_the_model_loaders_order():
    names = ["output.weight", "blk.10.attn_q.weight", "blk.2.ffn_up.weight", "token_embd.weight", "blk.2.attn_k.weight"]
    assert sorted(names, key=loader_order) == ["output.weight", "token_embd.weight", "blk.2.attn_k.weight",
                                               "blk.2.ffn_up.weight", "blk.10.attn_q.weight"]


@pytest.mark.slow
def test_gemma3_270m_allocated_with_its_imatrix_is_byte_identical(base_f16, squeeze_imatrix, tmp_path):
    """The real model: a tied embedding lowered, sliding-window layers, a mix over every block."""
    im, _ = squeeze_imatrix
    names = [n for n, e in read_index(base_f16).items() if len(e.shape) >= 2 and n != "token_embd.weight"]
    index = read_index(base_f16)
    # K-quants where the rows take blocks of 256, legacy blocks of 32 where they do not (640 wide)
    ladder = ("Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q4_0", "Q5_1", "Q8_0")
    overrides = [(exact_pattern(n), [t for t in ladder if fits(index[n].shape, t)][i % 3]) for i, n in enumerate(names)]
    same_file(base_f16, tmp_path, "Q4_K_M", imatrix_path=im, overrides=overrides, token_embedding_type="Q5_0")


@pytest.mark.parametrize("family", ["phi3", "qwen3moe"])
def test_a_pruned_variant_finds_the_pairs_quantized_from_its_unpruned_base(family, calibrated, tmp_path):
    """The refinement measures a pruned variant on the unpruned base (layers removed in memory):
    the pruned file is written from those bytes, looked up under the tensors' original names,
    and is still llama_model_quantize's file."""
    base, im = calibrated(family)
    pruned, pruned_im = tmp_path / "pruned-f16.gguf", tmp_path / "pruned-imatrix.gguf"
    prune_gguf(base, pruned, [1], swa_layers=None)
    write_imatrix(pruned_im, remap_imatrix(read_imatrix(im), 3, [1]))
    cache = QuantizedCache(1 << 30)
    assemble_file(base, tmp_path / "unpruned.gguf", "Q4_K_M", imatrix_path=im, cache=cache)
    made = same_file(pruned, tmp_path, "Q4_K_M", cache, imatrix_path=pruned_im,
                     pruned_from=PrunedFrom(base, im, (1,)))
    assert made.quantized == 0 and made.reused > 0
