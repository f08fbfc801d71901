"""The `squeeze` command: a thin layer over the library; errors become one 'Error: ...' line."""

from __future__ import annotations

import functools
import signal
import sys
import time
from pathlib import Path

import click

from pipeline.cost.gpu_rates import gpu as gpu_spec
from pipeline.cost.rates import machine_rates
from pipeline.cost.run_estimate import estimate_run, format_estimate, parse_count
from pipeline.build import toolchain as tc
from pipeline.errors import SqueezeError
from pipeline.formats.imatrix_file import combine_imatrices, read_imatrix, write_imatrix
from pipeline.fsutil import atomic_path
from pipeline.recipe.load import dump_recipe
from pipeline.report.card import write_card
from pipeline.report.compare import compare as compare_runs
from pipeline.report.compare import is_published_table, run_folder
from pipeline.report.statistics import write_statistics
from pipeline.report.tables import report_markdown, scored_variants
from pipeline.run.ray_executor import RayExecutor
from pipeline.run.runner import Interrupted, Runner, signals_interrupt
from pipeline.stages.freshness import remember_recipe, require_fresh, run_context
from pipeline.publish.publish_run import publish as publish_run
from pipeline.stages.registry import STAGE_ORDER, build_steps, check_stage, open_run


def _one_line(text: str) -> str:
    """A message that quotes what the user wrote ('unknown quant type 'Q4\nK'') stays one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _errors_as_one_line(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SqueezeError as exc:
            raise click.ClickException(_one_line(str(exc))) from None
        except KeyboardInterrupt as exc:  # Interrupted (SIGINT/SIGTERM in `run`), or Ctrl-C elsewhere
            if not isinstance(exc, Interrupted):
                exc = Interrupted(signal.SIGINT)
            click.echo(str(exc), err=True)
            sys.exit(exc.exit_code)
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
@click.option("--keep-going", is_flag=True,
              help="When a step fails, record why, skip the steps that need it and go on with the rest; "
                   "the report lists the failed variants. Exits non-zero at the end.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: run every step whose inputs are ready as a Ray task (pip install 'squeeze[ray]').")
@click.option("--address", metavar="ADDR",
              help="With --executor ray: the Ray cluster to join (default: RAY_ADDRESS, else a local one).")
@_errors_as_one_line
def run(recipe, results, force, from_stage, variants, keep_going, executor, address):
    """Run the recipe's stages, redoing only what changed."""
    with signals_interrupt(exiting=True):
        _run(recipe, results, force, from_stage, variants, keep_going, executor, address)


def _run(recipe, results, force, from_stage, variants, keep_going=False, executor="local", address=None):
    for stage in force:
        check_stage(stage, "--force")
    check_stage(from_stage, "--from")
    if address and executor != "ray":
        raise SqueezeError("--address names a Ray cluster: give --executor ray too")
    run = open_run(recipe, results)
    remember_recipe(run)
    steps = build_steps(run, tuple(variants))
    start = time.monotonic()
    runner = Runner(run.folder, echo=click.echo)
    run_steps = RayExecutor(runner, address).run if executor == "ray" else runner.run
    counts = run_steps(steps, set(force), from_stage, STAGE_ORDER, keep_going=keep_going)
    elapsed = time.monotonic() - start
    if counts["ran"] == 0 and not counts.get("failed"):
        click.echo(f"every stage is up to date ({counts['skipped']} steps)")
    else:
        click.echo(f"{counts['ran']} steps run, {counts['skipped']} up to date, {elapsed:.0f} s")
    report = run.folder / "scores.md"
    if report.exists():
        click.echo(f"report: {report}")
    if counts.get("failed"):
        failed = counts["failed"]
        blocked = f"; {len(counts['blocked'])} skipped as blocked" if counts["blocked"] else ""
        raise SqueezeError(f"{len(failed)} step{'s' if len(failed) > 1 else ''} failed: "
                           f"{', '.join(f'{k} ({why})' for k, why in failed.items())}{blocked}")


@main.command()
@recipe_arg
@results_opt
@click.option("--dump", is_flag=True,
              help="Print the recipe as squeeze reads it (extends: resolved, defaults filled) instead.")
@click.option("--estimate", is_flag=True,
              help="Predict each step's wall time, disk and peak memory for a fresh run on this machine "
                   "(rates measured once by a short probe, then cached).")
@click.option("--gpu", metavar="NAME", help="With --estimate: evaluate the model at this GPU's spec rates "
                                            "(H100, H200, A100, RTX4090, RTX3090, L4, T4, M2-Max, M2-Ultra, M3-Max).")
@click.option("--params", metavar="N", help="With --estimate, for a model not downloaded yet: its parameter "
                                            "count (12.2B, 270M).")
@click.option("--vocab", type=int, metavar="N", help="With --estimate, for a model not downloaded yet: its "
                                                     "vocabulary size.")
@click.option("--cpu-threads", type=int, metavar="N", help="With --estimate: price CPU work for a host of N threads "
                                                           "(scaled from this machine's rates); with --gpu the "
                                                           "default is that GPU's usual host.")
@click.option("--active-params", metavar="N", help="With --estimate, a mixture of experts: parameters a token "
                                                   "passes through (e.g. 3B), when the model is not here to say.")
@_errors_as_one_line
def plan(recipe, results, dump, estimate, gpu, params, vocab, cpu_threads, active_params):
    """Validate a recipe and print the stages, variants and what each step would produce."""
    if dump:
        click.echo(dump_recipe(open_run(recipe, results, check_model=False).recipe), nl=False)
        return
    if estimate or gpu or cpu_threads or active_params:
        # a recipe that offloads is priced even where this build cannot offload: `run` refuses it
        run = open_run(recipe, results, check_gpu=False)
        steps = build_steps(run)  # a recipe mistake is reported before the rate benchmark runs
        rates = machine_rates(run.threads, echo=click.echo)
        result = estimate_run(run, steps, rates, gpu_spec(gpu) if gpu else None,
                              parse_count(params) if params else None, vocab, cpu_threads,
                              parse_count(active_params, "--active-params") if active_params else None)
        for line in format_estimate(result):
            click.echo(line)
        return

    run = open_run(recipe, results)
    r = run.recipe
    info = run.model_info
    steps = build_steps(run)  # may still find a mistake (a dataset not found): before any output
    click.echo(f"recipe {r.name} ({r.path}): {info.arch}, {info.n_layers} layers, "
               f"{len(r.plans)} variants -> {run.folder}")
    for step in steps:
        click.echo(f"  {step.stage:<10} {step.key:<28} -> {step.produces}")


@main.command()
@recipe_arg
@results_opt
@_errors_as_one_line
def status(recipe, results):
    """Show each step as done, stale (and why), missing or failed (and why; --keep-going)."""
    run = open_run(recipe, results)
    for v in Runner(run.folder, echo=click.echo, read_only=True).status(build_steps(run)):
        detail = f" ({v.reason})" if v.state in ("stale", "failed") else ""
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
        if is_published_table(run_folder(run_path)):  # "no scores found" before anything else
            continue  # someone's published figures: nothing of ours to be stale
        run = run_context(run_path)
        if run is not None:
            stale[run.folder.resolve()] = require_fresh(run, "compare", allow_stale)
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
    run = open_run(recipe, results, check_model=False)
    stale = require_fresh(run, "card", allow_stale)
    path = write_card(run, output, stale)
    click.echo(f"model card: {path}" + (f" (marked stale: {', '.join(sorted(stale))})" if stale else ""))


@main.command()
@recipe_arg
@click.option("--repo", "repo_id", required=True, metavar="OWNER/NAME", help="Hugging Face model repository (created if needed).")
@click.option("--private", is_flag=True, help="Create the repository private.")
@results_opt
@allow_stale_opt
@_errors_as_one_line
def publish(recipe, repo_id, private, results, allow_stale):
    """Upload a scored run to the Hugging Face hub: the variants' GGUFs, the model card, the score
    tables and plots; only new or changed files are sent [env: HF_TOKEN, HF_ENDPOINT]."""
    run = open_run(recipe, results, check_model=False)
    done = publish_run(run, repo_id, private, allow_stale, echo=click.echo)
    if done.commit:
        click.echo(f"published {len(done.sent)} files ({len(done.unchanged)} unchanged): {done.url} "
                   f"(commit {done.commit[:12]})")
    else:
        click.echo(f"published: {done.url}")
    if done.others:
        click.echo(f"left as they are on the hub (not in this run): {', '.join(done.others)}")


@main.command()
@recipe_arg
@results_opt
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write it to this file instead of printing it.")
@allow_stale_opt
@_errors_as_one_line
def report(recipe, results, output, allow_stale):
    """Print the run's score tables (scores.md) as they stand now."""
    run = open_run(recipe, results, check_model=False)
    text = report_markdown(run, require_fresh(run, "report", allow_stale))
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
