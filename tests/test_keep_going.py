"""`squeeze run --keep-going` on a tiny random Gemma 3: a variant that llama.cpp refuses to
quantize (Q2_K_S without an importance matrix: llama_model_quantize throws "this quantization
requires an imatrix!") is reported in the log, in `squeeze status` and in scores.md; the other
variants are built, scored and reported; the exit status is non-zero. Without --keep-going the
same failure stops the run as before."""

from __future__ import annotations

import json
import textwrap

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.run.runner import Runner, Step

RECIPE = """\
model: {{source: {hf}, base_type: F16}}
variants:
  Q8_0: Q8_0
  Q4_0: Q4_0
  broken: {broken}
score: {{ctx: 128, chunks: 2}}
"""
REFUSED = "quantizing base-f16.gguf to Q2_K_S failed (llama_model_quantize returned 1)"


# ---- the scheduling, on small synthetic steps ------------------------------------------------
def upper(src, dst, stage, fail=False) -> Step:
    def action(io):
        io.out(dst).write_text(src.read_text().upper())
        if fail:
            raise ValueError("bad rows")
    return Step(f"{stage} {dst.stem}", stage, {}, [src], [dst], action)


def test_keep_going_skips_only_what_needs_the_failed_step(tmp_path):
    (tmp_path / "in.txt").write_text("x")
    steps = [upper(tmp_path / "in.txt", tmp_path / "a.txt", "quantize", fail=True),
             upper(tmp_path / "in.txt", tmp_path / "b.txt", "quantize"),
             upper(tmp_path / "a.txt", tmp_path / "a2.txt", "score"),
             upper(tmp_path / "a2.txt", tmp_path / "a3.txt", "report"),
             upper(tmp_path / "b.txt", tmp_path / "b2.txt", "score")]
    lines = []
    counts = Runner(tmp_path, echo=lines.append).run(steps, keep_going=True)
    assert counts == {"ran": 2, "skipped": 0, "failed": {"quantize a": "ValueError: bad rows"},
                      "blocked": {"score a2": "quantize a", "report a3": "quantize a"}}
    assert [line for line in lines if "done in" not in line] == [
        "quantize a: run, no previous result", "quantize a: failed, ValueError: bad rows",
        "score a2: skipped, blocked by quantize a (failed)", "report a3: skipped, blocked by quantize a (failed)",
        "quantize b: run, no previous result", "score b2: run, no previous result"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hashes.json", ".lock", "b.txt", "b2.txt", "in.txt",
                                                        "manifest.json"]
    assert [(v.state, v.reason) for v in Runner(tmp_path).status(steps)][:3] == [
        ("failed", "ValueError: bad rows"), ("done", ""), ("missing", "no previous result")]
    with pytest.raises(ValueError):  # without keep_going: the first failure stops the run
        Runner(tmp_path, echo=lines.append).run(steps)


# ---- a real failure of llama.cpp ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny_gemma import build_tiny_gemma3, calibration_text

    folder = tmp_path_factory.mktemp("keep-going")
    hf = build_tiny_gemma3(folder / "tiny-gemma3", calibration_text(), n_layers=2)
    recipe = folder / "tiny-keep-going.yaml"
    recipe.write_text(textwrap.dedent(RECIPE.format(hf=hf, broken="Q2_K_S")))
    return recipe, folder / "results"


def squeeze(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def lines_of(output: str) -> dict[str, str]:
    """step key -> the last thing the log says of it ('failed, ...', 'done in ...'); the closing
    'report: <path of scores.md>' line is not the report step's."""
    out = {}
    for line in output.splitlines():
        key, sep, what = line.partition(": ")
        if sep and not what.endswith("scores.md"):
            out[key] = what
    return out


@pytest.fixture(scope="module")
def kept_going(tiny):
    recipe, results = tiny
    return squeeze("run", recipe, "--results", results, "--keep-going")


@pytest.mark.slow
def test_the_failed_variant_is_reported_and_the_others_finish(tiny, kept_going):
    recipe, results = tiny
    out = kept_going
    assert out.exit_code == 1, out.output
    log = lines_of(out.output)
    assert log["quantize broken"].startswith(f"failed, {REFUSED}")
    assert log["score broken"] == "skipped, blocked by quantize broken (failed)"
    for key in ("quantize Q8_0", "quantize Q4_0", "score Q8_0", "score Q4_0", "report"):
        assert log[key].startswith("done in"), key
    last = out.output.strip().splitlines()[-1]
    assert last.startswith(f"Error: 1 step failed: quantize broken ({REFUSED}")
    assert last.endswith("; 1 skipped as blocked")
    assert not (results / "variants" / "broken.gguf").exists()
    assert not list(results.rglob("*.partial-*"))

    table = (results / "scores.md").read_text()
    assert "| Q8_0 " in table and "| Q4_0 " in table and "| broken " not in table
    assert "## Failed variants" in table
    assert f"- broken: quantize broken failed: {REFUSED}" in table
    manifest = json.loads((results / "manifest.json").read_text())
    assert manifest["failures"]["quantize broken"].startswith(REFUSED)
    reason = manifest["failures"]["quantize broken"]
    assert manifest["steps"]["report"]["extra"]["failed"] == {"broken": f"quantize broken failed: {reason}"}


@pytest.mark.slow
def test_status_shows_the_failure_and_what_waits_on_it(tiny, kept_going):
    recipe, results = tiny
    out = squeeze("status", recipe, "--results", results)
    assert out.exit_code == 0, out.output
    rows = {line[:30].strip(): line[30:].strip() for line in out.output.splitlines()}
    assert rows["quantize broken"].startswith(f"failed ({REFUSED}")
    assert rows["score broken"] == "missing"
    assert rows["quantize Q8_0"] == "done" and rows["score Q4_0"] == "done"
    assert rows["report"].startswith("stale")  # made without the failed variant


@pytest.mark.slow
def test_without_keep_going_the_failure_stops_the_run(tiny, kept_going):
    recipe, results = tiny
    out = squeeze("run", recipe, "--results", results)
    assert out.exit_code == 1
    lines = out.output.strip().splitlines()
    assert "quantize broken: run, it failed last time" in lines
    assert lines[-1].startswith(f"Error: {REFUSED}")
    assert not any(line.startswith(("score ", "report")) for line in lines), out.output


@pytest.mark.slow
def test_a_fixed_variant_clears_its_failure(tiny, kept_going):
    recipe, results = tiny
    recipe.write_text(recipe.read_text().replace("broken: Q2_K_S", "broken: Q2_K"))
    out = squeeze("run", recipe, "--results", results, "--keep-going")
    assert out.exit_code == 0, out.output
    log = lines_of(out.output)
    assert log["quantize broken"].startswith("done in") and log["score broken"].startswith("done in")
    assert log["score Q8_0"] == "up to date"
    manifest = json.loads((results / "manifest.json").read_text())
    assert "failures" not in manifest
    table = (results / "scores.md").read_text()
    assert "| broken " in table and "Failed variants" not in table
    status = squeeze("status", recipe, "--results", results).output
    assert all(line.split()[-1] == "done" for line in status.splitlines()), status
