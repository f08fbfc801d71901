"""Bad state on disk (issue 12): truncated or damaged model, imatrix and base-distribution files
are one line naming the file and what to do; a damaged manifest is set aside, not trusted and
not deleted; SIGINT and SIGTERM during a step leave what SIGKILL leaves, and a rerun resumes."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.engine.model import Model
from pipeline.errors import DamagedFile, SqueezeError
from pipeline.formats.imatrix_file import Imatrix, ImatrixEntry, read_imatrix, write_imatrix
from pipeline.formats.model_info import read_model_info
from pipeline.fsutil import PARTIAL_MARK
from pipeline.measure.perplexity import load_base, save_base
from pipeline.run.runner import Interrupted, Runner, Step, signals_interrupt
from pipeline.stages.registry import build_steps, open_run
from tests.conftest import ROOT
from tests.tiny_gemma import build_tiny_gemma3, calibration_text


def small_gguf(path: Path) -> Path:
    """A two-tensor GGUF (header, metadata, aligned data), enough for the readers' checks."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("blk.0.attn_q.weight", np.ones((4, 32), np.float32))
    w.add_tensor("output.weight", np.ones((3, 32), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_imatrix() -> Imatrix:
    return Imatrix({"blk.0.ffn_down.weight": ImatrixEntry(np.arange(8, dtype=np.float32).reshape(1, 8),
                                                          np.array([4], dtype=np.int64))}, ["t.txt"], 1, 4)


def one_line_error(fn) -> str:
    with pytest.raises(SqueezeError) as exc:
        fn()
    text = str(exc.value)
    assert "\n" not in text
    return text


# ---- GGUF files: gguf-py's reader and the engine's loader ------------------------------------

def test_truncated_gguf_read_with_gguf_py_is_one_line(tmp_path):
    path = small_gguf(tmp_path / "m.gguf")
    data = path.read_bytes()
    ends = max(t.data_offset + t.n_bytes for t in gguf.GGUFReader(str(path)).tensors)
    path.write_bytes(data[:ends - 10])
    assert one_line_error(lambda: read_model_info(path)) == (
        f"{path}: truncated GGUF file ({ends - 10} bytes; its tensors need {ends}); delete it and rerun")
    path.write_bytes(data[:30])  # inside the metadata
    assert one_line_error(lambda: read_model_info(path)) == (
        f"{path}: truncated or damaged GGUF file (its header does not fit in its 30 bytes); delete it and rerun")
    path.write_bytes(b"")
    assert one_line_error(lambda: read_model_info(path)) == f"{path}: empty GGUF file (0 bytes); delete it and rerun"
    path.write_bytes(b"<html>rate limited</html>")
    assert one_line_error(lambda: read_model_info(path)) == (
        f"{path}: not a GGUF file (it starts with b'<htm', not b'GGUF'); delete it and rerun")


def test_every_cut_of_a_gguf_is_one_line_or_reads_whole(tmp_path):
    full = small_gguf(tmp_path / "m.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    for n in range(0, len(full), 3):
        cut.write_bytes(full[:n])
        try:
            info = read_model_info(cut)
        except DamagedFile as exc:
            assert "\n" not in str(exc) and str(exc).startswith(f"{cut}: ")
        else:  # only a cut inside the last tensor's trailing padding still holds every tensor
            assert n >= len(full) - 32 and len(info.tensors) == 2


def test_the_engine_explains_a_truncated_model(tiny_base, tmp_path):
    cut = tmp_path / "cut.gguf"
    data = tiny_base.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    text = one_line_error(lambda: Model(cut))
    assert text.startswith(f"{cut}: truncated GGUF file ({len(data) // 2} bytes; its tensors need ")
    assert text.endswith("); delete it and rerun")
    cut.write_bytes(b"GGUF" + b"\xff" * 64)
    assert one_line_error(lambda: Model(cut)) == (
        f"{cut}: damaged GGUF file (GGUF version 4294967295; llama.cpp reads versions 2 and 3); delete it and rerun")


# ---- imatrix files, GGUF and legacy ----------------------------------------------------------

def test_damaged_imatrix_through_the_cli_is_one_error_line(tmp_path):
    path = tmp_path / "imatrix.gguf"
    write_imatrix(path, tiny_imatrix())
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    out = CliRunner().invoke(main, ["imatrix-stats", str(path), "--out", str(tmp_path / "stats")])
    assert out.exit_code == 1
    assert out.output.startswith(f"Error: {path}: truncated ")
    assert out.output.endswith("; make it again\n") and out.output.count("\n") == 1
    legacy = tmp_path / "imatrix.dat"
    legacy.write_bytes(np.array([1, 5], "<i4").tobytes() + b"blk.0" + np.array([1, -3], "<i4").tobytes())
    out = CliRunner().invoke(main, ["imatrix-combine", str(tmp_path / "out.gguf"), str(legacy)])
    assert out.output == f"Error: {legacy}: damaged imatrix file (blk.0 has -3 values); make it again\n"


# ---- the base distribution scoring reads -----------------------------------------------------

def base_dist(n=2, ctx=16, k=4) -> dict:
    m = ctx - ctx // 2 - 1
    return {"tokens": np.zeros((n, ctx), np.int32), "first": np.array(ctx // 2), "n_vocab": np.array(100),
            "top_ids": np.zeros((n, m, k), np.int32), "top_logp": np.zeros((n, m, k), np.float32),
            "target_logp": np.zeros((n, m), np.float32)}


def test_truncated_base_distribution_is_one_line(tmp_path):
    path = tmp_path / "base.npz"
    save_base(path, base_dist())
    assert load_base(path)["top_ids"].shape == (2, 7, 4)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 40])
    assert one_line_error(lambda: load_base(path)) == (
        f"{path}: truncated or damaged base distribution file (File is not a zip file); delete it and rerun")


def test_base_distribution_with_arrays_that_do_not_fit_is_one_line(tmp_path):
    path = tmp_path / "base.npz"
    dist = base_dist()
    dist["target_logp"] = np.zeros((2, 5), np.float32)
    save_base(path, dist)
    assert one_line_error(lambda: load_base(path)) == (
        f"{path}: damaged base distribution file (target_logp of shape (2, 5), expected (2, 7) first); "
        f"delete it and rerun")


# ---- the runner: damaged manifest, the stage to force, interrupted steps ---------------------

def text_step(src: Path, dst: Path, stage="quantize", action=None) -> Step:
    def copy(io):
        io.out(dst).write_text(src.read_text().upper())
    return Step(f"{stage} {dst.stem}", stage, {"x": 1}, [src], [dst], action or copy, versions={"v": "1"})


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "in.txt").write_text("hello")
    return tmp_path


@pytest.mark.parametrize("content, problem", [
    ('{"schema": 1, "steps": {"quantize out": {"stage": "quan', "not valid JSON (Unterminated string starting at: "
                                                                "line 1 column 51 (char 50))"),
    ("[1, 2]", "not a squeeze manifest (no mapping of steps)"),
    ('{"schema": 7, "steps": {}}', "manifest schema 7, this squeeze reads 1"),
    (b"\xff\xfe\x00garbage", "not valid JSON ('utf-8' codec can't decode byte 0xff in position 0: invalid start byte)"),
])
def test_damaged_manifest_is_set_aside_and_every_step_runs_again(folder, content, problem):
    step = text_step(folder / "in.txt", folder / "out.txt")
    Runner(folder, echo=lambda line: None).run([step])
    manifest = folder / "manifest.json"
    (manifest.write_bytes if isinstance(content, bytes) else manifest.write_text)(content)
    lines = []
    counts = Runner(folder, echo=lines.append).run([step])
    aside = [p for p in folder.iterdir() if p.name.startswith("manifest.json.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == (content if isinstance(content, bytes) else content.encode())
    assert lines[:2] == [f"{manifest}: {problem}; set aside as {aside[0].name}, and every step it cannot vouch "
                         f"for runs again", "quantize out: run, no previous result"]
    assert counts == {"ran": 1, "skipped": 0}
    assert "quantize out" in json.loads(manifest.read_text())["steps"]
    assert Runner(folder, echo=lines.append).run([step]) == {"ran": 0, "skipped": 1}


def run_then_damage_one_record(folder: Path) -> tuple[Step, Step, dict]:
    """Two steps run, then the manifest's record of the second damaged: a list where a mapping of
    hashes belongs. Returns the steps and the manifest's data as it was before the damage."""
    a = text_step(folder / "in.txt", folder / "a.txt", stage="convert")
    b = text_step(folder / "in.txt", folder / "b.txt", stage="score")
    Runner(folder, echo=lambda line: None).run([a, b])
    manifest = folder / "manifest.json"
    data = json.loads(manifest.read_text())
    damaged = json.loads(manifest.read_text())
    damaged["steps"]["score b"]["outputs"] = ["b.txt"]
    manifest.write_text(json.dumps(damaged))
    return a, b, data


def test_a_damaged_step_record_is_dropped_and_the_others_kept(folder):
    a, b, _ = run_then_damage_one_record(folder)
    manifest = folder / "manifest.json"
    lines = []
    Runner(folder, echo=lines.append).run([a, b])
    aside = next(p.name for p in folder.iterdir() if p.name.startswith("manifest.json.corrupt-"))
    assert lines == [f"{manifest}: step record 'score b' damaged; set aside as {aside}; 1 readable step records "
                     f"kept, and every step it cannot vouch for runs again",
                     "convert a: up to date", "score b: run, no previous result", lines[-1]]


def test_status_reports_a_damaged_manifest_and_leaves_it_in_place(folder):
    a, b, data = run_then_damage_one_record(folder)
    manifest = folder / "manifest.json"
    damaged = manifest.read_bytes()
    before = sorted(p.name for p in folder.iterdir())
    lines = []
    verdicts = Runner(folder, echo=lines.append, read_only=True).status([a, b])
    assert lines == [f"{manifest}: step record 'score b' damaged; left in place (`squeeze run` sets it aside); "
                     f"1 readable step records used, and every step it cannot vouch for shows as stale or missing"]
    assert [(v.step.key, v.state) for v in verdicts] == [("convert a", "done"), ("score b", "missing")]
    assert manifest.read_bytes() == damaged and sorted(p.name for p in folder.iterdir()) == before
    # `run` is the one that sets it aside
    Runner(folder, echo=lambda line: None).run([a, b])
    assert [p.name for p in folder.iterdir() if p.name.startswith("manifest.json.corrupt-")]
    assert json.loads(manifest.read_text())["steps"]["score b"]["outputs"] == {"b.txt": {
        "size": 5, "sha256": data["steps"]["convert a"]["outputs"]["a.txt"]["sha256"]}}


def test_squeeze_status_on_a_damaged_manifest_warns_and_changes_nothing(base_f16, tmp_path):
    recipe = tmp_path / "model.yaml"
    recipe.write_text(f"model: {{source: {base_f16}}}\nvariants: {{Q8_0: Q8_0}}\n")
    results = tmp_path / "results"
    results.mkdir()
    damaged = b'{"schema": 1, "steps": {"convert": {"stage": "conv'
    (results / "manifest.json").write_bytes(damaged)
    out = CliRunner().invoke(main, ["status", str(recipe), "--results", str(results)])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].startswith(f"{results / 'manifest.json'}: not valid JSON (")
    assert lines[0].endswith("; left in place (`squeeze run` sets it aside), and every step it cannot vouch "
                             "for shows as stale or missing")
    assert lines[1:] and all(line.split()[-1] == "missing" for line in lines[1:])
    assert (results / "manifest.json").read_bytes() == damaged
    assert sorted(p.name for p in results.iterdir()) == ["manifest.json"]


def test_damaged_hash_cache_is_rebuilt_quietly(folder):
    step = text_step(folder / "in.txt", folder / "out.txt")
    Runner(folder, echo=lambda line: None).run([step])
    (folder / ".hashes.json").write_text('["not", "a", "mapping"]')
    lines = []
    assert Runner(folder, echo=lines.append).run([step]) == {"ran": 0, "skipped": 1}
    assert lines == ["quantize out: up to date"]


def test_a_damaged_file_the_manifest_vouches_for_names_the_stage_to_force(folder):
    im = folder / "imatrix.gguf"

    def calibrate(io):
        write_imatrix(io.out(im), tiny_imatrix())

    def statistics(io):
        io.out(folder / "stats.txt").write_text(str(len(read_imatrix(im).entries)))

    steps = [Step("imatrix", "imatrix", {}, [folder / "in.txt"], [im], calibrate),
             Step("statistics", "statistics", {}, [im], [folder / "stats.txt"], statistics)]
    Runner(folder, echo=lambda line: None).run(steps)
    # bytes damaged in place, size and time kept: the manifest's cached hash still vouches for it
    st = im.stat()
    with open(im, "r+b") as f:
        f.write(b"GGUX")
    os.utime(im, ns=(st.st_atime_ns, st.st_mtime_ns))
    err = one_line_error(lambda: Runner(folder, echo=lambda line: None).run(steps, force_stages={"statistics"}))
    assert err == f"{im}: not an imatrix file (neither GGUF nor llama.cpp's legacy .dat); rerun with --force imatrix"


def interrupting_step(folder: Path, signum: int, then=None) -> Step:
    """A step that has half written its output when the signal comes (sent to this process)."""
    out = folder / "out.txt"

    def action(io):
        io.out(out).write_text("half")
        try:
            os.kill(os.getpid(), signum)
        finally:
            if then:
                then()
    return Step("quantize out", "quantize", {}, [folder / "in.txt"], [out], action)


def assert_clean_after_interrupt(folder: Path, key: str) -> None:
    assert not [p for p in folder.rglob(f"*{PARTIAL_MARK}*")], "a temporary output was left"
    assert not (folder / "out.txt").exists()
    assert key not in json.loads((folder / "manifest.json").read_text())["steps"]
    fd = os.open(folder / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the lock was not released
    finally:
        os.close(fd)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_step_unwinds_like_an_error(folder, signum):
    before = signal.getsignal(signum)
    with pytest.raises(Interrupted) as exc, signals_interrupt():
        Runner(folder, echo=lambda line: None).run([interrupting_step(folder, signum)])
    assert signal.getsignal(signum) is before  # the library gives the handlers back
    assert (exc.value.step, exc.value.exit_code) == ("quantize out", 128 + signum)
    assert str(exc.value) == f"Interrupted ({signal.Signals(signum).name}) during quantize out; rerun to resume"
    assert_clean_after_interrupt(folder, "quantize out")
    assert Runner(folder, echo=lambda line: None).run([text_step(folder / "in.txt", folder / "out.txt")])["ran"] == 1


def test_a_second_signal_during_cleanup_does_not_cut_it_short(folder):
    cleaned = []

    def cleanup():  # runs while the first Interrupted unwinds
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        cleaned.append(True)
    with pytest.raises(Interrupted) as exc, signals_interrupt():
        Runner(folder, echo=lambda line: None).run([interrupting_step(folder, signal.SIGINT, then=cleanup)])
    assert cleaned == [True] and exc.value.signum == signal.SIGINT
    assert_clean_after_interrupt(folder, "quantize out")


# ---- the real command in a subprocess, interrupted inside a step -----------------------------

@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random Gemma 3 converted to an F16 GGUF by the convert stage."""
    folder = tmp_path_factory.mktemp("tiny")
    hf = build_tiny_gemma3(folder / "tiny-gemma3", calibration_text(), n_layers=2)
    recipe = folder / "convert.yaml"
    recipe.write_text(f"model: {{source: {hf}}}\nvariants: {{Q8_0: Q8_0}}\n")
    ctx = open_run(recipe, folder / "results")
    Runner(ctx.folder, echo=lambda line: None).run([s for s in build_steps(ctx) if s.stage == "convert"])
    return ctx.base_path


def squeeze_popen(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def start_blocked_in_imatrix(tiny_base: Path, folder: Path) -> tuple[Path, Path, subprocess.Popen]:
    """`squeeze run` whose calibration text is a FIFO nobody writes: the imatrix step is sure to
    be running (blocked reading it) when the signal comes."""
    calib = folder / "calib.txt"
    os.mkfifo(calib)
    recipe = folder / "tiny.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        model: {{source: {tiny_base}}}
        calibration: {{datasets: [calib.txt], ctx: 128, chunks: 2}}
        variants: {{Q8_0: Q8_0}}
        score: {{ctx: 128, chunks: 2}}
        """))
    results = folder / "results"
    proc = squeeze_popen("run", str(recipe), "--results", str(results))
    seen = []
    for line in proc.stdout:
        seen.append(line.rstrip("\n"))
        if line.startswith("imatrix: "):
            break
    assert seen[-1:] == ["imatrix: run, no previous result"], seen
    return recipe, results, proc


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_squeeze_run_interrupted_in_a_step_exits_clean_and_resumes(tiny_base, tmp_path, signum):
    recipe, results, proc = start_blocked_in_imatrix(tiny_base, tmp_path)
    proc.send_signal(signum)
    if signum == signal.SIGINT:
        proc.send_signal(signal.SIGTERM)  # impatient: a second signal while it cleans up
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum
    assert err == f"Interrupted ({signal.Signals(signum).name}) during imatrix; rerun to resume\n"
    assert not [p for p in results.rglob(f"*{PARTIAL_MARK}*")]
    assert not (results / "imatrix.gguf").exists()
    steps = json.loads((results / "manifest.json").read_text())["steps"]
    assert list(steps) == ["convert"]
    # the calibration text arrives; the rerun resumes after the finished convert step
    (tmp_path / "calib.txt").unlink()
    (tmp_path / "calib.txt").write_text(calibration_text(60_000))
    again = subprocess.run([sys.executable, "-m", "pipeline", "run", str(recipe), "--results", str(results)],
                           cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr
    lines = again.stdout.splitlines()
    assert lines[:2] == ["convert: up to date", "imatrix: run, no previous result"]
    assert (results / "scores.md").exists()
