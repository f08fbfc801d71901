"""Task benchmark data in the formats llama-perplexity reads, and converters from the originals.

- HellaSwag: 6 lines per task (context, gold index 0-3, four endings), `--hellaswag`.
- WinoGrande: CSV `index,sentence,choice1,choice2,answer`, the blank marked `_`, `--winogrande`.
- Multiple choice (`--multiple-choice -bf file.bin`): llama.cpp's binary format, little endian:
  u32 n_task, u32 byte offset of each task, then per task: string question, answers mc1,
  answers mc2; string = u32 length + UTF-8 bytes; answers = u32 n, n strings, n int32 labels.
  ARC (JSONL), MMLU (CSV per subject) and TruthfulQA (mc_task.json) are converted into it, so
  the CLI can be run on exactly the questions squeeze scores.

Task selection reproduces the CLI's: it draws from std::mt19937 seeded with 1 (HellaSwag with
std::uniform_int_distribution as libstdc++ implements it, the others with a float scaling), so
`--hellaswag-tasks N` etc. on the same file picks the same tasks in the same order.
"""

from __future__ import annotations

import csv
import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import SqueezeError, did_you_mean

# Benchmark name -> the dataset name it is read from (pipeline.sources.datasets.KNOWN).
BENCHMARKS = {
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "arc-easy": "arc-easy",
    "arc-challenge": "arc-challenge",
    "mmlu": "mmlu",
    "truthfulqa": "truthfulqa",
}
LABELS = {"hellaswag": "HellaSwag", "winogrande": "WinoGrande", "arc-easy": "ARC-Easy",
          "arc-challenge": "ARC-Challenge", "mmlu": "MMLU", "truthfulqa": "TruthfulQA"}



def check_benchmark(name: str, where: str = "") -> None:
    if name not in BENCHMARKS:
        raise SqueezeError(f"{where}unknown benchmark '{name}'{did_you_mean(name, BENCHMARKS)} "
                           f"(known: {', '.join(BENCHMARKS)})")


# Question layout for the converted sets: the answer is appended after one space, as the CLI does.
QUESTION_TEMPLATE = "Question: {question}\nAnswer:"
MAX_ANSWERS = 100  # the CLI rejects more


@dataclass(frozen=True)
class ChoiceTask:
    """One multiple-choice task: `context + " " + ending` is scored for every ending."""

    context: str
    endings: tuple[str, ...]
    gold: int  # index of the correct ending
    source: str = ""  # file:line or file#task, for messages


@dataclass(frozen=True)
class WinograndeTask:
    first: str  # sentence before the blank
    second: str  # sentence after the blank
    choices: tuple[str, str]
    answer: int  # 1 or 2
    source: str = ""


# ---- std::mt19937 and the CLI's task sampling -----------------------------------------------

class MT19937:
    """The 32-bit Mersenne Twister as std::mt19937 defines it (seed by the integer recurrence)."""

    def __init__(self, seed: int = 5489):
        self.mt = [0] * 624
        self.mt[0] = seed & 0xFFFFFFFF
        for i in range(1, 624):
            prev = self.mt[i - 1]
            self.mt[i] = (1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF
        self.index = 624

    def _twist(self) -> None:
        mt = self.mt
        for i in range(624):
            y = (mt[i] & 0x80000000) | (mt[(i + 1) % 624] & 0x7FFFFFFF)
            v = mt[(i + 397) % 624] ^ (y >> 1)
            if y & 1:
                v ^= 0x9908B0DF
            mt[i] = v
        self.index = 0

    def __call__(self) -> int:
        if self.index >= 624:
            self._twist()
        y = self.mt[self.index]
        self.index += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        y ^= y >> 18
        return y & 0xFFFFFFFF


def _uniform_below(rng: MT19937, n: int) -> int:
    """std::uniform_int_distribution<size_t>(0, n-1)(rng) as libstdc++ (GCC 11+) computes it for
    a 32-bit engine: Lemire's multiply-and-shift with rejection."""
    product = rng() * n
    low = product & 0xFFFFFFFF
    if low < n:
        threshold = (0x100000000 - n) % n
        while low < threshold:
            product = rng() * n
            low = product & 0xFFFFFFFF
    return product >> 32


def hellaswag_selection(n_total: int, n_tasks: int) -> list[int]:
    """Indices llama-perplexity --hellaswag --hellaswag-tasks n_tasks evaluates, in order (it
    always shuffles, drawing without replacement)."""
    n_tasks = min(n_tasks, n_total) if n_tasks > 0 else n_total
    rng = MT19937(1)
    remaining = list(range(n_total))
    return [remaining.pop(_uniform_below(rng, len(remaining))) for _ in range(n_tasks)]


def sampled_selection(n_total: int, n_tasks: int) -> list[int]:
    """Indices --winogrande-tasks / --multiple-choice-tasks evaluate: all in file order when
    n_tasks is 0 or covers the file, else random draws with swap-remove, scaled in float32."""
    if n_tasks <= 0 or n_tasks >= n_total:
        return list(range(n_total))
    rng = MT19937(1)
    scale = np.float32(1.0) / (np.float32(1.0) + np.float32(4294967295))
    aux = list(range(n_total))
    out = []
    for _ in range(n_tasks):
        j = int(np.float32(np.float32(scale * np.float32(rng())) * np.float32(len(aux))))
        out.append(aux[j])
        aux[j] = aux[-1]
        aux.pop()
    return out


# ---- readers --------------------------------------------------------------------------------

def _read_text(path: Path) -> str:
    try:
        return Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise SqueezeError(f"{path}: task file not found") from None
    except UnicodeDecodeError as exc:
        raise SqueezeError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def read_hellaswag(path: Path) -> list[ChoiceTask]:
    lines = _read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline (std::getline reads no empty last line)
    if len(lines) % 6:
        raise SqueezeError(f"{path}:{len(lines)}: HellaSwag text needs 6 lines per task (context, gold "
                           f"index, 4 endings); the file has {len(lines)} lines")
    tasks = []
    for t in range(len(lines) // 6):
        gold = lines[6 * t + 1].strip()
        if gold not in ("0", "1", "2", "3"):
            raise SqueezeError(f"{path}:{6 * t + 2}: expected the gold ending index 0-3 (HellaSwag: 6 lines "
                               f"per task), got {lines[6 * t + 1][:40]!r}")
        tasks.append(ChoiceTask(lines[6 * t], tuple(lines[6 * t + 2: 6 * t + 6]), int(gold), f"{path}:{6 * t + 1}"))
    return tasks


def _split_winogrande_line(line: str) -> list[int] | None:
    """Positions of the first 4 commas outside double quotes (the CLI's parser)."""
    commas, quoted = [], False
    for i, ch in enumerate(line):
        if quoted:
            quoted = ch != '"'
        elif ch == ",":
            commas.append(i)
            if len(commas) == 4:
                return commas
        elif ch == '"':
            quoted = True
    return None


def read_winogrande(path: Path) -> list[WinograndeTask]:
    """WinoGrande CSV as the CLI parses it. Blank lines are skipped (the published file ends in
    one); any other line that does not parse is an error, with its line number."""
    tasks = []
    for n, line in enumerate(_read_text(path).split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        c = _split_winogrande_line(line)
        if c is None:
            raise SqueezeError(f"{path}:{n}: expected index,sentence,choice1,choice2,answer "
                               f"(WinoGrande CSV, 4 commas outside quotes)")
        sentence = (line[c[0] + 2: c[1] - 1] if line[c[0] + 1] == '"' else line[c[0] + 1: c[1]])
        choice1, choice2 = line[c[1] + 1: c[2]], line[c[2] + 1: c[3]]
        answer = line[c[3] + 1:].strip()
        if "_" not in sentence:
            raise SqueezeError(f"{path}:{n}: the sentence has no '_' marking the blank")
        if answer not in ("1", "2"):
            raise SqueezeError(f"{path}:{n}: expected answer 1 or 2, got {answer[:20]!r}")
        where = sentence.index("_")
        tasks.append(WinograndeTask(sentence[:where], sentence[where + 1:], (choice1, choice2), int(answer),
                                    f"{path}:{n}"))
    if not tasks:
        raise SqueezeError(f"{path}: no WinoGrande tasks")
    return tasks


def read_multiple_choice(path: Path) -> list[ChoiceTask]:
    """llama.cpp's multiple-choice binary (only mc1 is scored, as the CLI does)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise SqueezeError(f"{path}: task file not found") from None

    def bad(what: str) -> SqueezeError:
        return SqueezeError(f"{path}: not a llama.cpp multiple-choice file: {what}")

    if len(data) < 4:
        raise bad("shorter than its task count")
    (n_task,) = struct.unpack_from("<I", data, 0)
    if n_task == 0 or 4 + 4 * n_task > len(data):
        raise bad(f"task count {n_task} does not fit a file of {len(data)} bytes")
    positions = struct.unpack_from(f"<{n_task}I", data, 4)
    tasks = []
    for t, pos in enumerate(positions):
        try:
            question, pos = _unpack_string(data, pos)
            mc1, labels, pos = _unpack_answers(data, pos)
            _unpack_answers(data, pos)  # mc2, read for validation only
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            raise bad(f"task {t} at byte {positions[t]}: {exc}") from None
        if not question or not mc1 or any(not a for a in mc1):
            raise bad(f"task {t} has an empty question or answer")
        if labels.count(1) < 1:
            raise bad(f"task {t} has no answer labelled correct")
        tasks.append(ChoiceTask(question, tuple(mc1), labels.index(1), f"{path}#task{t}"))
    return tasks


def _unpack_string(data: bytes, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<I", data, pos)
    if pos + 4 + n > len(data):
        raise ValueError(f"string of {n} bytes runs past the end")
    return data[pos + 4: pos + 4 + n].decode("utf-8"), pos + 4 + n


def _unpack_answers(data: bytes, pos: int) -> tuple[list[str], list[int], int]:
    (n,) = struct.unpack_from("<I", data, pos)
    if n > MAX_ANSWERS:
        raise ValueError(f"{n} answers (at most {MAX_ANSWERS})")
    pos += 4
    answers = []
    for _ in range(n):
        a, pos = _unpack_string(data, pos)
        answers.append(a)
    labels = list(struct.unpack_from(f"<{n}i", data, pos))
    return answers, labels, pos + 4 * n


# ---- converters from the original files -----------------------------------------------------

def write_multiple_choice(tasks: list[ChoiceTask], path: Path) -> None:
    """Write tasks in llama.cpp's binary format (mc2 left empty)."""
    def s(text: str) -> bytes:
        b = text.encode("utf-8")
        return struct.pack("<I", len(b)) + b

    records = []
    for t in tasks:
        labels = [1 if i == t.gold else 0 for i in range(len(t.endings))]
        records.append(s(t.context) + struct.pack("<I", len(t.endings)) + b"".join(s(e) for e in t.endings)
                       + struct.pack(f"<{len(labels)}i", *labels) + struct.pack("<I", 0))
    offset = 4 + 4 * len(records)
    positions = []
    for r in records:
        positions.append(offset)
        offset += len(r)
    with open(path, "wb") as f:
        f.write(struct.pack(f"<I{len(records)}I", len(records), *positions))
        for r in records:
            f.write(r)


def read_arc_jsonl(path: Path) -> list[ChoiceTask]:
    tasks = []
    for n, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            q = item["question"]
            labels = [c["label"] for c in q["choices"]]
            gold = labels.index(item["answerKey"])
            tasks.append(ChoiceTask(QUESTION_TEMPLATE.format(question=q["stem"].strip()),
                                    tuple(c["text"].strip() for c in q["choices"]), gold, f"{path}:{n}"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise SqueezeError(f"{path}:{n}: expected an ARC JSON line with question.stem, question.choices "
                               f"[{{text, label}}] and answerKey") from None
    return tasks


def read_mmlu_folder(folder: Path) -> list[ChoiceTask]:
    """Every `*.csv` of an MMLU split (question,A,B,C,D,answer letter; no header), by file name."""
    files = sorted(Path(folder).glob("*.csv"))
    if not files:
        raise SqueezeError(f"{folder}: no MMLU *.csv files")
    tasks = []
    for f in files:
        for n, row in enumerate(csv.reader(io.StringIO(_read_text(f), newline="")), start=1):
            if not row:
                continue
            if len(row) != 6 or row[5].strip() not in "ABCD" or not row[5].strip():
                raise SqueezeError(f"{f}:{n}: expected question,A,B,C,D,answer (answer one of A-D)")
            tasks.append(ChoiceTask(QUESTION_TEMPLATE.format(question=row[0].strip()),
                                    tuple(x.strip() for x in row[1:5]), "ABCD".index(row[5].strip()), f"{f}:{n}"))
    return tasks


def read_truthfulqa_json(path: Path) -> list[ChoiceTask]:
    try:
        items = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise SqueezeError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    tasks = []
    for i, item in enumerate(items if isinstance(items, list) else []):
        targets = item.get("mc1_targets") if isinstance(item, dict) else None
        if not isinstance(targets, dict) or not targets or list(targets.values()).count(1) != 1:
            raise SqueezeError(f"{path}: item {i}: expected question and mc1_targets {{answer: 0/1}} with one 1")
        answers = tuple(targets)
        tasks.append(ChoiceTask(QUESTION_TEMPLATE.format(question=item["question"].strip()), answers,
                                list(targets.values()).index(1), f"{path}#item{i}"))
    if not tasks:
        raise SqueezeError(f"{path}: expected a JSON list of TruthfulQA items")
    return tasks


def read_choice_tasks(kind: str, path: Path) -> list[ChoiceTask]:
    """Tasks of a multiple-choice benchmark from its original file (or an llama.cpp .bin)."""
    path = Path(path)
    if path.suffix == ".bin":
        return read_multiple_choice(path)
    if kind == "hellaswag":
        return read_hellaswag(path)
    if kind.startswith("arc"):
        return read_arc_jsonl(path)
    if kind == "mmlu":
        return read_mmlu_folder(path)
    if kind == "truthfulqa":
        return read_truthfulqa_json(path)
    raise SqueezeError(f"unknown multiple-choice benchmark '{kind}'")
