"""`squeeze card`: a Hugging Face model card (README.md) for a scored run: front matter, the
files, the score tables, how the quants were made, the caveats, and how to reproduce them."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.errors import SqueezeError
from pipeline.fsutil import write_text_atomic
from pipeline.report.tables import (GRID_MARK, PLOT_FILE, grid_flattered, load_run, mark_grid, published_section,
                                    requant_caveat, stale_banner, tables_of)
from pipeline.recipe.plan import AutoPrune
from pipeline.run.layout import RunContext
from pipeline.run.manifest import Manifest
from pipeline.sources.model_source import BaseInfo


def _front_matter(run: RunContext) -> str:
    r = run.recipe
    meta = {}
    if r.report.base_model:
        meta["base_model"] = r.report.base_model
        meta["base_model_relation"] = "quantized"
    if r.report.license:
        meta["license"] = r.report.license
    meta["library_name"] = "gguf"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["gguf", "llama.cpp", "quantized", "imatrix", "squeeze"] + (["pruned"] if _pruned(run) else [])
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _pruned(run: RunContext) -> dict[str, tuple[tuple[int, ...], str]]:
    """variant -> (the original numbers of the layers it drops, how they were chosen), for every
    variant that drops any: listed in the recipe, picked automatically (`prune: {auto: K}`), or
    weighed against bits (`prune: {up_to: K}`, which may keep every layer)."""
    out = {}
    for v in run.recipe.plans:
        tag = run.prune_choice_tag(v)
        if tag is not None and not run.prune_choice_path(tag).exists():
            continue  # the prune stage has not chosen yet
        layers = run.variant_layers(v)
        if not layers:
            continue
        if tag is None:
            how = "listed in the recipe"
        elif isinstance(v.prune, AutoPrune):
            how = "picked by measured KLD"
        else:
            how = "picked by measured KLD, weighed against spending the bytes on bits"
        out[v.name] = (layers, how)
    return out


def _versions(run: RunContext) -> dict:
    m = Manifest(run.folder, read_only=True)
    for key, rec in m.steps.items():
        if rec.versions:
            return rec.versions
    return {}


def _method(run: RunContext) -> list[str]:
    r = run.recipe
    lines = [f"- **Base**: `{r.model.source}` converted to {r.model.base_type.upper()}; every variant is "
             "quantized from it and every score is measured against it."]
    if r.model.dither:
        lines.append("- **Dithered base**: the source was quantized, so each of its quantized tensors was taken off "
                     "that grid (uniform noise of ±half the grid step per block of 32) before anything was measured.")
    c = r.calibration
    if c is not None:
        src = f"`{c.imatrix}`" if c.imatrix else f"{', '.join(c.datasets)}, {c.chunks} chunks of {c.ctx} tokens"
        lines.append(f"- **Importance matrix**: {src} (llama-imatrix's method, computed in-process).")
    if r.select.rules:
        rules = "; ".join(f"`{t.pattern}` → {t.type}" for t in r.select.rules)
        lines.append(f"- **Tensor types** (first matching rule wins, like `llama-quantize --tensor-type`): {rules}.")
    pruned = _pruned(run)
    if pruned:
        lines.append("- **Layer pruning** (by squeeze, before quantizing: the blocks are dropped from the base, the "
                     "rest renumbered with their per-layer metadata and importance matrix kept; llama.cpp loads the "
                     "result as a model with fewer layers): " +
                     "; ".join(f"{n}: layers {', '.join(map(str, layers))} ({how})"
                               for n, (layers, how) in pruned.items()) + ".")
    s = r.score
    lines.append(f"- **Scoring**: {s.dataset}, {s.chunks} chunks of {s.ctx} tokens, the second half of each "
                 "chunk scored, as `llama-perplexity --kl-divergence` does; uncertainties are its formulas.")
    if s.tasks.benchmarks and s.tasks.count:
        lines.append(f"- **Tasks**: {s.tasks.count} tasks per benchmark chosen as `llama-perplexity "
                     f"--hellaswag-tasks/--winogrande-tasks/--multiple-choice-tasks {s.tasks.count}` choose them, "
                     f"context {s.tasks.ctx}. Small task counts carry large standard errors.")
    v = _versions(run)
    if v:
        lines.append("- **Software**: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".")
    return lines


def render_card(run: RunContext, stale: set[str] = frozenset()) -> str:
    """The card's Markdown; `stale` names variants whose scores predate the recipe (made with
    --allow-stale): the card opens with a warning and their rows are marked."""
    r = run.recipe
    tables = load_run(run.folder, [v.name for v in r.plans])
    if tables.scores.empty:
        raise SqueezeError(f"{run.folder}: no scores yet; run `squeeze run {r.path or r.name}` first")
    base = BaseInfo.load(run.base_info_path)
    t = mark_grid(tables_of(tables, r.report.reference, stale), grid_flattered(base, tables.scores))
    title = r.report.title or f"{r.name} GGUF"
    parts = [_front_matter(run), f"# {title}", ""]
    if stale:
        parts += [stale_banner(stale), ""]
    if r.description:
        parts += [r.description, ""]
    caveat = requant_caveat(base, tables.scores)
    if caveat:  # above the first table, where its marks are
        parts += [f"> {GRID_MARK.strip()} **Caveat**: {caveat}", ""]
    parts += ["GGUF quantizations made and measured with squeeze from one recipe; "
              "every number below was measured on the files listed here.", "",
              "## Files", "", t["sizes.csv"].to_markdown(index=False, disable_numparse=True), "",
              "## Quality against the base", "",
              f"Perplexity on {r.score.dataset} and KL divergence from the base's token distribution "
              "(lower is better), share of tokens where both pick the same top token (higher is better).", "",
              t["ppl-kld.csv"].to_markdown(index=False, disable_numparse=True), "",
              t["kld-percentiles.csv"].to_markdown(index=False, disable_numparse=True), ""]
    if (run.folder / PLOT_FILE).exists():
        parts += [f"![mean KLD against file size]({PLOT_FILE})", ""]
    parts += published_section(run, tables, "##")
    if not t["tasks.csv"].empty:
        parts += ["## Benchmarks", "", "Accuracy (%) ± standard error.", "", t["tasks.csv"].to_markdown(index=False, disable_numparse=True), ""]
    if not t["speed.csv"].empty:
        parts += ["## Speed", "", "Tokens per second on CPU (llama-bench's pp/tg tests), mean ± sd.", "",
                  t["speed.csv"].to_markdown(index=False, disable_numparse=True), ""]
    if not t["drift.csv"].empty:
        parts += ["## Behaviour drift", "", "Where greedy generations first differ from the base's "
                  "(lower error does not always mean the same behaviour).", "",
                  t["drift.csv"].to_markdown(index=False, disable_numparse=True), ""]
    parts += ["## How these files were made", "", *_method(run), ""]
    parts += ["## Reproduce", "", "```sh", f"squeeze run {r.path or 'RECIPE.yaml'}", "```", ""]
    return "\n".join(parts)


def write_card(run: RunContext, output: Path | None = None, stale: set[str] = frozenset()) -> Path:
    path = Path(output) if output else run.folder / "README.md"
    write_text_atomic(path, render_card(run, stale))
    return path
