"""Behaviour drift: where a variant's behaviour leaves the base's, on a small prompt suite.

Lower mean KL divergence on wikitext does not guarantee the same behaviour: one changed argmax
early in a generation sends the rest elsewhere. Two views of that, per prompt:

- free generation: greedy continuations from the base and from the variant, the first token
  where they part (`first_divergence`) and a short side-by-side excerpt;
- teacher forcing: the base's prompt + greedy continuation evaluated in one pass through the
  base and through the variant, and at every continuation position the KL divergence
  KLD(base || variant) and whether both models' top-1 token agree. This measures the variant on
  the text the base actually writes, without the divergence of one step compounding into the
  next, so the positions can be averaged over prompts.

The KLD is llama-perplexity's (`--kl-divergence`): the sum over the base's tokens with
log p > -16 of p (log p - log q), here over the full vocabulary (no sketch: a few hundred
positions fit in memory), so it is exactly 0 for a model against itself.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

from pipeline.engine.context import Context
from pipeline.engine.model import Model
from pipeline.errors import SqueezeError
from pipeline.measure.perplexity import LOGP_FLOOR, log_sum_exp_rows

# One prompt per kind of text a model card reader cares about (short, so greedy decoding of a
# few dozen tokens is cheap even on a laptop). `score.drift.prompts` replaces them.
PROMPTS = {
    "story": "Once upon a time, in a small village at the edge of a forest, there lived",
    "factual": "The Eiffel Tower is located in the city of",
    "programming": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "science news": "Astronomers announced on Tuesday that the James Webb Space Telescope had detected",
    "math QA": "Question: What is 12 plus 7?\nAnswer:",
}
EXCERPT_CHARS = 60
# 1: free generation only; 2: + teacher-forced KLD and top-1 agreement per position. A step's
# params carry it, so drift files of an older format are measured again.
FORMAT = 2


# ---- the prompt suite -----------------------------------------------------------------------

def load_prompts(path: Path, where: str = "") -> dict[str, str]:
    """A prompts file (YAML or JSON): a list of prompts (named "1", "2", ...) or a mapping of
    name to prompt. Every problem is one SqueezeError line: `where` (the recipe key), the file,
    what is wrong."""
    path = Path(path)

    def fail(problem: str):
        raise SqueezeError(f"{where}{path}: {problem}")

    if not path.is_file():
        fail("prompts file not found")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        fail("not a UTF-8 text file")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        fail(f"not valid YAML{at} ({getattr(exc, 'problem', None) or type(exc).__name__})")
    if isinstance(doc, list):
        doc = {str(i + 1): p for i, p in enumerate(doc)}
    if not isinstance(doc, dict):
        fail(f"expected a list of prompts or a mapping of name: prompt, got {type(doc).__name__ if doc is not None else 'an empty file'}")
    if not doc:
        fail("no prompts in it")
    prompts = {}
    for name, text in doc.items():
        if not isinstance(text, str) or not text.strip():
            fail(f"prompt '{name}': expected non-empty text, got {text!r}")
        prompts[str(name)] = text
    return prompts


def prompts_digest(prompts: dict[str, str]) -> str:
    """A short hash of the suite (names and texts): a step's params carry it, so editing the
    prompts measures drift again."""
    return hashlib.sha256(json.dumps(prompts, sort_keys=True).encode("utf-8")).hexdigest()[:16]


# ---- free generation ------------------------------------------------------------------------

def greedy(model: Model, prompt: str, n_tokens: int, threads: int | None = None) -> list[int]:
    """Greedy continuation token ids (stops early at an end-of-generation token)."""
    tokens = model.tokenize(prompt, add_special=True)
    out: list[int] = []
    with Context(model, len(tokens) + n_tokens, 1, threads) as context:
        logits = context.decode_tokens(tokens, 0)
        for i in range(n_tokens):
            tok = int(logits.argmax())
            out.append(tok)
            if model.is_eog(tok) or i == n_tokens - 1:
                break
            logits = context.decode_tokens([tok], len(tokens) + i)
    return out


def continuations(model: Model, n_tokens: int, threads: int | None = None,
                  prompts: dict[str, str] = PROMPTS) -> dict:
    return {name: {"prompt": p, "tokens": greedy(model, p, n_tokens, threads)} for name, p in prompts.items()}


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token; None when one continuation equals the other."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _excerpt(model: Model, tokens: list[int], at: int | None) -> str:
    """Text around the divergence: a few tokens before it, then what follows."""
    start = 0 if at is None else max(0, at - 3)
    text = model.detokenize(tokens[start:])
    text = ("…" if start else "") + text
    text = " ".join(text.split())
    return text[:EXCERPT_CHARS] + ("…" if len(text) > EXCERPT_CHARS else "")


# ---- teacher forcing ------------------------------------------------------------------------

def forced_logits(model: Model, base: dict, threads: int | None = None) -> dict[str, np.ndarray]:
    """Per prompt of `base` (continuations() of the base model): the model's logits at each
    position of the base's continuation, (n_continuation, n_vocab) float32, row i predicting
    continuation token i. Prompt and continuation are evaluated in one decode."""
    seqs = {name: (model.tokenize(b["prompt"], add_special=True), list(b["tokens"])) for name, b in base.items()}
    longest = max(len(p) + len(c) for p, c in seqs.values())
    out = {}
    with Context(model, longest, 1, threads) as context:
        for name, (prompt, cont) in seqs.items():
            # the last continuation token predicts nothing we compare: leave it out
            seq = np.concatenate([prompt, np.asarray(cont[:-1], np.int32)])
            out[name] = context.eval([seq], output_from=len(prompt) - 1)[0].copy()
    return out


@dataclass(frozen=True)
class ForcedComparison:
    """One prompt under teacher forcing: per continuation position, KLD(base || variant) and
    whether the two models' top-1 tokens agree."""

    kld: list[float]
    top1_agree: list[bool]

    @property
    def top1_agreement_pct(self) -> float:
        return 100.0 * sum(self.top1_agree) / len(self.top1_agree)

    @property
    def mean_kld(self) -> float:
        return float(np.mean(self.kld))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    return logits.astype(np.float64) - log_sum_exp_rows(logits)[:, None]


def kld_rows(base_logits: np.ndarray, variant_logits: np.ndarray) -> np.ndarray:
    """KLD(base || variant) per row of logits, as llama-perplexity sums it (base log p > -16)."""
    logp, logq = _log_softmax(base_logits), _log_softmax(variant_logits)
    return np.where(logp > LOGP_FLOOR, np.exp(logp) * (logp - logq), 0.0).sum(axis=1)


def compare_forced(base_logits: np.ndarray, variant_logits: np.ndarray) -> ForcedComparison:
    if base_logits.shape != variant_logits.shape:
        raise ValueError(f"logits of shape {base_logits.shape} against {variant_logits.shape}")
    agree = base_logits.argmax(axis=1) == variant_logits.argmax(axis=1)
    return ForcedComparison([float(x) for x in kld_rows(base_logits, variant_logits)], [bool(x) for x in agree])


# ---- the comparison a drift file holds ------------------------------------------------------

def compare(model: Model, base: dict, variant: dict,
            forced: dict[str, ForcedComparison] | None = None) -> list[dict]:
    """Per prompt: the first diverging token index of free generation (None: identical), both
    excerpts, and with `forced` the teacher-forced per-position KLD and top-1 agreement."""
    rows = []
    for name, b in base.items():
        v = variant[name]
        at = first_divergence(b["tokens"], v["tokens"])
        row = {"prompt": name, "n_tokens": len(b["tokens"]), "first_divergence": at,
               "base": _excerpt(model, b["tokens"], at), "variant": _excerpt(model, v["tokens"], at)}
        if forced is not None:
            f = forced[name]
            row |= {"top1_agreement_pct": f.top1_agreement_pct, "mean_kld": f.mean_kld, **asdict(f)}
        rows.append(row)
    return rows


@dataclass(frozen=True)
class DriftSummary:
    """One variant's drift in three numbers (the score table's drift columns)."""

    top1_agreement_pct: float  # teacher-forced, over every continuation position of every prompt
    mean_kld: float  # teacher-forced, over the same positions
    # Median over prompts of free generation's first diverging token; a prompt whose
    # continuations never part counts as its whole length (the tokens the base generated).
    median_first_divergence: float
    positions: int


def summarize(rows: list[dict]) -> DriftSummary:
    """The summary of compare()'s rows (with teacher forcing)."""
    agree = [a for r in rows for a in r["top1_agree"]]
    kld = [k for r in rows for k in r["kld"]]
    firsts = [r["n_tokens"] if r["first_divergence"] is None else r["first_divergence"] for r in rows]
    return DriftSummary(100.0 * sum(agree) / len(agree), float(np.mean(kld)),
                        float(statistics.median(firsts)), len(agree))
