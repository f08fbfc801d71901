"""Benchmark: error-compensated rounding (`rounding: gptq`) against llama.cpp's own, at the same
types and the same bytes, on a base without grid artifacts.

    flock /tmp/squeeze-heavy.lock .venv/bin/python scripts/bench_rounding.py [--chunks 20]

Setup (issue 27): Gemma 3 270M's F16 base dithered off its Q4_K_M grid (quality claims are made
on it: on the plain base, llama.cpp's rounding lands back on the source grid), one imatrix and
the inputs' second moments from the same calibration pass (20 x 512 tokens of groups_merged).

Rows, every file scored by `llama-perplexity --kl-divergence` against the base on wikitext-2
test (20 x 512 tokens: text neither the imatrix, the moments nor any choice saw), both sides in
the same run:
- the stock Q2_K, Q3_K_M and Q4_K_M mixes: llama_model_quantize's file against the same types
  rounded with gptq (pipeline.engine.assemble with pipeline.choose.gptq_rounding), bytes equal;
- the blocks-regime allocator at the stock Q3_K_M size (token_embd kept at its stock type, the
  blocks share the rest), once choosing and refining with llama.cpp's rounding and once with the
  probes rounding as gptq will, each file written with its rounding;
- per tensor kind, ||(W - Q) X||^2 on the calibration text for the stock mixes (in-sample by
  construction: gptq minimises exactly that; it shows where the rounding works);
- time and peak RSS, child processes, 3 runs each side, alternating: the calibration pass with
  and without the second moments; assembling the whole model at Q4_K_M with llama.cpp's rounding
  and with gptq (an empty tensor cache each run).

Targets: KLD <= 0.85 x llama.cpp's rounding at Q2_K and Q3_K_M and no worse at Q4_K_M; the
blocks allocation with gptq <= 0.7 x stock Q3_K_M; the second-moment pass <= 2 x the imatrix
pass's time; gptq rounding of the whole model <= 60 s on 2 cores.

Writes results/bench/rounding.json and rounding.md.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_allocate import held_types, sensitivities  # noqa: E402
from bench_common import (OUT, WORK, dataset, dithered_base, log, moments, provenance, run_child,  # noqa: E402
                          spread, verdict, write_json, write_text)

from pipeline.build.toolchain import reference_bin_dir  # noqa: E402
from pipeline.choose.budget import layout  # noqa: E402
from pipeline.choose.gptq_rounding import GptqRounder  # noqa: E402
from pipeline.choose.measured_allocation import choose_types  # noqa: E402
from pipeline.choose.memory_probe import PROBE_CHUNKS, MemoryProbe  # noqa: E402
from pipeline.cost.estimate import Pricer, shape_from_info  # noqa: E402
from pipeline.cost.rates import machine_rates  # noqa: E402
from pipeline.engine.assemble import assemble_file  # noqa: E402
from pipeline.engine.quantize import quantize_file  # noqa: E402
from pipeline.engine.quantized_tensors import QuantizedCache, file_identity  # noqa: E402
from pipeline.formats.moments_file import read_moments  # noqa: E402
from pipeline.formats.tensor_names import OUTPUT, TOKEN_EMBD, exact_pattern  # noqa: E402
from pipeline.fsutil import atomic_path, read_text  # noqa: E402
from pipeline.measure import calibration as activations  # noqa: E402
from pipeline.measure.rounding_gain import output_error_by_kind  # noqa: E402
from pipeline.stages.estimate import gptq_work, moments_work  # noqa: E402
from pipeline.units import MiB  # noqa: E402
from pipeline.work import Dense, GptqColumns  # noqa: E402

THREADS, CTX = 2, 512
FTYPES = ("Q2_K", "Q3_K_M", "Q4_K_M")
TIMED_FTYPE = "Q4_K_M"
RATIO_TARGETS = {"Q2_K": 0.85, "Q3_K_M": 0.85, "Q4_K_M": 1.0}
ALLOCATION_TARGET, PASS_TARGET, ROUNDING_SECONDS = 0.7, 2.0, 60.0
PREDICTION_TOLERANCE = 0.3  # the estimate's price of the rounding and of the moments' products
FILES = WORK / "rounding"


def rounder(moments_path: Path) -> GptqRounder:
    return GptqRounder(read_moments(moments_path), file_identity(moments_path))


def child(args) -> None:
    """One timed run in a process of its own (so its peak RSS is its own)."""
    base = dithered_base()
    if args.phase == "pass":
        text = dataset("groups_merged")
        activations.collect(base.path, activations.calibration_tokens(base.path, [text]), CTX, args.chunks,
                            threads=THREADS, second_moments=args.moments == "1")
    else:
        how = rounder(Path(args.moments)) if args.rounding == "gptq" else None
        with atomic_path(Path(args.dst)) as tmp:
            assemble_file(base.path, tmp, TIMED_FTYPE, imatrix_path=base.imatrix, cache=QuantizedCache(0),
                          rounder=how, threads=THREADS)


def alternate(sides: dict[str, list[str]], runs: int) -> dict:
    """Each side's seconds and peak RSS over `runs` runs, A B / B A / ..."""
    names, out = list(sides), {name: {"command": sides[name], "seconds": [], "peak_rss_bytes": []} for name in sides}
    order = []
    for rep in range(runs):
        for name in (names if rep % 2 == 0 else names[::-1]):
            before = os.getloadavg()
            seconds, rss, _ = run_child(sides[name])
            out[name]["seconds"].append(seconds)
            out[name]["peak_rss_bytes"].append(rss)
            order.append(name)
            log(f"  {name}: {seconds:.1f} s, {rss / MiB:.0f} MiB (load {before[0]:.2f})")
    for rec in out.values():
        rec["command_line"] = subprocess.list2cmdline(rec["command"])
        rec["seconds"] = spread(rec["seconds"])
        rec["peak_rss_bytes"] = max(rec["peak_rss_bytes"])
    return {"sides": out, "order": order}


class CliScore:
    """`llama-perplexity --kl-divergence` against the base's logits on the scoring text."""

    def __init__(self, base: Path, chunks: int):
        tools = reference_bin_dir()
        if tools is None:
            sys.exit("reference llama.cpp tools are not built: squeeze toolchain --build")
        self.cli, self.kld = str(tools / "llama-perplexity"), FILES / "base.kld"
        self.common = ["-f", str(dataset("wikitext-2")), "-c", str(CTX), "--chunks", str(chunks),
                       "-t", str(THREADS), "-tb", str(THREADS)]
        self.base_command = [self.cli, "-m", str(base), "--kl-divergence-base", str(self.kld), *self.common]
        log("base logits: llama-perplexity --kl-divergence-base")
        run_child(self.base_command)

    def command(self, path: Path) -> list[str]:
        return [self.cli, "-m", str(path), "--kl-divergence-base", str(self.kld), "--kl-divergence", *self.common]

    def score(self, path: Path) -> dict:
        _, _, out = run_child(self.command(path))
        stats = {}
        for key, label in (("mean_kld", r"Mean\s+KLD"), ("ppl", r"Mean PPL\(Q\)"), ("same_top_pct", r"Same top p")):
            m = re.search(label + r"\s*:\s*(-?[\d.]+)\s*±\s*([\d.]+)", out)
            if m is None:
                sys.exit(f"llama-perplexity printed no '{label}' for {path.name}:\n{out[-2000:]}")
            stats[key], stats[f"{key}_err"] = float(m[1]), float(m[2])
        return stats


def stock_rows(base, moments_path: Path, scorer: CliScore) -> tuple[list[dict], dict, dict]:
    """The stock mixes both ways; also the types of the timed ftype's file."""
    rows, kinds, timed_types = [], {}, {}
    gptq = rounder(moments_path)
    h = read_moments(moments_path)
    for ftype in FTYPES:
        stock, ours = FILES / f"{ftype}-llama.cpp.gguf", FILES / f"{ftype}-gptq.gguf"
        log(f"{ftype}: llama_model_quantize, then gptq")
        with atomic_path(stock) as tmp:
            quantize_file(base.path, tmp, ftype, imatrix_path=base.imatrix, threads=THREADS)
        with atomic_path(ours) as tmp:
            made = assemble_file(base.path, tmp, ftype, imatrix_path=base.imatrix, rounder=gptq, threads=THREADS)
        same_types = held_types(stock) == held_types(ours)
        if ftype == TIMED_FTYPE:
            timed_types = held_types(stock)
        scores = {"llama.cpp": scorer.score(stock), "gptq": scorer.score(ours)}
        ratio = scores["gptq"]["mean_kld"] / scores["llama.cpp"]["mean_kld"]
        kinds[ftype] = {k: {**v, "gptq_over_llama.cpp": v["gptq"] / v["llama.cpp"] if v["llama.cpp"] else None}
                        for k, v in output_error_by_kind(base.path, {"llama.cpp": stock, "gptq": ours}, h).items()}
        rounded = sum(1 for how in made.rounding.values() if how == "gptq")
        rows.append({"ftype": ftype, "bytes": {"llama.cpp": stock.stat().st_size, "gptq": ours.stat().st_size},
                     "same_types": same_types, "tensors_rounded_by_gptq": rounded,
                     "tensors_kept_llama_cpp": {n: how for n, how in made.rounding.items() if how != "gptq"},
                     "scores": scores, "kld_ratio": round(ratio, 4), "target_ratio": RATIO_TARGETS[ftype],
                     "verdict": verdict(ratio <= RATIO_TARGETS[ftype] and same_types
                                        and stock.stat().st_size == ours.stat().st_size)})
        log(f"{ftype}: KLD llama.cpp {scores['llama.cpp']['mean_kld']:.5f}, gptq {scores['gptq']['mean_kld']:.5f} "
            f"({ratio:.3f}x)")
        stock.unlink()
        ours.unlink()
    return rows, kinds, timed_types


def allocation_rows(base, moments_path: Path, scorer: CliScore, rounds: int) -> list[dict]:
    """The blocks regime at the stock Q3_K_M size, chosen with each rounding's probe."""
    stock = FILES / "Q3_K_M-stock.gguf"
    with atomic_path(stock) as tmp:
        quantize_file(base.path, tmp, "Q3_K_M", imatrix_path=base.imatrix, threads=THREADS)
    budget, stock_types = stock.stat().st_size, held_types(stock)
    stock_score = scorer.score(stock)
    stock.unlink()
    text = read_text(dataset("groups_merged"))
    plain = base.calibration_probe()
    sens = sensitivities(base.path, base.imatrix, base.layers_csv, plain)
    lay = layout(base.info, (), base.path)
    measured = {(e.tensor, e.type) for e in sens.errors}
    frozen = {n: t for n, t in stock_types.items()
              if n in (TOKEN_EMBD, OUTPUT) and any(e.tensor == n for e in sens.errors)}
    start = {n: t for n, t in stock_types.items() if (n, t) in measured}
    rows = []
    for rounding in ("llama.cpp", "gptq"):
        how = rounder(moments_path) if rounding == "gptq" else None
        probe = plain if how is None else MemoryProbe(base.path, text, CTX, PROBE_CHUNKS, THREADS,
                                                      imatrix_path=base.imatrix, rounder=how)
        dst = FILES / f"auto-blocks-Q3_K_M-{rounding}.gguf"
        target, started = budget, time.perf_counter()
        for _ in range(4):
            choice = choose_types(sens, target, lay.fixed, probe=probe, frozen=frozen, start=start, rounds=rounds,
                                  budget_label="Q3_K_M", echo=log)
            types = dict(choice.allocation.types)
            embd = types.pop(TOKEN_EMBD, None)
            with atomic_path(dst) as tmp:
                assemble_file(base.path, tmp, "Q8_0", imatrix_path=base.imatrix, rounder=how, threads=THREADS,
                              overrides=[(exact_pattern(n), t) for n, t in types.items()], token_embedding_type=embd)
            if dst.stat().st_size <= budget:
                break
            target -= dst.stat().st_size - budget + 4096
        else:
            sys.exit(f"blocks Q3_K_M with {rounding}: could not fit {budget} bytes")
        seconds = time.perf_counter() - started
        score = scorer.score(dst)
        ratio = score["mean_kld"] / stock_score["mean_kld"]
        rows.append({"regime": "blocks", "budget": "Q3_K_M", "budget_bytes": budget, "rounding": rounding,
                     "bytes": dst.stat().st_size, "stock_score": stock_score, "score": score,
                     "kld_over_stock": round(ratio, 4), "calibration_measured_kld": choice.measured_kld,
                     "allocation_seconds": round(seconds, 1), "refinement": choice.history,
                     "target_ratio": ALLOCATION_TARGET if rounding == "gptq" else None,
                     "verdict": verdict(ratio <= ALLOCATION_TARGET) if rounding == "gptq" else "reported"})
        log(f"blocks Q3_K_M, {rounding}: KLD {score['mean_kld']:.5f} = {ratio:.3f} x stock at "
            f"{dst.stat().st_size / MiB:.2f} MiB")
        dst.unlink()
        if probe is not plain:
            probe.close()
    plain.close()
    return rows


def predictions(base, types: dict[str, str], chunks: int) -> dict:
    """What the estimate prices, from this machine's measured rates, before anything is timed:
    the gptq file's assembly (llama.cpp's quantize of every tensor plus gptq's work) and the
    second moments' products over the timed pass's tokens."""
    shape, rates = shape_from_info(base.info), machine_rates(THREADS)
    pricer = Pricer(rates, None, THREADS)

    def price(work) -> float:
        return sum(pricer.gptq_columns(w.values) if isinstance(w, GptqColumns) else pricer.dense(w.flops)
                   for w in work if isinstance(w, (GptqColumns, Dense)))

    quantize = pricer.quantize(shape, types)
    return {"assembly_gptq_s": round(quantize + price(gptq_work(shape, types)[0]), 1),
            "assembly_llama_cpp_s": round(quantize, 1),
            "moments_extra_s": round(price(moments_work(shape, chunks * CTX)), 1),
            "rates": {"dense_flops": rates.dense_flops, "gptq_s_per_value": rates.gptq_s_per_value,
                      "measured": rates.measured},
            "how": "pipeline.stages.estimate.gptq_work and moments_work priced by pipeline.cost.estimate.Pricer at "
                   "this machine's rates (pipeline.cost.rates, its own benchmark; nothing fitted to these runs), "
                   "made before the timed runs"}


def timing(moments_path: Path, runs: int, chunks: int, predicted: dict) -> dict:
    me = [sys.executable, str(Path(__file__).resolve())]
    log(f"calibration pass, {chunks} chunks: with and without the second moments")
    passes = alternate({"imatrix pass": me + ["--phase", "pass", "--moments", "0", "--chunks", str(chunks)],
                        "imatrix and second moments": me + ["--phase", "pass", "--moments", "1", "--chunks",
                                                            str(chunks)]}, runs)
    log(f"assembling {TIMED_FTYPE}: llama.cpp's rounding and gptq")
    dst = FILES / "timed.gguf"
    rounding = alternate({"llama.cpp's rounding": me + ["--phase", "round", "--rounding", "llama.cpp",
                                                         "--dst", str(dst)],
                          "gptq": me + ["--phase", "round", "--rounding", "gptq", "--moments", str(moments_path),
                                        "--dst", str(dst)]}, runs)
    dst.unlink(missing_ok=True)
    pass_ratio = (passes["sides"]["imatrix and second moments"]["seconds"]["median"]
                  / passes["sides"]["imatrix pass"]["seconds"]["median"])
    gptq_s = rounding["sides"]["gptq"]["seconds"]["median"]
    extra_s = (passes["sides"]["imatrix and second moments"]["seconds"]["median"]
               - passes["sides"]["imatrix pass"]["seconds"]["median"])
    errors = {"assembly_gptq": predicted["assembly_gptq_s"] / gptq_s - 1,
              "moments_extra": predicted["moments_extra_s"] / max(extra_s, 1e-3) - 1}
    return {"calibration_pass": {**passes, "chunks": chunks, "ratio_at_median": round(pass_ratio, 3),
                                 "moments_extra_s": round(extra_s, 1),
                                 "target_ratio": PASS_TARGET, "verdict": verdict(pass_ratio <= PASS_TARGET)},
            "assembly": {**rounding, "ftype": TIMED_FTYPE, "target_seconds": ROUNDING_SECONDS,
                         "verdict": verdict(gptq_s <= ROUNDING_SECONDS),
                         "note": "the whole file, read, rounded and written; gptq's side includes reading the "
                                 "second moments"},
            "prediction": {**predicted, "errors": {k: round(v, 3) for k, v in errors.items()},
                           "target": f"within ±{PREDICTION_TOLERANCE:.0%} of the medians",
                           "verdict": verdict(all(abs(v) <= PREDICTION_TOLERANCE for v in errors.values()))}}


def markdown(r: dict) -> str:
    md = [f"# {r['title']}", "", f"{r['date']}, {r['machine']}, {r['threads']} threads, commit {r['commit']}.", "",
          r["what"], "", "## Stock mixes, same types and bytes", "",
          "| ftype | bytes | KLD llama.cpp | KLD gptq | gptq / llama.cpp | target | verdict |",
          "|---|---:|---:|---:|---:|---:|---|"]
    for x in r["stock"]:
        s = x["scores"]
        md.append(f"| {x['ftype']} | {x['bytes']['gptq']} | {s['llama.cpp']['mean_kld']:.5f} ± "
                  f"{s['llama.cpp']['mean_kld_err']:.5f} | {s['gptq']['mean_kld']:.5f} ± {s['gptq']['mean_kld_err']:.5f} "
                  f"| {x['kld_ratio']:.3f} | ≤ {x['target_ratio']} | {x['verdict']} |")
    md += ["", "## Output error per tensor kind, gptq / llama.cpp (calibration text: in-sample)", "",
           "| kind | " + " | ".join(r["output_error"]) + " |", "|---|" + "---:|" * len(r["output_error"])]
    kinds = sorted({k for per in r["output_error"].values() for k in per})
    for k in kinds:
        cells = [r["output_error"][f].get(k, {}).get("gptq_over_llama.cpp") for f in r["output_error"]]
        md.append(f"| {k} | " + " | ".join("" if c is None else f"{c:.3f}" for c in cells) + " |")
    md += ["", "## Blocks-regime allocation at the Q3_K_M size", "",
           "| rounding | bytes | KLD | × stock Q3_K_M | allocation s | verdict |", "|---|---:|---:|---:|---:|---|"]
    md += [f"| {x['rounding']} | {x['bytes']} | {x['score']['mean_kld']:.5f} | {x['kld_over_stock']:.3f} | "
           f"{x['allocation_seconds']} | {x['verdict']} |" for x in r["allocation"]]
    md += ["", "## Time and peak memory (median of 3, min–max)", "", "| work | side | seconds | peak RSS MiB |",
           "|---|---|---:|---:|"]
    for work in ("calibration_pass", "assembly"):
        for side, rec in r["timing"][work]["sides"].items():
            s = rec["seconds"]
            md.append(f"| {work} | {side} | {s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f}) | "
                      f"{rec['peak_rss_bytes'] / MiB:.0f} |")
    pr, t = r["timing"]["prediction"], r["timing"]
    md += ["", f"Priced by the estimate before the runs ({pr['how']}): the gptq file's assembly "
               f"{pr['assembly_gptq_s']} s (measured {t['assembly']['sides']['gptq']['seconds']['median']:.1f} s, "
               f"{pr['errors']['assembly_gptq']:+.0%}); the second moments' extra time "
               f"{pr['moments_extra_s']} s (measured {t['calibration_pass']['moments_extra_s']} s, "
               f"{pr['errors']['moments_extra']:+.0%}): {pr['verdict']} (target {pr['target']})."]
    md += ["", "Verdicts: " + "; ".join(f"{k}: {v}" for k, v in r["verdicts"].items()) + ".", "",
           f"Target: {r['target']}. Verdict: **{r['verdict']}**.", ""]
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=20, help="wikitext-2 chunks of 512 every file is scored on")
    ap.add_argument("--rounds", type=int, default=3, help="the allocator's refinement rounds")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per side")
    ap.add_argument("--timed-chunks", type=int, default=10, help="calibration chunks in each timed pass")
    ap.add_argument("--phase", choices=("pass", "round"), help=argparse.SUPPRESS)
    ap.add_argument("--moments", help=argparse.SUPPRESS)
    ap.add_argument("--rounding", help=argparse.SUPPRESS)
    ap.add_argument("--dst", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        child(args)
        return
    FILES.mkdir(parents=True, exist_ok=True)
    base = dithered_base()
    moments_path = moments(base.path, 20, CTX, THREADS)  # the imatrix's own 20 chunks
    scorer = CliScore(base.path, args.chunks)
    stock, kinds, stock_types = stock_rows(base, moments_path, scorer)
    allocation = allocation_rows(base, moments_path, scorer, args.rounds)
    scorer.kld.unlink(missing_ok=True)
    predicted = predictions(base, stock_types, args.timed_chunks)
    timed = timing(moments_path, args.runs, args.timed_chunks, predicted)
    verdicts = {f"{x['ftype']} gptq / llama.cpp ≤ {x['target_ratio']}": x["verdict"] for x in stock}
    verdicts.update({f"blocks Q3_K_M with gptq ≤ {ALLOCATION_TARGET} x stock": x["verdict"] for x in allocation
                     if x["rounding"] == "gptq"})
    verdicts[f"second-moment pass ≤ {PASS_TARGET} x the imatrix pass"] = timed["calibration_pass"]["verdict"]
    verdicts[f"gptq rounding of the whole model ≤ {ROUNDING_SECONDS:.0f} s"] = timed["assembly"]["verdict"]
    verdicts[f"the estimate's price within ±{PREDICTION_TOLERANCE:.0%}"] = timed["prediction"]["verdict"]
    result = {
        **provenance(THREADS),
        "benchmark": "rounding",
        "title": "Error-compensated rounding (gptq) against llama.cpp's own, same types and bytes",
        "what": f"Gemma 3 270M F16 base dithered off its Q4_K_M grid; one imatrix and the second moments from "
                f"20 x {CTX} tokens of groups_merged; every file scored by llama-perplexity --kl-divergence "
                f"against the base on wikitext-2 test, {args.chunks} x {CTX} tokens (held out from the "
                "calibration text), both roundings in the same run. The blocks-regime allocator keeps token_embd "
                f"at stock Q3_K_M's type and refines ({args.rounds} rounds) on {PROBE_CHUNKS} x {CTX} calibration "
                "tokens with a probe rounding as its file will be. Output errors per kind are on the calibration "
                "text (in-sample). Timings: child processes, alternating, an empty tensor cache per assembly.",
        "commands": ["python scripts/bench_rounding.py", subprocess.list2cmdline(scorer.base_command),
                     subprocess.list2cmdline(scorer.command(FILES / "<variant>.gguf"))],
        "stock": stock, "output_error": kinds, "allocation": allocation, "timing": timed,
        "verdicts": verdicts,
        "target": "KLD ≤ 0.85 x llama.cpp's rounding at Q2_K and Q3_K_M and no worse at Q4_K_M, same types and "
                  f"bytes; blocks allocation with gptq ≤ {ALLOCATION_TARGET} x stock Q3_K_M; the second-moment pass ≤ "
                  f"{PASS_TARGET} x the imatrix pass; gptq rounding of the whole model ≤ {ROUNDING_SECONDS:.0f} s",
        "verdict": verdict(all(v == "met" for v in verdicts.values())),
    }
    write_json(OUT / "rounding.json", result)
    write_text(OUT / "rounding.md", markdown(result))
    print("\n".join(f"{k}: {v}" for k, v in verdicts.items()))


if __name__ == "__main__":
    main()
