"""Error-compensated rounding into llama.cpp's types (issue 27's first part): every supported
type's block grid read and rewritten bit-exactly against ggml's own dequantization, and GPTQ's
rounding on that grid lowering the output error ||(W - Q) X|| at the same bytes."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.choose.gptq_rounding import gptq_rows, inverse_factor, lower_inverse, supports
from pipeline.engine.ggml_quant import dequantize_rows, quantize_rows
from pipeline.errors import SqueezeError
from pipeline.formats.block_grid import SUPPORTED, decode, encode
from pipeline.measure.rounding_gain import output_error

N = 512  # two K-quant super-blocks, sixteen 32-blocks per row


@pytest.fixture(scope="module")
def correlated():
    """Weights and the second moment of inputs whose columns are correlated and unevenly scaled,
    as a transformer's are; the imatrix is its diagonal per token."""
    rng = np.random.default_rng(7)
    mix = rng.standard_normal((N, N)) * 0.3 + np.eye(N)
    x = (rng.standard_normal((2048, N)) @ mix) * np.exp(rng.standard_normal(N) * 0.5)
    h = x.T @ x
    w = (rng.standard_normal((128, N)) * 0.05).astype(np.float32)
    return w, h, (np.diag(h) / len(x)).astype(np.float32)


@pytest.mark.parametrize("qtype", SUPPORTED)
def test_the_grid_read_from_the_bytes_is_what_ggml_dequantizes_and_new_indices_write_back_exactly(qtype, correlated):
    w, _, imp = correlated
    raw = quantize_rows(w, qtype, imp)
    grid = decode(raw, qtype, N)
    assert np.array_equal(grid.values(), dequantize_rows(raw, qtype, N))
    assert np.array_equal(encode(raw, qtype, N, grid.index), raw)  # its own indices: the same bytes
    chosen = np.random.default_rng(1).integers(0, grid.levels, size=grid.index.shape)
    rewritten = encode(raw, qtype, N, chosen)
    again = decode(rewritten, qtype, N)
    assert np.array_equal(again.index, chosen)
    assert np.array_equal(again.scale, grid.scale) and np.array_equal(again.offset, grid.offset)  # headers kept
    assert np.array_equal(dequantize_rows(rewritten, qtype, N), (grid.scale * chosen + grid.offset).astype(np.float32))


@pytest.mark.parametrize("qtype", SUPPORTED)
def test_gptq_lowers_the_output_error_at_the_same_type_and_bytes(qtype, correlated):
    w, h, imp = correlated
    stock = quantize_rows(w, qtype, imp)
    ours = gptq_rows(w, qtype, h, imp)
    assert ours.shape == stock.shape and ours.dtype == np.uint8
    before = output_error(w, dequantize_rows(stock, qtype, N), h)
    after = output_error(w, dequantize_rows(ours, qtype, N), h)
    assert after < 0.8 * before, (qtype, after / before)


def test_a_type_without_a_grid_is_refused_in_one_line(correlated):
    w, h, imp = correlated
    assert not supports("IQ4_XS") and supports("q4_k")
    with pytest.raises(SqueezeError, match=r"^IQ4_XS: no error-compensated rounding \(supported: Q8_0, "):
        gptq_rows(w, "IQ4_XS", h, imp)
    with pytest.raises(SqueezeError, match="second moment of"):
        gptq_rows(w, "Q4_K", h[:256, :256], imp)


@pytest.mark.parametrize("n", [5, 300, 1031])
def test_the_inverse_factor_is_the_cholesky_factor_of_the_damped_inverse(n):
    """lower_inverse halves the matrix (sizes that are no power of two included); U^T U must be
    (H + damp)^-1, with U upper, and a column no input reached is marked dead."""
    rng = np.random.default_rng(n)
    m = np.tril(rng.standard_normal((n, n))) + n * np.eye(n)
    assert np.allclose(lower_inverse(m) @ m, np.eye(n), atol=1e-10)
    x = rng.standard_normal((2 * n, n))
    x[:, 1] = 0.0
    h = x.T @ x
    u, dead = inverse_factor(h)
    assert np.array_equal(u, np.triu(u)) and dead.tolist() == [i == 1 for i in range(n)]
    damped = h.copy()
    damped[1, 1] = 1.0
    damped[np.diag_indices(n)] += 0.01 * np.mean(np.diag(damped))
    assert np.allclose(u.T @ u, np.linalg.inv(damped), rtol=1e-8, atol=1e-12)
