"""In-memory probes against the files they stand for: ggml's quantize in-process equals
llama_model_quantize byte for byte, a probe's KLD equals the KLD of the file with the same
change (within 1 %), the model is bit-identical after a probe is restored, and a sensitivity
step killed half-way resumes with the probes it had measured."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline.choose.file_probes import KLDProbe, build_mixed, file_kld, file_tensor_errors
from pipeline.choose.groups import group_of, probe_types
from pipeline.choose.memory_probe import MemoryProbe, ProbeLog
from pipeline.choose.weight_errors import tensor_errors
from pipeline.engine.ggml_quant import dequantize_rows, quantize_rows, round_trip
from pipeline.formats.gguf_index import read_index, tensor_values
from pipeline.formats.imatrix_file import read_imatrix
from pipeline.formats.model_info import read_model_info
from pipeline.fsutil import read_text

CTX, CHUNKS = 256, 2


def _text(calibration_sample) -> str:
    return read_text(calibration_sample)


@pytest.fixture(scope="module")
def imatrix(squeeze_imatrix) -> Path:
    return squeeze_imatrix[0]


@pytest.fixture(scope="module")
def probe(base_f16, imatrix, calibration_sample):
    with MemoryProbe(base_f16, _text(calibration_sample), CTX, CHUNKS, imatrix_path=imatrix) as p:
        yield p


@pytest.fixture(scope="module")
def file_probe(base_f16, calibration_sample):
    return KLDProbe(base_f16, _text(calibration_sample), CTX, CHUNKS)


def test_every_weight_of_the_file_is_found_with_its_shape_and_type(probe, base_f16):
    weights = probe.weights
    index = read_index(base_f16)
    assert set(index) <= set(weights.names)
    for name, entry in index.items():
        assert weights.shape(name) == tuple(entry.shape), name
        assert weights.stored_type(name) == entry.type.name
    np.testing.assert_array_equal(weights.original("blk.2.ffn_up.weight"),
                                  tensor_values(base_f16, index["blk.2.ffn_up.weight"]))


@pytest.mark.parametrize("name,qtype", [("blk.4.ffn_down.weight", "Q3_K"), ("blk.4.attn_v.weight", "IQ4_NL"),
                                        ("blk.4.ffn_gate.weight", "Q5_1")])
def test_quantize_in_process_is_byte_identical_to_llama_quantize(base_f16, imatrix, tmp_path, name, qtype):
    path = tmp_path / "one.gguf"
    build_mixed(base_f16, path, {name: qtype}, imatrix)
    entry = read_index(path)[name]
    assert entry.type.name == qtype
    held = np.memmap(path, dtype=np.uint8, mode="r", offset=entry.offset, shape=(entry.n_bytes,))
    values = tensor_values(base_f16, read_index(base_f16)[name])
    ours = quantize_rows(values, qtype, read_imatrix(imatrix).normalized()[name])
    assert np.array_equal(ours.reshape(-1), held)
    np.testing.assert_array_equal(dequantize_rows(ours, qtype, values.shape[1]), tensor_values(path, entry))


def test_weight_errors_in_process_equal_those_from_files(base_f16, imatrix, tmp_path):
    info = read_model_info(base_f16)
    only = {"blk.3.attn_output.weight", "blk.3.attn_q.weight", "token_embd.weight"}
    types = ("Q2_K", "Q4_K", "Q4_0", "Q8_0")
    # every row of the block tensors (exact), the embedding's 262k rows sampled (1 in 16: an estimate)
    mem = {(r.tensor, r.type): r for r in tensor_errors(base_f16, imatrix, info, types, group_of,
                                                        only=only - {"token_embd.weight"}, sample=False)}
    mem.update({(r.tensor, r.type): r for r in tensor_errors(base_f16, imatrix, info, types, group_of,
                                                             only={"token_embd.weight"})})
    files = {(r.tensor, r.type): r for r in file_tensor_errors(base_f16, imatrix, info, tmp_path, types, only=only)}
    assert set(mem) == set(files)  # 640-wide rows: no K-quant for attn_q or the embedding
    for key, f in files.items():
        assert mem[key].bytes == f.bytes, key
        rel = 0.02 if key[0] == "token_embd.weight" else 1e-5
        assert mem[key].error == pytest.approx(f.error, rel=rel), key


def test_the_probe_equals_the_file_with_the_same_change_within_one_percent(probe, file_probe, base_f16, imatrix,
                                                                          tmp_path):
    info = read_model_info(base_f16)
    mix = {"token_embd.weight": "Q5_0", "blk.2.ffn_down.weight": "Q3_K", "blk.2.attn_k.weight": "IQ4_NL",
           "blk.6.ffn_up.weight": "Q4_0", "blk.6.attn_output.weight": "Q2_K", "blk.11.ffn_gate.weight": "Q5_1"}
    cases = {"layer 7 removed": ({}, [7]), "attention of 3 low": (probe_types(info, (3, "attn")), []),
             "MLP of 9 low": (probe_types(info, (9, "mlp")), []), "a mix of types": (mix, [])}
    for label, (types, removed) in cases.items():
        mem = probe.kld(types, removed)
        ref = file_kld(file_probe, base_f16, imatrix, tmp_path, None, types, removed)
        assert ref > 1e-3, label
        assert mem == pytest.approx(ref, rel=0.01), label


def test_after_a_probe_the_model_is_bit_identical_to_the_base(probe):
    weights = probe.weights
    before_logits = probe.logits()
    touched = ["token_embd.weight", "blk.5.attn_output.weight", "blk.5.ffn_down.weight", "blk.8.attn_q.weight"]
    before = {n: weights.raw(n).copy() for n in touched}
    probe.kld({"token_embd.weight": "Q4_0", "blk.8.attn_q.weight": "Q4_0"}, removed=[5])
    assert weights.changed == []
    for name in touched:
        assert weights.stored_type(name) == "F16"
        assert np.array_equal(weights.raw(name), before[name]), name
    after_logits = probe.logits()
    assert np.array_equal(before_logits, after_logits)
    # the KLD of the restored model against the base, from the full distributions: exactly 0
    logp = before_logits - np.log(np.exp(before_logits.astype(np.float64)).sum(-1, keepdims=True))
    logq = after_logits - np.log(np.exp(after_logits.astype(np.float64)).sum(-1, keepdims=True))
    assert float((np.exp(logp) * (logp - logq)).sum()) == 0.0


def test_a_probe_restores_the_model_when_measuring_fails(probe):
    before = probe.weights.raw("blk.1.ffn_down.weight").copy()
    with pytest.raises(Exception):
        probe.measure({"blk.1.ffn_down.weight": "Q4_K", "no.such.weight": "Q4_0"})
    assert probe.weights.changed == []
    assert np.array_equal(probe.weights.raw("blk.1.ffn_down.weight"), before)


def test_round_trip_lands_on_the_type_grid():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 512)).astype(np.float32)
    once = round_trip(x, "Q4_K")
    assert np.abs(once - x).max() > 0
    np.testing.assert_array_equal(round_trip(once, "Q8_0"), round_trip(once, "Q8_0"))


def test_probe_log_keeps_finished_probes_and_ignores_a_torn_line(tmp_path):
    log = ProbeLog(tmp_path / "p.jsonl", "abc")
    assert log.start() == {}
    log.add("3.attn", 0.5)
    log.add("token_embd", 0.25)
    with open(log.path, "a") as f:
        f.write('{"unit": "4.ml')  # killed in the middle of a write
    assert ProbeLog(log.path, "abc").start() == {"3.attn": 0.5, "token_embd": 0.25}
    assert ProbeLog(log.path, "other inputs").start() == {}  # measured on something else: start over
    assert log.path.read_text() == json.dumps({"fingerprint": "other inputs"}) + "\n"


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from pipeline.formats.model_info import read_model_info
    from pipeline.fsutil import read_text
    from pipeline.choose.memory_probe import MemoryProbe
    from pipeline.choose.sensitivity import run_sensitivity

    base, imatrix, text, log, kill_after = sys.argv[1:6]
    done = []

    def map_then_die(fn, items, desc=""):
        out = []
        for item in items:
            out.append(fn(item))
            done.append(item)
            if len(done) == int(kill_after):
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind, as a real kill
        return out

    probe = MemoryProbe(Path(base), read_text(Path(text)), 256, 2, imatrix_path=Path(imatrix))
    run_sensitivity(probe, read_model_info(Path(base)), Path(imatrix), layers=[0], log_path=Path(log),
                    map=map_then_die)
""")


def test_a_killed_sensitivity_step_resumes_with_the_probes_it_had(base_f16, imatrix, calibration_sample, tmp_path):
    log = tmp_path / "sensitivity.probes.jsonl"
    script = tmp_path / "killed.py"
    script.write_text(KILLED_RUN)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "SQUEEZE_PROGRESS": "0"}
    r = subprocess.run([sys.executable, str(script), str(base_f16), str(imatrix), str(calibration_sample), str(log),
                        "4"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr
    lines = log.read_text().splitlines()
    assert len(lines) == 1 + 4  # the fingerprint, then the 4 probes measured before the kill

    from pipeline.choose.sensitivity import run_sensitivity

    said, measured = [], []

    def counting_map(fn, items, desc=""):
        measured.extend(items)
        return [fn(i) for i in items]

    info = read_model_info(base_f16)
    with MemoryProbe(base_f16, _text(calibration_sample), CTX, CHUNKS, imatrix_path=imatrix) as probe:
        result = run_sensitivity(probe, info, imatrix, layers=[0], log_path=log, map=counting_map,
                                 echo=said.append)
        # 1 layer x 3 probes, the embedding, 7 kinds: the 4 measured before the kill are not measured again
        assert said == [f"sensitivity: resuming with 4 of 11 probes measured ({log.name})"]
        assert len(measured) == 7 and (0, "removed") not in measured
        # what was logged before the kill is what an uninterrupted probe measures
        first = json.loads(lines[1])
        assert first["unit"] == "0.removed"
        assert result.rows[0].kld_removed == first["kld"] == pytest.approx(probe.kld(removed=[0]), rel=1e-12)
