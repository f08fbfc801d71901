"""A tiny random Gemma 3 (Gemma3ForCausalLM) Hugging Face checkpoint, built from nothing:
config.json, model.safetensors (numpy, no torch) and a sentencepiece tokenizer trained on a
little text. Widths are multiples of 256 so llama.cpp's K-quants apply to every weight.

Also used by scripts/bench_convert.py with 270M-class sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPECIAL = {"pad": 0, "eos": 1, "bos": 2, "unk": 3}  # Gemma's ids


def calibration_text(limit: int = 300_000) -> str:
    """A little real English (the imatrix calibration set) to train the tokenizer on."""
    from pipeline.fsutil import read_text
    from pipeline.sources.datasets import resolve_dataset

    return read_text(resolve_dataset("groups_merged", Path.cwd(), "tiny_gemma: "))[:limit]


def train_tokenizer(folder: Path, text: str, vocab_size: int) -> int:
    """Train a byte-fallback BPE sentencepiece model (as Gemma's) into folder/tokenizer.model."""
    import sentencepiece as spm

    lines = [ln for ln in text.splitlines() if ln.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, num_threads=1,
        pad_id=SPECIAL["pad"], eos_id=SPECIAL["eos"], bos_id=SPECIAL["bos"], unk_id=SPECIAL["unk"],
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        add_dummy_prefix=False, normalization_rule_name="identity", minloglevel=2)
    (folder / "tokenizer.vocab").unlink(missing_ok=True)
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).vocab_size()


def gemma3_config(n_vocab: int, hidden: int, intermediate: int, n_layers: int, n_heads: int,
                  n_kv_heads: int, head_dim: int, sliding_window: int = 128) -> dict:
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": n_vocab, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": n_layers, "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim, "query_pre_attn_scalar": head_dim, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0, "rope_scaling": None, "sliding_window": sliding_window,
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)],
        "attention_bias": False, "attention_dropout": 0.0, "attn_logit_softcapping": None,
        "final_logit_softcapping": None, "tie_word_embeddings": True, "use_cache": True,
        "pad_token_id": SPECIAL["pad"], "eos_token_id": SPECIAL["eos"], "bos_token_id": SPECIAL["bos"],
        "torch_dtype": "float32",
    }


def gemma3_weights(config: dict, seed: int = 0, dtype=np.float16):
    """(name, array) pairs with the checkpoint's tensor names and shapes ([out, in] like torch)."""
    rng = np.random.default_rng(seed)
    h, ff, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    nq, nkv = config["num_attention_heads"], config["num_key_value_heads"]

    def dense(rows, cols):
        return (rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)).astype(dtype)

    def norm(n):  # Gemma stores w with y = x * (1 + w): small values around 0
        return (0.1 * rng.standard_normal(n, dtype=np.float32)).astype(dtype)

    yield "model.embed_tokens.weight", dense(config["vocab_size"], h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", norm(h)
        yield p + "self_attn.q_proj.weight", dense(nq * hd, h)
        yield p + "self_attn.k_proj.weight", dense(nkv * hd, h)
        yield p + "self_attn.v_proj.weight", dense(nkv * hd, h)
        yield p + "self_attn.o_proj.weight", dense(h, nq * hd)
        yield p + "self_attn.q_norm.weight", norm(hd)
        yield p + "self_attn.k_norm.weight", norm(hd)
        yield p + "post_attention_layernorm.weight", norm(h)
        yield p + "pre_feedforward_layernorm.weight", norm(h)
        yield p + "mlp.gate_proj.weight", dense(ff, h)
        yield p + "mlp.up_proj.weight", dense(ff, h)
        yield p + "mlp.down_proj.weight", dense(h, ff)
        yield p + "post_feedforward_layernorm.weight", norm(h)
    yield "model.norm.weight", norm(h)


def write_tokenizer_config(folder: Path) -> None:
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "tokenizer_class": "GemmaTokenizer"}, indent=1))


def build_tiny_gemma3(folder: Path, text: str, *, vocab_size: int = 1024, hidden: int = 256,
                      intermediate: int = 512, n_layers: int = 6, n_heads: int = 2, n_kv_heads: int = 1,
                      head_dim: int = 128, seed: int = 0, config_vocab: int | None = None) -> Path:
    """Write a complete checkpoint folder. `config_vocab` pads the model's vocabulary past the
    tokenizer's (as Gemma's 262144 rows do), for realistic embedding sizes."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_vocab = train_tokenizer(folder, text, vocab_size)
    write_tokenizer_config(folder)
    config = gemma3_config(config_vocab or n_vocab, hidden, intermediate, n_layers, n_heads, n_kv_heads, head_dim)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    save_file(dict(gemma3_weights(config, seed)), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
