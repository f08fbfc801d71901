"""Converting a checkpoint with real weights (issue 19): Gemma 3 270M rebuilt as a Hugging Face
folder from its Q4_K_M GGUF (tests/real_checkpoint.py: bfloat16 weights, Google's tokenizer
files), converted to F16 by squeeze's convert stage, against the F16 base squeeze dequantized
from the same GGUF. Both hold the same dequantized values, the folder's rounded to bfloat16."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.engine.context import Context
from pipeline.engine.model import Model
from pipeline.formats.gguf_index import TensorEntry, read_index, read_metadata, tensor_values
from pipeline.fsutil import read_text
from pipeline.measure import perplexity
from pipeline.run.runner import Runner
from pipeline.sources.datasets import resolve_dataset
from pipeline.sources.hf_convert import sentencepiece_warning
from pipeline.stages import convert
from pipeline.stages.registry import open_run
from tests.real_checkpoint import example_hf_folder

pytestmark = pytest.mark.slow

CTX, CHUNKS = 256, 4
# The checkpoint rounds each value to bfloat16 (8 significant bits: at most 2^-8 of it off), the
# dequantized base rounded it to F16 (at most 2^-11); below F16's normal range (2^-14) the
# base's steps are 2^-24 apart.
RTOL = 2.0 ** -8 + 2.0 ** -11
ATOL = 2.0 ** -24


@pytest.fixture(scope="module")
def converted_base(base_f16, tmp_path_factory) -> Path:
    """squeeze's convert step alone on a recipe whose model is the folder (a recipe needs a variant)."""
    folder = example_hf_folder()
    work = tmp_path_factory.mktemp("real-weights")
    recipe = work / "recipe.yaml"
    recipe.write_text(f"model:\n  source: {folder}\n  base_type: F16\nvariants:\n  Q4_K_M: Q4_K_M\n")
    ctx = open_run(recipe, results=work / "results")
    assert Runner(ctx.folder).run(convert.steps(ctx)) == {"ran": 1, "skipped": 0}
    return ctx.base_path


def row_blocks(path_a: Path, a: TensorEntry, path_b: Path, b: TensorEntry, values: int = 1 << 22):
    """The two tensors as float64, a block of rows at a time (the embedding table is 168M values)."""
    n_rows = int(np.prod(a.shape[1:]))
    step = max(1, values // a.shape[0])
    for start in range(0, n_rows, step):
        rows = np.arange(start, min(n_rows, start + step))
        yield (tensor_values(path_a, a, rows).astype(np.float64), tensor_values(path_b, b, rows).astype(np.float64))


def test_every_tensor_is_the_dequantized_one_within_bf16_rounding(converted_base, base_f16):
    ours, dequantized = read_index(converted_base), read_index(base_f16)
    assert {e.name: (e.shape, e.type.name) for e in ours.values()} == \
        {e.name: (e.shape, e.type.name) for e in dequantized.values()}
    # Measured (transformers 5.24, torch 2.13): at most 1/257 = 2^-8 / (1 + 2^-8) of a value,
    # bfloat16's worst case, in every F16 matrix (relative RMS error 0.14-0.17 %); the F32 norms
    # exactly (Gemma's 1 + w values are bfloat16 numbers). A float32 checkpoint converts to
    # the dequantized base bit for bit.
    rounded = False
    for name, entry in dequantized.items():
        for x, y in row_blocks(base_f16, entry, converted_base, ours[name]):
            err = np.abs(y - x)
            over = err > RTOL * np.abs(x) + ATOL
            assert not over.any(), (f"{name}: {int(over.sum())} values off by more than bfloat16 rounding, "
                                    f"e.g. {x[over][0]:.8g} -> {y[over][0]:.8g}")
            rounded = rounded or bool(err.any())
    assert rounded  # the bfloat16 rounding is there: the folder was not float32


def test_vocabulary_is_the_ggufs(converted_base, base_f16):
    """tokenizer.model took the converter down Gemma's sentencepiece path: same tokens, scores,
    types and special ids, byte for byte."""
    ours = {kv.key: kv.raw for kv in read_metadata(converted_base)[0]}
    theirs = {kv.key: kv.raw for kv in read_metadata(base_f16)[0] if kv.key.startswith("tokenizer.")}
    assert set(theirs) - set(ours) == set()
    assert [key for key in theirs if ours[key] != theirs[key]] == []


def test_perplexity_within_a_tenth_of_a_percent(converted_base, base_f16):
    text = read_text(resolve_dataset("wikitext-2"))[:20000]  # over 4,000 tokens
    with Model(base_f16) as model:
        chunks = perplexity.make_chunks(model, text, CTX, CHUNKS)
        with Context(model, CTX, perplexity.seqs_per_batch(CTX)) as c:
            base = perplexity.base_distribution(model, c, chunks)
    with Model(converted_base) as model:
        assert (perplexity.make_chunks(model, text, CTX, CHUNKS).tokens == chunks.tokens).all()
        with Context(model, CTX, perplexity.seqs_per_batch(CTX)) as c:
            summary = perplexity.summarize(base, perplexity.score_against_base(model, c, base))
    # Against the base's exact PPL: "ppl_base" is from its 16-bit log-probs, as llama-perplexity's.
    # Measured on these 508 tokens: 21.5063 against 21.5131 (-0.03 %), mean KLD 7e-5, the same
    # top token at 99.4 % of them.
    assert abs(summary["ppl"] / summary["ppl_base_exact"] - 1) < 1e-3, summary


def test_a_sentencepiece_export_without_its_model_file_is_warned_about(tmp_path):
    """The folder above needed Google's tokenizer.model: without it the converter writes the
    vocabulary as byte-level BPE (tokenizer.ggml.model gpt2), which splits runs of spaces
    differently. squeeze says so before converting; a byte-level BPE folder gets no warning."""
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "tokenizer.json").write_bytes((example_hf_folder() / "tokenizer.json").read_bytes())
    assert "no tokenizer.model" in sentencepiece_warning(exported)
    assert sentencepiece_warning(example_hf_folder()) is None  # with its tokenizer.model
    byte_level = tmp_path / "byte-level"
    byte_level.mkdir()
    (byte_level / "tokenizer.json").write_text('{"model": {"type": "BPE", "byte_fallback": false}}')
    assert sentencepiece_warning(byte_level) is None
