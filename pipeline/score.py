"""Stage score: perplexity and KL divergence of every variant against the base, in-process.

The base model is evaluated once per run (`score base`, stored compactly as top-K
log-probabilities); each variant is then scored against that file on the same tokens.
"""

from __future__ import annotations

import json
import os

from pipeline import perplexity
from pipeline.context import RunContext
from pipeline.datasets import read_text, resolve_dataset
from pipeline.engine import Context, Model, engine_versions
from pipeline.runner import Step

# Sequences evaluated per decode, as llama-perplexity packs n_batch / n_ctx (2048 / 512 = 4).
SEQS_PER_BATCH = 4


def score_params(ctx: RunContext) -> dict:
    s = ctx.recipe.score
    return {"score.dataset": s.dataset, "score.ctx": s.ctx, "score.chunks": s.chunks}


def steps(ctx: RunContext) -> list[Step]:
    recipe = ctx.recipe
    s = recipe.score
    data = resolve_dataset(s.dataset, _recipe_dir(ctx), recipe.where("score", "dataset"))
    threads = s.threads or ctx.threads
    n_gpu = recipe.model.n_gpu_layers

    def base_action(io):
        with Model(ctx.base_path, n_gpu) as model:
            chunks = perplexity.make_chunks(model, read_text(data), s.ctx, s.chunks, what=str(data))
            with Context(model, s.ctx, min(SEQS_PER_BATCH, len(chunks.tokens)), threads) as c:
                dist = perplexity.base_distribution(model, c, chunks)
        perplexity.save_base(io.out(ctx.base_distribution_path), dist)
        return {"chunks": int(len(chunks.tokens)), "bytes": os.path.getsize(io.out(ctx.base_distribution_path))}

    out = [Step("score base", "score", score_params(ctx), [ctx.base_path, data], [ctx.base_distribution_path],
                base_action, versions=engine_versions(),
                produces=f"scores/base-topk.npz (base top-{perplexity.TOP_K} log-probs on {s.dataset}, "
                         f"{s.chunks} chunks of {s.ctx})")]
    for v in recipe.variants:
        out.append(Step(f"score {v.name}", "score", score_params(ctx),
                        [ctx.variant_path(v.name), ctx.base_distribution_path], [ctx.score_path(v.name)],
                        _variant_action(ctx, v.name, threads, n_gpu), variant=v.name, versions=engine_versions(),
                        produces=f"scores/{v.name}.json (size, bpw, PPL, KLD, same top, RMS dp)"))
    return out


def _recipe_dir(ctx: RunContext):
    from pathlib import Path

    return Path(ctx.recipe.path).parent if ctx.recipe.path else None


def _variant_action(ctx: RunContext, name: str, threads, n_gpu):
    def run(io):
        s = ctx.recipe.score
        base = perplexity.load_base(ctx.base_distribution_path)
        path = ctx.variant_path(name)
        with Model(path, n_gpu) as model:
            with Context(model, s.ctx, min(SEQS_PER_BATCH, len(base["tokens"])), threads) as c:
                per_token = perplexity.score_against_base(model, c, base)
            summary = perplexity.summarize(base, per_token)
            n_params, tensor_bytes = _sizes(model)
        result = {"variant": name, "file_bytes": path.stat().st_size, "tensor_bytes": tensor_bytes,
                  "n_params": n_params, "bpw": tensor_bytes * 8 / n_params, **summary}
        io.out(ctx.score_path(name)).write_text(json.dumps(result, indent=2) + "\n")
        return {"mean_kld": summary["mean_kld"]}
    return run


def _sizes(model) -> tuple[int, int]:
    """Parameter count and tensor bytes as llama.cpp reports them (bpw = bytes * 8 / params)."""
    import llama_cpp

    return int(llama_cpp.llama_model_n_params(model.ptr)), int(llama_cpp.llama_model_size(model.ptr))
