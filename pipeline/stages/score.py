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

import dataclasses
import json
import os
from dataclasses import asdict
from pathlib import Path

from pipeline.choose.groups import low_type_for
from pipeline.choose.memory_probe import PROBE_CHUNKS, MemoryProbe
from pipeline.choose.text_transfer import FACTOR_CHUNKS, REFERENCE_FALLBACK, REFERENCE_TYPE, measure_transfer
from pipeline.cost import estimate as est
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
from pipeline.stages.estimate import (base_model, chunk_counts, probe_change_bytes, probe_session, quantizable,
                                      variant_model)
from pipeline.stages.imatrix import imatrix_input
from pipeline.stages.probes import probe_for, probe_params
from pipeline.work import Decode, Forward, Kld, Load, ModelRef, Note, Resident, Roundtrip, Sketch, Write


def score_params(run: RunContext) -> dict:
    return run.recipe.values("score.dataset", "score.ctx", "score.chunks")


def _write_json(io, path: Path, data) -> None:
    io.out(path).write_text(json.dumps(data, indent=2) + "\n")


def steps(run: RunContext) -> list[Step]:
    recipe = run.recipe
    s = recipe.score
    data = resolve_dataset(s.dataset, run.recipe_dir, recipe.where("score", "dataset"))
    threads = s.threads or run.threads
    n_gpu = recipe.model.n_gpu_layers
    gpu = n_gpu != 0  # every score step loads a model with n_gpu layers offloaded
    versions = engine_versions()

    def base_action(io):
        with Model(run.base_path, n_gpu) as model:
            chunks = perplexity.make_chunks(model, read_text(data), s.ctx, s.chunks, what=str(data))
            with Context(model, s.ctx, min(perplexity.seqs_per_batch(s.ctx), len(chunks.tokens)), threads) as c:
                dist = perplexity.base_distribution(model, c, chunks)
        perplexity.save_base(io.out(run.base_distribution_path), dist)
        return {"chunks": int(len(chunks.tokens)), "bytes": os.path.getsize(io.out(run.base_distribution_path))}

    base_params = {**score_params(run), "score.base_format": perplexity.BASE_FORMAT}
    out = [Step("score base", "score", base_params, [run.base_path, data], [run.base_distribution_path],
                base_action, versions=versions, gpu=gpu,
                produces=f"scores/base-topk.npz (base top-{perplexity.TOP_K} log-probs + {perplexity.TAIL_SAMPLES} "
                         f"sampled tail ids per token on {s.dataset}, "
                         f"{s.chunks} chunks of {s.ctx})", work=lambda shape: _score_work(run, shape, None))]
    for v in recipe.plans:
        out.append(Step(f"score {v.name}", "score", score_params(run),
                        [run.variant_path(v.name), run.base_distribution_path], [run.score_path(v.name)],
                        _variant_action(run, v.name, threads, n_gpu), variant=v.name, versions=versions, gpu=gpu,
                        produces=f"scores/{v.name}.json (size, bpw, PPL, KLD, Δp, same top p, each ± error)",
                        work=lambda shape, name=v.name: _score_work(run, shape, name)))
    if any(isinstance(v.budget, KldBudget) for v in recipe.plans):
        out.append(_transfer_step(run, data, threads, versions, gpu))
    names = [(BASE, run.base_path, None)] + [(v.name, run.variant_path(v.name), v.name) for v in recipe.plans]
    if s.tasks.benchmarks and s.tasks.count > 0:
        task_files = [resolve_dataset(BENCHMARKS[b], run.recipe_dir, recipe.where("score", "tasks", "benchmarks"))
                      for b in s.tasks.benchmarks]
        params = recipe.values("score.tasks.benchmarks", "score.tasks.count", "score.tasks.ctx")
        for name, model_path, variant in names:
            out.append(Step(f"tasks {name}", "score", params, [model_path] + [f for f in task_files if f.is_file()],
                            [run.tasks_path(name)], _tasks_action(run, name, model_path, threads, n_gpu),
                            variant=variant, versions=versions, gpu=gpu,
                            produces=f"scores/{name}.tasks.json ({', '.join(s.tasks.benchmarks)}; "
                                     f"{s.tasks.count} tasks each, ctx {s.tasks.ctx})",
                            work=lambda shape, variant=variant: _tasks_work(run, shape, variant)))
    if s.speed.repetitions > 0:
        params = {**recipe.values("score.speed.pp", "score.speed.tg", "score.speed.repetitions"),
                  "score.threads": threads}  # the threads it ran with, also when model.threads gave them
        for name, model_path, variant in names[1:]:
            out.append(Step(f"speed {name}", "score", params, [model_path], [run.speed_path(name)],
                            _speed_action(run, name, model_path, threads, n_gpu), variant=variant,
                            versions=versions, gpu=gpu,
                            produces=f"scores/{name}.speed.json (pp{s.speed.pp}, tg{s.speed.tg} tokens/s "
                                     f"x{s.speed.repetitions})",
                            work=lambda shape, variant=variant: _speed_work(run, shape, variant)))
    if s.drift.tokens > 0:
        prompts_file, prompts = drift_prompts(run)
        params = {**recipe.values("score.drift.tokens", "score.drift.prompts"),
                  "score.drift.prompts_sha256": drift.prompts_digest(prompts), "score.drift.format": drift.FORMAT}
        extra = [prompts_file] if prompts_file else []
        forced = "; first divergence, KLD and top-1 agreement per position of the base's continuation"
        for name, model_path, variant in names:
            # a variant's step teacher-forces the base's continuations through the base model too
            inputs = [model_path] + ([] if variant is None else [run.base_path, run.drift_path(BASE)]) + extra
            out.append(Step(f"drift {name}", "score", params, inputs, [run.drift_path(name)],
                            _drift_action(run, name, model_path, variant is None, prompts, threads, n_gpu),
                            variant=variant, versions=versions, gpu=gpu,
                            produces=f"scores/{name}.drift.json (greedy {s.drift.tokens} tokens, "
                                     f"{len(prompts)} prompts{'' if variant is None else forced})",
                            work=lambda shape, variant=variant: _drift_work(run, shape, variant)))
    return out


# ---- the work each step declares (pipeline.work), for `plan --estimate` ---------------------------
def _model(run: RunContext, shape, variant: str | None) -> ModelRef:
    return base_model(shape, run) if variant is None else variant_model(shape, run, run.recipe.variant(variant))


def _score_work(run: RunContext, shape, variant: str | None) -> list:
    """The scoring chunks through the model: the base's distribution kept, or a variant's KLD taken."""
    s = run.recipe.score
    tokens, scored, outputs = chunk_counts(s.chunks, s.ctx)
    n_seq = perplexity.seqs_per_batch(s.ctx)
    model = _model(run, shape, variant)
    dist_bytes = scored * (perplexity.TOP_K * 8 + perplexity.TAIL_SAMPLES * 6 + 12) + tokens * 4
    work = [Load(), Forward(tokens, model.flops_per_token, model.quantized, outputs),
            Resident(model, n_seq * s.ctx, n_seq * s.ctx, dist_bytes), Note(f"{s.chunks} x {s.ctx} tokens")]
    if variant is None:
        return work + [Sketch(scored), Write(run.base_distribution_path, dist_bytes)]
    return work + [Kld(scored)]


def _transfer_work(run: RunContext, shape) -> list:
    """Two reference changes, each quantized once in memory and measured on the probes' calibration
    chunks and on FACTOR_CHUNKS chunks of the scoring text held out from scoring, after one pass
    for the base's distribution on those."""
    s = run.recipe.score
    tokens, scored, outputs = chunk_counts(FACTOR_CHUNKS, s.ctx)
    n_seq = perplexity.seqs_per_batch(s.ctx)
    reference = {t.name: low_type_for(t.shape, REFERENCE_TYPE, REFERENCE_FALLBACK) for t in quantizable(shape)}
    return probe_session(shape, run, 2, PROBE_CHUNKS, quantized=True) + [
        Forward(3 * tokens, shape.flops_per_token(), True, 3 * outputs), Kld(3 * scored), Roundtrip(reference),
        Resident(base_model(shape, run), n_seq * s.ctx, n_seq * s.ctx, sum(probe_change_bytes(shape, run, reference))),
        Write(run.text_transfer_path, 600),
        Note(f"4 probes: 2 on {PROBE_CHUNKS} calibration chunks, 2 on {FACTOR_CHUNKS} x {s.ctx} held-out scoring "
             "chunks")]


# English text in a BPE/sentencepiece vocabulary: about this many characters per token.
CHARS_PER_TOKEN = 4.0
# Mean characters a task evaluates (context once, then every answer) and of its answers alone,
# over the first 100 tasks each selection picks: used when a benchmark's file is not here.
TASK_CHARS = {"hellaswag": (735, 440), "winogrande": (207, 100), "arc-easy": (214, 110),
              "arc-challenge": (266, 130), "mmlu": (526, 90), "truthfulqa": (332, 250)}
_task_chars: dict[tuple, tuple[float, float]] = {}


def _task_tokens(run: RunContext, bench: str, count: int) -> tuple[float, float]:
    """(tokens evaluated, tokens of the answers) for a benchmark's selected tasks, from their
    characters (CHARS_PER_TOKEN each)."""
    key = (bench, count)
    if key not in _task_chars:
        try:
            selected = tasks.load_selected(bench, resolve_dataset(BENCHMARKS[bench], run.recipe_dir), count)
        except SqueezeError:
            selected = None
        if selected is None:
            total, answers = TASK_CHARS.get(bench, (400, 150))
            _task_chars[key] = (total * count, answers * count)
        elif bench == "winogrande":  # both sentences in full, for either choice; scored after the blank
            _task_chars[key] = (sum(2 * len(t.first) + sum(map(len, t.choices)) + 2 * len(t.second) for t in selected),
                                sum(2 * len(t.second) for t in selected))
        else:
            ends = [sum(len(e) + 1 for e in t.endings) for t in selected]
            _task_chars[key] = (sum(len(t.context) for t in selected) + sum(ends), sum(ends))
    total, answers = _task_chars[key]
    return total / CHARS_PER_TOKEN, answers / CHARS_PER_TOKEN


def _tasks_work(run: RunContext, shape, variant: str | None) -> list:
    """Every task token evaluated; log-softmax rows only for the answers' tokens."""
    t = run.recipe.score.tasks
    counts = [_task_tokens(run, b, t.count) for b in t.benchmarks]
    n_tokens, answers = sum(c[0] for c in counts), sum(c[1] for c in counts)
    model = _model(run, shape, variant)
    return [Load(), Forward(n_tokens, model.flops_per_token, model.quantized, answers), Kld(answers),
            Resident(model, t.ctx * 4, t.ctx * 4), Note(f"~{n_tokens:.0f} tokens")]


def _speed_work(run: RunContext, shape, variant: str | None) -> list:
    """llama-bench's tests, each run once more as a warm-up."""
    sp = run.recipe.score.speed
    model = _model(run, shape, variant)
    runs = sp.repetitions + 1
    return [Load(), Forward(runs * 2 * sp.pp, model.flops_per_token, model.quantized),
            Decode(runs * 2 * sp.tg, model.bytes), Resident(model, sp.pp + sp.tg, sp.pp)]


# Tokens a drift prompt has before the continuation (the built-in prompts are one sentence).
DRIFT_PROMPT_TOKENS = 20


def _drift_work(run: RunContext, shape, variant: str | None) -> list:
    """Greedy continuations of every prompt; for a variant, the base's continuation also
    teacher-forced through both models and compared."""
    d = run.recipe.score.drift
    n_prompts = len(drift.PROMPTS) if d.prompts is None else 5
    model = _model(run, shape, variant)
    work = [Load(), Decode(n_prompts * d.tokens, model.bytes),
            Forward(n_prompts * DRIFT_PROMPT_TOKENS, model.flops_per_token, model.quantized)]
    extra, resident = 0, model
    if variant is not None:
        forced_tokens, forced_out = n_prompts * (DRIFT_PROMPT_TOKENS + d.tokens), n_prompts * d.tokens
        work += [Load(2), Forward(forced_tokens, shape.flops_per_token(), False, forced_out),
                 Forward(forced_tokens, model.flops_per_token, model.quantized, forced_out), Kld(2 * forced_out)]
        extra = 2 * est.logits_bytes(forced_out, shape.n_vocab)
        resident = dataclasses.replace(model, bytes=max(model.bytes, base_model(shape, run).bytes))
    return work + [Resident(resident, DRIFT_PROMPT_TOKENS + d.tokens, DRIFT_PROMPT_TOKENS + d.tokens, extra)]


def _transfer_step(run: RunContext, data: Path, threads, versions, gpu) -> Step:
    """Four in-memory probes: the blocks at 4 bits, then the embedding alone, each on the probes'
    calibration chunks (found in the run's probe memo when measured before) and on chunks of the
    scoring text held out from scoring (the FACTOR_CHUNKS after the scored ones), so the targets'
    predictions are judged on chunks the factors never saw. A text too short for that falls back
    to the scored chunks, and the record says the prediction is then in-sample."""
    imatrix = imatrix_input(run)

    def act(io):
        s, gpu_layers = run.recipe.score, run.recipe.model.n_gpu_layers
        with probe_for(run, PROBE_CHUNKS, imatrix=imatrix) as calibration:
            try:
                other = MemoryProbe(run.base_path, read_text(data), s.ctx, FACTOR_CHUNKS, threads, None, gpu_layers,
                                    imatrix, memo=run.probe_memo_path, skip_chunks=s.chunks)
                n = len(other.base["tokens"])
                text, held_out = (f"{s.dataset}, chunks {s.chunks + 1}-{s.chunks + n} of {s.ctx} tokens (held out: "
                                  f"after the {s.chunks} scored)"), True
            except SqueezeError:
                other = MemoryProbe(run.base_path, "", s.ctx, s.chunks, threads, run.base_distribution_path,
                                    gpu_layers, imatrix, memo=run.probe_memo_path)
                text, held_out = (f"{s.dataset}, the {len(other.base['tokens'])} scored chunks of {s.ctx} tokens "
                                  "(in-sample: the text has no chunk beyond them)"), False
            with other:
                transfer = measure_transfer(run.model_info, calibration, other, text, held_out)
        _write_json(io, run.text_transfer_path, transfer.as_dict())
        return {"factors": {k: round(v, 4) for k, v in transfer.factors.items()}, "held_out": held_out}

    params = {**probe_params(run), **score_params(run), "probe_chunks": PROBE_CHUNKS,
              "transfer.reference": f"{REFERENCE_TYPE}, else {REFERENCE_FALLBACK}", "transfer.chunks": FACTOR_CHUNKS,
              "transfer.held_out": True}
    inputs = [run.base_path, run.base_distribution_path, data] + ([imatrix] if imatrix else [])
    return Step("transfer base", "score", params, inputs, [run.text_transfer_path], act, versions=versions, gpu=gpu,
                produces="scores/text-transfer.json (calibration-to-scoring KLD factors: blocks, embedding)",
                work=lambda shape: _transfer_work(run, shape))


def _variant_action(run: RunContext, name: str, threads, n_gpu):
    def act(io):
        s = run.recipe.score
        base = perplexity.load_base(run.base_distribution_path)
        path = run.variant_path(name)
        with Model(path, n_gpu) as model:
            perplexity.check_same_vocabulary(model, base)
            with Context(model, s.ctx, min(perplexity.seqs_per_batch(s.ctx), len(base["tokens"])), threads) as c:
                per_token = perplexity.score_against_base(model, c, base)
            summary = perplexity.summarize(base, per_token)
            n_params, tensor_bytes = model.n_params, model.size_bytes
        v = run.recipe.variant(name)
        result = {"variant": name, "ftype": v.ftype,
                  "pruned_layers": " ".join(str(x) for x in run.variant_layers(v)),
                  "file_bytes": path.stat().st_size, "tensor_bytes": tensor_bytes,
                  "n_params": n_params, "bpw": tensor_bytes * 8 / n_params, "chunks": int(len(base["tokens"])),
                  "ctx": int(base["tokens"].shape[1]), **summary}
        _write_json(io, run.score_path(name), result)
        return {"mean_kld": summary["mean_kld"]}
    return act


def _tasks_action(run: RunContext, name: str, model_path: Path, threads, n_gpu):
    def act(io):
        t = run.recipe.score.tasks
        results = []
        with Model(model_path, n_gpu) as model:
            for bench in t.benchmarks:
                where = run.recipe.where("score", "tasks", "benchmarks")
                path = resolve_dataset(BENCHMARKS[bench], run.recipe_dir, where)
                selected = tasks.load_selected(bench, path, t.count)
                results.append(tasks.run_benchmark(model, bench, selected, t.ctx, threads).as_dict())
        _write_json(io, run.tasks_path(name), {"model": name, "results": results,
                                               "average_pct": tasks.average_accuracy(results)})
        return {"average_pct": tasks.average_accuracy(results)}
    return act


def _speed_action(run: RunContext, name: str, model_path: Path, threads, n_gpu):
    def act(io):
        sp = run.recipe.score.speed
        with Model(model_path, n_gpu) as model:
            result = speed.measure(model, sp.pp, sp.tg, sp.repetitions, threads)
        _write_json(io, run.speed_path(name), {"model": name, **result})
        return {t: round(v["mean"], 2) for t, v in result["tests"].items()}
    return act


def drift_prompts(run: RunContext) -> tuple[Path | None, dict[str, str]]:
    """The drift prompt suite: `score.drift.prompts` (a file beside the recipe) or the built-in one."""
    name = run.recipe.score.drift.prompts
    if name is None:
        return None, drift.PROMPTS
    path = run.recipe.beside(name)
    return path, drift.load_prompts(path, run.recipe.where("score", "drift", "prompts"))


def _drift_action(run: RunContext, name: str, model_path: Path, is_base: bool, prompts: dict[str, str],
                  threads, n_gpu):
    def act(io):
        n = run.recipe.score.drift.tokens
        if is_base:
            with Model(model_path, n_gpu) as model:
                result = {"model": name, "tokens": n, "continuations": drift.continuations(model, n, threads, prompts)}
            _write_json(io, run.drift_path(name), result)
            return None
        # Both models' teacher-forced logits are held, one model loaded at a time (n_prompts x
        # tokens x n_vocab floats: 160 MiB for 5 prompts of 32 tokens and a 262k vocabulary).
        base = json.loads(run.drift_path(BASE).read_text())["continuations"]
        with Model(run.base_path, n_gpu) as model:
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
        _write_json(io, run.drift_path(name), {"model": name, "tokens": n, "continuations": mine,
                                               "comparison": rows, "summary": asdict(summary)})
        return {"top1_agreement_pct": round(summary.top1_agreement_pct, 2),
                "median_first_divergence": summary.median_first_divergence}
    return act
