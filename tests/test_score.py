"""Perplexity and KL divergence against llama-perplexity on the same model files and chunks,
the statistics formulas, speed and drift on the real model, and the bad-input messages."""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest

from pipeline.engine.context import Context
from pipeline.engine.model import Model
from pipeline.errors import SqueezeError
from pipeline.fsutil import read_text
from pipeline.measure import drift, perplexity, speed
from pipeline.sources.datasets import resolve_dataset

CTX, CHUNKS = 256, 6  # 762 scored tokens: enough for the CLI's statistics (it wants >= 100)


def tiny_gguf_with_vocab(dst, width: int = 64):
    """A 1-layer Gemma 3 with random weights and a small made-up sentencepiece vocabulary
    (specials, the 256 byte tokens, letters): a real, loadable model with another vocabulary."""
    import string

    import gguf

    pieces = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + \
        ["\u2581"] + list(string.ascii_letters + string.digits + string.punctuation)
    types = [3, 3, 3, 2] + [6] * 256 + [1] * (len(pieces) - 260)
    n_vocab = len(pieces)
    w = gguf.GGUFWriter(str(dst), "gemma3")
    for key, value in (("context_length", 2048), ("embedding_length", width), ("block_count", 1),
                       ("feed_forward_length", 2 * width), ("attention.head_count", 1),
                       ("attention.head_count_kv", 1), ("attention.key_length", width),
                       ("attention.value_length", width), ("attention.sliding_window", 512)):
        w.add_uint32(f"gemma3.{key}", value)
    w.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32("gemma3.rope.freq_base", 10000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores([0.0] * 260 + [-float(i) for i in range(n_vocab - 260)])
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    rng = np.random.default_rng(0)

    def t(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    w.add_tensor("token_embd.weight", t(n_vocab, width))
    for name, shape in (("attn_norm", (width,)), ("attn_q", (width, width)), ("attn_k", (width, width)),
                        ("attn_v", (width, width)), ("attn_output", (width, width)), ("attn_q_norm", (width,)),
                        ("attn_k_norm", (width,)), ("post_attention_norm", (width,)), ("ffn_norm", (width,)),
                        ("ffn_gate", (2 * width, width)), ("ffn_up", (2 * width, width)),
                        ("ffn_down", (width, 2 * width)), ("post_ffw_norm", (width,))):
        w.add_tensor(f"blk.0.{name}.weight", t(*shape))
    w.add_tensor("output_norm.weight", t(width))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def variant_q3(base_f16, tmp_path_factory):
    from pipeline.stages.quantize import quantize_file

    path = tmp_path_factory.mktemp("score") / "Q3_K_M.gguf"
    quantize_file(base_f16, path, "Q3_K_M")
    return path


@pytest.fixture(scope="module")
def base_dist(base_f16):
    with Model(base_f16) as model:
        chunks = perplexity.make_chunks(model, read_text(resolve_dataset("wikitext-2")), CTX, CHUNKS)
        with Context(model, CTX, perplexity.seqs_per_batch(CTX)) as c:
            return perplexity.base_distribution(model, c, chunks)


@pytest.fixture(scope="module")
def squeeze_summary(variant_q3, base_dist):
    with Model(variant_q3) as model, Context(model, CTX, perplexity.seqs_per_batch(CTX)) as c:
        return perplexity.summarize(base_dist, perplexity.score_against_base(model, c, base_dist))


def _cli_kld(tools, base_f16, variant, tmp_path) -> str:
    kld = tmp_path / "base.kld"
    common = ["-f", str(resolve_dataset("wikitext-2")), "-c", str(CTX), "--chunks", str(CHUNKS)]
    for args in (["-m", str(base_f16), "--kl-divergence-base", str(kld)],
                 ["-m", str(variant), "--kl-divergence-base", str(kld), "--kl-divergence"]):
        out = subprocess.run([str(tools / "llama-perplexity"), *args, *common], capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, out.stderr[-2000:]
    kld.unlink()
    return out.stdout + out.stderr


def _figure(text: str, label: str) -> tuple[float, float | None]:
    m = re.search(re.escape(label) + r"\s*:\s*(-?[\d.]+)%?(?:\s*±\s*(-?[\d.]+))?", text)
    assert m, f"{label!r} not in llama-perplexity's output"
    return float(m.group(1)), (float(m.group(2)) if m.group(2) else None)


@pytest.mark.slow
@pytest.mark.reference
def test_perplexity_and_kld_match_llama_perplexity(llama_tools, base_f16, variant_q3, squeeze_summary, tmp_path):
    out = _cli_kld(llama_tools, base_f16, variant_q3, tmp_path)
    s = squeeze_summary
    assert s["tokens"] == CHUNKS * (CTX - 1 - CTX // 2)

    def close(ours, label, rel):
        theirs, _ = _figure(out, label)
        assert abs(ours / theirs - 1) < rel, (label, ours, theirs)

    close(s["ppl"], "Mean PPL(Q)", 0.01)
    close(s["ppl_base"], "Mean PPL(base)", 0.01)
    close(s["ppl_ratio"], "Mean PPL(Q)/PPL(base)", 0.01)
    close(s["mean_kld"], "Mean    KLD", 0.01)
    close(s["median_kld"], "Median  KLD", 0.02)
    close(s["kld_p99"], "99.0%   KLD", 0.02)
    close(s["rms_dp_pct"], "RMS Δp", 0.01)
    # the ± figures use the CLI's formulas on (nearly) the same values
    assert abs(s["ppl_err"] / _figure(out, "Mean PPL(Q)")[1] - 1) < 0.02
    assert abs(s["mean_kld_err"] / _figure(out, "Mean    KLD")[1] - 1) < 0.02
    assert abs(s["ln_ppl_ratio_err"] / _figure(out, "Mean ln(PPL(Q)/PPL(base))")[1] - 1) < 0.05
    assert abs(s["cor_ln_ppl_pct"] - _figure(out, "Cor(ln(PPL(Q)), ln(PPL(base)))")[0]) < 0.5
    assert abs(s["same_top_pct"] - _figure(out, "Same top p")[0]) < 0.2


def test_statistics_follow_llama_cpp_formulas():
    rng = np.random.default_rng(1)
    n = 400
    base = {"target_logp": -rng.exponential(2.0, n).reshape(4, -1)}
    lq = base["target_logp"] - rng.normal(0.05, 0.1, base["target_logp"].shape)
    var = {"target_logp": lq, "kld": rng.exponential(0.1, lq.shape), "same_top": rng.random(lq.shape) < 0.8}
    s = perplexity.summarize(base, var)
    nll, nllb = -lq.ravel(), -base["target_logp"].ravel()
    assert s["ppl"] == pytest.approx(np.exp(nll.mean()))
    assert s["ppl_err"] == pytest.approx(np.exp(nll.mean()) * nll.std() / np.sqrt(n - 1), rel=1e-9)
    cov = np.cov(nll, nllb, bias=True)[0, 1] / (n - 1)
    assert s["ln_ppl_ratio_err"] == pytest.approx(np.sqrt(nll.var() / (n - 1) + nllb.var() / (n - 1) - 2 * cov))
    assert s["cor_ln_ppl_pct"] == pytest.approx(100 * np.corrcoef(nll, nllb)[0, 1])
    k = np.sort(var["kld"].ravel().astype(np.float32))
    assert s["kld_p99"] == pytest.approx(k[int(0.99 * (n - 1))] * 0.99 + k[int(0.99 * (n - 1)) + 1] * 0.01, rel=1e-3)
    assert s["median_kld"] == pytest.approx(0.5 * (k[199] + k[200]))
    p = var["same_top"].mean()
    assert s["same_top_pct_err"] == pytest.approx(100 * np.sqrt(p * (1 - p) / (n - 1)))


@pytest.mark.slow
def test_base_distribution_is_compact(base_dist, tmp_path):
    path = tmp_path / "base.npz"
    perplexity.save_base(path, base_dist)
    llama = perplexity.llama_cpp_base_bytes(262144, CHUNKS, CTX)
    assert path.stat().st_size < 0.02 * llama
    assert perplexity.load_base(path)["top_ids"].shape == (CHUNKS, CTX - 1 - CTX // 2, perplexity.TOP_K)


@pytest.mark.slow
def test_variant_with_another_vocabulary_is_refused(base_dist, tmp_path):
    tiny = tiny_gguf_with_vocab(tmp_path / "tiny.gguf")
    with Model(tiny) as model, Context(model, CTX, 1) as c:
        with pytest.raises(SqueezeError) as e:
            perplexity.score_against_base(model, c, base_dist)
    assert str(e.value) == (f"{tiny}: vocabulary of 355 tokens differs from the base's 262144; "
                            f"refusing to score against it")


@pytest.mark.slow
def test_same_size_other_tokens_is_refused(source_gguf, base_dist, tmp_path):
    with Model(source_gguf) as model, Context(model, CTX, 1) as c:
        with pytest.raises(SqueezeError) as e:
            perplexity.score_against_base(model, c, dict(base_dist, vocab=np.array("0123456789abcdef")))
    assert str(e.value) == (f"{source_gguf}: vocabulary differs from the base's (same size, other tokens); "
                            f"refusing to score against it")


@pytest.mark.slow
def test_text_shorter_than_two_chunks_is_refused(source_gguf):
    with Model(source_gguf) as model:
        with pytest.raises(SqueezeError) as e:
            perplexity.make_chunks(model, "Only a few words here.", 512, 4, what="short.txt")
    assert str(e.value) == "short.txt: 7 tokens is fewer than the 1024 needed (2 x ctx 512, as llama-perplexity requires)"


def test_missing_base_distribution_is_named(tmp_path):
    with pytest.raises(SqueezeError) as e:
        perplexity.load_base(tmp_path / "scores" / "base-topk.npz")
    assert str(e.value) == (f"{tmp_path / 'scores' / 'base-topk.npz'}: base distribution not found; score the "
                            f"base first (the `score base` step of `squeeze run`)")


def test_missing_base_model_is_named(tmp_path):
    with pytest.raises(SqueezeError) as e:
        Model(tmp_path / "base-f16.gguf")
    assert str(e.value) == f"{tmp_path / 'base-f16.gguf'}: model file not found"


@pytest.mark.slow
def test_speed_reports_every_test_with_threads(source_gguf):
    with Model(source_gguf) as model:
        r = speed.measure(model, pp=32, tg=4, repetitions=2, threads=2)
    assert r["threads"] == 2 and list(r["tests"]) == ["pp32", "tg4", "pp32+tg4"]
    for t in r["tests"].values():
        assert len(t["samples"]) == 2 and t["mean"] > 0 and t["sd"] >= 0


@pytest.mark.slow
def test_drift_finds_no_divergence_against_itself_and_names_the_first_one(source_gguf):
    prompts = {"factual": drift.PROMPTS["factual"]}
    with Model(source_gguf) as model:
        a = drift.continuations(model, 6, prompts=prompts)
        (row,) = drift.compare(model, a, a)
        assert row["first_divergence"] is None and row["base"] == row["variant"]
        changed = {"factual": dict(a["factual"], tokens=a["factual"]["tokens"][:2] + [107, 107, 107, 107])}
        (row,) = drift.compare(model, a, changed)
    assert row["first_divergence"] == (2 if a["factual"]["tokens"][2] != 107 else 3)
    assert drift.first_divergence([1, 2, 3], [1, 2]) == 2
