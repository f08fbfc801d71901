"""The `squeeze` command: a thin layer over the library; errors become one 'Error: ...' line."""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import click

from pipeline.engine import toolchain as tc
from pipeline.errors import SqueezeError
from pipeline.formats.imatrix_file import combine_imatrices, read_imatrix, write_imatrix
from pipeline.fsutil import atomic_path
from pipeline.recipe.load import dump_recipe
from pipeline.report.card import write_card
from pipeline.report.compare import compare as compare_runs
from pipeline.report.compare import run_folder
from pipeline.report.statistics import write_statistics
from pipeline.report.tables import report_markdown, scored_variants
from pipeline.run.runner import Runner
from pipeline.stages.freshness import remember_recipe, require_fresh, run_context
from pipeline.stages.registry import STAGE_ORDER, build_steps, check_stage, open_run


def _errors_as_one_line(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SqueezeError as exc:
            raise click.ClickException(str(exc)) from None
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="squeeze")
def main():
    """squeeze: smaller GGUF models by layer-wise quantization and pruning, with every cost measured."""


recipe_arg = click.argument("recipe", type=click.Path(dir_okay=False))
results_opt = click.option("--results", type=click.Path(file_okay=False),
                           help="Results folder (default: results/<recipe name>).")
allow_stale_opt = click.option("--allow-stale", is_flag=True,
                               help="Show results that are not current anyway, each stale row marked as such.")


@main.command()
@recipe_arg
@results_opt
@click.option("--force", "force", multiple=True, metavar="STAGE", help="Redo this stage even if up to date.")
@click.option("--from", "from_stage", metavar="STAGE", help="Redo this stage and every later one.")
@click.option("--variant", "variants", multiple=True, metavar="NAME", help="Only build and score this variant.")
@_errors_as_one_line
def run(recipe, results, force, from_stage, variants):
    """Run the recipe's stages, redoing only what changed."""
    for stage in force:
        check_stage(stage, "--force")
    check_stage(from_stage, "--from")
    ctx = open_run(recipe, results)
    remember_recipe(ctx)
    steps = build_steps(ctx, tuple(variants))
    start = time.monotonic()
    counts = Runner(ctx.folder, echo=click.echo).run(steps, set(force), from_stage, STAGE_ORDER)
    elapsed = time.monotonic() - start
    if counts["ran"] == 0:
        click.echo(f"every stage is up to date ({counts['skipped']} steps)")
    else:
        click.echo(f"{counts['ran']} steps run, {counts['skipped']} up to date, {elapsed:.0f} s")
    report = ctx.folder / "scores.md"
    if report.exists():
        click.echo(f"report: {report}")


@main.command()
@recipe_arg
@results_opt
@click.option("--dump", is_flag=True,
              help="Print the recipe as squeeze reads it (extends: resolved, defaults filled) instead.")
@_errors_as_one_line
def plan(recipe, results, dump):
    """Validate a recipe and print the stages, variants and what each step would produce."""
    if dump:
        click.echo(dump_recipe(open_run(recipe, results, check_model=False).recipe), nl=False)
        return

    ctx = open_run(recipe, results)
    r = ctx.recipe
    info = ctx.model_info
    click.echo(f"recipe {r.name} ({r.path}): {info.arch}, {info.n_layers} layers, "
               f"{len(r.variants)} variants -> {ctx.folder}")
    for step in build_steps(ctx):
        click.echo(f"  {step.stage:<10} {step.key:<28} -> {step.produces}")


@main.command()
@recipe_arg
@results_opt
@_errors_as_one_line
def status(recipe, results):
    """Show each step as done, stale (and why) or missing."""
    ctx = open_run(recipe, results)
    for v in Runner(ctx.folder, echo=click.echo).status(build_steps(ctx)):
        detail = f" ({v.reason})" if v.state == "stale" else ""
        click.echo(f"{v.step.key:<30} {v.state}{detail}")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--variant", "variants", multiple=True, metavar="NAME", help="Only these variants.")
@click.option("--reference", metavar="NAME", help="Variant the others are measured against (one run).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write the table as CSV.")
@allow_stale_opt
@_errors_as_one_line
def compare(runs, variants, reference, csv_path, allow_stale):
    """Put variants of a run (a results folder or recipe), or the same variants across several
    runs, side by side with deltas and better/worse arrows."""
    stale = {}
    for run_path in runs:
        run_folder(run_path)  # "no scores found" before anything else
        ctx = run_context(run_path)
        if ctx is not None:
            stale[ctx.folder.resolve()] = require_fresh(ctx, "compare", allow_stale)
        elif allow_stale:  # nothing to check it against: every row is unverified
            stale[Path(run_path).resolve()] = scored_variants(Path(run_path))
        else:
            raise SqueezeError(f"compare: cannot tell whether {run_path} is current: it records no recipe "
                               "(or the recipe is gone); name the recipe instead, or pass --allow-stale")
    table = compare_runs(list(runs), tuple(variants), reference, stale)
    click.echo(table.to_markdown(index=False, disable_numparse=True))
    if csv_path:
        with atomic_path(csv_path) as tmp:
            table.to_csv(tmp, index=False)


@main.command()
@recipe_arg
@results_opt
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Where to write (default: <results>/README.md).")
@allow_stale_opt
@_errors_as_one_line
def card(recipe, results, output, allow_stale):
    """Write a Hugging Face model card (README.md) from a scored run."""
    ctx = open_run(recipe, results, check_model=False)
    stale = require_fresh(ctx, "card", allow_stale)
    path = write_card(ctx, output, stale)
    click.echo(f"model card: {path}" + (f" (marked stale: {', '.join(sorted(stale))})" if stale else ""))


@main.command()
@recipe_arg
@results_opt
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write it to this file instead of printing it.")
@allow_stale_opt
@_errors_as_one_line
def report(recipe, results, output, allow_stale):
    """Print the run's score tables (scores.md) as they stand now."""
    ctx = open_run(recipe, results, check_model=False)
    text = report_markdown(ctx, require_fresh(ctx, "report", allow_stale))
    if output:
        with atomic_path(output) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
        click.echo(f"report: {output}")
    else:
        click.echo(text)


@main.command()
@click.option("--fetch", is_flag=True, help="Download the matching llama.cpp source (llama-cpp-python sdist).")
@click.option("--build", is_flag=True, help="Build the reference CLI tools (llama-quantize, -imatrix, -perplexity, -bench).")
@click.option("--bin", "bin_dir", type=click.Path(file_okay=False), envvar="SQUEEZE_LLAMA_CPP_BIN",
              help="Your own llama.cpp build's bin folder (CUDA, Metal), used instead of the reference "
                   "tools [env: SQUEEZE_LLAMA_CPP_BIN].")
@_errors_as_one_line
def toolchain(fetch, build, bin_dir):
    """Print the llama.cpp versions squeeze runs; fetch its source or build the reference tools."""
    with tc.using_bin(bin_dir):
        if fetch or build:
            tc.fetch_source(echo=click.echo)
        if fetch:
            click.echo(f"converter: {tc.convert_script(echo=click.echo)}")
        if build:
            click.echo(f"reference tools: {tc.build_reference(echo=click.echo)}")
        for key, value in tc.describe().items():
            click.echo(f"{key:<18} {value}")


@main.command("imatrix-combine")
@click.argument("output", type=click.Path(dir_okay=False))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--chunk-size", default=512, show_default=True,
              help="Tokens per chunk a legacy .dat file counts as (llama-imatrix's -c).")
@_errors_as_one_line
def imatrix_combine(output, inputs, chunk_size):
    """Add imatrix files (GGUF or legacy .dat) into one GGUF imatrix, as llama-imatrix --in-file does."""


    combined = combine_imatrices([read_imatrix(Path(p)) for p in inputs], chunk_size)
    with atomic_path(Path(output)) as tmp:
        write_imatrix(tmp, combined)
    click.echo(f"{output}: {len(combined.entries)} entries, {combined.chunk_count} chunks of {chunk_size}")


@main.command("imatrix-stats")
@click.argument("imatrix", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Folder for stats.csv, stats-layers.csv, stats.md and stats.png.")
@_errors_as_one_line
def imatrix_stats(imatrix, out_dir):
    """The statistics of `llama-imatrix --show-statistics` for an imatrix file, as tables and a heatmap."""


    src, out = Path(imatrix), Path(out_dir)
    names = ("stats.csv", "stats-layers.csv", "stats.md", "stats.png")
    with atomic_path(out / names[0]) as a, atomic_path(out / names[1]) as b, atomic_path(out / names[2]) as c, \
            atomic_path(out / names[3]) as d:
        rows, layers = write_statistics(src, read_imatrix(src), a, b, c, d)
    click.echo(f"{len(rows)} tensors, {len(layers)} layers -> {', '.join(str(out / n) for n in names)}")


if __name__ == "__main__":
    sys.exit(main())
