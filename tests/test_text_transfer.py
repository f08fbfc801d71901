"""Carrying a KLD from calibration text to other text by per-class factors: the arithmetic, the
reference changes on the real model, and a real mix carried from groups_merged to wikitext-2
(Gemma 3 270M, dithered base: no grid artifact to make a 4-bit block type nearly free)."""

from __future__ import annotations

import pytest

from pipeline.choose.groups import group_of
from pipeline.choose.memory_probe import MemoryProbe
from pipeline.choose.text_transfer import (BLOCKS, EMBEDDING, TextTransfer, class_shares, measure_transfer,
                                           reference_mixes)
from pipeline.formats.ggml_types import fits
from pipeline.formats.model_info import read_model_info
from pipeline.fsutil import read_text
from pipeline.sources.datasets import resolve_dataset

CTX, CHUNKS = 256, 2


def test_shares_split_a_mix_between_the_embedding_and_the_blocks():
    shares = class_shares({"token_embd": 0.3, "0.attn": 0.1, "1.mlp": 0.6, "2.mlp": -0.01})
    assert shares == pytest.approx({EMBEDDING: 0.3, BLOCKS: 0.7})
    assert class_shares({}) == {BLOCKS: 1.0}  # nothing predicted: the blocks' factor
    transfer = TextTransfer("other", {EMBEDDING: 0.5, BLOCKS: 0.7}, {})
    assert transfer.carry(0.2, {"token_embd": 0.3, "0.attn": 0.7}) == pytest.approx(0.2 * (0.3 * 0.5 + 0.7 * 0.7))
    # a class the model had no reference for is carried at the blocks' factor
    assert TextTransfer("other", {BLOCKS: 0.7}, {}).carry(1.0, {"token_embd": 1.0}) == pytest.approx(0.7)


def test_the_reference_changes_cover_every_chosen_tensor_at_a_type_its_rows_fit(base_dithered):
    info = read_model_info(base_dithered)
    mixes = reference_mixes(info)
    assert set(mixes) == {EMBEDDING, BLOCKS}
    assert mixes[EMBEDDING] == {"token_embd.weight": "Q4_0"}  # 640 columns: not a multiple of Q4_K's 256
    chosen = {t.name for t in info.quantizable() if group_of(t.name) is not None}
    assert set(mixes[EMBEDDING]) | set(mixes[BLOCKS]) == chosen
    assert set(mixes[BLOCKS].values()) <= {"Q4_K", "Q4_0"}


@pytest.fixture(scope="module")
def probes(base_dithered):
    calibration = MemoryProbe(base_dithered, read_text(resolve_dataset("groups_merged"))[:30000], CTX, CHUNKS)
    wiki = read_text(resolve_dataset("wikitext-2"))[:60000]
    other = MemoryProbe(base_dithered, wiki, CTX, CHUNKS)
    # the factors come from other chunks of the same text than those the predictions are judged on
    held_out = MemoryProbe(base_dithered, wiki, CTX, CHUNKS, skip_chunks=CHUNKS)
    assert not (held_out.base["tokens"] == other.base["tokens"]).all()
    with calibration, other, held_out:
        yield calibration, other, held_out


def test_a_mix_is_carried_to_other_text_by_its_classes(base_dithered, probes):
    calibration, other, held_out = probes
    info = read_model_info(base_dithered)
    transfer = measure_transfer(info, calibration, held_out, "wikitext-2, held out", held_out=True)
    for cls, ref in transfer.references.items():
        assert ref["calibration_kld"] > 0 and ref["other_kld"] > 0
        assert transfer.factors[cls] == pytest.approx(ref["other_kld"] / ref["calibration_kld"])
    # groups_merged is harder on the embedding than wikitext-2 is: its ratio is the lower one
    assert transfer.factors[EMBEDDING] < transfer.factors[BLOCKS] < 1.0

    # a mix that lowers both, most of its KLD from the embedding: the embedding at 4 bits, the
    # MLPs of every third layer at Q4_K (measured: carried -3 %, the blocks' ratio alone +20 %)
    embedding = {"token_embd.weight": "IQ4_NL"}
    blocks = {t.name: "Q4_K" if fits(t.shape, "Q4_K") else "Q4_0" for t in info.quantizable()
              if (group_of(t.name) or "").endswith(".mlp") and int(group_of(t.name).split(".")[0]) % 3 == 0}
    split = {"token_embd": calibration.kld(embedding), "blocks": calibration.kld(blocks)}
    mix = {**embedding, **blocks}
    carried = transfer.carry(calibration.kld(mix), split)
    measured = other.kld(mix)
    single_ratio = transfer.factors[BLOCKS] * calibration.kld(mix)
    assert carried == pytest.approx(measured, rel=0.15)
    assert abs(carried - measured) < abs(single_ratio - measured)
