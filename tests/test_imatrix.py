"""The calibration pass (importance matrix + layer similarity) against llama.cpp's llama-imatrix,
its GGUF / legacy files, resumption, and the one-line answers to bad calibration input."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from pipeline.engine.context import Context
from pipeline.engine.eval_hook import GGML_TYPE_F32, EvalHook, ggml
from pipeline.engine.model import Model
from pipeline.errors import SqueezeError
from pipeline.formats.gguf_index import read_index
from pipeline.formats.imatrix_file import (Imatrix, ImatrixEntry, check_against_model, combine_imatrices, read_imatrix,
                                           write_imatrix)
from pipeline.formats.layers_csv import read_layers_csv
from pipeline.formats.model_info import read_model_info
from pipeline.measure.calibration import calibration_tokens, collect, fingerprint, load_checkpoint, to_imatrix

CALIBRATION_CHUNKS = 4  # what the squeeze_imatrix / cli_imatrix fixtures of conftest.py use


def tiny_imatrix(n_cols=(8, 4)) -> Imatrix:
    rng = np.random.default_rng(3)
    im = Imatrix(datasets=["tiny.txt"], chunk_count=2, chunk_size=16)
    for i, n in enumerate(n_cols):
        im.entries[f"blk.{i}.ffn_down.weight"] = ImatrixEntry(rng.random((1, n), dtype=np.float32) * 32,
                                                              np.array([32]))
    return im


# ---- against llama-imatrix ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.reference
def test_imatrix_matches_llama_imatrix(squeeze_imatrix, cli_imatrix):
    # Same model, text, ctx 512 and 4 chunks. squeeze lays out the chunks and batches as the CLI
    # does (4 sequences per decode, ubatch 512, BOS first), so every activation is computed by
    # the same kernels on the same rows; and it adds the squares in the CLI's order with the
    # CLI's rounding (fused multiply-add into float32). So the tolerance is zero: every sum and
    # count must be bit-identical, which is also what the quantize test below relies on.
    ours, theirs = read_imatrix(squeeze_imatrix[0]), read_imatrix(cli_imatrix)
    assert sorted(ours.entries) == sorted(theirs.entries)
    assert len(ours.entries) == 18 * 7
    assert (ours.chunk_count, ours.chunk_size) == (theirs.chunk_count, theirs.chunk_size) == (CALIBRATION_CHUNKS, 512)
    for name, e in ours.entries.items():
        t = theirs.entries[name]
        assert e.counts.tolist() == t.counts.tolist() == [CALIBRATION_CHUNKS * 512], name
        assert e.sums.shape == t.sums.shape, name
        np.testing.assert_array_equal(e.sums, t.sums, err_msg=name)


@pytest.mark.slow
@pytest.mark.reference
def test_quantizing_with_squeeze_imatrix_is_bit_identical(base_f16, squeeze_imatrix, cli_imatrix, tmp_path):
    from pipeline.engine.quantize import quantize_file

    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    quantize_file(base_f16, ours, "Q2_K", imatrix_path=squeeze_imatrix[0])
    quantize_file(base_f16, theirs, "Q2_K", imatrix_path=cli_imatrix)
    a, b = read_index(ours), read_index(theirs)  # the tensor tables (gguf-py's reader: ~10 s a file)
    assert list(a) == list(b)
    for name, ta in a.items():
        tb = b[name]
        assert ta.type == tb.type, name
        assert _tensor_bytes(ours, ta) == _tensor_bytes(theirs, tb), name


def _tensor_bytes(path, entry) -> bytes:
    with open(path, "rb") as f:
        f.seek(entry.offset)
        return f.read(entry.n_bytes)


@pytest.mark.slow
@pytest.mark.reference
def test_legacy_dat_and_combining_match_the_cli(base_f16, squeeze_imatrix, cli_imatrix, llama_tools, tmp_path):
    tool = [str(llama_tools / "llama-imatrix"), "-m", str(base_f16)]  # -m is required; no model is loaded
    # the CLI converts squeeze's GGUF imatrix into its legacy .dat format; squeeze reads that back
    dat = tmp_path / "ours.dat"
    subprocess.run([*tool, "--in-file", str(squeeze_imatrix[0]), "--output-format", "dat", "-o", str(dat)],
                   check=True, capture_output=True)
    legacy, gguf_im = read_imatrix(dat), read_imatrix(squeeze_imatrix[0])
    assert legacy.legacy and legacy.chunk_count == CALIBRATION_CHUNKS
    norm_l, norm_g = legacy.normalized(), gguf_im.normalized()
    assert sorted(norm_l) == sorted(norm_g)
    for name in norm_g:  # legacy stores sum / count * ncall in float32: one rounding more each way
        np.testing.assert_allclose(norm_l[name], norm_g[name], rtol=1e-6, err_msg=name)
    # combining two GGUF files and a legacy one, as `llama-imatrix --in-file ... --in-file ...`
    combined = tmp_path / "combined.gguf"
    subprocess.run([*tool, "--in-file", str(squeeze_imatrix[0]), "--in-file", str(cli_imatrix), "--in-file", str(dat),
                    "-o", str(combined)], check=True, capture_output=True)
    want = read_imatrix(combined)
    got = combine_imatrices([read_imatrix(squeeze_imatrix[0]), read_imatrix(cli_imatrix), legacy], chunk_size=512)
    assert sorted(got.entries) == sorted(want.entries)
    assert got.chunk_count == want.chunk_count == 3 * CALIBRATION_CHUNKS
    for name, e in want.entries.items():
        assert got.entries[name].counts.tolist() == e.counts.tolist(), name
        np.testing.assert_array_equal(got.entries[name].sums, e.sums, err_msg=name)


# ---- layer similarity and resumption ------------------------------------------------------------

@pytest.mark.slow
def test_layers_csv_has_every_block_over_every_token(squeeze_imatrix):
    rows = read_layers_csv(squeeze_imatrix[1])
    assert [r.layer for r in rows] == list(range(18))
    assert all(r.tokens == CALIBRATION_CHUNKS * 512 for r in rows)
    assert all(-1.0 <= r.cos_sim <= 1.0 for r in rows)
    assert all(abs(r.block_influence - (1.0 - r.cos_sim)) < 1e-7 for r in rows)
    # block 0 turns token embeddings into something else; the middle blocks change the state little
    assert rows[0].block_influence > 0.5
    assert min(r.block_influence for r in rows) < 0.05


class Interrupted(Exception):
    pass


def stop_at(chunks: int):
    """An on_batch hook that kills the pass once `chunks` chunks are checkpointed."""
    def stop(done):
        if done == chunks:
            raise Interrupted
    return stop


@pytest.mark.slow
def test_interrupted_pass_resumes_from_last_checkpoint(base_f16, calibration_sample, tmp_path):
    tokens = calibration_tokens(base_f16, [calibration_sample])
    checkpoint = tmp_path / "imatrix.checkpoint.npz"

    # one 128-token chunk per decode, so a checkpoint is saved after every chunk
    with pytest.raises(Interrupted):
        collect(base_f16, tokens, 128, 3, checkpoint=checkpoint, on_batch=stop_at(2), n_seq=1)
    assert checkpoint.exists()
    resumed, extra = collect(base_f16, tokens, 128, 3, checkpoint=checkpoint, n_seq=1)
    assert extra["resumed_from_chunk"] == 2
    whole, extra = collect(base_f16, tokens, 128, 3, n_seq=1)
    assert extra["resumed_from_chunk"] == 0
    a, b = to_imatrix(resumed, 128, []), to_imatrix(whole, 128, [])
    assert sorted(a.entries) == sorted(b.entries) and a.chunk_count == b.chunk_count == 3
    for name in a.entries:
        assert a.entries[name].counts.tolist() == b.entries[name].counts.tolist() == [384]
        np.testing.assert_array_equal(a.entries[name].sums, b.entries[name].sums, err_msg=name)
    np.testing.assert_array_equal(resumed.cos_tokens, whole.cos_tokens)
    np.testing.assert_allclose(resumed.cos_sum, whole.cos_sum, rtol=1e-12)
    # a checkpoint of another model, text, ctx or batch layout is not resumed
    assert load_checkpoint(checkpoint, fingerprint(base_f16, tokens[:384], 128, 1)) is not None
    assert load_checkpoint(checkpoint, fingerprint(base_f16, tokens[1:385], 128, 1)) is None
    assert load_checkpoint(checkpoint, fingerprint(base_f16, tokens[:384], 128, 2)) is None


# ---- files and bad input ------------------------------------------------------------------------

def test_gguf_imatrix_round_trip(tmp_path):
    im = tiny_imatrix()
    write_imatrix(tmp_path / "a.gguf", im)
    back = read_imatrix(tmp_path / "a.gguf")
    assert (back.datasets, back.chunk_count, back.chunk_size, back.legacy) == (["tiny.txt"], 2, 16, False)
    for name, e in im.entries.items():
        np.testing.assert_array_equal(back.entries[name].sums, e.sums)
        assert back.entries[name].counts.tolist() == [32]
    # the normalized values llama-quantize is handed: sums / counts
    np.testing.assert_allclose(back.normalized()["blk.0.ffn_down.weight"], im.entries["blk.0.ffn_down.weight"].sums[0] / 32)


def test_truncated_imatrix_is_one_line(tmp_path):
    path = tmp_path / "cut.gguf"
    write_imatrix(path, tiny_imatrix())
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 20])
    with pytest.raises(SqueezeError) as exc:
        read_imatrix(path)
    assert str(exc.value) == (f"{path}: truncated imatrix file ({len(data) - 20} bytes; its tensors need {len(data)}); "
                              f"make it again")
    path.write_bytes(data[:100])
    with pytest.raises(SqueezeError) as exc:
        read_imatrix(path)
    assert str(exc.value).startswith(f"{path}: truncated or damaged imatrix file (")
    assert "\n" not in str(exc.value)


def test_truncated_legacy_imatrix_is_one_line(tmp_path):
    name = b"blk.0.ffn_down.weight"
    body = np.arange(8, dtype=np.float32).tobytes()
    data = np.array([1, len(name)], dtype="<i4").tobytes() + name + np.array([2, 8], dtype="<i4").tobytes() + body
    path = tmp_path / "cut.dat"
    path.write_bytes(data[:-5])
    with pytest.raises(SqueezeError) as exc:
        read_imatrix(path)
    assert str(exc.value) == f"{path}: truncated imatrix file (ends at byte {len(data) - 5} inside entry 1); make it again"
    path.write_bytes(data)
    im = read_imatrix(path)
    assert im.legacy and im.entries["blk.0.ffn_down.weight"].counts.tolist() == [2]
    np.testing.assert_allclose(im.normalized()["blk.0.ffn_down.weight"], np.arange(8) / 2)


def test_imatrix_from_another_model_is_one_line(base_f16, tmp_path):
    info = read_model_info(base_f16)
    path = tmp_path / "other.gguf"
    other = Imatrix(entries={"blk.0.attn_q.weight": ImatrixEntry(np.ones((1, 576), np.float32), np.array([512]))})
    with pytest.raises(SqueezeError) as exc:
        check_against_model(other, path, info)
    assert str(exc.value) == (f"{path}: imatrix entry blk.0.attn_q.weight has 576 values, the model's tensor "
                              f"640x1024 needs 640; the imatrix was made for another model")
    other = Imatrix(entries={"blk.29.attn_q.weight": ImatrixEntry(np.ones((1, 640), np.float32), np.array([512]))})
    with pytest.raises(SqueezeError) as exc:
        check_against_model(other, path, info)
    assert str(exc.value) == (f"{path}: imatrix entry blk.29.attn_q.weight is not a tensor of the model "
                              f"(gemma3, 18 layers); the imatrix was made for another model")


# ---- the device-memory path of the eval hook ----------------------------------------------------

class _ViewAgainstCopy(EvalHook):
    """For every matrix product, read its activations both ways: the host view the CPU build uses
    and the ggml_backend_tensor_get copy an offloaded (GPU) layer needs."""

    def __init__(self):
        super().__init__()
        self.g = ggml()
        self.compared = 0
        self.max_diff = 0.0

    def ask(self, t):
        return t.op == self.g.MUL_MAT

    def collect(self, t):
        src1 = t.src[1].contents
        if src1.type == GGML_TYPE_F32:
            view, copy = self.g.array(src1), self.g.array(src1, copy=True)
            self.max_diff = max(self.max_diff, float(np.abs(view - copy).max()))
            self.compared += 1
        return True


def test_device_copy_path_reads_the_same_activations_as_the_host_view(source_gguf):
    with Model(source_gguf) as model:
        hook = _ViewAgainstCopy()
        tokens = model.tokenize("The quick brown fox jumps over the lazy dog. " * 8)
        with Context(model, 128, 1, cb_eval=hook.callback) as lctx:
            lctx.eval([tokens[:128]])
        hook.check()
    assert hook.compared >= 7 * model.n_layer  # q, k, v, o, gate, up, down of every block
    assert hook.max_diff == 0.0


# ---- the input's full second moment (error-compensated rounding) -------------------------------

@pytest.mark.slow
def test_second_moments_share_an_input_and_their_diagonal_is_the_imatrix(base_f16, calibration_sample, tmp_path):
    """H = sum x x^T per distinct input: q/k/v share one, gate/up one, attn_output and ffn_down
    their own; its diagonal is the imatrix's sum of squares; a killed pass resumes to the same H."""
    tokens = calibration_tokens(base_f16, [calibration_sample])
    checkpoint = tmp_path / "imatrix.checkpoint.npz"

    with pytest.raises(Interrupted):
        collect(base_f16, tokens, 128, 2, checkpoint=checkpoint, on_batch=stop_at(1), n_seq=1,
                second_moments=True)
    resumed, extra = collect(base_f16, tokens, 128, 2, checkpoint=checkpoint, n_seq=1, second_moments=True)
    assert extra["resumed_from_chunk"] == 1
    whole, _ = collect(base_f16, tokens, 128, 2, n_seq=1, second_moments=True)
    of = whole.moment_of
    assert of["blk.3.attn_k.weight"] == of["blk.3.attn_v.weight"] == of["blk.3.attn_q.weight"]
    assert of["blk.3.ffn_up.weight"] == of["blk.3.ffn_gate.weight"] != of["blk.3.attn_q.weight"]
    assert len({of["blk.3.attn_output.weight"], of["blk.3.ffn_down.weight"], of["blk.3.attn_q.weight"],
                of["blk.3.ffn_up.weight"]}) == 4
    assert set(of) == set(whole.sums)  # every dense weight of the blocks
    for name in whole.sums:
        h = whole.second_moment(name)
        np.testing.assert_allclose(np.diag(h), whole.sums[name][0], rtol=2e-5, err_msg=name)
        assert np.allclose(h, h.T)
        np.testing.assert_array_equal(resumed.second_moment(name), h, err_msg=name)
    # a checkpoint without the moments is not resumed by a pass that wants them
    assert load_checkpoint(checkpoint, fingerprint(base_f16, tokens[:256], 128, 1, second_moments=True)) is not None
    assert load_checkpoint(checkpoint, fingerprint(base_f16, tokens[:256], 128, 1)) is None
