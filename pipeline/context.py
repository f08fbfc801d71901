"""Everything the stages of one run share: the recipe, the results folder and its file names."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.model_info import ModelInfo


def results_root() -> Path:
    return Path(os.environ.get("SQUEEZE_RESULTS") or "results")


@dataclass
class RunContext:
    recipe: object  # pipeline.recipe.Recipe
    folder: Path

    # ---- file names (one place, so stages and reports agree) --------------------------------
    @property
    def base_path(self) -> Path:
        return self.folder / f"base-{self.recipe.model.base_type.lower()}.gguf"

    @property
    def imatrix_path(self) -> Path:
        return self.folder / "imatrix.gguf"

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

    # pruned bases (pipeline.prune): one per distinct prune set, tagged 'p13-15'; 'auto2' for
    # the K=2 set the prune stage picks
    def pruned_base_path(self, tag: str) -> Path:
        return self.folder / "pruned" / f"base-{self.recipe.model.base_type.lower()}-{tag}.gguf"

    def pruned_imatrix_path(self, tag: str) -> Path:
        return self.folder / "pruned" / f"imatrix-{tag}.gguf"

    def prune_choice_path(self, tag: str) -> Path:
        return self.folder / "pruned" / f"{tag}.json"

    # sensitivities (pipeline.sensitivity) and budget choices (pipeline.allocate)
    @property
    def sensitivity_csv_path(self) -> Path:
        return self.folder / "sensitivity.csv"

    @property
    def sensitivity_json_path(self) -> Path:
        return self.folder / "sensitivity.json"

    @property
    def sensitivity_plot_path(self) -> Path:
        return self.folder / "sensitivity.png"

    def allocation_md_path(self, name: str) -> Path:
        return self.folder / "variants" / f"{name}.allocation.md"

    def variant_path(self, name: str) -> Path:
        return self.folder / "variants" / f"{name}.gguf"

    def tensor_types_path(self, name: str) -> Path:
        return self.folder / "variants" / f"{name}.tensor-types.txt"

    def score_path(self, name: str) -> Path:
        return self.folder / "scores" / f"{name}.json"

    @property
    def base_distribution_path(self) -> Path:
        return self.folder / "scores" / "base-topk.npz"

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
    @functools.cached_property
    def model_info(self) -> ModelInfo:
        from pipeline.convert import model_info_for

        return model_info_for(self)

    @property
    def threads(self) -> int | None:
        return self.recipe.model.threads
