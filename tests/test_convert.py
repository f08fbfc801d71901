"""Hugging Face folder -> F16 GGUF with the pinned convert_hf_to_gguf.py, and the whole pipeline
(imatrix, quantize, score, report) on the model squeeze converted: a tiny random Gemma 3
checkpoint built here, with a sentencepiece tokenizer trained on a little text."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import SqueezeError
from pipeline.stages.registry import open_run
from tests.conftest import run_squeeze
from tests.tiny_gemma import build_tiny_gemma3, calibration_text

N_LAYERS = 6


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return build_tiny_gemma3(tmp_path_factory.mktemp("hf") / "tiny-gemma3", calibration_text(), n_layers=N_LAYERS)


def recipe_text(source: Path | str, extra_model: str = "") -> str:
    return f"""\
        model:
          source: {source}
          base_type: F16{extra_model}
        calibration: {{datasets: [groups_merged], ctx: 128, chunks: 2}}
        variants:
          Q4_K_M: Q4_K_M
          Q3_K_M: {{ftype: Q3_K_M}}
          Q3_K_M-pruned: {{ftype: Q3_K_M, prune: [2]}}
        score:
          ctx: 128
          chunks: 2
          tasks: {{benchmarks: [], count: 0}}
          speed: {{repetitions: 0}}
          drift: {{tokens: 0}}
        report: {{reference: Q4_K_M}}
        """


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def error_of(recipe: Path) -> str:
    with pytest.raises(SqueezeError) as exc:
        open_run(recipe, results=recipe.parent / "results")
    return str(exc.value)


# ---- before converting: plan reads the folder, bad folders fail in one line --------------------
def test_plan_reads_the_folder_and_lists_convert_first(tiny_hf, write_recipe, tmp_path):
    recipe = write_recipe(recipe_text(tiny_hf))
    result = CliRunner().invoke(main, ["plan", str(recipe), "--results", str(tmp_path / "res")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"gemma3, {N_LAYERS} layers, 3 variants" in lines[0]
    assert lines[1].split()[:2] == ["convert", "convert"]
    assert (f"base-f16.gguf + base-f16.json (F16 base from Hugging Face folder {tiny_hf}, "
            f"by llama.cpp's convert_hf_to_gguf.py)") \
        in lines[1]


def test_folder_tensors_have_gguf_names_and_shapes(tiny_hf, write_recipe):
    info = open_run(write_recipe(recipe_text(tiny_hf)), check_model=False).model_info
    shapes = {t.name: t.shape for t in info.tensors}
    assert info.arch == "gemma3" and info.n_layers == N_LAYERS
    assert shapes["blk.0.ffn_down.weight"] == (512, 256)  # ggml order: row length first
    assert shapes["blk.5.attn_q.weight"] == (256, 256)
    assert "token_embd.weight" in shapes and "output_norm.weight" in shapes


def test_folder_without_config_json(tiny_hf, write_recipe, tmp_path):
    folder = copy_folder(tiny_hf, tmp_path / "noconfig")
    (folder / "config.json").unlink()
    recipe = write_recipe(recipe_text(folder))
    assert error_of(recipe) == (f"{recipe}:2: model.source: {folder}: no config.json "
                                f"(expected a Hugging Face model folder)")


def test_architecture_llama_cpp_cannot_convert(tiny_hf, write_recipe, tmp_path):
    folder = copy_folder(tiny_hf, tmp_path / "unknown-arch")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["Gemma9ForTelepathy"]
    (folder / "config.json").write_text(json.dumps(config))
    recipe = write_recipe(recipe_text(folder))
    assert error_of(recipe) == (f"{recipe}:2: model.source: architecture 'Gemma9ForTelepathy' (in {folder}/config.json) "
                                f"cannot be converted by the pinned llama.cpp's convert_hf_to_gguf.py")


def test_misspelt_architecture_gets_a_suggestion(tiny_hf, write_recipe, tmp_path):
    folder = copy_folder(tiny_hf, tmp_path / "typo-arch")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["Gemma3ForCausalLm"]
    (folder / "config.json").write_text(json.dumps(config))
    assert error_of(write_recipe(recipe_text(folder))).endswith("; did you mean 'Gemma3ForCausalLM'?")


def test_missing_tokenizer(tiny_hf, write_recipe, tmp_path):
    folder = copy_folder(tiny_hf, tmp_path / "notok")
    (folder / "tokenizer.model").unlink()
    recipe = write_recipe(recipe_text(folder))
    assert error_of(recipe) == (f"{recipe}:2: model.source: {folder}: no tokenizer (expected tokenizer.model or "
                                f"tokenizer.json or vocab.json beside config.json)")


def test_broken_config_json_names_the_line(tiny_hf, write_recipe, tmp_path):
    folder = copy_folder(tiny_hf, tmp_path / "badjson")
    (folder / "config.json").write_text('{\n  "architectures": ["Gemma3ForCausalLM"],\n  oops\n}\n')
    assert error_of(write_recipe(recipe_text(folder))) == (
        f"{folder}/config.json:3: not valid JSON (Expecting property name enclosed in double quotes)")


def test_missing_convert_dependencies_say_how_to_install(tiny_hf, write_recipe, tmp_path, monkeypatch):
    # sys.modules[name] = None is how Python marks a module as not importable
    monkeypatch.setitem(sys.modules, "torch", None)
    recipe = write_recipe(recipe_text(tiny_hf))
    result = CliRunner().invoke(main, ["run", str(recipe), "--results", str(tmp_path / "res")])
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == ("Error: converting a Hugging Face model needs torch (not installed): "
                                              "pip install 'squeeze[convert]' (or make setup)")
    assert not (tmp_path / "res" / "base-f16.gguf").exists()


@pytest.mark.slow
def test_converter_failure_is_one_line_and_leaves_no_base(tiny_hf, write_recipe, tmp_path):
    import os

    folder = copy_folder(tiny_hf, tmp_path / "truncated")
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)  # header intact, data cut short
    results = tmp_path / "res"
    result = CliRunner().invoke(main, ["run", str(write_recipe(recipe_text(folder))), "--results", str(results)])
    assert result.exit_code == 1
    log = results / "logs" / "convert.log"
    assert result.output.splitlines()[-1] == (f"Error: convert_hf_to_gguf.py failed on {folder} (exit 1): "
                                              f"ValueError: mmap length is greater than file size (log: {log})")
    assert "Traceback" in log.read_text()
    assert list(results.rglob("*.gguf*")) == []  # neither a base nor a partial one


# ---- converting and running everything on the converted model ---------------------------------
@pytest.fixture(scope="module")
def converted_run(tiny_hf, tmp_path_factory):
    """`squeeze run` (the real command) on a recipe pointing at the HF folder."""
    folder = tmp_path_factory.mktemp("run")
    import textwrap

    recipe = folder / "tiny.yaml"
    recipe.write_text(textwrap.dedent(recipe_text(tiny_hf)))
    results = folder / "results"
    proc = run_squeeze("run", str(recipe), "--results", str(results))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return recipe, results, proc.stdout


@pytest.mark.slow
def test_run_converts_quantizes_and_scores_the_hf_model(converted_run):
    recipe, results, out = converted_run
    assert out.splitlines()[0] == "convert: run, no previous result"
    for name in ("base-f16.gguf", "imatrix.gguf", "variants/Q4_K_M.gguf", "variants/Q3_K_M.gguf",
                 "variants/Q3_K_M-pruned.gguf", "scores/Q4_K_M.json", "scores/Q3_K_M-pruned.json", "scores.md"):
        assert (results / name).is_file(), name
    step = json.loads((results / "manifest.json").read_text())["steps"]["convert"]
    assert step["versions"]["convert_hf_to_gguf"].startswith("llama-cpp-python ")
    assert step["extra"]["peak_rss_mib"] > 0
    assert sorted(Path(p).name for p in step["inputs"]) == [
        "config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"]
    from pipeline.engine.model import Model

    with Model(results / "variants" / "Q3_K_M-pruned.gguf") as pruned:
        assert pruned.n_layer == N_LAYERS - 1
    size_rows = [line.split("|") for line in (results / "scores.md").read_text().splitlines()
                 if line.startswith("| Q3_K_M-pruned ")]
    assert size_rows and size_rows[0][3].strip() == "2"  # the size table names the pruned layer


@pytest.mark.slow
def test_converted_base_loads_and_tokenizes_like_sentencepiece(converted_run, tiny_hf):
    import sentencepiece as spm

    from pipeline.engine.model import Model

    _, results, _ = converted_run
    sp = spm.SentencePieceProcessor(model_file=str(tiny_hf / "tokenizer.model"))
    text = "The quick brown fox jumps over the lazy dog 1234 times."
    with Model(results / "base-f16.gguf") as model:
        assert model.meta("general.architecture") == "gemma3"
        assert model.n_layer == N_LAYERS and model.n_embd == 256 and model.n_vocab == sp.vocab_size()
        assert model.tokenize(text).tolist() == [sp.bos_id()] + sp.encode(text)
        assert model.meta("general.file_type") == "1"  # MOSTLY_F16


@pytest.mark.slow
def test_second_run_is_up_to_date_and_a_version_change_makes_steps_stale(converted_run):
    recipe, results, _ = converted_run
    again = run_squeeze("run", str(recipe), "--results", str(results))
    assert again.returncode == 0 and "every stage is up to date" in again.stdout
    manifest_path = results / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    engine_steps = {key for key, step in manifest["steps"].items() if "llama-cpp-python" in step["versions"]}
    for key in engine_steps:  # as if made by the previous release
        manifest["steps"][key]["versions"]["llama-cpp-python"] = "0.3.35"
    manifest_path.write_text(json.dumps(manifest))
    import llama_cpp

    status = run_squeeze("status", str(recipe), "--results", str(results))
    assert status.returncode == 0, status.stderr
    states = {line.split()[0] + (" " + line.split()[1] if line.split()[1] not in ("done", "stale") else ""): line
              for line in status.stdout.splitlines()}
    assert {"convert", "imatrix", "quantize Q4_K_M", "quantize Q3_K_M", "score base", "score Q3_K_M"} <= engine_steps
    why = f"stale (llama-cpp-python version changed (0.3.35 -> {llama_cpp.__version__}))"
    for key in engine_steps:
        assert states[key].endswith(why), states[key]
    # the report records no engine version, but waits for the scores that are now stale
    assert states["report"].split()[1] == "stale"
