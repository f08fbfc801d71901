"""Stage score: every number a model card shows, for every variant, in-process.

- `score base`: the base model's distribution on the evaluation text, once per run (top-K
  log-probabilities plus a sample of the rest, scores/base-topk.npz; see pipeline.measure.perplexity);
  `score V`: PPL, KLD and the rest of
  `llama-perplexity --kl-divergence`'s figures against it (scores/V.json).
- `tasks base`, `tasks V`: HellaSwag, WinoGrande, ARC, MMLU, TruthfulQA accuracies
  (scores/V.tasks.json), the same task selection as the CLI's `--*-tasks N`.
- `speed V`: llama-bench style tokens/s (scores/V.speed.json).
- `drift base`, `drift V`: greedy continuations of a prompt suite (scores/V.drift.json).

Each is its own step, so changing the task count reruns only the task steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.engine.backend import engine_versions
from pipeline.engine.context import Context
from pipeline.engine.model import Model
from pipeline.formats.task_data import BENCHMARKS
from pipeline.fsutil import read_text
from pipeline.measure import drift, perplexity, speed, tasks
from pipeline.run.layout import BASE, RunContext
from pipeline.run.runner import Step
from pipeline.sources.datasets import resolve_dataset



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
                base_action, versions=versions,
                produces=f"scores/base-topk.npz (base top-{perplexity.TOP_K} log-probs + {perplexity.TAIL_SAMPLES} "
                         f"sampled tail ids per token on {s.dataset}, "
                         f"{s.chunks} chunks of {s.ctx})")]
    for v in recipe.variants:
        out.append(Step(f"score {v.name}", "score", score_params(ctx),
                        [ctx.variant_path(v.name), ctx.base_distribution_path], [ctx.score_path(v.name)],
                        _variant_action(ctx, v.name, threads, n_gpu), variant=v.name, versions=versions,
                        produces=f"scores/{v.name}.json (size, bpw, PPL, KLD, Δp, same top p, each ± error)"))
    names = [(BASE, ctx.base_path, None)] + [(v.name, ctx.variant_path(v.name), v.name) for v in recipe.variants]
    if s.tasks.benchmarks and s.tasks.count > 0:
        task_files = [resolve_dataset(BENCHMARKS[b], ctx.recipe_dir, recipe.where("score", "tasks", "benchmarks"))
                      for b in s.tasks.benchmarks]
        params = recipe.values("score.tasks.benchmarks", "score.tasks.count", "score.tasks.ctx")
        for name, model_path, variant in names:
            out.append(Step(f"tasks {name}", "score", params, [model_path] + [f for f in task_files if f.is_file()],
                            [ctx.tasks_path(name)], _tasks_action(ctx, name, model_path, threads, n_gpu),
                            variant=variant, versions=versions,
                            produces=f"scores/{name}.tasks.json ({', '.join(s.tasks.benchmarks)}; "
                                     f"{s.tasks.count} tasks each, ctx {s.tasks.ctx})"))
    if s.speed.repetitions > 0:
        params = {**recipe.values("score.speed.pp", "score.speed.tg", "score.speed.repetitions"),
                  "score.threads": threads}  # the threads it ran with, also when model.threads gave them
        for name, model_path, variant in names[1:]:
            out.append(Step(f"speed {name}", "score", params, [model_path], [ctx.speed_path(name)],
                            _speed_action(ctx, name, model_path, threads, n_gpu), variant=variant, versions=versions,
                            produces=f"scores/{name}.speed.json (pp{s.speed.pp}, tg{s.speed.tg} tokens/s "
                                     f"x{s.speed.repetitions})"))
    if s.drift.tokens > 0:
        params = recipe.values("score.drift.tokens")
        for name, model_path, variant in names:
            inputs = [model_path] + ([] if variant is None else [ctx.drift_path(BASE)])
            out.append(Step(f"drift {name}", "score", params, inputs, [ctx.drift_path(name)],
                            _drift_action(ctx, name, model_path, variant is None, threads, n_gpu),
                            variant=variant, versions=versions,
                            produces=f"scores/{name}.drift.json (greedy {s.drift.tokens} tokens, "
                                     f"{len(drift.PROMPTS)} prompts)"))
    return out


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
        result = {"variant": name, "ftype": v.ftype.upper(),
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


def _drift_action(ctx: RunContext, name: str, model_path: Path, is_base: bool, threads, n_gpu):
    def run(io):
        n = ctx.recipe.score.drift.tokens
        with Model(model_path, n_gpu) as model:
            mine = drift.continuations(model, n, threads)
            result = {"model": name, "tokens": n, "continuations": mine}
            if not is_base:
                base = json.loads(ctx.drift_path(BASE).read_text())["continuations"]
                result["comparison"] = drift.compare(model, base, mine)
        _write_json(io, ctx.drift_path(name), result)
    return run
