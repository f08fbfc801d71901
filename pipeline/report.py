"""Stage report: the score tables a model card shows, as CSV and Markdown (pandas)."""

from __future__ import annotations

import json

import pandas as pd

from pipeline.context import RunContext
from pipeline.runner import Step

# Below this many bits per weight comparisons on the 270M test model are meaningful: its F16
# base was dequantized from Q4_K_M, so requantizing to ~4.5 bpw and up lands back on the same
# grid and looks nearly lossless (see shared/FINDINGS.md).
REQUANT_CAVEAT_BPW = 4.5


def steps(ctx: RunContext) -> list[Step]:
    inputs = [ctx.score_path(v.name) for v in ctx.recipe.variants]
    outputs = [ctx.folder / "scores.csv", ctx.folder / "scores.md"]
    params = {"report.reference": ctx.recipe.report.reference, "report.title": ctx.recipe.report.title}

    def action(io):
        df = load_scores(ctx)
        df.to_csv(io.out(outputs[0]), index=False)
        io.out(outputs[1]).write_text(render_markdown(ctx, df))
        return {"variants": len(df)}

    return [Step("report", "report", params, inputs, outputs, action,
                 produces="scores.csv, scores.md (size and PPL/KLD tables)")]


def load_scores(ctx: RunContext) -> pd.DataFrame:
    rows = [json.loads(ctx.score_path(v.name).read_text()) for v in ctx.recipe.variants]
    for v, row in zip(ctx.recipe.variants, rows):
        row["ftype"] = v.ftype.upper()
        row["pruned_layers"] = " ".join(str(x) for x in ctx.recipe.prune_for(v))
    return pd.DataFrame(rows)


def size_table(df: pd.DataFrame, reference: str | None) -> pd.DataFrame:
    ref = reference if reference in set(df["variant"]) else df.loc[df["file_bytes"].idxmax(), "variant"]
    ref_bytes = float(df.loc[df["variant"] == ref, "file_bytes"].iloc[0])
    return pd.DataFrame({
        "Variant": df["variant"],
        "Type": df["ftype"],
        "Pruned layers": df["pruned_layers"].replace("", "-"),
        "Size (MiB)": (df["file_bytes"] / 2**20).round(1),
        "BPW": df["bpw"].round(2),
        f"Shrinkage vs {ref}": [f"{(1 - b / ref_bytes) * 100:.1f}%" for b in df["file_bytes"]],
    })


def error_table(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "Variant": df["variant"],
        "PPL ↓": df["ppl"].round(4),
        "PPL ratio ↓": df["ppl_ratio"].round(4),
        "Mean KLD ↓": df["mean_kld"].round(5),
        "Same top ↑": df["same_top_pct"].map(lambda x: f"{x:.2f}%"),
        "RMS Δp ↓": df["rms_dp_pct"].map(lambda x: f"{x:.2f}%"),
    })


def render_markdown(ctx: RunContext, df: pd.DataFrame) -> str:
    r = ctx.recipe
    title = r.report.title or f"{r.name}: score tables"
    parts = [f"# {title}", "",
             f"Model: `{r.model.source}` (base {r.model.base_type.upper()}). Scored on {r.score.dataset}, "
             f"{int(df['tokens'].iloc[0])} tokens ({r.score.chunks} chunks of {r.score.ctx}, second half of each "
             f"chunk), against the base. PPL of the base: {df['ppl_base'].iloc[0]:.4f}.", "",
             "## Sizes", "", size_table(df, r.report.reference).to_markdown(index=False), "",
             "## Perplexity and KL divergence", "", error_table(df).to_markdown(index=False), ""]
    if (df["bpw"] >= REQUANT_CAVEAT_BPW).any() and "gemma3-270m" in str(r.model.source).replace("_", "-"):
        parts += ["> Note: the 270M base was dequantized from a Q4_K_M file, so variants at about "
                  f"{REQUANT_CAVEAT_BPW} bits per weight and above land back on the original grid and look "
                  "nearly lossless. Compare quality below that, and for pruning.", ""]
    return "\n".join(parts)
