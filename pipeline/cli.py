"""The `squeeze` command: a thin layer over the library; errors become one 'Error: ...' line."""

from __future__ import annotations

import functools
import sys
import time

import click

from pipeline.errors import SqueezeError


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


@main.command()
@recipe_arg
@results_opt
@click.option("--force", "force", multiple=True, metavar="STAGE", help="Redo this stage even if up to date.")
@click.option("--from", "from_stage", metavar="STAGE", help="Redo this stage and every later one.")
@click.option("--variant", "variants", multiple=True, metavar="NAME", help="Only build and score this variant.")
@_errors_as_one_line
def run(recipe, results, force, from_stage, variants):
    """Run the recipe's stages, redoing only what changed."""
    from pipeline.plan import build_steps, check_stage, open_run
    from pipeline.runner import Runner

    for stage in force:
        check_stage(stage, "--force")
    check_stage(from_stage, "--from")
    ctx = open_run(recipe, results)
    steps = build_steps(ctx, tuple(variants))
    start = time.monotonic()
    counts = Runner(ctx.folder, echo=click.echo).run(steps, set(force), from_stage)
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
@_errors_as_one_line
def plan(recipe, results):
    """Validate a recipe and print the stages, variants and what each step would produce."""
    from pipeline.plan import build_steps, open_run

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
    from pipeline.plan import build_steps, open_run
    from pipeline.runner import Runner

    ctx = open_run(recipe, results)
    for v in Runner(ctx.folder, echo=click.echo).status(build_steps(ctx)):
        detail = f" ({v.reason})" if v.state == "stale" else ""
        click.echo(f"{v.step.key:<30} {v.state}{detail}")


@main.command()
@click.option("--fetch", is_flag=True, help="Download the matching llama.cpp source (llama-cpp-python sdist).")
@click.option("--build", is_flag=True, help="Build the reference CLI tools (llama-quantize, -imatrix, -perplexity, -bench).")
@_errors_as_one_line
def toolchain(fetch, build):
    """Print the llama.cpp versions squeeze runs; fetch its source or build the reference tools."""
    from pipeline import toolchain as tc

    if fetch or build:
        tc.fetch_source(echo=click.echo)
    if build:
        click.echo(f"reference tools: {tc.build_reference(echo=click.echo)}")
    for key, value in tc.describe().items():
        click.echo(f"{key:<18} {value}")


if __name__ == "__main__":
    sys.exit(main())
