"""Find evaluation and calibration data by name or path.

A name is looked up, in order, in: the recipe's folder, the project's `calibration/` folder,
every folder in $SQUEEZE_DATA (os.pathsep-separated; CI points it at shared/datasets), and
squeeze's download cache. A name with a hub home is downloaded into that cache when online; the
file taken out of the download is keyed (pipeline.cache) by the download's sha256 and the version
of the extraction, so a new upstream file or a changed extraction replaces it.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline import __version__
from pipeline.cache import MadeFrom, cached, stale_reason
from pipeline.errors import SqueezeError, did_you_mean
from pipeline.fsutil import atomic_path, cache_dir
from pipeline.sources.hub import download_file

PROJECT_CALIBRATION = Path(__file__).resolve().parents[2] / "calibration"
EXTRACT_FORMAT = "1"  # bump when what _extract writes changes


@dataclass(frozen=True)
class KnownDataset:
    relpath: str  # inside a data folder
    hub_repo: str | None = None  # where to download it from when it is nowhere local
    hub_file: str | None = None
    zip_member: str | None = None


KNOWN = {
    "wikitext-2": KnownDataset("wikitext-2-raw/wiki.test.raw", "ggml-org/ci", "wikitext-2-raw-v1.zip",
                               "wikitext-2-raw/wiki.test.raw"),
    "groups_merged": KnownDataset("imatrix-calibration/groups_merged.txt"),
    "hellaswag": KnownDataset("hellaswag/hellaswag_val_full.txt"),
    "winogrande": KnownDataset("winogrande/winogrande-debiased-eval.csv"),
    "arc-easy": KnownDataset("arc/ARC-Easy-Dev.jsonl"),
    "arc-challenge": KnownDataset("arc/ARC-Challenge-Dev.jsonl"),
    "mmlu": KnownDataset("mmlu/val"),
    "truthfulqa": KnownDataset("truthfulqa/mc_task.json"),
}


def data_folders() -> list[Path]:
    folders = [PROJECT_CALIBRATION]
    for entry in os.environ.get("SQUEEZE_DATA", "").split(os.pathsep):
        if entry:
            folders.append(Path(entry).expanduser())
    folders.append(cache_dir("datasets"))
    return folders


def resolve_dataset(name: str, recipe_dir: Path | None = None, where: str = "") -> Path:
    """A local file (or folder) for `name`; downloads a known dataset when it is nowhere local."""
    p = Path(os.path.expanduser(name))
    candidates = [p] if p.is_absolute() else [(recipe_dir or Path.cwd()) / p, Path.cwd() / p]
    for c in candidates:
        if c.exists():
            return c
    known = KNOWN.get(name)
    downloads = cache_dir("datasets")
    for folder in data_folders():
        # what squeeze downloaded itself is checked against its source below, not taken as found
        if known and (folder / known.relpath).exists() and not (known.hub_repo and folder == downloads):
            return folder / known.relpath
        if (folder / name).exists():
            return folder / name
    if known and known.hub_repo:
        return _download(name, known)
    hint = did_you_mean(name, KNOWN)
    raise SqueezeError(f"{where}dataset '{name}' not found{hint} (looked beside the recipe, in calibration/, "
                       f"$SQUEEZE_DATA and {cache_dir('datasets')}); give a path or set SQUEEZE_DATA")


def extract_versions() -> dict[str, str]:
    return {"squeeze": __version__, "dataset extraction": EXTRACT_FORMAT}


def _made_from(name: str, known: KnownDataset, fetched: Path | None) -> MadeFrom:
    params = {"dataset": name, "hub_repo": known.hub_repo, "hub_file": known.hub_file, "member": known.zip_member}
    return MadeFrom({"download": fetched} if fetched else {}, extract_versions(), params)


def _download(name: str, known: KnownDataset) -> Path:
    target = cache_dir("datasets") / known.relpath
    try:
        fetched = download_file(known.hub_repo, known.hub_file, repo_type="dataset")
    except SqueezeError:
        # the hub cannot be asked: an earlier extraction by this version is still what it was
        if stale_reason(target, _made_from(name, known, None), check_sources=False) is None:
            return target
        raise
    extract_dataset(name, known, Path(fetched), target)
    return target


def extract_dataset(name: str, known: KnownDataset, fetched: Path, target: Path,
                    versions: dict[str, str] | None = None) -> Path:
    """`target` taken out of the downloaded `fetched`, unless its record says it already was
    (same download bytes, same extraction version)."""
    made_from = _made_from(name, known, fetched)
    if versions is not None:
        made_from = MadeFrom(made_from.sources, versions, made_from.params)
    cached(target, made_from, lambda: _extract(name, known, fetched, target))
    return target


def _extract(name: str, known: KnownDataset, fetched: Path, target: Path) -> None:
    if known.zip_member:
        with zipfile.ZipFile(fetched) as zf, atomic_path(target) as tmp:
            member = next((m for m in zf.namelist() if m.endswith(known.zip_member)), None)
            if member is None:
                raise SqueezeError(f"{fetched}: has no {known.zip_member} for dataset '{name}'")
            tmp.write_bytes(zf.read(member))
    else:
        with atomic_path(target) as tmp:
            tmp.write_bytes(Path(fetched).read_bytes())
