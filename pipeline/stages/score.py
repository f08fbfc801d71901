"""Stage score: every number a model card shows, for every variant, in-process.

- `score base`: the base model's distribution on the evaluation text, once per run (top-K
  log-probabilities plus a sample of the rest, scores/base-topk.npz; see pipeline.measure.perplexity);
  `score V`: PPL, KLD and the rest of
  `llama-perplexity --kl-divergence`'s figures against it (scores/V.json).
- `tasks base`, `tasks V`: HellaSwag, WinoGrande, ARC, MMLU, TruthfulQA accuracies
  (scores/V.tasks.json), the same task selection as the CLI's `--*-tasks N`.
- `speed V`: llama-bench style tokens/s (scores/V.speed.json).
- `transfer base`, when a variant has a KLD target: how a KLD measured on the calibration text
  (where the target is met while choosing) carries to the scoring text, per class of tensor
  (pipeline.choose.text_transfer; scores/text-transfer.json). The report turns each target's
  calibration KLD into a predicted scoring KLD with it, beside the measured one.
- `drift base`, `drift V`: greedy continuations of a prompt suite (`score.drift.prompts`, else
  pipeline.measure.drift.PROMPTS) and, for a variant, the first token where its own greedy
  continuation parts from the base's, and the KLD and top-1 agreement per position of the base's
  continuation fed to both models (scores/V.drift.json).

Each is its own step, so changing the task count reruns only the task steps.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from pipeline.choose.memory_probe import PROBE_CHUNKS, MemoryProbe
from pipeline.choose.text_transfer import FACTOR_CHUNKS, REFERENCE_FALLBACK, REFERENCE_TYPE, measure_transfer
from pipeline.engine.backend import engine_versions
from pipeline.engine.context import Context
from pipeline.engine.model import Model
from pipeline.errors import SqueezeError
from pipeline.formats.task_data import BENCHMARKS
from pipeline.fsutil import read_text
from pipeline.measure import drift, perplexity, speed, tasks
from pipeline.recipe.plan import KldBudget
from pipeline.run.layout import BASE, RunContext
from pipeline.run.runner import Step
from pipeline.sources.datasets import resolve_dataset
from pipeline.stages.imatrix import imatrix_input
from pipeline.stages.probes import probe_for, probe_params


def score_params(ctx: RunContext) -> dict:
    return ctx.recipe.values("score.dataset", "score.ctx", "score.chunks")


def _write_json(io, path: Path, data) -> None:
    io.out(path).write_text(json.dumps(data, indent=2) + "\n")


def steps(ctx: RunContext) -> list[Step]:
    recipe = ctx.recipe
    s = recipe.score
    data = resolve_dataset(s.dataset, ctx.recipe_dir, recipe.where("score", "dataset"))
    threads = s.threads or ctx.threads
    n_gpu = recipe.model.n_gpu_layers
    gpu = n_gpu != 0  # every score step loads a model with n_gpu layers offloaded
    versions = engine_versions()

    def base_action(io):
        with Model(ctx.base_path, n_gpu) as model:
            chunks = perplexity.make_chunks(model, read_text(data), s.ctx, s.chunks, what=str(data))
            with Context(model, s.ctx, min(perplexity.seqs_per_batch(s.ctx), len(chunks.tokens)), threads) as c:
                dist = perplexity.base_distribution(model, c, chunks)
        perplexity.save_base(io.out(ctx.base_distribution_path), dist)
        return {"chunks": int(len(chunks.tokens)), "bytes": os.path.getsize(io.out(ctx.base_distribution_path))}

    base_params = {**score_params(ctx), "score.base_format": perplexity.BASE_FORMAT}
    out = [Step("score base", "score", base_params, [ctx.base_path, data], [ctx.base_distribution_path],
                base_action, versions=versions, gpu=gpu,
                produces=f"scores/base-topk.npz (base top-{perplexity.TOP_K} log-probs + {perplexity.TAIL_SAMPLES} "
                         f"sampled tail ids per token on {s.dataset}, "
                         f"{s.chunks} chunks of {s.ctx})")]
    for v in recipe.plans:
        out.append(Step(f"score {v.name}", "score", score_params(ctx),
                        [ctx.variant_path(v.name), ctx.base_distribution_path], [ctx.score_path(v.name)],
                        _variant_action(ctx, v.name, threads, n_gpu), variant=v.name, versions=versions, gpu=gpu,
                        produces=f"scores/{v.name}.json (size, bpw, PPL, KLD, Δp, same top p, each ± error)"))
    if any(isinstance(v.budget, KldBudget) for v in recipe.plans):
        out.append(_transfer_step(ctx, data, threads, versions, gpu))
    names = [(BASE, ctx.base_path, None)] + [(v.name, ctx.variant_path(v.name), v.name) for v in recipe.plans]
    if s.tasks.benchmarks and s.tasks.count > 0:
        task_files = [resolve_dataset(BENCHMARKS[b], ctx.recipe_dir, recipe.where("score", "tasks", "benchmarks"))
                      for b in s.tasks.benchmarks]
        params = recipe.values("score.tasks.benchmarks", "score.tasks.count", "score.tasks.ctx")
        for name, model_path, variant in names:
            out.append(Step(f"tasks {name}", "score", params, [model_path] + [f for f in task_files if f.is_file()],
                            [ctx.tasks_path(name)], _tasks_action(ctx, name, model_path, threads, n_gpu),
                            variant=variant, versions=versions, gpu=gpu,
                            produces=f"scores/{name}.tasks.json ({', '.join(s.tasks.benchmarks)}; "
                                     f"{s.tasks.count} tasks each, ctx {s.tasks.ctx})"))
    if s.speed.repetitions > 0:
        params = {**recipe.values("score.speed.pp", "score.speed.tg", "score.speed.repetitions"),
                  "score.threads": threads}  # the threads it ran with, also when model.threads gave them
        for name, model_path, variant in names[1:]:
            out.append(Step(f"speed {name}", "score", params, [model_path], [ctx.speed_path(name)],
                            _speed_action(ctx, name, model_path, threads, n_gpu), variant=variant,
                            versions=versions, gpu=gpu,
                            produces=f"scores/{name}.speed.json (pp{s.speed.pp}, tg{s.speed.tg} tokens/s "
                                     f"x{s.speed.repetitions})"))
    if s.drift.tokens > 0:
        prompts_file, prompts = drift_prompts(ctx)
        params = {**recipe.values("score.drift.tokens", "score.drift.prompts"),
                  "score.drift.prompts_sha256": drift.prompts_digest(prompts), "score.drift.format": drift.FORMAT}
        extra = [prompts_file] if prompts_file else []
        forced = "; first divergence, KLD and top-1 agreement per position of the base's continuation"
        for name, model_path, variant in names:
            # a variant's step teacher-forces the base's continuations through the base model too
            inputs = [model_path] + ([] if variant is None else [ctx.base_path, ctx.drift_path(BASE)]) + extra
            out.append(Step(f"drift {name}", "score", params, inputs, [ctx.drift_path(name)],
                            _drift_action(ctx, name, model_path, variant is None, prompts, threads, n_gpu),
                            variant=variant, versions=versions, gpu=gpu,
                            produces=f"scores/{name}.drift.json (greedy {s.drift.tokens} tokens, "
                                     f"{len(prompts)} prompts{'' if variant is None else forced})"))
    return out


def _transfer_step(ctx: RunContext, data: Path, threads, versions, gpu) -> Step:
    """Four in-memory probes: the blocks at 4 bits, then the embedding alone, each on the probes'
    calibration chunks (found in the run's probe memo when measured before) and on chunks of the
    scoring text held out from scoring (the FACTOR_CHUNKS after the scored ones), so the targets'
    predictions are judged on chunks the factors never saw. A text too short for that falls back
    to the scored chunks, and the record says the prediction is then in-sample."""
    imatrix = imatrix_input(ctx)

    def run(io):
        s, gpu_layers = ctx.recipe.score, ctx.recipe.model.n_gpu_layers
        with probe_for(ctx, PROBE_CHUNKS, imatrix=imatrix) as calibration:
            try:
                other = MemoryProbe(ctx.base_path, read_text(data), s.ctx, FACTOR_CHUNKS, threads, None, gpu_layers,
                                    imatrix, memo=ctx.probe_memo_path, skip_chunks=s.chunks)
                n = len(other.base["tokens"])
                text, held_out = (f"{s.dataset}, chunks {s.chunks + 1}-{s.chunks + n} of {s.ctx} tokens (held out: "
                                  f"after the {s.chunks} scored)"), True
            except SqueezeError:
                other = MemoryProbe(ctx.base_path, "", s.ctx, s.chunks, threads, ctx.base_distribution_path,
                                    gpu_layers, imatrix, memo=ctx.probe_memo_path)
                text, held_out = (f"{s.dataset}, the {len(other.base['tokens'])} scored chunks of {s.ctx} tokens "
                                  "(in-sample: the text has no chunk beyond them)"), False
            with other:
                transfer = measure_transfer(ctx.model_info, calibration, other, text, held_out)
        _write_json(io, ctx.text_transfer_path, transfer.as_dict())
        return {"factors": {k: round(v, 4) for k, v in transfer.factors.items()}, "held_out": held_out}

    params = {**probe_params(ctx), **score_params(ctx), "probe_chunks": PROBE_CHUNKS,
              "transfer.reference": f"{REFERENCE_TYPE}, else {REFERENCE_FALLBACK}", "transfer.chunks": FACTOR_CHUNKS,
              "transfer.held_out": True}
    inputs = [ctx.base_path, ctx.base_distribution_path, data] + ([imatrix] if imatrix else [])
    return Step("transfer base", "score", params, inputs, [ctx.text_transfer_path], run, versions=versions, gpu=gpu,
                produces="scores/text-transfer.json (calibration-to-scoring KLD factors: blocks, embedding)")


def _variant_action(ctx: RunContext, name: str, threads, n_gpu):
    def run(io):
        s = ctx.recipe.score
        base = perplexity.load_base(ctx.base_distribution_path)
        path = ctx.variant_path(name)
        with Model(path, n_gpu) as model:
            perplexity.check_same_vocabulary(model, base)
            with Context(model, s.ctx, min(perplexity.seqs_per_batch(s.ctx), len(base["tokens"])), threads) as c:
                per_token = perplexity.score_against_base(model, c, base)
            summary = perplexity.summarize(base, per_token)
            n_params, tensor_bytes = model.n_params, model.size_bytes
        v = ctx.recipe.variant(name)
        result = {"variant": name, "ftype": v.ftype,
                  "pruned_layers": " ".join(str(x) for x in ctx.variant_layers(v)),
                  "file_bytes": path.stat().st_size, "tensor_bytes": tensor_bytes,
                  "n_params": n_params, "bpw": tensor_bytes * 8 / n_params, "chunks": int(len(base["tokens"])),
                  "ctx": int(base["tokens"].shape[1]), **summary}
        _write_json(io, ctx.score_path(name), result)
        return {"mean_kld": summary["mean_kld"]}
    return run


def _tasks_action(ctx: RunContext, name: str, model_path: Path, threads, n_gpu):
    def run(io):
        t = ctx.recipe.score.tasks
        results = []
        with Model(model_path, n_gpu) as model:
            for bench in t.benchmarks:
                where = ctx.recipe.where("score", "tasks", "benchmarks")
                path = resolve_dataset(BENCHMARKS[bench], ctx.recipe_dir, where)
                selected = tasks.load_selected(bench, path, t.count)
                results.append(tasks.run_benchmark(model, bench, selected, t.ctx, threads).as_dict())
        _write_json(io, ctx.tasks_path(name), {"model": name, "results": results,
                                               "average_pct": tasks.average_accuracy(results)})
        return {"average_pct": tasks.average_accuracy(results)}
    return run


def _speed_action(ctx: RunContext, name: str, model_path: Path, threads, n_gpu):
    def run(io):
        sp = ctx.recipe.score.speed
        with Model(model_path, n_gpu) as model:
            result = speed.measure(model, sp.pp, sp.tg, sp.repetitions, threads)
        _write_json(io, ctx.speed_path(name), {"model": name, **result})
        return {t: round(v["mean"], 2) for t, v in result["tests"].items()}
    return run


def drift_prompts(ctx: RunContext) -> tuple[Path | None, dict[str, str]]:
    """The drift prompt suite: `score.drift.prompts` (a file beside the recipe) or the built-in one."""
    name = ctx.recipe.score.drift.prompts
    if name is None:
        return None, drift.PROMPTS
    path = ctx.recipe.beside(name)
    return path, drift.load_prompts(path, ctx.recipe.where("score", "drift", "prompts"))


def _drift_action(ctx: RunContext, name: str, model_path: Path, is_base: bool, prompts: dict[str, str],
                  threads, n_gpu):
    def run(io):
        n = ctx.recipe.score.drift.tokens
        if is_base:
            with Model(model_path, n_gpu) as model:
                result = {"model": name, "tokens": n, "continuations": drift.continuations(model, n, threads, prompts)}
            _write_json(io, ctx.drift_path(name), result)
            return None
        # Both models' teacher-forced logits are held, one model loaded at a time (n_prompts x
        # tokens x n_vocab floats: 160 MiB for 5 prompts of 32 tokens and a 262k vocabulary).
        base = json.loads(ctx.drift_path(BASE).read_text())["continuations"]
        with Model(ctx.base_path, n_gpu) as model:
            base_logits = drift.forced_logits(model, base, threads)
            base_vocab = perplexity.vocab_fingerprint(model)
        with Model(model_path, n_gpu) as model:
            if perplexity.vocab_fingerprint(model) != base_vocab:
                raise SqueezeError(f"{model_path}: vocabulary differs from the base's; refusing to compare drift")
            mine = drift.continuations(model, n, threads, {k: b["prompt"] for k, b in base.items()})
            forced = {k: drift.compare_forced(base_logits[k], v)
                      for k, v in drift.forced_logits(model, base, threads).items()}
            rows = drift.compare(model, base, mine, forced)
        summary = drift.summarize(rows)
        _write_json(io, ctx.drift_path(name), {"model": name, "tokens": n, "continuations": mine,
                                               "comparison": rows, "summary": asdict(summary)})
        return {"top1_agreement_pct": round(summary.top1_agreement_pct, 2),
                "median_first_divergence": summary.median_first_divergence}
    return run
