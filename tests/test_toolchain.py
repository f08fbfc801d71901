"""`squeeze toolchain`: the versions every manifest records, the llama.cpp source fetched for the
installed llama-cpp-python, its converter, and a user's own llama.cpp build or checkout."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import llama_cpp
import pytest
from click.testing import CliRunner

from pipeline import __version__
from pipeline.cli import main
from pipeline.build import build_flags, toolchain
from pipeline.errors import SqueezeError
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def source_root() -> Path:
    """The fetched llama.cpp source (downloads the sdist once when it is not cached yet)."""
    return toolchain.converter_root(echo=lambda _: None)


def printed(output: str) -> dict[str, str]:
    """`squeeze toolchain` lines are 'key (18 wide) value'."""
    return {line[:18].strip(): line[19:] for line in output.splitlines() if len(line) > 19 and line[18] == " "}


def test_toolchain_prints_the_versions_squeeze_runs(source_root, monkeypatch):
    monkeypatch.delenv("SQUEEZE_LLAMA_CPP_BIN", raising=False)
    monkeypatch.delenv("SQUEEZE_LLAMA_CPP_SRC", raising=False)
    result = CliRunner().invoke(main, ["toolchain"])
    assert result.exit_code == 0, result.output
    info = printed(result.output)
    assert info["squeeze"] == __version__
    assert info["llama-cpp-python"] == llama_cpp.__version__
    assert info["gguf (installed)"] == version("gguf")
    assert re.fullmatch(r"[0-9a-f]{7,40}", info["llama.cpp commit"]), info
    assert info["converter"] == str(source_root / "convert_hf_to_gguf.py")
    assert re.fullmatch(r"\d+\.\d+\.\d+", info["gguf (converter)"])


def test_fetch_finds_the_converter_in_the_matching_sdist(source_root):
    result = CliRunner().invoke(main, ["toolchain", "--fetch"])
    assert result.exit_code == 0, result.output
    assert f"converter: {source_root / 'convert_hf_to_gguf.py'}" in result.output.splitlines()
    # the sdist of the installed version, under squeeze's cache, with llama.cpp vendored
    assert source_root == toolchain.source_dir(llama_cpp.__version__) / "vendor" / "llama.cpp"
    assert (source_root / "gguf-py" / "gguf" / "__init__.py").is_file()
    assert (source_root / "tools" / "quantize").is_dir()


def test_commit_is_read_from_the_sdist_changelog(source_root):
    changelog = (toolchain.source_dir() / "CHANGELOG.md").read_text()
    commit = toolchain.llama_cpp_commit()
    assert f"llama.cpp@{commit}" in changelog.split(f"## [{llama_cpp.__version__}]")[1].split("\n## [")[0]


def test_converter_runs_with_its_own_gguf_py(source_root):
    script = source_root / "convert_hf_to_gguf.py"
    proc = subprocess.run([sys.executable, "-c", "import gguf; print(gguf.__file__)"], capture_output=True,
                          text=True, env=toolchain_env(script), check=True)
    assert Path(proc.stdout.strip()).is_relative_to(source_root / "gguf-py")


def toolchain_env(script: Path) -> dict:
    from pipeline.sources.hf_convert import convert_env

    return convert_env(script)


def test_own_bin_folder_must_hold_the_tools(tmp_path):
    result = CliRunner().invoke(main, ["toolchain", "--bin", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output == (f"Error: $SQUEEZE_LLAMA_CPP_BIN={tmp_path}: expected llama-quantize, llama-imatrix, "
                             f"llama-perplexity, llama-bench there\n")


@pytest.mark.reference
def test_own_bin_folder_is_used_and_its_version_shown(llama_tools, monkeypatch):
    monkeypatch.delenv("SQUEEZE_LLAMA_CPP_BIN", raising=False)
    result = CliRunner().invoke(main, ["toolchain", "--bin", str(llama_tools)])
    assert result.exit_code == 0, result.output
    shown = printed(result.output)["reference tools"]
    m = re.fullmatch(rf"{re.escape(str(llama_tools))} \(\$SQUEEZE_LLAMA_CPP_BIN\), version .+ \(build \d+, "
                     rf"commit (\w+)\)", shown)
    assert m, shown
    if llama_tools == toolchain.build_dir() / "bin":  # the reference build: same llama.cpp as the bindings
        assert toolchain.llama_cpp_commit().startswith(m.group(1))


def test_own_source_folder_must_hold_the_converter(tmp_path, monkeypatch):
    monkeypatch.setenv("SQUEEZE_LLAMA_CPP_SRC", str(tmp_path))
    with pytest.raises(SqueezeError) as exc:
        toolchain.convert_script()
    assert str(exc.value) == (f"$SQUEEZE_LLAMA_CPP_SRC={tmp_path}: expected a llama.cpp source folder with "
                              f"convert_hf_to_gguf.py")


def test_switching_converter_is_recorded_as_a_version(source_root, tmp_path, monkeypatch):
    """The convert step's versions name the converter, so switching to your own checkout
    makes the base stale (the runner compares versions before anything else)."""
    import shutil

    from pipeline.run.runner import Runner, Step

    def write_base(io) -> None:
        io.out(tmp_path / "base.gguf").write_bytes(b"x")

    def convert_step():
        return Step("convert", "convert", {}, [], [tmp_path / "base.gguf"], write_base,
                    versions={"convert_hf_to_gguf": toolchain.converter_label()})

    monkeypatch.delenv("SQUEEZE_LLAMA_CPP_SRC", raising=False)
    runner = Runner(tmp_path, echo=lambda _: None)
    runner.run([convert_step()])
    assert runner.verdict(convert_step()).state == "done"
    own = tmp_path / "my-llama.cpp"
    own.mkdir()
    shutil.copy(source_root / "convert_hf_to_gguf.py", own)
    monkeypatch.setenv("SQUEEZE_LLAMA_CPP_SRC", str(own))
    verdict = runner.verdict(convert_step())
    assert verdict.state == "stale"
    assert verdict.reason == (f"convert_hf_to_gguf version changed (llama-cpp-python {llama_cpp.__version__} sdist "
                              f"-> {own} ($SQUEEZE_LLAMA_CPP_SRC))")


def test_a_cuda_build_has_its_own_flags_and_cache_name(monkeypatch):
    monkeypatch.setenv("SQUEEZE_GPU", "")
    cpu_args, cpu_id = build_flags.cmake_args(), build_flags.flags_id()
    monkeypatch.setenv("SQUEEZE_GPU", "cuda")
    monkeypatch.setenv("SQUEEZE_CUDA_ARCHS", "")  # nothing asked: the H100/H200 alone
    assert build_flags.cmake_args() == cpu_args + ["-DGGML_CUDA=ON", "-DGGML_CUDA_NO_VMM=ON",
                                                   "-DCMAKE_CUDA_ARCHITECTURES=90-real"]
    assert build_flags.flags_id().startswith("cuda90_real-")
    assert build_flags.flags_id() != cpu_id  # the CPU wheel is never reused for a CUDA build
    monkeypatch.setenv("SQUEEZE_CUDA_ARCHS", "86,90")
    assert build_flags.cmake_args()[-1] == "-DCMAKE_CUDA_ARCHITECTURES=86;90"
    monkeypatch.setenv("SQUEEZE_CUDA_ARCHS", "hopper")
    with pytest.raises(SystemExit, match="CUDA_ARCHS=hopper: expected CUDA architectures"):
        build_flags.cmake_args()
    monkeypatch.setenv("SQUEEZE_CUDA_ARCHS", "")
    monkeypatch.setenv("SQUEEZE_GPU", "rocm")
    with pytest.raises(SystemExit, match="GPU=rocm: expected one of: cuda"):
        build_flags.cmake_args()


def test_setup_without_a_cuda_toolkit_says_so_in_one_line(tmp_path):
    # install_engine.sh with GPU=cuda where no nvcc can be found stops before building anything
    if shutil.which("nvcc", path="/usr/bin:/bin"):
        pytest.skip("this machine has nvcc in /usr/bin")
    env = {"PATH": "/usr/bin:/bin", "GPU": "cuda", "HOME": str(tmp_path), "CUDA_HOME": str(tmp_path / "no-cuda")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "install_engine.sh"), sys.executable],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    assert proc.stderr == (f"Error: GPU=cuda: no CUDA toolkit found (nvcc is neither on PATH nor in "
                           f"{tmp_path / 'no-cuda'}/bin); install it (or set CUDA_HOME), or drop GPU=cuda for a "
                           "CPU build\n")
    assert proc.stdout == ""
