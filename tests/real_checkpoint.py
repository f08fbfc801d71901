"""Gemma 3 270M as a Hugging Face checkpoint with real weights, rebuilt from its Q4_K_M GGUF: the
folder a convert of real weights is tested on (tests/test_real_weights.py).

transformers reads the GGUF into Gemma3ForCausalLM, dequantizing every tensor to float32 (it
needs accelerate for that). That model is marked quantized and refuses save_pretrained, so its
state dict goes into a fresh model built from the same config, saved in bfloat16 as Google
publishes the checkpoint. The tokenizer is written as Google's folder has it: transformers saves
only tokenizer.json, and without a tokenizer.model llama.cpp's converter falls back to a
byte-level BPE vocabulary (tokenizer.ggml.model "gpt2") that splits long runs of spaces
differently, so tokenizer.model is rebuilt from the GGUF's own vocabulary.

Cached in squeeze's cache (`test-models/gemma3-270m-hf/`) keyed like the other test models
(pipeline.cache): by the GGUF, this file and the versions of what writes the bytes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf

from pipeline.cache import MadeFrom, cached, package_versions
from pipeline.fsutil import build_folder, cache_dir
from tests.example_model import example_source_gguf

DTYPE = "bfloat16"  # the published checkpoint's dtype


def build_hf_folder(source: Path, folder: Path) -> Path:
    """config.json, model.safetensors (bfloat16), tokenizer.json, tokenizer.model and
    tokenizer_config.json from a Gemma 3 GGUF."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, name = str(source.parent), source.name
    config = AutoConfig.from_pretrained(where, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, DTYPE))
    model.load_state_dict(loaded.state_dict())  # float32 -> bfloat16, rounded to nearest even
    del loaded
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(where, gguf_file=name).save_pretrained(str(folder))
    write_sentencepiece(source, folder)
    return folder


def write_sentencepiece(source: Path, folder: Path) -> None:
    """tokenizer.model from the GGUF's vocabulary (Gemma's is a byte-fallback BPE sentencepiece
    model), and in tokenizer_config.json the added tokens the converter reads their types from."""
    from sentencepiece import sentencepiece_model_pb2 as sp

    reader = gguf.GGUFReader(str(source))
    tokens = reader.get_field(gguf.Keys.Tokenizer.LIST).contents()
    scores = reader.get_field(gguf.Keys.Tokenizer.SCORES).contents()
    types = reader.get_field(gguf.Keys.Tokenizer.TOKEN_TYPE).contents()

    def special_id(key: str) -> int:
        return int(reader.get_field(key).contents())

    unk = special_id(gguf.Keys.Tokenizer.UNK_ID)
    proto = sp.ModelProto()
    trainer = proto.trainer_spec
    trainer.model_type = sp.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = True
    trainer.unk_id, trainer.bos_id = unk, special_id(gguf.Keys.Tokenizer.BOS_ID)
    trainer.eos_id, trainer.pad_id = special_id(gguf.Keys.Tokenizer.EOS_ID), special_id(gguf.Keys.Tokenizer.PAD_ID)
    norm = proto.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces = \
        "identity", False, False, True
    added = {}
    for i, (text, score, kind) in enumerate(zip(tokens, scores, types)):
        piece = proto.pieces.add()
        if kind == gguf.TokenType.USER_DEFINED:
            # The converter wrote these runs of spaces with sentencepiece's "▁" turned back to " ".
            text = text.replace(" ", "\u2581")
        piece.piece, piece.score = text, score
        # sentencepiece has exactly one unknown piece; the converter's added-token pass marks
        # Gemma's <unk> a control token, as the GGUF has it.
        piece.type = sp.ModelProto.SentencePiece.UNKNOWN if i == unk else kind
        if kind in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED):
            added[str(i)] = {"content": text, "special": kind == gguf.TokenType.CONTROL}
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = added
    for key in (gguf.Keys.Tokenizer.ADD_BOS, gguf.Keys.Tokenizer.ADD_EOS):
        config[key.rsplit(".", 1)[1]] = bool(reader.get_field(key).contents())  # "add_bos_token"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def builder_versions() -> dict[str, str]:
    return package_versions("transformers", "torch", "accelerate", "tokenizers", "sentencepiece", "gguf")


def example_hf_folder() -> Path:
    """The cached folder, rebuilt (into a temporary folder, then renamed) when its record is stale."""
    source = example_source_gguf()
    target = cache_dir("test-models") / "gemma3-270m-hf"
    made_from = MadeFrom({"model": source, "builder": Path(__file__)}, builder_versions(), {"dtype": DTYPE})

    cached(target, made_from, lambda: build_folder(target, lambda work: build_hf_folder(source, work)),
           lambda why: print(f"test model: rebuilding {target.name} from {source.name} ({why})", file=sys.stderr))
    return target
