"""Perplexity and KL divergence against a base model, as llama-perplexity computes them.

Chunking follows tools/perplexity: the text is tokenized whole (with BOS), cut into chunks of
`ctx` tokens, each chunk's first token replaced by BOS, and only the second half of each chunk
is scored (tokens first+1..ctx-1 predicted from positions first..ctx-2, first = ctx/2).

The base model's distribution is not stored whole (llama.cpp keeps 2 bytes x n_vocab per token,
4.5 GB for 17k tokens of a 262k vocabulary). Per scored token squeeze keeps a sketch of it:
- the top-K log-probabilities and their token ids (exact),
- of the rest ("tail"), only what llama.cpp's KLD sums over (base log-prob above -16): its
  mass P and S token ids drawn by systematic sampling proportional to p, with their log-probs,
- the log-prob of the actual next token.
KL divergence as llama-perplexity computes it, sum over {log p_i > -16} of p_i (log p_i - log q_i),
is then: the exact top-K terms + P/S * sum of (log p - log q) over the S sampled ids, an
unbiased estimate of the tail's terms whose variance is that of log p - log q (small when the
variant is close to the base) and shrinks further as the samples are stratified by cumulative
mass. With K=256 and S=1024 (tail log-probs in 16 bits: 8 KB per token, 1.6 % of llama.cpp's
file) the mean KLD over 1,000 tokens is within ~0.5 % of the full sum even for Q4_K_M (KLD
0.005), less on more tokens; top-K plus one bucket for the rest, the first version, was 8 % low
at K=512 on Q3_K_M.

`summarize` turns per-token values into every figure `llama-perplexity --kl-divergence` prints,
with the same uncertainty formulas (tools/perplexity/perplexity.cpp, kl_divergence()).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.engine.context import Context
from pipeline.engine.model import Model
from pipeline.errors import DamagedFile, SqueezeError
from pipeline.progress import bar

TOP_K = 256  # exact entries per scored token
TAIL_SAMPLES = 1024  # sampled ids for the rest of the distribution
# Tail log-probs lie in (-16, 0): kept as uint16 steps of 16/65535 nats, llama.cpp's own precision.
_Q_SCALE = 65535 / 16.0
LOGP_FLOOR = -16.0  # llama-perplexity's KLD ignores base log-probs at or below this
BASE_FORMAT = 2  # 1: top-K + one tail bucket (still readable); 2: top-K + tail sample
# Percentiles llama-perplexity prints for KLD and for delta-p (fractions of the sorted values).
KLD_PERCENTILES = (0.999, 0.99, 0.95, 0.90, 0.10, 0.05, 0.01, 0.001)
DP_PERCENTILES = (0.999, 0.99, 0.95, 0.90, 0.75, 0.25, 0.10, 0.05, 0.01, 0.001)


def seqs_per_batch(ctx: int, n_batch: int = 2048) -> int:
    """Sequences per decode as llama-perplexity packs them: n_batch / ctx (default n_batch 2048)."""
    return max(1, n_batch // ctx)


@dataclass
class Chunks:
    tokens: np.ndarray  # (n_chunks, ctx) int32, first token already BOS where the model adds one
    first: int  # first scored position

    @property
    def n_scored(self) -> int:
        return self.tokens.shape[1] - 1 - self.first


def make_chunks(model: Model, text: str, ctx: int, n_chunks: int, what: str = "text", skip: int = 0) -> Chunks:
    """The first `n_chunks` chunks of `ctx` tokens, as llama-perplexity cuts them; `skip`: start
    after that many chunks (text held out from what the first chunks score)."""
    tokens = model.tokenize(text, add_special=True)
    if len(tokens) < 2 * ctx:
        raise SqueezeError(f"{what}: {len(tokens)} tokens is fewer than the {2 * ctx} needed "
                           f"(2 x ctx {ctx}, as llama-perplexity requires)")
    if skip and len(tokens) // ctx - skip < 1:
        raise SqueezeError(f"{what}: {len(tokens)} tokens hold {len(tokens) // ctx} chunks of {ctx}; none is left "
                           f"after the first {skip}")
    n = min(n_chunks, len(tokens) // ctx - skip)
    chunks = tokens[skip * ctx: (skip + n) * ctx].reshape(n, ctx).copy()
    if model.add_bos:
        chunks[:, 0] = model.bos
    return Chunks(chunks, ctx // 2)


def vocab_fingerprint(model: Model) -> str:
    """A hash of the vocabulary size and a spread of token pieces: two models with the same
    fingerprint tokenize alike, so their distributions over token ids can be compared."""
    h = hashlib.sha256(str(model.n_vocab).encode())
    step = max(1, model.n_vocab // 4096)
    for t in list(range(0, model.n_vocab, step)) + [model.n_vocab - 1]:
        h.update(model.piece(t).encode("utf-8", "replace") + b"\0")
    return h.hexdigest()[:16]


def _lse_block(logits: np.ndarray) -> np.ndarray:
    m = logits.max(axis=1)
    s = np.exp(logits - m[:, None]).sum(axis=1, dtype=np.float64)
    return m.astype(np.float64) + np.log(s)


_pool: ThreadPoolExecutor | None = None
_LSE_ROWS = 16  # rows per block: a 262k-wide block of 16 rows is 16 MB, cache-friendly temporaries


def log_sum_exp_rows(logits: np.ndarray) -> np.ndarray:
    """log(sum(exp(row))) per row, float64; the log-probs are then logits - lse, computed only
    where needed (a full 262k-wide log-softmax per row would double the cost of scoring).
    Blocks of rows run on all cores (numpy releases the GIL), as llama-perplexity's workers do."""
    n = logits.shape[0]
    if n <= _LSE_ROWS:
        return _lse_block(logits)
    return np.concatenate(_map(_lse_block, [logits[i: i + _LSE_ROWS] for i in range(0, n, _LSE_ROWS)]))


def _map(fn, items) -> list:
    """fn over items on a thread per core (numpy's kernels release the GIL)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="squeeze-score")
    return list(_pool.map(fn, items))


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def evaluate_logits(ctx: Context, chunks: Chunks, per_chunk, desc: str) -> float:
    """Run the chunks through the model, n_seq sequences per decode as llama-perplexity does,
    and hand each chunk's raw logits at positions first..ctx-2 (n_scored, n_vocab) and the
    tokens they predict to `per_chunk(i, logits, targets)`. Returns the seconds spent in
    per_chunk: the numpy work alone, which the cost model prices apart from the decodes."""
    first = chunks.first
    spent = 0.0
    with bar(total=len(chunks.tokens), desc=desc, unit="chunk") as progress:
        for batch in _batches(len(chunks.tokens), ctx.n_seq):
            logits = ctx.eval([chunks.tokens[i] for i in batch], output_from=first)
            for j, i in enumerate(batch):
                start = time.perf_counter()
                per_chunk(i, logits[j, :-1], chunks.tokens[i, first + 1:])
                spent += time.perf_counter() - start
                progress.update(1)
    return spent


def _sketch_block(logits: np.ndarray, targets: np.ndarray, k: int, n_tail: int) -> tuple:
    """The base sketch of a block of rows (see the module docstring)."""
    lse = _lse_block(logits)
    logp = logits - lse[:, None].astype(np.float32)
    idx = np.argpartition(logp, -k, axis=1)[:, -k:]
    vals = np.take_along_axis(logp, idx, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")  # sorted: column 0 is the argmax
    top_ids = np.take_along_axis(idx, order, axis=1)
    top_logp = np.take_along_axis(vals, order, axis=1)
    rows = np.arange(len(logits))
    target = logp[rows, targets]
    # Tail: everything but the top-K that llama.cpp's KLD counts (log p > -16).
    np.put_along_axis(logp, top_ids, -np.inf, axis=1)
    p_tail = np.where(logp > LOGP_FLOOR, np.exp(logp.astype(np.float64)), 0.0)
    mass = p_tail.sum(axis=1)
    cum = np.cumsum(p_tail, axis=1)
    # systematic sampling: the ids at cumulative mass (j + 1/2) / S of the tail
    at = (np.arange(n_tail) + 0.5) / n_tail
    tail_ids = np.stack([np.searchsorted(cum[r], at * mass[r]) for r in rows]).clip(0, logits.shape[1] - 1)
    tail_ids = tail_ids.astype(np.int32)
    tail_logp = np.take_along_axis(logits, tail_ids, axis=1) - lse[:, None].astype(np.float32)
    tail_logp = np.rint((tail_logp - LOGP_FLOOR) * _Q_SCALE).clip(0, 65535).astype(np.uint16)
    return top_ids.astype(np.int32), top_logp, tail_ids, tail_logp, mass, target


def base_distribution(model: Model, ctx: Context, chunks: Chunks, k: int = TOP_K,
                      n_tail: int = TAIL_SAMPLES, spent: dict | None = None) -> dict[str, np.ndarray]:
    """The base sketch of every chunk; `spent["numpy_s"]`, when given, gets the seconds of
    sketching alone (without the decodes)."""
    n, m = len(chunks.tokens), chunks.n_scored
    k = min(k, model.n_vocab)
    out = {"top_ids": np.zeros((n, m, k), np.int32), "top_logp": np.zeros((n, m, k), np.float32),
           "tail_ids": np.zeros((n, m, n_tail), np.int32), "tail_logp": np.zeros((n, m, n_tail), np.uint16),
           "tail_mass": np.zeros((n, m), np.float64), "target_logp": np.zeros((n, m), np.float32)}
    names = ("top_ids", "top_logp", "tail_ids", "tail_logp", "tail_mass", "target_logp")

    def keep(i, logits, targets):
        starts = range(0, m, _LSE_ROWS)
        blocks = _map(lambda a: _sketch_block(logits[a: a + _LSE_ROWS], targets[a: a + _LSE_ROWS], k, n_tail), starts)
        for a, parts in zip(starts, blocks):
            for name, part in zip(names, parts):
                out[name][i, a: a + _LSE_ROWS] = part

    seconds = evaluate_logits(ctx, chunks, keep, "score base")
    if spent is not None:
        spent["numpy_s"] = seconds
    return {"tokens": chunks.tokens, "first": np.array(chunks.first), **out, "n_vocab": np.array(model.n_vocab),
            "vocab": np.array(vocab_fingerprint(model)), "format": np.array(BASE_FORMAT)}


def save_base(path: Path, dist: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **dist)


def load_base(path: Path, remedy: str = "delete it and rerun") -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise SqueezeError(f"{path}: base distribution not found; score the base first "
                           f"(the `score base` step of `squeeze run`)")
    try:
        with np.load(path, allow_pickle=False) as z:
            base = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - zipfile.BadZipFile, EOFError, ValueError ... on a cut or damaged .npz
        detail = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DamagedFile(path, f"truncated or damaged base distribution file ({detail})", remedy) from None
    missing = {"tokens", "first", "top_ids", "top_logp", "target_logp", "n_vocab"} - set(base)
    if missing:
        raise DamagedFile(path, f"not a base distribution file (no {', '.join(sorted(missing))})", remedy)
    problem = _shape_problem(base)
    if problem:
        raise DamagedFile(path, f"damaged base distribution file ({problem})", remedy)
    return base


def _shape_problem(base: dict[str, np.ndarray]) -> str | None:
    """Arrays whose shapes do not fit together (what a flipped byte in a .npy header leaves)."""
    tokens = base["tokens"]
    if tokens.ndim != 2 or base["first"].ndim != 0 or base["n_vocab"].ndim != 0:
        return f"tokens of shape {tokens.shape}"
    n, ctx = tokens.shape
    first = int(base["first"])
    if not 0 <= first < ctx:
        return f"first scored position {first} outside a context of {ctx}"
    m = ctx - first - 1
    want = {"top_ids": (n, m), "top_logp": (n, m), "target_logp": (n, m), "tail_ids": (n, m),
            "tail_logp": (n, m), "tail_mass": (n, m)}
    for name, lead in want.items():
        if name in base and base[name].shape[:2] != lead:
            return f"{name} of shape {base[name].shape}, expected {lead} first"
    if base["top_ids"].shape != base["top_logp"].shape:
        return f"top_ids {base['top_ids'].shape} and top_logp {base['top_logp'].shape} differ"
    return None


def check_same_vocabulary(model: Model, base: dict[str, np.ndarray]) -> None:
    """Refuse to compare distributions over different token sets."""
    if int(base["n_vocab"]) != model.n_vocab:
        raise SqueezeError(f"{model.path}: vocabulary of {model.n_vocab} tokens differs from the base's "
                           f"{int(base['n_vocab'])}; refusing to score against it")
    if "vocab" in base and str(base["vocab"]) != vocab_fingerprint(model):
        raise SqueezeError(f"{model.path}: vocabulary differs from the base's (same size, other tokens); "
                           f"refusing to score against it")


def score_against_base(model: Model, ctx: Context, base: dict[str, np.ndarray],
                       spent: dict | None = None) -> dict[str, np.ndarray]:
    """Per scored token: variant log-prob of the target, KLD(base || variant), top-token agreement;
    `spent["numpy_s"]`, when given, gets the seconds of the comparison alone (without the decodes)."""
    check_same_vocabulary(model, base)
    chunks = Chunks(base["tokens"], int(base["first"]))
    n, m = base["target_logp"].shape
    out = {"target_logp": np.zeros((n, m), np.float64), "kld": np.zeros((n, m), np.float64),
           "same_top": np.zeros((n, m), bool)}
    rows = np.arange(m)

    def compare(i, logits, targets):
        lse = log_sum_exp_rows(logits)
        ids = base["top_ids"][i]
        logp = base["top_logp"][i].astype(np.float64)
        out["target_logp"][i] = logits[rows, targets] - lse
        q_top = np.take_along_axis(logits, ids, axis=1).astype(np.float64) - lse[:, None]
        if "tail_ids" in base:
            q_tail = np.take_along_axis(logits, base["tail_ids"][i], axis=1).astype(np.float64) - lse[:, None]
            p_tail = base["tail_logp"][i].astype(np.float64) / _Q_SCALE + LOGP_FLOOR
            out["kld"][i] = kld_from_sketch(logp, q_top, base["tail_mass"][i], p_tail, q_tail)
        else:  # a format-1 file (top-K and one bucket), as cached by earlier versions
            out["kld"][i] = kld_top_k_bucket(logp, q_top)
        out["same_top"][i] = logits.argmax(axis=1) == _cli_base_argmax(ids, base["top_logp"][i])

    seconds = evaluate_logits(ctx, chunks, compare, f"score {model.path.stem}")
    if spent is not None:
        spent["numpy_s"] = seconds
    return out


def _cli_base_argmax(ids: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """The base's top token as llama-perplexity sees it: its base log-probs are 16-bit steps of
    16/65535 nats below the maximum, so tokens within half a step of the top tie, and the
    lowest token id among them wins."""
    steps = np.rint((logp[:, :8] - logp[:, :1] + 16.0) * _Q_SCALE)
    tied = steps >= steps[:, :1]
    return np.where(tied, ids[:, :8], np.iinfo(np.int32).max).min(axis=1)


def cli_base_target_logp(base: dict[str, np.ndarray]) -> np.ndarray:
    """The base's log-prob of each actual next token as llama-perplexity's KLD mode reads it back
    from its base file: 16-bit steps of 16/65535 nats up from the row's maximum - 16, so rounded
    to that grid and never below its floor (log_softmax() in tools/perplexity stores
    nearest_int((logit - (max - 16)) / scale), 0 for anything lower). PPL(base), its ratios and
    Δp in the KLD printout use these, so squeeze does too; the exact PPL(base) is reported
    beside it. (The rounding alone moves PPL(base) by about 1e-6 of itself.)"""
    top = base["top_logp"][..., 0].astype(np.float64)
    steps = np.rint((base["target_logp"].astype(np.float64) - top - LOGP_FLOOR) * _Q_SCALE).clip(0, 65535)
    return top + LOGP_FLOOR + steps / _Q_SCALE


def kld_from_sketch(logp: np.ndarray, logq: np.ndarray, tail_mass: np.ndarray, logp_tail: np.ndarray,
                    logq_tail: np.ndarray) -> np.ndarray:
    """llama-perplexity's KLD per row from the base sketch and the variant's log-probs at the
    sketch's ids: exact over the top-K (where log p > -16), estimated over the rest."""
    top = np.where(logp > LOGP_FLOOR, np.exp(logp) * (logp - logq), 0.0).sum(axis=1)
    return top + tail_mass / logp_tail.shape[1] * (logp_tail - logq_tail).sum(axis=1)


def kld_top_k_bucket(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """KL over the kept tokens plus one bucket for the rest of both (format 1; a lower bound)."""
    p = np.exp(logp)
    tail_p = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    tail_q = np.clip(1.0 - np.exp(logq).sum(axis=1), 1e-30, 1.0)
    kld = (p * (logp - logq)).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        kld += np.where(tail_p > 0, tail_p * (np.log(tail_p) - np.log(tail_q)), 0.0)
    return kld


# ---- statistics, as tools/perplexity/perplexity.cpp computes them ----------------------------

def _mean_and_uncertainty(x: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error from the sums, as llama.cpp does (0 for <= 10 values)."""
    n = x.size
    if n < 1:
        return 0.0, 0.0
    f = float(x.sum() / n)
    df = float((x * x).sum() / n) - f * f
    return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def _covariance(a: np.ndarray, b: np.ndarray) -> float:
    n = a.size
    if n < 10:
        return 0.0
    return (float((a * b).sum() / n) - float(a.sum() / n) * float(b.sum() / n)) / (n - 1)


def _percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama.cpp's linear interpolation at fraction * (n - 1) of the sorted values."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = np.float32(fraction) * np.float32(sorted_values.size - 1)
    ip = int(p)
    p = float(p) - ip
    return (1 - p) * float(sorted_values[ip]) + p * float(sorted_values[min(ip + 1, sorted_values.size - 1)])


def _median(sorted_values: np.ndarray) -> float:
    n = sorted_values.size
    return float(sorted_values[n // 2]) if n % 2 else 0.5 * float(sorted_values[n // 2] + sorted_values[n // 2 - 1])


def _pct_key(fraction: float) -> str:
    return f"{fraction * 100:g}".replace(".", "_")


def summarize(base: dict[str, np.ndarray], var: dict[str, np.ndarray]) -> dict[str, float]:
    """Every figure `llama-perplexity --kl-divergence` prints, each `x` with its `x_err` where
    the CLI shows one. Keys kept from the first version: tokens, ppl, ppl_base, ppl_ratio,
    mean_kld, max_kld, same_top_pct, rms_dp_pct, mean_dp_pct."""
    exact_nll_base = -base["target_logp"].astype(np.float64).ravel()
    nll_base = -cli_base_target_logp(base).ravel() if "top_logp" in base else exact_nll_base
    nll = -var["target_logp"].astype(np.float64).ravel()
    kld = var["kld"].astype(np.float64).ravel()
    dp = np.exp(-nll) - np.exp(-nll_base)
    n = nll.size

    log_ppl, log_ppl_err = _mean_and_uncertainty(nll)
    log_base, log_base_err = _mean_and_uncertainty(nll_base)
    cov = _covariance(nll, nll_base)
    ppl, ppl_base = math.exp(log_ppl), math.exp(log_base)
    ln_ratio = log_ppl - log_base
    ln_ratio_err = math.sqrt(max(log_ppl_err ** 2 + log_base_err ** 2 - 2 * cov, 0.0))
    ratio = math.exp(ln_ratio)
    ppl_err, ppl_base_err = ppl * log_ppl_err, ppl_base * log_base_err
    diff_err = math.sqrt(max(ppl_err ** 2 + ppl_base_err ** 2 - 2 * ppl * ppl_base * cov, 0.0))
    denom = log_ppl_err * log_base_err
    kld_mean, kld_err = _mean_and_uncertainty(kld)
    dp_mean, dp_err = _mean_and_uncertainty(dp)
    mse, mse_err = _mean_and_uncertainty(dp * dp)
    rms = math.sqrt(mse)
    same = float(var["same_top"].mean())

    out = {
        "tokens": int(n),
        "ppl": ppl, "ppl_err": ppl_err,
        "ppl_base": ppl_base, "ppl_base_err": ppl_base_err,
        "ppl_base_exact": math.exp(float(exact_nll_base.mean())),
        "cor_ln_ppl_pct": 100.0 * cov / denom if denom > 0 else float("nan"),
        "ln_ppl_ratio": ln_ratio, "ln_ppl_ratio_err": ln_ratio_err,
        "ppl_ratio": ratio, "ppl_ratio_err": ratio * ln_ratio_err,
        "ppl_diff": ppl - ppl_base, "ppl_diff_err": diff_err,
        "mean_kld": kld_mean, "mean_kld_err": kld_err,
    }
    # llama.cpp sorts float32 values; do the same so percentiles match to the printed digits.
    ks = np.sort(kld.astype(np.float32))
    out["max_kld"] = float(ks[-1])
    for f in KLD_PERCENTILES[:4]:
        out[f"kld_p{_pct_key(f)}"] = _percentile(ks, f)
    out["median_kld"] = _median(ks)
    for f in KLD_PERCENTILES[4:]:
        out[f"kld_p{_pct_key(f)}"] = _percentile(ks, f)
    out["min_kld"] = float(ks[0])

    ds = np.sort(dp.astype(np.float32))
    out["mean_dp_pct"], out["mean_dp_pct_err"] = 100.0 * dp_mean, 100.0 * dp_err
    out["max_dp_pct"] = 100.0 * float(ds[-1])
    for f in DP_PERCENTILES:
        out[f"dp_p{_pct_key(f)}_pct"] = 100.0 * _percentile(ds, f)
    out["median_dp_pct"] = 100.0 * _median(ds)
    out["min_dp_pct"] = 100.0 * float(ds[0])
    out["rms_dp_pct"] = 100.0 * rms
    out["rms_dp_pct_err"] = 100.0 * (0.5 / rms * mse_err if rms > 0 else 0.0)
    out["same_top_pct"] = 100.0 * same
    out["same_top_pct_err"] = 100.0 * math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0
    return out


def llama_cpp_base_bytes(n_vocab: int, n_chunks: int, ctx: int) -> int:
    """Size of `llama-perplexity --kl-divergence-base`'s file for the same chunks: a header, the
    tokens, then per scored token 2 bytes x (n_vocab rounded up to even + 4)."""
    nv = 2 * ((n_vocab + 1) // 2) + 4
    return 8 + 4 + 4 + 4 + n_chunks * ctx * 4 + n_chunks * (ctx - 1 - ctx // 2) * nv * 2
