"""Task benchmarks scored as llama-perplexity scores them: HellaSwag, WinoGrande and multiple
choice (ARC-Easy, ARC-Challenge, MMLU, TruthfulQA mc1).

Every task is one decode: the tokens the answers share are evaluated once for all answer
sequences (several sequence ids on one token), then each answer's own tokens follow in its own
sequence, exactly the batch layout of tools/perplexity. An answer's score is the mean log-prob
of its tokens (HellaSwag and multiple choice), and WinoGrande compares the mean log-prob of
the words after the blank, with the CLI's index arithmetic kept as is (including its FIXME: when
a choice is not skipped the second sequence's first logit is taken from the wrong row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.engine.context import SharedPrefixContext
from pipeline.engine.model import Model
from pipeline.errors import SqueezeError
from pipeline.formats.task_data import (ChoiceTask, WinograndeTask, check_benchmark, hellaswag_selection,
                                        read_choice_tasks, read_winogrande, sampled_selection)
from pipeline.measure.perplexity import log_sum_exp_rows
from pipeline.progress import bar

WINOGRANDE_MIN_TRAILING = 3  # k_min_trailing_ctx in the CLI


def load_selected(name: str, path: Path, count: int):
    """The tasks the CLI would evaluate with `--<benchmark>-tasks count` on the same file."""
    check_benchmark(name)
    if name == "winogrande":
        tasks = read_winogrande(path)
        return [tasks[i] for i in sampled_selection(len(tasks), count)]
    tasks = read_choice_tasks(name, path)
    pick = hellaswag_selection if name == "hellaswag" and path.suffix != ".bin" else sampled_selection
    return [tasks[i] for i in pick(len(tasks), count)]


@dataclass
class TaskResult:
    benchmark: str
    n_tasks: int
    n_correct: int
    ctx: int
    outcomes: tuple[int, ...] = ()  # 1/0 per task, in evaluation order
    scores: tuple[tuple[float, ...], ...] = ()  # per task, each answer's score (mean log-prob)

    @property
    def accuracy(self) -> float:
        return self.n_correct / self.n_tasks if self.n_tasks else float("nan")

    @property
    def stderr(self) -> float:
        """Standard error of the accuracy, sqrt(p(1-p)/(n-1)) as the CLI prints it."""
        p, n = self.accuracy, self.n_tasks
        return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")

    def as_dict(self) -> dict:
        return {"benchmark": self.benchmark, "tasks": self.n_tasks, "correct": self.n_correct, "ctx": self.ctx,
                "accuracy_pct": 100 * self.accuracy, "stderr_pct": 100 * self.stderr,
                "outcomes": "".join(map(str, self.outcomes))}


class _LogProbs:
    """log-probabilities of chosen tokens from a block of logit rows (one normalizer per row)."""

    def __init__(self, rows: np.ndarray):
        self.rows = rows
        self.lse = log_sum_exp_rows(rows)

    def __call__(self, i: int, token: int) -> float:
        return float(self.rows[i, token]) - float(self.lse[i])


def _common_prefix(seqs: list[np.ndarray]) -> int:
    n = min(len(s) for s in seqs)
    for k in range(n):
        if any(s[k] != seqs[0][k] for s in seqs[1:]):
            return k
    return n


def choice_scores(scorer: SharedPrefixContext, task: ChoiceTask) -> list[float]:
    """Mean log-prob per token of each ending after `context + " "` (HellaSwag, multiple choice)."""
    model = scorer.model
    seqs = [model.tokenize(task.context + " " + e, add_special=True) for e in task.endings]
    cp = _common_prefix(seqs)
    if cp == 0 or any(len(s) == cp for s in seqs):
        raise SqueezeError(f"{task.source}: answers are empty or one answer is a prefix of all others")
    logprob = _LogProbs(scorer.decode(seqs, cp, all_logits=False, what=task.source))
    scores, r = [], 1
    for s in seqs:
        total = logprob(0, s[cp])
        for j in range(cp, len(s) - 1):
            total += logprob(r, s[j + 1])
            r += 1
        scores.append(total / (len(s) - cp))
    return scores


def winogrande_scores(scorer: SharedPrefixContext, task: WinograndeTask) -> list[np.float32]:
    """The two scores llama-perplexity --winogrande prints: the mean log-prob (float32, as the
    CLI keeps it) of the words after the blank, for each choice."""
    model = scorer.model
    seqs = [model.tokenize(task.first + c + task.second, add_special=True) for c in task.choices]
    n_base = [len(model.tokenize(task.first + c, add_special=True)) for c in task.choices]
    cp = _common_prefix(seqs)
    logprob = _LogProbs(scorer.decode(seqs, cp, all_logits=True, what=task.source))
    skip = all(len(s) - cp > WINOGRANDE_MIN_TRAILING for s in seqs)
    scores = []
    for s, seq in enumerate(seqs):
        base = n_base[s] if skip else cp
        last = 1 if len(seq) - base > 1 else 0
        # Row of the logits at position base-1, as the CLI indexes it (for the second sequence
        # it assumes base > cp, so without skipping it reads a row of the first sequence).
        li = base - cp if s == 0 else len(seqs[0]) - cp + base - cp
        total = 0.0
        for j in range(base - 1, len(seq) - 1 - last):
            total += logprob(li, seq[j + 1])
            li += 1
        count = len(seq) - base - last
        scores.append(np.float32(total) / np.float32(count) if count else np.float32("nan"))
    return scores


def run_benchmark(model: Model, name: str, tasks: list, n_ctx: int, threads: int | None = None,
                  flash_attn: bool | None = None) -> TaskResult:
    """Score `tasks` one decode each. `flash_attn` None keeps llama.cpp's default (on for the CPU
    backend); False gives scores that do not depend on how tasks are packed into a decode (the CPU
    flash-attention kernel accumulates in F16, so llama-perplexity's scores, which pack many
    tasks per decode, move with their neighbours: compare with its `-fa off`)."""
    max_seq = 2 if name == "winogrande" else max(4, max(len(t.endings) for t in tasks))
    outcomes, all_scores = [], []
    with SharedPrefixContext(model, n_ctx, max_seq, threads, flash_attn) as scorer, \
            bar(total=len(tasks), desc=f"{name} {model.path.stem}", unit="task") as progress:
        for task in tasks:
            if name == "winogrande":
                scores = winogrande_scores(scorer, task)
                outcomes.append(int((1 if scores[0] > scores[1] else 2) == task.answer))
            else:
                scores = choice_scores(scorer, task)
                outcomes.append(int(int(np.argmax(scores)) == task.gold))  # first maximum wins, as in the CLI
            all_scores.append(tuple(float(x) for x in scores))
            progress.update(1)
    return TaskResult(name, len(tasks), sum(outcomes), n_ctx, tuple(outcomes), tuple(all_scores))


def average_accuracy(results: list[dict]) -> float:
    """The card's Average column: the plain mean of the benchmarks' accuracies (percent)."""
    vals = [r["accuracy_pct"] for r in results if r["tasks"]]
    return sum(vals) / len(vals) if vals else float("nan")
