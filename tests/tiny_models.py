"""Tiny random checkpoints of real architectures for the tests, built from a Hugging Face config
with transformers and converted to F16 GGUF by squeeze's own convert stage, cached in squeeze's
cache (`test-models/tiny-<family>-f16.gguf`) keyed like the other test models (pipeline.cache):
by this file, the tokenizer's source and the versions of everything that writes the bytes.

Families (what each layout adds to the tests):
  qwen3moe  experts (ffn_{gate,up,down}_exps, 3-D) behind a router (ffn_gate_inp), no shared expert
  qwen2moe  the same plus a shared expert (ffn_*_shexp) and its one-row gate (ffn_gate_inp_shexp)
  phi3      dense with fused tensors: attn_qkv and an ffn_up twice the ffn_down's width

All use GPT-2's real byte-level BPE tokenizer, rebuilt as a tokenizer.json from the vocabulary
file llama.cpp ships for its tokenizer tests (models/ggml-vocab-gpt-2.gguf in the converter's
checkout): the converter recognises it by its pre-tokenizer hash, and nothing is downloaded.
Widths are 256 so llama.cpp's K-quants (blocks of 256) apply to every block weight.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import gguf

from pipeline import __version__
from pipeline.cache import MadeFrom, cached, package_versions
from pipeline.build.toolchain import converter_root
from pipeline.fsutil import cache_dir
from pipeline.sources.hf_convert import run_converter

VOCAB_FILE = Path("models") / "ggml-vocab-gpt-2.gguf"  # relative to the converter's llama.cpp root
SEED = 0

_COMMON = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
               max_position_embeddings=2048, initializer_range=0.05, rms_norm_eps=1e-6)
_MOE = dict(moe_intermediate_size=256, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
            intermediate_size=512, decoder_sparse_step=1, mlp_only_layers=[])

# Config fields per family (transformers' config class and HF `architectures` name first).
FAMILIES: dict[str, dict] = {
    "qwen3moe": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], head_dim=64,
                     tie_word_embeddings=True, **_COMMON, **_MOE),
    "qwen2moe": dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"],
                     shared_expert_intermediate_size=256, tie_word_embeddings=False, **_COMMON, **_MOE),
    "phi3": dict(model_type="phi3", architectures=["Phi3ForCausalLM"], intermediate_size=512,
                 tie_word_embeddings=False, pad_token_id=0, **_COMMON),
}

# Models for one test each (not in FAMILIES, which tests/test_moe.py runs every test on).
OTHER_MODELS: dict[str, dict] = {
    # expert rows of 160 (no K-quant's 256 fits ffn_down_exps) and an untied output layer: what a
    # size budget's smallest-file check has to count as llama.cpp writes it
    "qwen3moe-narrow": dict(FAMILIES["qwen3moe"], tie_word_embeddings=False, num_hidden_layers=4, num_experts=12,
                            moe_intermediate_size=160),
}

def vocab_source() -> Path:
    """llama.cpp's GPT-2 vocabulary file, beside the converter squeeze runs."""
    return converter_root(echo=lambda *_: None) / VOCAB_FILE


def _strings(reader: gguf.GGUFReader, key: str) -> list[str]:
    f = reader.get_field(key)
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def write_bpe_tokenizer(folder: Path, vocab_gguf: Path) -> int:
    """tokenizer.json + tokenizer_config.json rebuilt from a llama.cpp vocabulary GGUF of a
    byte-level BPE tokenizer (tokens, merges, control tokens); returns the vocabulary size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    reader = gguf.GGUFReader(str(vocab_gguf))
    tokens = _strings(reader, gguf.Keys.Tokenizer.LIST)
    merges = [tuple(m.split(" ", 1)) for m in _strings(reader, gguf.Keys.Tokenizer.MERGES)]
    types = reader.get_field(gguf.Keys.Tokenizer.TOKEN_TYPE)
    control = [tokens[i] for i, part in enumerate(types.data)
               if int(types.parts[part][0]) == gguf.TokenType.CONTROL]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in control])
    tok.save(str(folder / "tokenizer.json"))
    eos = control[0]
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": eos, "eos_token": eos, "unk_token": eos,
        "add_bos_token": False, "add_prefix_space": False}, indent=1))
    return len(tokens)


def family_config(family: str, n_vocab: int) -> dict:
    eos = n_vocab - 1  # GPT-2's <|endoftext|>
    return dict({**FAMILIES, **OTHER_MODELS}[family], vocab_size=n_vocab, bos_token_id=eos, eos_token_id=eos)


def build_hf_folder(folder: Path, family: str, vocab_gguf: Path) -> Path:
    """A complete HF checkpoint: config, random float32 weights saved by transformers, tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_vocab = write_bpe_tokenizer(folder, vocab_gguf)
    fields = family_config(family, n_vocab)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(folder))
    return folder


def builder_versions() -> dict[str, str]:
    """What the converted bytes depend on besides this file and the vocabulary."""
    return {**package_versions("transformers", "torch", "tokenizers", "gguf", "llama-cpp-python"),
            "squeeze": __version__}


def tiny_model(family: str) -> Path:
    """The family's tiny F16 GGUF, built and converted unless its cached record still holds."""
    if family not in FAMILIES and family not in OTHER_MODELS:
        raise ValueError(f"unknown tiny model family '{family}'; one of {', '.join([*FAMILIES, *OTHER_MODELS])}")
    vocab = vocab_source()
    target = cache_dir("test-models") / f"tiny-{family}-f16.gguf"
    made_from = MadeFrom({"builder": Path(__file__), "vocab": vocab}, builder_versions(),
                         {"family": family, "seed": SEED})

    def build() -> None:
        work = Path(tempfile.mkdtemp(prefix=f"tiny-{family}-", dir=target.parent))
        try:
            hf = build_hf_folder(work / "hf", family, vocab)
            run_converter(hf, target, "F16", work / "convert.log", echo=lambda *_: None)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    cached(target, made_from, build,
           lambda why: print(f"test model: building tiny {family} -> {target.name} ({why})", file=sys.stderr))
    return target


def tiny_hf_folder(family: str, folder: Path) -> Path:
    """The family's HF checkpoint folder (not cached: for tests of the convert stage itself)."""
    return build_hf_folder(folder, family, vocab_source())
