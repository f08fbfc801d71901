"""Perplexity and KL divergence against a base model, as llama-perplexity computes them.

Chunking follows tools/perplexity: the text is tokenized whole (with BOS), cut into chunks of
`ctx` tokens, each chunk's first token replaced by BOS, and only the second half of each chunk
is scored (tokens first..ctx-1 predicted from positions first-1..ctx-2, first = ctx/2).

The base model's distribution is not stored whole (llama.cpp keeps 2 bytes x n_vocab per token,
4.5 GB for 17k tokens of a 262k vocabulary): per scored token squeeze keeps the top-K
log-probabilities, their token ids and the log-prob of the actual next token. KL divergence is
then computed over the top-K tokens plus one bucket holding all remaining probability mass on
both sides, which by the log-sum inequality is a lower bound of the full-vocabulary KLD that
is tight when the base is confident (see tests for the agreement with llama-perplexity).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.engine import Context, Model
from pipeline.errors import SqueezeError
from pipeline.progress import bar

TOP_K = 128


@dataclass
class Chunks:
    tokens: np.ndarray  # (n_chunks, ctx) int32, first token already BOS where the model adds one
    first: int  # first scored position

    @property
    def n_scored(self) -> int:
        return self.tokens.shape[1] - 1 - self.first


def make_chunks(model: Model, text: str, ctx: int, n_chunks: int, what: str = "text") -> Chunks:
    tokens = model.tokenize(text, add_special=True)
    if len(tokens) < 2 * ctx:
        raise SqueezeError(f"{what}: {len(tokens)} tokens is fewer than the {2 * ctx} needed "
                           f"(2 x ctx {ctx}, as llama-perplexity requires)")
    n = min(n_chunks, len(tokens) // ctx)
    chunks = tokens[: n * ctx].reshape(n, ctx).copy()
    if model.add_bos:
        chunks[:, 0] = model.bos
    return Chunks(chunks, ctx // 2)


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32 (float64 accumulation of the normalizer)."""
    m = logits.max(axis=1, keepdims=True)
    shifted = logits - m
    lse = np.log(np.exp(shifted).sum(axis=1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return shifted - lse


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def evaluate(model: Model, ctx: Context, chunks: Chunks, per_row, desc: str) -> None:
    """Run the chunks through the model, n_seq at a time, and hand each chunk's scored
    log-probabilities (n_scored, n_vocab) and the tokens they predict to `per_row(i, logp, targets)`."""
    first = chunks.first
    with bar(total=len(chunks.tokens), desc=desc, unit="chunk") as progress:
        for batch in _batches(len(chunks.tokens), ctx.n_seq):
            seqs = [chunks.tokens[i] for i in batch]
            logits = ctx.eval(seqs, output_from=first)  # (n, ctx-first, n_vocab)
            for j, i in enumerate(batch):
                # logits at positions first..ctx-2 predict tokens first+1..ctx-1
                logp = log_softmax_rows(logits[j, :-1])
                per_row(i, logp, chunks.tokens[i, first + 1:])
                progress.update(1)


def base_distribution(model: Model, ctx: Context, chunks: Chunks, k: int = TOP_K) -> dict[str, np.ndarray]:
    n, m = len(chunks.tokens), chunks.n_scored
    top_ids = np.zeros((n, m, k), dtype=np.int32)
    top_logp = np.zeros((n, m, k), dtype=np.float32)
    target_logp = np.zeros((n, m), dtype=np.float32)

    def keep(i, logp, targets):
        idx = np.argpartition(logp, -k, axis=1)[:, -k:]
        vals = np.take_along_axis(logp, idx, axis=1)
        order = np.argsort(-vals, axis=1)  # sorted: column 0 is the argmax
        top_ids[i] = np.take_along_axis(idx, order, axis=1)
        top_logp[i] = np.take_along_axis(vals, order, axis=1)
        target_logp[i] = logp[np.arange(len(targets)), targets]

    evaluate(model, ctx, chunks, keep, "score base")
    return {"tokens": chunks.tokens, "first": np.array(chunks.first), "top_ids": top_ids,
            "top_logp": top_logp, "target_logp": target_logp, "n_vocab": np.array(model.n_vocab)}


def save_base(path: Path, dist: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **dist)


def load_base(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def score_against_base(model: Model, ctx: Context, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per scored token: variant log-prob of the target, KLD(base || variant), top-token agreement."""
    if int(base["n_vocab"]) != model.n_vocab:
        raise SqueezeError(f"{model.path}: vocabulary of {model.n_vocab} tokens differs from the base's "
                           f"{int(base['n_vocab'])}; refusing to score against it")
    chunks = Chunks(base["tokens"], int(base["first"]))
    n, m = base["target_logp"].shape
    out = {"target_logp": np.zeros((n, m), np.float32), "kld": np.zeros((n, m), np.float64),
           "same_top": np.zeros((n, m), bool)}

    def compare(i, logq, targets):
        ids, logp = base["top_ids"][i], base["top_logp"][i].astype(np.float64)
        out["target_logp"][i] = logq[np.arange(len(targets)), targets]
        q_top = np.take_along_axis(logq, ids, axis=1).astype(np.float64)
        p = np.exp(logp)
        tail_p = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
        tail_q = np.clip(1.0 - np.exp(q_top).sum(axis=1), 1e-30, 1.0)
        kld = (p * (logp - q_top)).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            kld += np.where(tail_p > 0, tail_p * (np.log(tail_p) - np.log(tail_q)), 0.0)
        out["kld"][i] = kld
        out["same_top"][i] = logq.argmax(axis=1) == ids[:, 0]

    evaluate(model, ctx, chunks, compare, f"score {model.path.stem}")
    return out


def summarize(base: dict[str, np.ndarray], var: dict[str, np.ndarray]) -> dict[str, float]:
    """The headline figures llama-perplexity --kl-divergence prints."""
    lb = base["target_logp"].astype(np.float64).ravel()
    lq = var["target_logp"].astype(np.float64).ravel()
    kld = var["kld"].ravel()
    dp = np.exp(lq) - np.exp(lb)
    return {
        "tokens": int(lb.size),
        "ppl": float(np.exp(-lq.mean())),
        "ppl_base": float(np.exp(-lb.mean())),
        "ppl_ratio": float(np.exp(lb.mean() - lq.mean())),
        "mean_kld": float(kld.mean()),
        "max_kld": float(kld.max()),
        "same_top_pct": float(100.0 * var["same_top"].mean()),
        "rms_dp_pct": float(100.0 * np.sqrt(np.mean(dp * dp))),
        "mean_dp_pct": float(100.0 * dp.mean()),
    }
