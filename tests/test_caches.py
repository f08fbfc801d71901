"""Caches that check what they hold (pipeline.cache): the dequantized test model, the benchmarks'
work files and downloaded datasets are each reused only while the sources they were made from
(by hash) and the versions that made them are unchanged; a changed source or version rebuilds."""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest

from pipeline.cache import MadeFrom, cached, read_record, record_path, stale_reason
from pipeline.formats.imatrix_file import read_imatrix
from tests.example_model import dequantized_base, dequantizer_versions

ROOT = Path(__file__).resolve().parent.parent


# ---- the keying itself ----------------------------------------------------------------------

def _upper(src: Path, dst: Path):
    builds = []

    def build():
        builds.append(1)
        dst.write_text(src.read_text().upper())
    return build, builds


def test_a_cached_file_is_rebuilt_when_its_source_version_or_parameters_change(tmp_path):
    src, dst = tmp_path / "words.txt", tmp_path / "WORDS.txt"
    src.write_text("one two\n")
    build, builds = _upper(src, dst)

    def made_from(version="1", mode="upper"):
        return MadeFrom({"text": src}, {"tool": version}, {"mode": mode})

    assert cached(dst, made_from(), build) == "WORDS.txt is missing"
    assert cached(dst, made_from(), build) is None
    assert builds == [1] and dst.read_text() == "ONE TWO\n"
    record = read_record(dst)
    assert record["sources"]["text"]["size"] == 8 and len(record["sources"]["text"]["sha256"]) == 64

    os.utime(src, ns=(1, 1))  # touched, same bytes: the hash says nothing changed
    assert cached(dst, made_from(), build) is None

    src.write_text("three\n")
    assert cached(dst, made_from(), build) == "source text changed"
    assert dst.read_text() == "THREE\n"
    assert cached(dst, made_from("2"), build) == "version of tool changed (1 -> 2)"
    assert cached(dst, made_from("2", "lower"), build) == "parameter mode changed (upper -> lower)"
    assert len(builds) == 4

    dst.write_text("edited by hand, much longer\n")
    assert stale_reason(dst, made_from("2", "lower")) == "WORDS.txt changed after it was made"
    record_path(dst).unlink()
    assert stale_reason(dst, made_from("2", "lower")) == "WORDS.txt has no record of what it was made from"


def test_a_failed_build_leaves_nothing_that_looks_finished(tmp_path):
    src, dst = tmp_path / "a.txt", tmp_path / "b.txt"
    src.write_text("a")
    cached(dst, MadeFrom({"a": src}, {"v": "1"}), lambda: dst.write_text("A"))

    def broken():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cached(dst, MadeFrom({"a": src}, {"v": "2"}), broken)
    assert stale_reason(dst, MadeFrom({"a": src}, {"v": "1"})) == "b.txt has no record of what it was made from"


# ---- the dequantized test model -------------------------------------------------------------

def _tiny_quantized(path: Path, scale: float) -> None:
    """A tiny GGUF with a Q8_0 matrix, as the PyPI model is a quantized one (not runnable: never loaded)."""
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(1)
    values = (np.arange(64 * 32, dtype=np.float32).reshape(64, 32) / 2048 - 0.5) * scale
    w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0),
                 raw_shape=(64, 34), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _q_weight(path: Path) -> np.ndarray:
    reader = gguf.GGUFReader(str(path))
    return next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight").data


def test_test_model_is_redone_for_a_new_source_or_gguf_version(tmp_path, capsys):
    src, base = tmp_path / "q8.gguf", tmp_path / "cache" / "f16.gguf"
    _tiny_quantized(src, 1.0)
    dequantized_base(src, base)
    first = _q_weight(base).copy()
    assert first.dtype == np.float16 and "(f16.gguf is missing)" in capsys.readouterr().err

    stamp = base.stat().st_mtime_ns
    dequantized_base(src, base)
    assert base.stat().st_mtime_ns == stamp and capsys.readouterr().err == ""

    _tiny_quantized(src, 2.0)  # a new upstream file
    dequantized_base(src, base)
    assert "(source model changed)" in capsys.readouterr().err
    assert np.allclose(_q_weight(base), 2 * first, atol=1e-2)

    newer = {**dequantizer_versions(), "gguf": "999.0"}
    dequantized_base(src, base, versions=newer)
    assert "(version of gguf changed" in capsys.readouterr().err
    assert read_record(base)["versions"]["gguf"] == "999.0"


def test_the_cached_example_model_records_what_it_was_made_from(base_f16, source_gguf):
    record = read_record(base_f16)
    assert record["sources"]["model"]["size"] == source_gguf.stat().st_size
    assert record["versions"] == dequantizer_versions()
    assert stale_reason(base_f16, MadeFrom({"model": source_gguf}, dequantizer_versions(),
                                           {"base_type": "F16"})) is None


# ---- downloaded datasets --------------------------------------------------------------------

def test_a_downloaded_dataset_is_extracted_again_when_the_hub_file_changes(tmp_path, monkeypatch):
    from pipeline.sources import datasets
    from tests.fake_hub import FakeHub

    monkeypatch.setenv("SQUEEZE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SQUEEZE_DATA", str(tmp_path / "empty"))
    repo = tmp_path / "ci"
    repo.mkdir()

    def publish(text: str) -> None:
        with zipfile.ZipFile(repo / "wikitext-2-raw-v1.zip", "w") as zf:
            zf.writestr("wikitext-2-raw/wiki.test.raw", text)

    publish(" = First = \n")
    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        server.add("ggml-org/ci", repo, repo_type="dataset")
        path = datasets.resolve_dataset("wikitext-2", tmp_path)
        assert path.read_text() == " = First = \n"
        assert read_record(path)["versions"] == datasets.extract_versions()
        stamp = path.stat().st_mtime_ns
        assert datasets.resolve_dataset("wikitext-2", tmp_path).stat().st_mtime_ns == stamp

        publish(" = Second = \n")  # a new commit upstream
        server.repos[("dataset", "ggml-org/ci")] = (repo, "b" * 40)
        assert datasets.resolve_dataset("wikitext-2", tmp_path).read_text() == " = Second = \n"

    # a new extraction version redoes it from the downloaded file, without the hub
    known = datasets.KNOWN["wikitext-2"]
    fetched = next(p for p in (tmp_path / "cache" / "hub").rglob("wikitext-2-raw-v1.zip") if "b" * 40 in str(p))
    stamp = path.stat().st_mtime_ns
    datasets.extract_dataset("wikitext-2", known, fetched, path, {**datasets.extract_versions(), "squeeze": "9"})
    assert path.stat().st_mtime_ns != stamp and read_record(path)["versions"]["squeeze"] == "9"
    assert path.read_text() == " = Second = \n"


# ---- the benchmarks' work files -------------------------------------------------------------

@pytest.fixture
def bench_common():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_common
        yield bench_common
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def test_benchmark_imatrix_is_redone_for_new_text_or_engine(base_f16, bench_common, tmp_path, capsys):
    text = tmp_path / "calibration.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    work = tmp_path / "work"

    im, layers = bench_common.calibration(base_f16, chunks=1, ctx=64, text=text, work=work)
    assert "rebuilding (imatrix-c1.gguf is missing)" in capsys.readouterr().out
    first = read_imatrix(im).entries["blk.0.attn_q.weight"].sums.copy()
    assert read_record(layers)["sources"] == read_record(im)["sources"]

    bench_common.calibration(base_f16, chunks=1, ctx=64, text=text, work=work)
    assert "rebuilding" not in capsys.readouterr().out

    text.write_text("Colourless green ideas sleep furiously, said nobody at all. " * 30)
    bench_common.calibration(base_f16, chunks=1, ctx=64, text=text, work=work)
    assert "rebuilding (source text changed)" in capsys.readouterr().out
    assert not np.array_equal(read_imatrix(im).entries["blk.0.attn_q.weight"].sums, first)

    from pipeline.engine.backend import engine_versions

    older = {**engine_versions(), "llama-cpp-python": "0.0.1"}
    bench_common.calibration(base_f16, chunks=1, ctx=64, text=text, work=work, versions=older)
    assert "version of llama-cpp-python changed" in capsys.readouterr().out
