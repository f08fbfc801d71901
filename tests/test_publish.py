"""`squeeze publish` against a local server that answers the hub's upload API the way the hub does
(tests/fake_hub.py), talked to by huggingface_hub's own client over its LFS protocol: a scored run of
a tiny Gemma 3 goes up with every file intact and the token sent; publishing it again sends nothing;
an upload cut off mid-file resumes with the part in flight; a publish that failed at its commit
sends only what is missing the next time; and a run that is not ready is refused in one line."""

from __future__ import annotations

import hashlib
import json
import shutil
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.report.card import render_card
from pipeline.stages.registry import open_run
from tests.fake_hub import FakeHub
from tests.tiny_gemma import build_tiny_gemma3, calibration_text

REPO = "tiny-org/tiny-gemma3-gguf"
TOKEN = "hf_test_token"
PART = 256 * 1024  # the fake hub's LFS part size: the tiny GGUFs (1-1.5 MB) go up in several parts

# huggingface_hub hands httpx a file as `data=`, which httpx 0.28 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

RECIPE = """\
    model: {{source: {hf}, base_type: F16}}
    variants:
      Q8_0: Q8_0
      Q4_K_M: Q4_K_M{extra}
    score: {{ctx: 128, chunks: 2, speed: {{repetitions: 0}}, drift: {{tokens: 0}}}}
    report: {{reference: Q8_0, license: apache-2.0}}
    """


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    """A tiny Gemma 3 (2 layers, converted from a HF folder), two variants built and scored once."""
    folder = tmp_path_factory.mktemp("publish")
    hf = build_tiny_gemma3(folder / "tiny-gemma3", calibration_text(), n_layers=2)
    recipe = folder / "tiny-publish.yaml"
    recipe.write_text(textwrap.dedent(RECIPE.format(hf=hf, extra="")))
    results = folder / "results"
    run = CliRunner().invoke(main, ["run", str(recipe), "--results", str(results)])
    assert run.exit_code == 0, run.output
    return recipe, results


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # huggingface_hub sends through Xet storage when hf_xet is installed; the fake speaks LFS
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub(storage=tmp_path / "hub", token=TOKEN) as server:
        server.part_size = PART
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def publish(recipe, results, *options):
    return CliRunner().invoke(main, ["publish", str(recipe), "--repo", REPO, "--results", str(results), *options])


def expected_files(results: Path) -> dict[str, Path]:
    files = {"tiny-publish-Q8_0.gguf": results / "variants" / "Q8_0.gguf",
             "tiny-publish-Q4_K_M.gguf": results / "variants" / "Q4_K_M.gguf",
             "README.md": results / "README.md"}
    for name in ("scores.md", "scores.csv", "sizes.csv", "ppl-kld.csv", "kld-percentiles.csv", "kld-vs-size.png"):
        files[name] = results / name
    return files  # tasks.csv, speed.csv, drift.csv: not measured, empty, left out


def repo_folder(hub) -> Path:
    return hub.repos[("model", REPO)][0]


def puts(hub) -> list:
    return [c for c in hub.calls if c.method == "PUT"]


def test_first_publish_creates_the_repository_with_every_file(scored_run, hub):
    recipe, results = scored_run
    out = publish(recipe, results, "--private")
    assert out.exit_code == 0, out.output
    commit = hub.repos[("model", REPO)][1]
    assert out.output.splitlines()[-1] == f"published 9 files (0 unchanged): {hub.url}/{REPO} (commit {commit[:12]})"

    files = expected_files(results)
    on_hub = sorted(p.relative_to(repo_folder(hub)).as_posix() for p in repo_folder(hub).rglob("*") if p.is_file())
    assert on_hub == sorted([*files, ".gitattributes"])
    for name, local in files.items():
        assert (repo_folder(hub) / name).read_bytes() == local.read_bytes(), name
    ctx = open_run(recipe, results, check_model=False)
    assert (repo_folder(hub) / "README.md").read_text() == render_card(ctx)
    # the binary files went through LFS, the GGUFs in parts, each byte once
    lfs = hub.lfs_paths[("model", REPO)]
    assert lfs == {name: sha256(files[name]) for name in ("tiny-publish-Q8_0.gguf", "tiny-publish-Q4_K_M.gguf",
                                                          "kld-vs-size.png")}
    gguf_bytes = sum(files[n].stat().st_size for n in lfs if n.endswith(".gguf"))
    assert len(puts(hub)) == sum(-(-files[n].stat().st_size // PART) for n in lfs if n.endswith(".gguf")) + 1
    assert sum(c.received for c in puts(hub)) == gguf_bytes + files["kld-vs-size.png"].stat().st_size
    assert hub.private[("model", REPO)] is True
    # every hub API call carried the token; only the presigned part URLs go without it, as on S3
    api = [c for c in hub.calls if c.path.startswith("/api/") or ".git/info/lfs" in c.path]
    assert {c.authorization for c in api} == {f"Bearer {TOKEN}"}
    assert {c.authorization for c in hub.calls if c.path.startswith("/lfs-")} == {None}


def test_publishing_the_same_run_again_sends_no_file(scored_run, hub):
    recipe, results = scored_run
    assert publish(recipe, results).exit_code == 0
    commit = hub.repos[("model", REPO)][1]
    hub.calls.clear()
    again = publish(recipe, results)
    assert again.exit_code == 0, again.output
    assert f"{REPO}: all 9 files are up to date on {hub.url}; nothing sent" in again.output
    assert again.output.splitlines()[-1] == f"published: {hub.url}/{REPO}"
    assert hub.repos[("model", REPO)][1] == commit  # no new commit
    assert puts(hub) == []
    # what was sent at all: the create request (answered 409) and nothing with a file in it
    assert {c.path for c in hub.calls if c.received} == {"/api/repos/create"}
    assert not any(word in c.path for c in hub.calls for word in ("preupload", "commit", "lfs", "validate-yaml"))


def test_only_a_file_that_differs_on_the_hub_is_sent_again(scored_run, hub):
    recipe, results = scored_run
    assert publish(recipe, results).exit_code == 0
    (repo_folder(hub) / "scores.md").write_text("edited on the hub\n")  # as if someone changed it there
    hub.calls.clear()
    out = publish(recipe, results)
    assert out.exit_code == 0, out.output
    assert f"{REPO}: sending 1 of 9 files" in out.output
    assert (repo_folder(hub) / "scores.md").read_bytes() == (results / "scores.md").read_bytes()
    assert puts(hub) == []  # a text file travels inside the commit
    committed = [c for c in hub.calls if c.path.endswith("/commit/main")]
    assert len(committed) == 1 and committed[0].received < 2 * (results / "scores.md").stat().st_size + 1000


def test_an_upload_cut_off_mid_file_resumes_with_the_part_in_flight(scored_run, hub):
    recipe, results = scored_run
    gguf = results / "variants" / "Q8_0.gguf"
    hub.cut_uploads.add((sha256(gguf), 2))
    out = publish(recipe, results)
    assert out.exit_code == 0, out.output
    assert (repo_folder(hub) / "tiny-publish-Q8_0.gguf").read_bytes() == gguf.read_bytes()
    assert hub.lfs_paths[("model", REPO)]["tiny-publish-Q8_0.gguf"] == sha256(gguf)
    # the parts of that object: part 2 twice (cut at half, then whole), every other part once
    upload = next(u for u, info in hub._uploads.items() if info["oid"] == sha256(gguf))
    sent = [(int(c.path.rsplit("/", 1)[1]), c.received) for c in puts(hub) if f"/{upload}/" in c.path]
    parts = -(-gguf.stat().st_size // PART)
    assert sorted(n for n, _ in sent) == sorted([*range(1, parts + 1), 2])
    assert sorted(r for n, r in sent if n == 2) == [PART // 2, PART]
    assert sum(r for _, r in sent) == gguf.stat().st_size + PART // 2


def test_a_publish_that_failed_at_its_commit_sends_only_what_is_missing(scored_run, hub):
    recipe, results = scored_run
    hub.fail_commit_once = True
    failed = publish(recipe, results)
    assert failed.exit_code == 1
    assert failed.output.splitlines()[-1] == f"Error: cannot publish to {REPO} on {hub.url}: Internal Error"
    assert sorted(p.name for p in repo_folder(hub).iterdir()) == [".gitattributes"]  # nothing committed
    hub.calls.clear()
    out = publish(recipe, results)
    assert out.exit_code == 0, out.output
    assert puts(hub) == []  # the hub holds every LFS object from the failed try
    for name, local in expected_files(results).items():
        assert (repo_folder(hub) / name).read_bytes() == local.read_bytes(), name


def test_a_variant_not_built_is_refused_in_one_line(scored_run, hub, tmp_path):
    recipe, results = scored_run
    grown = tmp_path / "tiny-publish.yaml"  # the same recipe with one more variant, never run
    hf = recipe.parent / "tiny-gemma3"
    grown.write_text(textwrap.dedent(RECIPE.format(hf=hf, extra="\n      Q2_K: Q2_K")))
    out = publish(grown, results, "--allow-stale")
    assert out.exit_code == 1
    assert out.output == (f"Error: publish: not every variant is built and scored in {results}: Q2_K (not built); "
                          f"run `squeeze run {grown}` first\n")
    stale = publish(grown, results)  # without --allow-stale the freshness check speaks first
    assert stale.exit_code == 1 and len(stale.output.splitlines()) == 1
    assert stale.output.startswith(f"Error: publish: the results in {results} are not current: quantize Q2_K ")
    assert hub.calls == []  # refused before anything was sent


def test_a_token_without_write_access_is_one_line(scored_run, hub, monkeypatch):
    recipe, results = scored_run
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    out = publish(recipe, results)
    assert out.exit_code == 1
    assert out.output == (f"Error: cannot publish to {REPO} on {hub.url}: not allowed (HTTP 401); set HF_TOKEN "
                          f"to a token with write access to tiny-org\n")


def test_a_malformed_repo_id_is_refused_before_any_request(scored_run, hub):
    recipe, results = scored_run
    out = CliRunner().invoke(main, ["publish", str(recipe), "--repo", "tiny org/x", "--results", str(results)])
    assert out.exit_code == 1
    assert out.output == ("Error: --repo: 'tiny org/x' is not a hub repository id (expected owner/name: letters, "
                          "digits, '-', '_', '.')\n")
    assert hub.calls == []


@pytest.mark.parametrize("failure, said", [
    ("boom", "score Q4_K_M failed"),  # recorded by `squeeze run --keep-going`
    (None, "score Q4_K_M did not finish"),  # killed, or raised without --keep-going: only the record is gone
])
def test_a_variant_whose_step_failed_is_refused_even_with_allow_stale(scored_run, hub, tmp_path, failure, said):
    """The runner drops a step's record before the step starts, so after a failure the files of an
    earlier success may still be there: they are not published as this recipe's."""
    recipe, results = scored_run
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["steps"]["score Q4_K_M"]
    if failure:
        manifest["failures"] = {"score Q4_K_M": failure}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    out = publish(recipe, copy, "--allow-stale")
    assert out.exit_code == 1
    assert out.output == (f"Error: publish: not every variant is built and scored in {copy}: Q4_K_M ({said}); "
                          f"run `squeeze run {recipe}` first\n")
    assert hub.calls == []


def test_private_is_not_quietly_dropped_for_a_public_repository(scored_run, hub):
    recipe, results = scored_run
    assert publish(recipe, results).exit_code == 0
    out = publish(recipe, results, "--private")
    assert out.exit_code == 1
    assert out.output == (f"Error: {REPO} on {hub.url} is public; --private only applies to a new repository "
                          "(make it private in its settings, or leave out --private)\n")


def test_stale_results_go_up_only_with_allow_stale_and_marked(scored_run, hub, tmp_path):
    recipe, results = scored_run
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    edited = tmp_path / "tiny-publish.yaml"  # Q4_K_M's recipe changed after it was scored
    edited.write_text(recipe.read_text().replace("Q4_K_M: Q4_K_M", "Q4_K_M: {ftype: Q4_K_M, output_type: Q8_0}"))
    refused = publish(edited, copy)
    assert refused.exit_code == 1 and hub.calls == []
    assert refused.output.startswith(f"Error: publish: the results in {copy} are not current: quantize Q4_K_M ")
    out = publish(edited, copy, "--allow-stale")
    assert out.exit_code == 0, out.output
    assert out.output.splitlines()[0] == "publish: stale results for Q4_K_M (--allow-stale); their rows are marked"
    card = (repo_folder(hub) / "README.md").read_text()
    assert "**Stale results.**" in card and "Q4_K_M (stale)" in card
    assert "Q4_K_M (stale)" in (repo_folder(hub) / "scores.md").read_text()
    assert (copy / "scores.md").read_bytes() == (results / "scores.md").read_bytes()  # the run's own file is untouched
