"""Perplexity and KL divergence against llama-perplexity on the same model files and chunks,
the statistics formulas, speed and drift on the real model, and the bad-input messages."""

from __future__ import annotations

import math
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
    from pipeline.engine.quantize import quantize_file

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


@pytest.fixture(scope="module")
def exact_summary(base_f16, variant_q3):
    """squeeze's summary with a sketch that keeps every base token llama.cpp's KLD sums over
    (log p > -16: at most 62,060 of them per token on these chunks), so no tail is sampled: its
    per-token KLD is the exact sum, and only the CLI's 16-bit base log-probs separate the two."""
    with Model(base_f16) as model:
        chunks = perplexity.make_chunks(model, read_text(resolve_dataset("wikitext-2")), CTX, CHUNKS)
        with Context(model, CTX, perplexity.seqs_per_batch(CTX)) as c:
            base = perplexity.base_distribution(model, c, chunks, k=EXACT_K)
    assert base["tail_mass"].max() == 0.0
    with Model(variant_q3) as model, Context(model, CTX, perplexity.seqs_per_batch(CTX)) as c:
        var = perplexity.score_against_base(model, c, base)
    return base, var


@pytest.fixture(scope="module")
def cli_kld(llama_tools, base_f16, variant_q3, tmp_path_factory) -> str:
    """llama-perplexity --kl-divergence on the same files, text, ctx and chunks (stdout + stderr)."""
    kld = tmp_path_factory.mktemp("cli-kld") / "base.kld"
    common = ["-f", str(resolve_dataset("wikitext-2")), "-c", str(CTX), "--chunks", str(CHUNKS)]
    for args in (["-m", str(base_f16), "--kl-divergence-base", str(kld)],
                 ["-m", str(variant_q3), "--kl-divergence-base", str(kld), "--kl-divergence"]):
        out = subprocess.run([str(llama_tools / "llama-perplexity"), *args, *common], capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, out.stderr[-2000:]
    kld.unlink()
    return out.stdout + out.stderr


EXACT_K = 65536  # > the 62,060 base tokens above llama.cpp's -16 cutoff at any scored position here

# The statistics block of llama-perplexity --kl-divergence: label -> squeeze's key ("99.0%   KLD"
# and the other percentile lines are keyed by their number).
_LABELS = {"Mean PPL(Q)": "ppl", "Mean PPL(base)": "ppl_base", "Cor(ln(PPL(Q)), ln(PPL(base)))": "cor_ln_ppl_pct",
           "Mean ln(PPL(Q)/PPL(base))": "ln_ppl_ratio", "Mean PPL(Q)/PPL(base)": "ppl_ratio",
           "Mean PPL(Q)-PPL(base)": "ppl_diff", "Mean    KLD": "mean_kld", "Maximum KLD": "max_kld",
           "Median  KLD": "median_kld", "Minimum KLD": "min_kld", "Mean    Δp": "mean_dp_pct",
           "Maximum Δp": "max_dp_pct", "Median  Δp": "median_dp_pct", "Minimum Δp": "min_dp_pct",
           "RMS Δp": "rms_dp_pct", "Same top p": "same_top_pct"}
_LINE = re.compile(r"^(?P<label>[^:\n]+?)\s*:\s*(?P<v>-?\d+\.\d+)\s*%?(?:\s*±\s*(?P<e>\d+\.\d+))?\s*%?\s*$", re.M)
_NUM = r"\s*(-?\d+\.\d+)\s*±\s*(\d+\.\d+)\s*%?"
_CHUNK = re.compile(r"^\s*(\d+)" + _NUM * 5 + r"\s*$", re.M)
_CHUNK_KEYS = ("ppl", "ln_ppl_ratio", "mean_kld", "rms_dp_pct", "same_top_pct")


def _half_unit(text: str) -> float:
    """Half a unit of the last printed digit: how far the printed number may be from the value."""
    return 0.5 * 10.0 ** -len(text.split(".")[1])


def parse_kld_statistics(text: str) -> dict[str, tuple[float, float]]:
    """Every figure of the final statistics: key -> (value, half a unit of its last digit)."""
    out = {}
    for m in _LINE.finditer(text[text.index("====== Perplexity statistics ======"):]):
        label = m["label"].strip()
        pct = re.fullmatch(r"([\d.]+)%\s+(KLD|Δp)", label)
        if pct:
            key = f"{'kld' if pct[2] == 'KLD' else 'dp'}_p{perplexity._pct_key(float(pct[1]) / 100)}"
            key += "_pct" if pct[2] == "Δp" else ""
        else:
            key = _LABELS[label]
        out[key] = (float(m["v"]), _half_unit(m["v"]))
        if m["e"]:
            out[f"{key}_err"] = (float(m["e"]), _half_unit(m["e"]))
    return out


def parse_kld_chunks(text: str) -> list[dict[str, tuple[float, float]]]:
    """The running figures printed after each chunk (over all chunks so far)."""
    rows = []
    for m in _CHUNK.finditer(text):
        vals = m.groups()[1:]
        row = {}
        for j, key in enumerate(_CHUNK_KEYS):
            row[key] = (float(vals[2 * j]), _half_unit(vals[2 * j]))
            row[f"{key}_err"] = (float(vals[2 * j + 1]), _half_unit(vals[2 * j + 1]))
        rows.append(row)
    return rows


# How far squeeze's figure may be from the CLI's beyond the CLI's printed rounding, and why.
# The one systematic difference: the CLI reads the base back as 16-bit log-probs, steps of 16/65535
# nats, so each base log-prob is off by up to half a step; squeeze keeps the top-K in float32.
HALF_STEP = 8 / 65535
_KLD_ORDER = {"max_kld", "min_kld", "median_kld"} | {f"kld_p{perplexity._pct_key(f)}"
                                                     for f in perplexity.KLD_PERCENTILES}


def exact_tolerance(key: str, ours: dict[str, float], n: int) -> float:
    if key in _KLD_ORDER:
        # per token the CLI's KLD sums p (log p - log q) over rounded log p: measured within
        # 1e-4 nats of the exact sum here; an order statistic moves no more than the values do
        return HALF_STEP
    if key in ("mean_kld", "mean_kld_err"):
        # those per-token rounding errors are independent: the mean (and its standard error)
        # keep about 1/sqrt(n) of them
        return HALF_STEP / math.sqrt(n)
    if key.startswith("same_top"):
        return 0.0  # the same tokens agree on the top token: same count
    if "dp" in key:
        # p = exp(-nll) from the CLI's float32 nll (rounded to ~2e-6 nats at these logit sizes):
        # 2e-6 of probability, in percent
        return 2e-4
    if key.startswith("cor"):
        return 1e-4  # percent; a ratio of float64 sums of the same float32 values
    # PPL figures: the CLI keeps each -log p in float32 and sums in float64, squeeze in float64
    # throughout; the mean differs by ~1e-7 nats, so each figure by well under 1e-6 of PPL
    scale = {"ln_ppl_ratio": 1.0, "ln_ppl_ratio_err": 1.0, "ppl_diff": ours["ppl"],
             "ppl_diff_err": ours["ppl"]}.get(key, abs(ours.get(key.removesuffix("_err"), 1.0)))
    return 1e-6 * scale


def _mismatches(ours: dict[str, float], theirs: dict[str, tuple[float, float]], tol) -> list[str]:
    bad = []
    for key, (value, printed) in theirs.items():
        limit = printed + tol(key)
        if not abs(ours[key] - value) <= limit:
            bad.append(f"{key}: squeeze {ours[key]:.9g}, llama-perplexity {value:.9g}, "
                       f"difference {ours[key] - value:.3g} > {limit:.3g}")
    return bad


def _first_chunks(d: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: (v[:n] if v.ndim >= 2 else v) for k, v in d.items()}


@pytest.mark.slow
@pytest.mark.reference
def test_every_kld_figure_matches_llama_perplexity(cli_kld, exact_summary):
    """All 43 figures of the final statistics and the 10 running figures after every chunk, with
    the exact sketch: what is left is the CLI's 16-bit base and its float32 sums."""
    base, var = exact_summary
    ours = perplexity.summarize(base, var)
    theirs = parse_kld_statistics(cli_kld)
    assert len(theirs) == 43 and ours["tokens"] == CHUNKS * (CTX - 1 - CTX // 2)
    bad = _mismatches(ours, theirs, lambda key: exact_tolerance(key, ours, ours["tokens"]))
    chunks = parse_kld_chunks(cli_kld)
    assert len(chunks) == CHUNKS
    for i, row in enumerate(chunks, start=1):
        part = perplexity.summarize(_first_chunks(base, i), _first_chunks(var, i))
        bad += [f"chunk {i} {m}" for m in
                _mismatches(part, row, lambda key: exact_tolerance(key, part, part["tokens"]))]
    assert not bad, "\n".join(bad)


# The default sketch samples the base's tail (1024 ids past the top 256): per token its KLD is an
# estimate (here within 0.014 nats, 9 % of that token's KLD, of the exact sum), so the KLD figures
# get a relative allowance on top of the exact sketch's tolerance; everything else is computed
# from the same numbers as with the exact sketch.
SKETCH_REL = {"mean_kld": 1e-3, "mean_kld_err": 3e-3}  # errors of 1024 samples average out over 762 tokens
SKETCH_REL_ORDER = 0.02  # an order statistic follows a few tokens' estimates; measured up to 0.9 %


@pytest.mark.slow
@pytest.mark.reference
def test_default_sketch_figures_match_llama_perplexity(cli_kld, squeeze_summary, exact_summary):
    ours = squeeze_summary
    exact = perplexity.summarize(*exact_summary)
    theirs = parse_kld_statistics(cli_kld)
    kld_keys = _KLD_ORDER | set(SKETCH_REL)
    assert {k: v for k, v in ours.items() if k not in kld_keys} == {k: v for k, v in exact.items() if k not in kld_keys}

    def tol(key):
        extra = SKETCH_REL_ORDER if key in _KLD_ORDER else SKETCH_REL.get(key, 0.0)
        return exact_tolerance(key, ours, ours["tokens"]) + extra * abs(theirs[key][0])

    bad = _mismatches(ours, theirs, tol)
    assert not bad, "\n".join(bad)


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
