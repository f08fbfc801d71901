"""Behaviour drift: greedy continuations of a small prompt suite from the base and a variant,
the first token where they part, and a short side-by-side excerpt.

Lower KL divergence does not guarantee the same behaviour: one changed argmax early in a
generation sends the rest elsewhere. This table shows where that happens.
"""

from __future__ import annotations

from pipeline.engine.context import Context
from pipeline.engine.model import Model

# One prompt per kind of text a model card reader cares about (short, so greedy decoding of a
# few dozen tokens is cheap even on a laptop).
PROMPTS = {
    "story": "Once upon a time, in a small village at the edge of a forest, there lived",
    "factual": "The Eiffel Tower is located in the city of",
    "programming": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "science news": "Astronomers announced on Tuesday that the James Webb Space Telescope had detected",
    "math QA": "Question: What is 12 plus 7?\nAnswer:",
}
EXCERPT_CHARS = 60


def greedy(model: Model, prompt: str, n_tokens: int, threads: int | None = None) -> list[int]:
    """Greedy continuation token ids (stops early at an end-of-generation token)."""
    tokens = model.tokenize(prompt, add_special=True)
    out: list[int] = []
    with Context(model, len(tokens) + n_tokens, 1, threads) as ctx:
        logits = ctx.decode_tokens(tokens, 0)
        for i in range(n_tokens):
            tok = int(logits.argmax())
            out.append(tok)
            if model.is_eog(tok) or i == n_tokens - 1:
                break
            logits = ctx.decode_tokens([tok], len(tokens) + i)
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


def compare(model: Model, base: dict, variant: dict) -> list[dict]:
    """Per prompt: the first diverging token index (None: identical) and both excerpts."""
    rows = []
    for name, b in base.items():
        v = variant[name]
        at = first_divergence(b["tokens"], v["tokens"])
        rows.append({"prompt": name, "n_tokens": len(b["tokens"]), "first_divergence": at,
                     "base": _excerpt(model, b["tokens"], at), "variant": _excerpt(model, v["tokens"], at)})
    return rows
