"""The verdict of scripts/gpu_check.sh on the record it wrote (results/bench/gpu.json): every
claim the check makes is compared with a stated tolerance, and any miss fails it.

    python scripts/gpu_verdict.py results/bench/gpu.json   # exit 1 with one line a miss

The tolerances, and why they are not zero: a GPU sums in another order (and cuBLAS in F16 for
quantized weights' matrix products), so the same model gives slightly different logits there;
they are wide enough for that and narrow enough that a wrong offload, a probe that writes into the
wrong buffer, or an imatrix collected from the wrong rows fails."""

from __future__ import annotations

import json
import sys
from pathlib import Path

TOLERANCES = {
    "ppl_rel": 0.005,          # |PPL_gpu / PPL_cpu - 1| per variant and for the base
    "kld_rel": 0.05,           # |KLD_gpu - KLD_cpu| <= max(kld_rel * KLD_cpu, kld_abs)
    "kld_abs": 5e-4,
    "imatrix_rel_l2": 0.01,    # per tensor: ||gpu - cpu|| / ||cpu|| of the importance vector
    "probe_rel": 0.01,         # an in-memory probe's KLD on the GPU against the CPU's
}


def _load_misses(load: dict | None) -> list[str]:
    if not load:
        return ["load report: missing (llama.cpp's load log was not read)"]
    if load["offloaded"] == load["layers"] > 0 and load.get("device_mib", 0) > 0:
        return []
    return [f"load report: llama.cpp put {load['offloaded']}/{load['layers']} layers on the GPU and "
            f"{load.get('device_mib', 0):.1f} MiB in device buffers; every layer was asked for"]


def _score_misses(scores: dict, tol: dict) -> list[str]:
    if not scores:
        return ["scores: missing (the offloaded recipe's PPL and KLD were not compared with the CPU's)"]
    out = []
    for variant, s in sorted(scores.items()):
        ratio = s["gpu"]["ppl"] / s["cpu"]["ppl"] - 1
        if abs(ratio) > tol["ppl_rel"]:
            out.append(f"scores: {variant}: PPL {s['gpu']['ppl']:.4f} on the GPU against {s['cpu']['ppl']:.4f} on "
                       f"the CPU ({ratio:+.2%}; tolerance ±{tol['ppl_rel']:.1%})")
        if "mean_kld" not in s["cpu"]:
            continue  # the base has a PPL only
        g, c = s["gpu"]["mean_kld"], s["cpu"]["mean_kld"]
        allowed = max(tol["kld_rel"] * c, tol["kld_abs"])
        if abs(g - c) > allowed:
            out.append(f"scores: {variant}: mean KLD {g:.5f} on the GPU against {c:.5f} on the CPU "
                       f"(off by {abs(g - c):.5f}; tolerance {allowed:.5f})")
    return out


def _imatrix_misses(imatrix: dict | None, tol: dict) -> list[str]:
    if not imatrix:
        return ["imatrix: missing"]
    out = [] if imatrix["same_tensors"] else ["imatrix: the GPU's and the CPU's name different tensors"]
    if imatrix["max_rel_l2"] > tol["imatrix_rel_l2"]:
        out.append(f"imatrix: {imatrix['worst']} differs by {imatrix['max_rel_l2']:.3%} (relative L2) between "
                   f"the GPU and the CPU; tolerance {tol['imatrix_rel_l2']:.1%}")
    return out


def _probe_misses(probes: dict, restored: bool, tol: dict) -> list[str]:
    out = [] if probes else ["probes: missing"]
    out += [f"probes: {label}: KLD {p['gpu']:.5f} on the GPU against {p['cpu']:.5f} on the CPU "
            f"({p['rel_diff']:.2%}; tolerance {tol['probe_rel']:.0%})"
            for label, p in sorted(probes.items()) if p["rel_diff"] > tol["probe_rel"]]
    if not restored:
        out.append("probes: the weights in device memory were not put back bit-identical after a probe")
    return out


def failures(record: dict, tol: dict = TOLERANCES) -> list[str]:
    """One line for every claim of the record that misses its tolerance (empty: the check passed)."""
    return (_load_misses(record.get("load_report")) + _score_misses(record.get("scores") or {}, tol)
            + _imatrix_misses(record.get("imatrix_gpu_vs_cpu"), tol)
            + _probe_misses(record.get("probes") or {}, record.get("probe_restored_bit_identical_on_gpu", False), tol))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python scripts/gpu_verdict.py RECORD.json", file=sys.stderr)
        return 2
    record = json.loads(Path(argv[0]).read_text())
    missed = failures(record)
    for line in missed:
        print(f"Error: gpu_check: {line}", file=sys.stderr)
    if not missed:
        print(f"gpu_check: met: every claim within its tolerance ({', '.join(f'{k} {v:g}' for k, v in TOLERANCES.items())})")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
