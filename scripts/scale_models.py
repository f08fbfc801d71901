"""Random-weight Hugging Face checkpoints at the sizes squeeze's users work at, for the scaling
benchmark (scripts/bench_scale.py), not for the test suite. Their costs (bytes, FLOPs, memory,
seconds) are real; their quality numbers (PPL, KLD) mean nothing.

  gemma3-1b   Gemma 3 1B's shapes: 26 layers, hidden 1152, intermediate 6912, 4 heads with one
              KV head of 256, the 262,144-token vocabulary, five sliding-window layers (window
              512) to one global; 1.0e9 parameters. Gemma 3 270M's real tokenizer.
  llama-thin  another shape, many thin layers: llama, 32 layers, hidden 512, intermediate 1536,
              8 heads with 4 KV heads, GPT-2's 50,257-token BPE vocabulary, tied embedding;
              1.3e8 parameters. Widths are multiples of 256 so every K-quant applies.
  llama-wide  a shape no constant of the estimate was fitted on: llama, 24 layers, hidden 2048,
              intermediate 5632, 16 heads with 8 KV heads, GPT-2's vocabulary, untied output;
              1.3e9 parameters.

Weights are drawn by transformers' own initializer (normal, the config's initializer_range) with
a fixed seed and saved in bfloat16, as the published checkpoints are. Each folder is cached in
squeeze's cache (`test-models/<name>-hf/`), keyed (pipeline.cache) by this file, the tokenizer's
source, the config and the versions of what writes the bytes.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from pipeline.cache import MadeFrom, cached, package_versions
from pipeline.fsutil import build_folder, cache_dir
from tests.real_checkpoint import example_hf_folder
from tests.tiny_models import vocab_source, write_bpe_tokenizer

SEED = 0
DTYPE = "bfloat16"
GEMMA_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

# Gemma 3 1B's published config fields that set its shape (the rest come from the 270M's config).
GEMMA3_1B = dict(num_hidden_layers=26, hidden_size=1152, intermediate_size=6912, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                 max_position_embeddings=32768)
LLAMA_THIN = dict(model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=32, hidden_size=512,
                  intermediate_size=1536, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                  max_position_embeddings=8192, initializer_range=0.02, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=True)
# A shape the estimate was not tuned on (issue 28): wider and deeper than llama-thin, a vocabulary of
# GPT-2's size; 24 layers of 2048 give about 1.3e9 parameters.
LLAMA_WIDE = dict(LLAMA_THIN, num_hidden_layers=24, hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
MODELS = ("gemma3-1b", "llama-thin", "llama-wide")


def _gemma_config(tokenizer_from: Path) -> dict:
    config = json.loads((tokenizer_from / "config.json").read_text())
    config.update(GEMMA3_1B)
    window_pattern = config["_sliding_window_pattern"]  # every 6th layer is global
    config["layer_types"] = ["full_attention" if (i + 1) % window_pattern == 0 else "sliding_attention"
                             for i in range(GEMMA3_1B["num_hidden_layers"])]
    config.pop("_model_name_or_path", None)
    return config


def _save_random(config_fields: dict, folder: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(config_fields)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, DTYPE))
    model.save_pretrained(str(folder))


def build(name: str, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if name == "gemma3-1b":
        real = example_hf_folder()
        for f in GEMMA_TOKENIZER_FILES:
            shutil.copy2(real / f, folder / f)
        _save_random(_gemma_config(real), folder)
    else:
        n_vocab = write_bpe_tokenizer(folder, vocab_source())
        eos = n_vocab - 1  # GPT-2's <|endoftext|>
        fields = LLAMA_WIDE if name == "llama-wide" else LLAMA_THIN
        _save_random(dict(fields, vocab_size=n_vocab, bos_token_id=eos, eos_token_id=eos), folder)


def scale_model(name: str) -> Path:
    """The cached HF folder of `name` (one of MODELS), built when its record is stale."""
    if name not in MODELS:
        raise ValueError(f"unknown scale model '{name}'; one of {', '.join(MODELS)}")
    target = cache_dir("test-models") / f"{name}-hf"
    tokenizer = example_hf_folder() / "tokenizer.model" if name == "gemma3-1b" else vocab_source()
    made_from = MadeFrom({"builder": Path(__file__), "tokenizer": tokenizer},
                         package_versions("transformers", "torch", "tokenizers", "safetensors"),
                         {"shape": GEMMA3_1B if name == "gemma3-1b" else LLAMA_THIN, "seed": SEED, "dtype": DTYPE})

    cached(target, made_from, lambda: build_folder(target, lambda work: build(name, work)), lambda why: print(f"scale model: building {name} ({why})", file=sys.stderr))
    return target


if __name__ == "__main__":
    for n in sys.argv[1:] or MODELS:
        print(scale_model(n))
