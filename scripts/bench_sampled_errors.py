"""Benchmark: is the sampled weight error good enough to allocate with? (issue 18, part 3)

    flock /tmp/squeeze-heavy.lock .venv/bin/python scripts/bench_sampled_errors.py [--budgets Q2_K,Q3_K_M,Q4_K_M]

On Gemma 3 270M's dithered F16 base (no grid artifact), with the imatrix of 20 chunks of
groups_merged and the sensitivity map measured in memory (both kept in results/bench/work, as
scripts/bench_allocate.py keeps them): every tensor's weight error at every candidate type is
computed twice, from every row and from the sampled rows (pipeline.choose.weight_errors: the
sampling rule), timed. The alphas are derived from each set of errors, the allocator chooses a
mix for each budget (the stock mixes' sizes, blocks regime: token_embd at the stock type) from
each, and both mixes are measured in memory on the probe chunks.

Targets: the sampled allocation gives the same type to >= 95 % of the tensors, and its measured
KLD is within 2 % of the full one's. Writes results/bench/sampled-errors.json / .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import OUT, ROOT, dithered_base, log, write_json, write_text  # noqa: E402

sys.path.insert(0, str(ROOT))

from bench_allocate import held_types, sensitivities  # noqa: E402

from pipeline.choose.budget import layout  # noqa: E402
from pipeline.choose.groups import CANDIDATE_TYPES, group_of  # noqa: E402
from pipeline.choose.measured_allocation import choose_types  # noqa: E402
from pipeline.choose.memory_probe import PROBE_CHUNKS  # noqa: E402
from pipeline.choose.sensitivity import Sensitivity, group_alphas, kind_gains  # noqa: E402
from pipeline.choose.weight_errors import BLOCK_ROWS, MIN_ROWS_PER_MATRIX, VOCAB_ROWS, tensor_errors  # noqa: E402
from pipeline.engine.backend import engine_versions  # noqa: E402
from pipeline.engine.quantize import quantize_file  # noqa: E402
from pipeline.formats.tensor_names import OUTPUT, TOKEN_EMBD  # noqa: E402

SAME_TYPES_TARGET = 0.95
KLD_TARGET = 0.02


def with_errors(sens: Sensitivity, errors) -> Sensitivity:
    """The map with other weight errors: the alphas derived again from the same probes."""
    errors = [e for e in errors if e.group in sens.group_kld]
    gains = kind_gains(errors, sens.kind_kld)
    per_group, per_tensor = group_alphas(errors, sens.group_kld, gains)
    return Sensitivity(sens.rows, sens.group_kld, per_group, errors, sens.correlations, per_tensor, sens.kind_kld,
                       gains)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="Q2_K,Q3_K_M,Q4_K_M")
    args = ap.parse_args()
    dithered = dithered_base()
    base, info, imatrix, layers_csv = dithered.path, dithered.info, dithered.imatrix, dithered.layers_csv
    cal = dithered.calibration_probe()
    sens = sensitivities(base, imatrix, layers_csv, cal)

    timings, errors = {}, {}
    for label, sample in (("full", False), ("sampled", True)):
        started = time.perf_counter()
        errors[label] = tensor_errors(base, imatrix, info, CANDIDATE_TYPES, group_of, sample=sample)
        timings[label] = time.perf_counter() - started
        log(f"weight errors, {label}: {timings[label]:.1f} s for {len(errors[label])} (tensor, type) pairs")
    full = {(e.tensor, e.type): e.error for e in errors["full"]}
    rel = [abs(e.error / full[(e.tensor, e.type)] - 1) for e in errors["sampled"] if full[(e.tensor, e.type)] > 0]
    maps = {label: with_errors(sens, errs) for label, errs in errors.items()}

    lay = layout(info, (), base)
    rows = []
    for name in [x.strip() for x in args.budgets.split(",") if x.strip()]:
        stock = OUT / "work" / f"stock-{name}.gguf"
        quantize_file(base, stock, name, imatrix_path=imatrix)
        budget, types = stock.stat().st_size, held_types(stock)
        stock.unlink()
        frozen = {n: t for n, t in types.items() if n in (TOKEN_EMBD, OUTPUT) and any(e.tensor == n for e in sens.errors)}
        chosen = {label: choose_types(m, budget, lay.fixed, frozen=frozen, budget_label=name)
                  for label, m in maps.items()}
        a, b = chosen["full"].allocation.types, chosen["sampled"].allocation.types
        same = sum(1 for n in a if b.get(n) == a[n]) / len(a)
        kld = {label: cal.kld(c.allocation.types) for label, c in chosen.items()}
        row = {"budget": name, "budget_bytes": budget, "tensors": len(a), "same_type_share": same,
               "full_bytes": chosen["full"].allocation.total_bytes, "sampled_bytes": chosen["sampled"].allocation.total_bytes,
               "full_kld": kld["full"], "sampled_kld": kld["sampled"],
               "kld_difference": kld["sampled"] / kld["full"] - 1}
        rows.append(row)
        log(f"{name}: same type for {same:.1%} of {len(a)} tensors; KLD full {kld['full']:.4f}, "
            f"sampled {kld['sampled']:.4f} ({row['kld_difference']:+.2%})")
    cal.close()

    verdicts = [f"same type ≥ {SAME_TYPES_TARGET:.0%}: " + ("met" if all(r["same_type_share"] >= SAME_TYPES_TARGET
                                                                         for r in rows) else "missed"),
                f"KLD within {KLD_TARGET:.0%}: " + ("met" if all(abs(r["kld_difference"]) <= KLD_TARGET
                                                                for r in rows) else "missed")]
    data = {"date": time.strftime("%Y-%m-%d"), "engine": engine_versions(),
            "base": "Gemma 3 270M F16 base dithered off its Q4_K_M grid (model.dither)",
            "imatrix": "20 chunks x 512 of groups_merged", "probe": f"{PROBE_CHUNKS} x 512 calibration tokens, in memory",
            "regime": "blocks (token_embd at the stock type), no refinement: the errors alone decide",
            "rule": {"block_rows": BLOCK_ROWS, "vocab_rows": VOCAB_ROWS, "min_rows_per_matrix": MIN_ROWS_PER_MATRIX,
                     "how": "every k-th row of each matrix, k = ceil(rows / limit); the error scaled by rows / sampled"},
            "seconds": {k: round(v, 1) for k, v in timings.items()},
            "relative_error": {"median": statistics.median(rel), "p95": sorted(rel)[int(0.95 * (len(rel) - 1))],
                               "max": max(rel), "pairs": len(rel)},
            "rows": rows, "verdicts": verdicts}
    write_json(OUT / "sampled-errors.json", data)
    md = ["# Weight errors from sampled rows against every row", "",
          f"{data['date']}. {data['base']}; imatrix {data['imatrix']}; KLD measured {data['probe']}. "
          f"Sampling rule: at most {BLOCK_ROWS} rows per block tensor (at least {MIN_ROWS_PER_MATRIX} per expert "
          f"matrix), {VOCAB_ROWS} per vocabulary-sized tensor, every k-th row.", "",
          f"Time for the errors of {len(errors['full'])} (tensor, type) pairs: every row {timings['full']:.1f} s, "
          f"sampled {timings['sampled']:.1f} s. Relative error of the sampled estimate: median "
          f"{data['relative_error']['median']:.2%}, 95th percentile {data['relative_error']['p95']:.2%}, "
          f"max {data['relative_error']['max']:.2%}.", "",
          "| budget | tensors | same type | KLD from every row | KLD from sampled rows | difference |",
          "|---|---:|---:|---:|---:|---:|"]
    md += [f"| {r['budget']} | {r['tensors']} | {r['same_type_share']:.1%} | {r['full_kld']:.4f} | "
           f"{r['sampled_kld']:.4f} | {r['kld_difference']:+.2%} |" for r in rows]
    md += ["", *[f"- {v}" for v in verdicts]]
    write_text(OUT / "sampled-errors.md", "\n".join(md) + "\n")
    log("wrote results/bench/sampled-errors.json and .md")


if __name__ == "__main__":
    main()
