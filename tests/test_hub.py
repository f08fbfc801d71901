"""Hub downloads against a local server that answers like the Hugging Face hub (tests/fake_hub.py):
model snapshots with only the files conversion needs, a download cut off mid-file that resumes
with a Range request, the token from $HF_TOKEN, the cache, datasets, and one-line errors."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import SqueezeError
from pipeline.sources import hub
from tests.fake_hub import FakeHub
from tests.tiny_gemma import build_tiny_gemma3, calibration_text

REPO = "tiny-org/tiny-gemma3"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory) -> Path:
    """A tiny Gemma 3 repository. Its embedding is padded to 40k rows so model.safetensors
    (~27 MB) outgrows huggingface_hub's 10 MB write chunk: a cut at half the file leaves
    whole chunks on disk for the resumed request to continue from."""
    folder = build_tiny_gemma3(tmp_path_factory.mktemp("repo") / "tiny", calibration_text(), n_layers=2,
                               config_vocab=40_000)
    (folder / "README.md").write_text("# tiny\n")  # served, but not needed for conversion
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"\0" * 1000)
    return folder


@pytest.fixture
def fake_hub(hub_folder, tmp_path, monkeypatch):
    from pipeline.build import toolchain

    # keep using the fetched llama.cpp source while squeeze's cache is a fresh folder
    monkeypatch.setenv("SQUEEZE_LLAMA_CPP_SRC", str(toolchain.converter_root()))
    monkeypatch.setenv("SQUEEZE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    with FakeHub() as server:
        server.commit = server.add(REPO, hub_folder)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def file_gets(server, name: str) -> list[str | None]:
    return [rng for method, path, rng in server.requests if method == "GET" and path.endswith("/" + name)]


def test_download_resumes_a_file_cut_off_midway(fake_hub, hub_folder):
    fake_hub.drop_once.add("model.safetensors")
    folder = hub.download_model(REPO, echo=lambda _: None)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"]
    assert sha256(folder / "model.safetensors") == sha256(hub_folder / "model.safetensors")
    first, second = file_gets(fake_hub, "model.safetensors")
    assert first is None
    resumed_at = int(second.removeprefix("bytes=").removesuffix("-"))
    size = (hub_folder / "model.safetensors").stat().st_size
    assert 0 < resumed_at <= size // 2  # only the missing part was sent again
    assert folder.name == fake_hub.commit  # every file from one commit
    assert hub.commit_of(REPO) == fake_hub.commit


def test_a_failed_download_keeps_the_files_it_finished(fake_hub):
    """huggingface_hub (1.x) drops a partial file when a download fails for good, so a later run
    resumes file by file: what was complete is not fetched again."""
    fake_hub.fail_once.add("tokenizer.model")
    with pytest.raises(SqueezeError) as exc:
        hub.download_model(REPO, echo=lambda _: None)
    assert str(exc.value).startswith(f"cannot download hub model '{REPO}' from {fake_hub.url}: ")
    assert hub.cached_model(REPO) is None
    fake_hub.requests.clear()
    hub.download_model(REPO, echo=lambda _: None)  # the next run
    fetched = [path.rsplit("/", 1)[1] for method, path, _ in fake_hub.requests
               if method == "GET" and "/resolve/" in path]
    assert fetched == ["tokenizer.model", "tokenizer_config.json"]


def test_token_from_the_environment_is_sent(fake_hub):
    hub.download_model(REPO, echo=lambda _: None)
    assert set(fake_hub.authorizations) == {"Bearer hf_test_token"}


def test_second_download_comes_from_the_cache(fake_hub):
    first = hub.download_model(REPO, echo=lambda _: None)
    assert hub.cached_model(REPO) == first
    fake_hub.requests.clear()
    assert hub.download_model(REPO, echo=lambda _: None) == first
    assert [r for r in fake_hub.requests if r[0] == "GET" and "/resolve/" in r[1]] == []


def test_hub_id_that_does_not_exist(fake_hub):
    with pytest.raises(SqueezeError) as exc:
        hub.download_model("nobody/no-such-model", where="r.yaml:2: model.source: ")
    assert str(exc.value) == (f"r.yaml:2: model.source: hub model 'nobody/no-such-model' not found on "
                              f"{fake_hub.url} (check the name; a private model needs HF_TOKEN)")


def test_revision_that_does_not_exist(fake_hub):
    with pytest.raises(SqueezeError) as exc:
        hub.download_model(REPO, revision="v9", where="r.yaml:3: model.revision: ")
    assert str(exc.value) == f"r.yaml:3: model.revision: hub model '{REPO}' has no revision 'v9'"


def test_malformed_hub_id_is_caught_when_the_recipe_loads(write_recipe):
    from pipeline.stages.registry import open_run

    recipe = write_recipe("""\
        model:
          source: hf:google/gemma 3
          arch: gemma3
          layers: 2
        variants: {Q4_K_M: Q4_K_M}
        """)
    with pytest.raises(SqueezeError) as exc:
        open_run(recipe, recipe.parent / "res")
    assert str(exc.value) == (f"{recipe}:2: model.source: 'hf:google/gemma 3' is not a hub model id "
                              f"(expected hf:<owner>/<name>)")


def test_squeeze_run_with_unknown_hub_id_fails_in_one_line(fake_hub, write_recipe, tmp_path):
    recipe = write_recipe("""\
        model:
          source: hf:nobody/no-such-model
          arch: gemma3
          layers: 2
        variants: {Q4_K_M: Q4_K_M}
        score: {chunks: 1, tasks: {benchmarks: []}, speed: {repetitions: 0}, drift: {tokens: 0}}
        """)
    result = CliRunner().invoke(main, ["run", str(recipe), "--results", str(tmp_path / "res")])
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == (
        f"Error: {recipe}:2: model.source: hub model 'nobody/no-such-model' not found on {fake_hub.url} "
        f"(check the name; a private model needs HF_TOKEN)")


def test_dataset_download_through_the_hub(fake_hub, tmp_path, monkeypatch):
    """datasets.py fetches wikitext-2 from its hub home when no data folder has it."""
    from pipeline.sources.datasets import resolve_dataset

    repo = tmp_path / "ci"
    repo.mkdir()
    with zipfile.ZipFile(repo / "wikitext-2-raw-v1.zip", "w") as zf:
        zf.writestr("wikitext-2-raw/wiki.test.raw", " = Title = \n text of the test split \n")
    fake_hub.add("ggml-org/ci", repo, repo_type="dataset")
    monkeypatch.setenv("SQUEEZE_DATA", str(tmp_path / "empty"))
    path = resolve_dataset("wikitext-2", tmp_path, "score.dataset: ")
    assert path.read_text() == " = Title = \n text of the test split \n"
    assert ("GET", "/datasets/ggml-org/ci/resolve/main/wikitext-2-raw-v1.zip", None) in fake_hub.requests


@pytest.mark.slow
def test_convert_stage_downloads_and_converts_a_hub_model(fake_hub, write_recipe, tmp_path):
    from pipeline.engine.model import Model
    from pipeline.run.runner import Runner
    from pipeline.stages import convert
    from pipeline.stages.registry import open_run

    recipe = write_recipe(f"""\
        model:
          source: hf:{REPO}
          base_type: BF16
          arch: gemma3
          layers: 2
        variants: {{Q4_K_M: Q4_K_M}}
        """)
    plan = CliRunner().invoke(main, ["plan", str(recipe), "--results", str(tmp_path / "res")])
    assert plan.output.splitlines()[1].endswith(
        f"base-bf16.gguf + base-bf16.json (BF16 base from Hugging Face hub model {REPO}, by llama.cpp's "
        f"convert_hf_to_gguf.py; downloaded first)"), plan.output
    ctx = open_run(recipe, tmp_path / "res")
    Runner(ctx.folder, echo=lambda _: None).run(convert.steps(ctx))
    with Model(ctx.base_path) as model:
        assert model.n_layer == 2 and model.meta("general.architecture") == "gemma3"
        assert model.meta("general.file_type") == "32"  # MOSTLY_BF16
    step = json.loads((ctx.folder / "manifest.json").read_text())["steps"]["convert"]
    assert step["extra"]["hub_commit"] == fake_hub.commit
    # once downloaded, the model's own files describe it (shapes too), even without a base
    info = open_run(recipe, tmp_path / "elsewhere").model_info
    assert {t.name: t.shape for t in info.tensors}["blk.1.ffn_down.weight"] == (512, 256)
    shutil.rmtree(ctx.folder)
