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

import llama_cpp
import numpy as np

from pipeline.datasets import resolve_dataset
from pipeline.engine import ContextBase, Model
from pipeline.errors import SqueezeError, did_you_mean
from pipeline.perplexity import log_sum_exp_rows
from pipeline.progress import bar
from pipeline.task_data import (BENCHMARKS, LABELS, ChoiceTask, WinograndeTask, hellaswag_selection,  # noqa: F401
                                read_choice_tasks, read_winogrande, sampled_selection)

WINOGRANDE_MIN_TRAILING = 3  # k_min_trailing_ctx in the CLI


def check_benchmark(name: str, where: str = "") -> None:
    if name not in BENCHMARKS:
        raise SqueezeError(f"{where}unknown benchmark '{name}'{did_you_mean(name, BENCHMARKS)} "
                           f"(known: {', '.join(BENCHMARKS)})")


def load_selected(name: str, count: int, recipe_dir: Path | None = None, where: str = ""):
    """The tasks the CLI would evaluate with `--<benchmark>-tasks count` on the same file."""
    check_benchmark(name, where)
    path = resolve_dataset(BENCHMARKS[name], recipe_dir, where)
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


class SharedPrefixScorer(ContextBase):
    """A llama context that decodes one task at a time: a common prefix shared by up to
    `max_seq` sequences, then each sequence's own tokens."""

    def __init__(self, model: Model, ctx: int, max_seq: int, n_threads: int | None = None):
        # Like llama-perplexity's task modes: -c ctx with n_parallel sequences is a unified
        # cache of n_parallel x ctx cells, and a task fits when all its tokens fit in it.
        self.ctx = ctx
        self.n_ctx = ctx * max_seq
        self.max_seq = max_seq
        self._open(model, self.n_ctx, max_seq, n_threads, kv_unified=True, seq_ids_per_token=max_seq,
                   what=f"a task context of {self.n_ctx} tokens")

    def decode(self, seqs: list[np.ndarray], prefix: int, all_logits: bool, what: str) -> np.ndarray:
        """Logit rows in the CLI's order: the last prefix token, then per sequence its tokens from
        `prefix` on (all of them when `all_logits`, else all but the last)."""
        need = prefix + sum(len(s) - prefix for s in seqs)
        if need > self.n_ctx:
            raise SqueezeError(f"{what}: needs {need} tokens, more than the {self.n_ctx} of the task context "
                               f"({self.max_seq} sequences x ctx {self.ctx}); raise score.tasks.ctx")
        if len(seqs) > self.max_seq:
            raise SqueezeError(f"{what}: {len(seqs)} answers, more than the {self.max_seq} sequences of the context")
        b = self._batch
        k = 0

        def add(tok, pos, seq_ids, want):
            nonlocal k
            b.token[k] = int(tok)
            b.pos[k] = pos
            b.n_seq_id[k] = len(seq_ids)
            for j, s in enumerate(seq_ids):
                b.seq_id[k][j] = s
            b.logits[k] = want
            k += 1

        all_ids = list(range(len(seqs)))
        for i in range(prefix):
            add(seqs[0][i], i, all_ids, i == prefix - 1)
        for s, seq in enumerate(seqs):
            for i in range(prefix, len(seq)):
                add(seq[i], i, [s], all_logits or i < len(seq) - 1)
        b.n_tokens = k
        n_out = sum(int(b.logits[i] != 0) for i in range(k))
        self.clear()
        rc = llama_cpp.llama_decode(self._ctx, b)
        if rc != 0:
            raise SqueezeError(f"{self.model.path}: llama_decode failed with code {rc} on {what}")
        ptr = llama_cpp.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out * self.model.n_vocab,)).reshape(n_out, -1).copy()


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


def choice_scores(scorer: SharedPrefixScorer, task: ChoiceTask) -> list[float]:
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


def winogrande_choice(scorer: SharedPrefixScorer, task: WinograndeTask) -> int:
    """1 or 2: the choice whose continuation scores higher, with the CLI's exact token ranges."""
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
    return 1 if scores[0] > scores[1] else 2


def run_benchmark(model: Model, name: str, tasks: list, n_ctx: int, threads: int | None = None) -> TaskResult:
    max_seq = 2 if name == "winogrande" else max(4, max(len(t.endings) for t in tasks))
    outcomes = []
    with SharedPrefixScorer(model, n_ctx, max_seq, threads) as scorer, \
            bar(total=len(tasks), desc=f"{name} {model.path.stem}", unit="task") as progress:
        for task in tasks:
            if name == "winogrande":
                outcomes.append(int(winogrande_choice(scorer, task) == task.answer))
            else:
                scores = choice_scores(scorer, task)
                outcomes.append(int(int(np.argmax(scores)) == task.gold))  # first maximum wins, as in the CLI
            progress.update(1)
    return TaskResult(name, len(tasks), sum(outcomes), n_ctx, tuple(outcomes))


def average_accuracy(results: list[dict]) -> float:
    """The card's Average column: the plain mean of the benchmarks' accuracies (percent)."""
    vals = [r["accuracy_pct"] for r in results if r["tasks"]]
    return sum(vals) / len(vals) if vals else float("nan")


def write_cli_inputs(name: str, tasks: list, path: Path) -> None:
    """The selected tasks in the format llama-perplexity reads, for running the CLI on exactly
    these tasks (with all tasks of the file: then it evaluates each once, in any order)."""
    from pipeline.task_data import write_multiple_choice

    if name == "winogrande":
        lines = []
        for i, t in enumerate(tasks):
            sentence = f"{t.first}_{t.second}"
            sentence = f'"{sentence}"' if "," in sentence or '"' in sentence else sentence
            lines.append(f"{i},{sentence},{t.choices[0]},{t.choices[1]},{t.answer}")
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif name == "hellaswag" and Path(path).suffix != ".bin":
        out = []
        for t in tasks:
            out += [t.context, str(t.gold), *t.endings]
        Path(path).write_text("\n".join(out) + "\n", encoding="utf-8")
    else:
        write_multiple_choice(tasks, path)

