"""scripts/gpu_check.sh's verdict (scripts/gpu_verdict.py) can fail on each claim it makes: a record
doctored one claim at a time fails with that claim named; llama.cpp's real load report of a CPU
build (nothing offloaded) fails the every-layer-on-the-GPU claim. Runs without a GPU."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from pipeline.engine.load_report import load_report, parse_load_log
from tests.conftest import ROOT
from tests.tiny_models import tiny_model

sys.path.insert(0, str(ROOT / "scripts"))
from gpu_verdict import TOLERANCES, failures  # noqa: E402

# What a passing check records (the shape gpu_check.sh writes), with GPU-like small differences.
GOOD = {
    "load_report": {"offloaded": 7, "layers": 7, "device_mib": 40.2, "buffers_mib": {"CUDA0": 40.2, "CPU_Mapped": 9.8}},
    "scores": {"base": {"gpu": {"ppl": 20.031}, "cpu": {"ppl": 20.03}},
               "Q4_K_M": {"gpu": {"ppl": 20.5, "mean_kld": 0.0301}, "cpu": {"ppl": 20.49, "mean_kld": 0.0300}}},
    "imatrix_gpu_vs_cpu": {"tensors": 42, "same_tensors": True, "max_rel_l2": 0.0004, "median_rel_l2": 0.0001,
                           "worst": "blk.3.ffn_down.weight"},
    "probes": {"layer removed": {"gpu": 0.501, "cpu": 0.5, "rel_diff": 0.002}},
    "probe_restored_bit_identical_on_gpu": True,
}

DOCTORED = {
    "load report": lambda r: r["load_report"].update(offloaded=5),
    "device buffers": lambda r: r["load_report"].update(device_mib=0.0),
    "scores: Q4_K_M: PPL": lambda r: r["scores"]["Q4_K_M"]["gpu"].update(ppl=21.0),
    "scores: Q4_K_M: mean KLD": lambda r: r["scores"]["Q4_K_M"]["gpu"].update(mean_kld=0.04),
    "scores: missing": lambda r: r.update(scores={}),
    "imatrix:": lambda r: r["imatrix_gpu_vs_cpu"].update(max_rel_l2=0.2),
    "imatrix: the GPU's": lambda r: r["imatrix_gpu_vs_cpu"].update(same_tensors=False),
    "probes: layer removed": lambda r: r["probes"]["layer removed"].update(gpu=0.6, rel_diff=0.2),
    "probes: the weights": lambda r: r.update(probe_restored_bit_identical_on_gpu=False),
}


def test_a_good_record_passes():
    assert failures(GOOD) == []


@pytest.mark.parametrize("claim", DOCTORED)
def test_each_doctored_claim_fails_the_check_and_is_named(claim):
    record = copy.deepcopy(GOOD)
    DOCTORED[claim](record)
    missed = failures(record)
    assert len(missed) == 1, missed
    expected = "load report" if claim == "device buffers" else claim
    assert missed[0].startswith(expected), missed


def test_the_verdict_command_exits_1_with_one_line_a_miss(tmp_path):
    record = copy.deepcopy(GOOD)
    DOCTORED["imatrix:"](record)
    DOCTORED["scores: Q4_K_M: mean KLD"](record)
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(record))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_verdict.py"), str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("Error: gpu_check: ") for line in lines)
    assert "tolerance" in lines[0] and "tolerance" in lines[1]
    path.write_text(json.dumps(GOOD))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_verdict.py"), str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("gpu_check: met")


def test_the_kld_tolerance_is_relative_with_an_absolute_floor():
    record = copy.deepcopy(GOOD)
    cpu = record["scores"]["Q4_K_M"]["cpu"]["mean_kld"]
    record["scores"]["Q4_K_M"]["gpu"]["mean_kld"] = cpu * (1 + TOLERANCES["kld_rel"] * 0.9)
    assert failures(record) == []
    record["scores"]["Q4_K_M"]["gpu"]["mean_kld"] = cpu * (1 + TOLERANCES["kld_rel"] * 1.1)
    assert len(failures(record)) == 1


def test_llama_cpps_load_report_of_a_cpu_build_fails_the_offload_claim():
    model = tiny_model("phi3")
    report = load_report(model, -1)  # every layer asked for; a CPU build puts none on a GPU
    assert report.offloaded == 0 and report.layers == 4 and not report.all_offloaded
    assert report.buffers.get("CPU_Mapped", 0) > 0 and report.device_mib == 0
    record = copy.deepcopy(GOOD)
    record["load_report"] = {"offloaded": report.offloaded, "layers": report.layers, "device_mib": report.device_mib}
    assert [m for m in failures(record) if m.startswith("load report")]


def test_the_load_log_of_an_offloaded_model_is_read():
    log = ("load_tensors: offloading 6 repeating layers to GPU\nload_tensors: offloading output layer to GPU\n"
           "load_tensors: offloaded 7/7 layers to GPU\nload_tensors:        CUDA0 model buffer size =    40.20 MiB\n"
           "load_tensors:   CPU_Mapped model buffer size =     9.80 MiB\n")
    report = parse_load_log(log)
    assert (report.offloaded, report.layers, report.device_mib) == (7, 7, 40.2) and report.all_offloaded
