"""Task benchmarks: data formats, the CLI's task selection, and accuracy equal to
llama-perplexity's on the same tasks (per task, not just in total)."""

from __future__ import annotations

import re
import struct
import subprocess

import pytest

from pipeline.engine.model import Model
from pipeline.errors import SqueezeError
from pipeline.formats.task_data import (MT19937, ChoiceTask, hellaswag_selection, read_arc_jsonl, read_hellaswag,
                                        read_mmlu_folder, read_multiple_choice, read_truthfulqa_json, read_winogrande,
                                        sampled_selection, write_multiple_choice)
from pipeline.measure import tasks
from pipeline.sources.datasets import resolve_dataset

TASK_CTX = 768


# ---- selection (constants printed by a 10-line C++ program built with g++ 12 / libstdc++) -----

def test_mt19937_matches_the_standard():
    rng = MT19937()
    for _ in range(9999):
        rng()
    assert rng() == 4123659995  # the C++ standard's required 10000th output of default-seeded mt19937


def test_hellaswag_selection_is_the_clis():
    # std::uniform_int_distribution<size_t> over the remaining tasks, erased after each draw
    assert hellaswag_selection(10042, 8) == [4187, 10013, 7233, 9363, 1, 1286, 3036, 10032]


def test_winogrande_and_multiple_choice_selection_is_the_clis():
    assert sampled_selection(1267, 8) == [528, 1262, 911, 1178, 0, 161, 381, 1258]
    assert sampled_selection(10, 0) == list(range(10))  # 0 or >= all: every task in file order
    assert sampled_selection(10, 10) == list(range(10))


# ---- formats -----------------------------------------------------------------------------------

def test_original_task_files_convert(tmp_path):
    arc = read_arc_jsonl(resolve_dataset("arc-easy"))
    assert len(arc) == 570 and len(read_arc_jsonl(resolve_dataset("arc-challenge"))) == 299
    assert arc[0].context == "Question: Which technology was developed most recently?\nAnswer:"
    assert arc[0].endings[0] == "cellular telephone" and arc[0].gold == 0
    assert len(read_mmlu_folder(resolve_dataset("mmlu"))) == 1531
    tqa = read_truthfulqa_json(resolve_dataset("truthfulqa"))
    assert len(tqa) == 817 and tqa[0].endings[tqa[0].gold].startswith("Nothing in particular")
    assert len(read_hellaswag(resolve_dataset("hellaswag"))) == 10042
    assert len(read_winogrande(resolve_dataset("winogrande"))) == 1267
    path = tmp_path / "arc.bin"
    write_multiple_choice(arc[:20], path)
    assert read_multiple_choice(path) == [ChoiceTask(t.context, t.endings, t.gold, f"{path}#task{i}")
                                          for i, t in enumerate(arc[:20])]


def test_hellaswag_with_wrong_line_count_names_the_line(tmp_path):
    path = tmp_path / "hs.txt"
    path.write_text("ctx\n0\na\nb\nc\nd\nctx2\n")
    with pytest.raises(SqueezeError) as e:
        read_hellaswag(path)
    assert str(e.value) == (f"{path}:7: HellaSwag text needs 6 lines per task (context, gold index, "
                            f"4 endings); the file has 7 lines")
    path.write_text("ctx\n0\na\nb\nc\nd\nctx2\nfive\na\nb\nc\nd\n")
    with pytest.raises(SqueezeError) as e:
        read_hellaswag(path)
    assert str(e.value) == f"{path}:8: expected the gold ending index 0-3 (HellaSwag: 6 lines per task), got 'five'"


def test_winogrande_bad_line_names_the_line(tmp_path):
    path = tmp_path / "wg.csv"
    path.write_text('0,"A, quoted _ sentence.",x,y,1\n1,no commas here\n')
    with pytest.raises(SqueezeError) as e:
        read_winogrande(path)
    assert str(e.value) == (f"{path}:2: expected index,sentence,choice1,choice2,answer "
                            f"(WinoGrande CSV, 4 commas outside quotes)")
    path.write_text("0,A _ sentence.,x,y,3\n")
    with pytest.raises(SqueezeError) as e:
        read_winogrande(path)
    assert str(e.value) == f"{path}:1: expected answer 1 or 2, got '3'"
    path.write_text('0,"A, quoted _ sentence.",x,y,2\n\n')
    (task,) = read_winogrande(path)
    assert (task.first, task.second, task.choices, task.answer) == ("A, quoted ", " sentence.", ("x", "y"), 2)


def test_truncated_multiple_choice_file_is_refused(tmp_path):
    path = tmp_path / "mc.bin"
    write_multiple_choice([ChoiceTask("Q", ("a", "b"), 1)], path)
    path.write_bytes(path.read_bytes()[:-6])
    with pytest.raises(SqueezeError) as e:
        read_multiple_choice(path)
    assert str(e.value).startswith(f"{path}: not a llama.cpp multiple-choice file: task 0 at byte 8: ")
    path.write_bytes(struct.pack("<I", 5))
    with pytest.raises(SqueezeError) as e:
        read_multiple_choice(path)
    assert str(e.value) == f"{path}: not a llama.cpp multiple-choice file: task count 5 does not fit a file of 4 bytes"


def test_mmlu_row_with_bad_answer_names_file_and_line(tmp_path):
    (tmp_path / "x_val.csv").write_text("Q1,a,b,c,d,A\nQ2,a,b,c,d,E\n")
    with pytest.raises(SqueezeError) as e:
        read_mmlu_folder(tmp_path)
    assert str(e.value) == f"{tmp_path / 'x_val.csv'}:2: expected question,A,B,C,D,answer (answer one of A-D)"


# ---- against llama-perplexity ---------------------------------------------------------------

N_TASKS = 20  # per benchmark, the tasks the CLI's --*-tasks 20 picks


def _cli(tools, model, *args, ctx: int = TASK_CTX) -> str:
    out = subprocess.run([str(tools / "llama-perplexity"), "-m", str(model), "-c", str(ctx), *args],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout + out.stderr


def _outcomes_from_running_accuracy(lines: list[tuple[int, float]]) -> str:
    """Per-task 1/0 from the CLI's running accuracy (percent after task i, 8 decimals)."""
    outcomes, correct = [], 0
    for i, acc in lines:
        now = round(acc * i / 100)
        outcomes.append(str(now - correct))
        correct = now
    return "".join(outcomes)


@pytest.fixture(scope="module")
def model(source_gguf):
    with Model(source_gguf) as m:
        yield m


# Flash attention: llama.cpp's CPU kernel accumulates attention in F16, and the CLI packs up to
# 32 tasks into one decode, so with it on (the default) a task's score moves with the tasks packed
# beside it: on these 50 HellaSwag tasks one outcome differs from the same task decoded alone.
# With `-fa off` the CLI's scores do not depend on the packing, so both sides run without it here;
# the task logic (tokens, shared prefix, scored ranges, first maximum wins) is what is compared.

@pytest.mark.slow
@pytest.mark.reference
def test_hellaswag_equals_llama_perplexity(model, llama_tools, source_gguf):
    selected = tasks.load_selected("hellaswag", resolve_dataset("hellaswag"), N_TASKS)
    ours = tasks.run_benchmark(model, "hellaswag", selected, TASK_CTX, flash_attn=False)
    out = _cli(llama_tools, source_gguf, "--hellaswag", "--hellaswag-tasks", str(N_TASKS), "-fa", "off",
               "-f", str(resolve_dataset("hellaswag")))
    running = [(int(i), float(a)) for i, a in re.findall(r"^(\d+)\t([\d.]+)%\t\[", out, re.M)]
    assert len(running) == N_TASKS
    assert "".join(map(str, ours.outcomes)) == _outcomes_from_running_accuracy(running)


def _winogrande_tokens(model, task) -> int:
    seqs = [model.tokenize(task.first + c + task.second, add_special=True) for c in task.choices]
    prefix = tasks._common_prefix(seqs)
    return prefix + sum(len(s) - prefix for s in seqs)


@pytest.mark.slow
@pytest.mark.reference
def test_winogrande_equals_llama_perplexity(model, llama_tools, source_gguf):
    """Outcome per task, and the two scores the CLI prints per task."""
    selected = tasks.load_selected("winogrande", resolve_dataset("winogrande"), N_TASKS)
    ours = tasks.run_benchmark(model, "winogrande", selected, TASK_CTX)
    # -c such that the CLI's 4 x ctx cells hold one task but never two: one task per decode, as squeeze does
    need = [_winogrande_tokens(model, t) for t in selected]
    ctx = -(-max(need) // 4)
    assert 4 * ctx < min(a + b for a, b in zip(need, need[1:]))
    out = _cli(llama_tools, source_gguf, "--winogrande", "--winogrande-tasks", str(N_TASKS),
               "-f", str(resolve_dataset("winogrande")), ctx=ctx)
    rows = re.findall(r"^(\d+)\t[\d.]+\t\s*(-?[\d.]+)\s+(-?[\d.]+)\s+(\d)\s+(\d)$", out, re.M)
    assert len(rows) == N_TASKS
    assert "".join(map(str, ours.outcomes)) == "".join(str(int(r[3] == r[4])) for r in rows)
    diffs = sorted(abs(float(r[1 + j]) - ours.scores[i][j]) for i, r in enumerate(rows) for j in (0, 1))
    # The CLI normalizes each log-prob with a float32 sum of 262,144 exps (compute_logprobs), which
    # comes out ~2e-4 of itself low; squeeze sums in float64. Most scores agree to that; a few of
    # them (up to 0.16 on these tasks) move with the CLI's context size for a reason not yet found.
    assert diffs[len(diffs) // 2] < 5e-4, diffs


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.parametrize("bench", ["arc-easy", "arc-challenge", "mmlu", "truthfulqa"])
def test_multiple_choice_equals_llama_perplexity_on_the_converted_file(model, llama_tools, source_gguf, tmp_path,
                                                                       bench):
    """squeeze reads the original file; the CLI reads squeeze's conversion; same tasks picked."""
    selected = tasks.load_selected(bench, resolve_dataset(bench), N_TASKS)
    ours = tasks.run_benchmark(model, bench, selected, TASK_CTX, flash_attn=False)
    from pipeline.formats.task_data import read_choice_tasks

    path = tmp_path / f"{bench}.bin"
    write_multiple_choice(read_choice_tasks(bench, resolve_dataset(bench)), path)
    n_parallel = max(4, max(len(t.endings) for t in selected))  # the CLI needs a sequence per answer
    out = _cli(llama_tools, source_gguf, "--multiple-choice", "--multiple-choice-tasks", str(N_TASKS), "-bf", str(path),
               "-np", str(n_parallel), "-fa", "off")
    running = [(int(i), float(a)) for i, a in re.findall(r"^(\d+)\t([\d.]+)$", out, re.M)]
    assert len(running) == N_TASKS
    assert "".join(map(str, ours.outcomes)) == _outcomes_from_running_accuracy(running)


@pytest.mark.slow
def test_a_task_longer_than_the_context_is_named(model, tmp_path):
    task = ChoiceTask("word " * 200, ("a", "b"), 0, "long.bin#task0")
    with pytest.raises(SqueezeError) as e:
        tasks.run_benchmark(model, "arc-easy", [task], 32)
    assert str(e.value) == ("long.bin#task0: needs 204 tokens, more than the 128 of the task context "
                            "(4 sequences x ctx 32); raise score.tasks.ctx")
