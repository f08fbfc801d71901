"""Speed as llama-bench measures it: prompt processing (pp512: one 512-token batch into an
empty cache), text generation (tg128: 128 single-token decodes) and both in a row (pp512+tg128),
each repeated after one warm-up run; reported as tokens/s mean ± sample standard deviation,
with the thread count.

Tokens are random ids (llama-bench uses rand() % n_vocab): speed does not depend on content.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from pipeline.engine.backend import default_threads
from pipeline.engine.context import Context
from pipeline.engine.model import Model
from pipeline.progress import bar


def _prompt(context: Context, tokens: np.ndarray, start: int = 0) -> None:
    n_batch = context.n_ctx  # the context's batch holds n_ctx tokens
    for i in range(0, len(tokens), n_batch):
        part = tokens[i: i + n_batch]
        context.decode_tokens(part, start + i, want_last=i + n_batch >= len(tokens))


def _generate(context: Context, n: int, start: int, rng: np.random.Generator, n_vocab: int) -> None:
    for i in range(n):
        context.decode_tokens([int(rng.integers(n_vocab))], start + i)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(model: Model, pp: int = 512, tg: int = 128, repetitions: int = 3,
            threads: int | None = None, seed: int = 0) -> dict:
    """tokens/s for pp, tg and pp+tg: {test: {"mean", "sd", "samples"}}, plus threads."""
    threads = threads or default_threads()
    rng = np.random.default_rng(seed)
    n_vocab = model.n_vocab
    tests = {f"pp{pp}": (pp, 0), f"tg{tg}": (0, tg), f"pp{pp}+tg{tg}": (pp, tg)}
    out = {"threads": threads, "repetitions": repetitions, "tests": {}}
    with Context(model, pp + tg, 1, threads) as context, \
            bar(total=len(tests) * (repetitions + 1), desc=f"speed {model.path.stem}", unit="run") as progress:
        for name, (n_p, n_g) in tests.items():
            def once():
                context.clear()
                if n_p:
                    _prompt(context, rng.integers(n_vocab, size=n_p).astype(np.int32))
                if n_g:  # tg alone starts from an empty cache too, like llama-bench's -n test
                    _generate(context, n_g, n_p, rng, n_vocab)
            once()  # warm-up, not counted (as llama-bench does)
            progress.update(1)
            samples = []
            for _ in range(repetitions):
                samples.append((n_p + n_g) / _timed(once))
                progress.update(1)
            out["tests"][name] = {"tokens": n_p + n_g, "mean": statistics.fmean(samples) if samples else None,
                                  "sd": statistics.stdev(samples) if len(samples) > 1 else 0.0,
                                  "samples": samples}
    return out
