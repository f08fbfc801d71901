"""Everything the stages of one run share: the recipe, the results folder and its file names,
and the tags that name a variant's pruned base."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.formats.model_info import ModelInfo
from pipeline.recipe.plan import AutoPrune, UpToPrune, VariantPlan
from pipeline.recipe.schema import Recipe
from pipeline.sources.model_source import model_info_for

# The name the base model's score files go under (scores/base.tasks.json, ...), beside the variants'.
BASE = "base"


def results_root() -> Path:
    return Path(os.environ.get("SQUEEZE_RESULTS") or "results")


@dataclass
class RunContext:
    recipe: Recipe
    folder: Path

    # ---- file names (one place, so stages and reports agree) --------------------------------
    @property
    def base_path(self) -> Path:
        return self.folder / f"base-{self.recipe.model.base_type.lower()}.gguf"

    @property
    def base_info_path(self) -> Path:
        """What the convert step knows about the base's origin (pipeline.sources.model_source.BaseInfo)."""
        return self.base_path.with_suffix(".json")

    @property
    def recipe_dir(self) -> Path | None:
        return Path(self.recipe.path).parent if self.recipe.path else None

    @property
    def imatrix_path(self) -> Path:
        return self.folder / "imatrix.gguf"

    @property
    def moments_path(self) -> Path:
        """The calibration pass's input second moments, made when a variant rounds with gptq."""
        return self.folder / "moments.npz"

    @property
    def layers_path(self) -> Path:
        return self.folder / "layers.csv"

    @property
    def layers_plot_path(self) -> Path:
        return self.folder / "layers.png"

    @property
    def stats_csv_path(self) -> Path:
        return self.folder / "stats.csv"

    @property
    def stats_layers_csv_path(self) -> Path:
        return self.folder / "stats-layers.csv"

    @property
    def stats_md_path(self) -> Path:
        return self.folder / "stats.md"

    @property
    def stats_heatmap_path(self) -> Path:
        return self.folder / "stats.png"

    # pruned bases (pipeline.stages.prune): one per distinct prune set, tagged 'p13-15'; 'auto2'
    # for the K=2 set the prune stage picks
    def prune_choice_tag(self, v: VariantPlan) -> str | None:
        """The tag of a variant's automatic prune choice: 'auto2' for K=2 layers picked (shared by
        the variants asking for it), 'upto2-<variant>' for at most 2 weighed against bits under the
        variant's own budget; None when its layers are given (or none)."""
        if isinstance(v.prune, AutoPrune):
            return f"auto{v.prune.k}"
        if isinstance(v.prune, UpToPrune):
            return f"upto{v.prune.k}-{v.name}"
        return None

    def prune_tag(self, v: VariantPlan) -> str | None:
        """The tag of the pruned base a variant is quantized from; None when it drops no layer."""
        tag = self.prune_choice_tag(v)
        if tag is not None:
            return tag
        layers = v.prune.listed
        return "p" + "-".join(str(x) for x in layers) if layers else None

    def variant_layers(self, v: VariantPlan) -> tuple[int, ...]:
        """The original numbers of the layers a variant drops (automatic: read from the choice)."""
        tag = self.prune_choice_tag(v)
        if tag is None:
            return v.prune.listed
        return tuple(json.loads(self.prune_choice_path(tag).read_text())["layers"])

    def pruned_base_path(self, tag: str) -> Path:
        return self.folder / "pruned" / f"base-{self.recipe.model.base_type.lower()}-{tag}.gguf"

    def pruned_imatrix_path(self, tag: str) -> Path:
        return self.folder / "pruned" / f"imatrix-{tag}.gguf"

    def prune_choice_path(self, tag: str) -> Path:
        return self.folder / "pruned" / f"{tag}.json"

    # sensitivities (pipeline.choose.sensitivity) and budget choices (pipeline.choose.allocate)
    @property
    def sensitivity_csv_path(self) -> Path:
        return self.folder / "sensitivity.csv"

    @property
    def sensitivity_json_path(self) -> Path:
        return self.folder / "sensitivity.json"

    @property
    def sensitivity_md_path(self) -> Path:
        return self.folder / "sensitivity.md"

    @property
    def sensitivity_plot_path(self) -> Path:
        return self.folder / "sensitivity.png"

    @property
    def probe_memo_path(self) -> Path:
        """Every in-memory probe the run measured (pipeline.choose.memory_probe.ProbeMemo): a cache
        the sensitivity, prune and quantize steps share, not a result."""
        return self.folder / "probes.memo.jsonl"

    def allocation_md_path(self, name: str) -> Path:
        return self.folder / "variants" / f"{name}.allocation.md"

    def memory_fit_path(self, name: str) -> Path:
        """A memory-targeted variant: what llama.cpp allocated to run it at the target's context."""
        return self.folder / "variants" / f"{name}.memory.json"

    def target_path(self, name: str) -> Path:
        """A KLD-targeted variant's target and what its chosen mix measured on calibration text."""
        return self.folder / "variants" / f"{name}.target.json"

    def variant_path(self, name: str) -> Path:
        return self.folder / "variants" / f"{name}.gguf"

    def tensor_types_path(self, name: str) -> Path:
        return self.folder / "variants" / f"{name}.tensor-types.txt"

    def score_path(self, name: str) -> Path:
        return self.folder / "scores" / f"{name}.json"

    @property
    def base_distribution_path(self) -> Path:
        return self.folder / "scores" / "base-topk.npz"

    @property
    def text_transfer_path(self) -> Path:
        """The per-class factors from calibration-text KLD to scoring-text KLD
        (pipeline.choose.text_transfer), measured when a variant has a KLD target."""
        return self.folder / "scores" / "text-transfer.json"

    # Task accuracies, tokens/s and greedy continuations; `name` is a variant or "base".
    def tasks_path(self, name: str) -> Path:
        return self.folder / "scores" / f"{name}.tasks.json"

    def speed_path(self, name: str) -> Path:
        return self.folder / "scores" / f"{name}.speed.json"

    def drift_path(self, name: str) -> Path:
        return self.folder / "scores" / f"{name}.drift.json"

    def report_path(self, name: str) -> Path:
        """A report output: scores.md, sizes.csv, kld-vs-size.png, ..."""
        return self.folder / name

    # ---- the model, as far as it is known before any work ---------------------------------
    @property
    def model_info(self) -> ModelInfo:
        # Before convert, a Hugging Face source's tensors are predicted from its names; once the
        # base exists it is the truth, so the answer is kept only while the base's presence holds.
        have_base = self.base_path.exists()
        cached = self.__dict__.get("_model_info")
        if cached is None or cached[0] != have_base:
            cached = self.__dict__["_model_info"] = (have_base, model_info_for(self.recipe, self.base_path))
        return cached[1]

    @property
    def threads(self) -> int | None:
        return self.recipe.model.threads
