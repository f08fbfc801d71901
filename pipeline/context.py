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

    def variant_path(self, name: str) -> Path:
        return self.folder / "variants" / f"{name}.gguf"

    def tensor_types_path(self, name: str) -> Path:
        return self.folder / "variants" / f"{name}.tensor-types.txt"

    def score_path(self, name: str) -> Path:
        return self.folder / "scores" / f"{name}.json"

    @property
    def base_distribution_path(self) -> Path:
        return self.folder / "scores" / "base-topk.npz"

    # ---- the model, as far as it is known before any work ---------------------------------
    @functools.cached_property
    def model_info(self) -> ModelInfo:
        from pipeline.convert import model_info_for

        return model_info_for(self)

    @property
    def threads(self) -> int | None:
        return self.recipe.model.threads
