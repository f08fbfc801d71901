"""Downloads from the Hugging Face hub (models and datasets) into squeeze's cache.

huggingface_hub does the transfers. When a connection drops mid-file it asks for the rest with
an HTTP Range request (up to 5 times without progress); squeeze retries a failed file a few more
times. A run that fails for good loses only the file in flight: huggingface_hub 1.x deletes
partial files, but every finished file stays in the cache and a later run fetches only the rest.
The endpoint ($HF_ENDPOINT) and token ($HF_TOKEN) are read at call time, so a test can point
squeeze at a local server without re-importing anything. Uploads (`squeeze publish`) are in
pipeline.publish.hub_upload and use the same endpoint and token.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

from pipeline.errors import SqueezeError
from pipeline.fsutil import cache_dir, write_json_atomic
from pipeline.progress import bar

DEFAULT_ENDPOINT = "https://huggingface.co"

# What convert_hf_to_gguf.py reads from a model repository: config, weights, tokenizer. Other
# files (README, original checkpoints, ONNX exports, images) are not downloaded.
MODEL_FILE_PATTERNS = (
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
# Old checkpoints without safetensors: only fetched when a repository has no *.safetensors.
LEGACY_WEIGHT_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")

# Whole-download retries on top of huggingface_hub's own in-file resumes (each resumes too).
ATTEMPTS = 3


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def token() -> str | None:
    # None lets huggingface_hub fall back to a token saved by `hf auth login`.
    return os.environ.get("HF_TOKEN") or None


def hub_cache() -> Path:
    return cache_dir("hub")


def quiet_progress_bars() -> None:
    if os.environ.get("SQUEEZE_PROGRESS", "1") == "0":
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def download_file(repo_id: str, filename: str, repo_type: str = "model", revision: str | None = None,
                  where: str = "") -> Path:
    """One file of a hub repository, from the cache when it is there already."""
    from huggingface_hub import hf_hub_download

    quiet_progress_bars()
    what = f"{'dataset' if repo_type == 'dataset' else 'hub model'} '{repo_id}'"
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return Path(hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision,
                                        cache_dir=hub_cache(), token=token(), endpoint=endpoint()))
        except Exception as exc:  # noqa: BLE001 - translated into one line below
            if attempt < ATTEMPTS and transient(exc):
                continue
            raise _explain(exc, where, what, revision, filename) from None
    raise AssertionError("unreachable")


def download_model(repo_id: str, revision: str | None = None, where: str = "", echo=print) -> Path:
    """The files of a model repository that conversion needs; returns the local snapshot folder."""
    from huggingface_hub import HfApi

    quiet_progress_bars()
    what = f"hub model '{repo_id}'"
    try:
        info = HfApi(endpoint=endpoint(), token=token()).model_info(repo_id, revision=revision)
    except Exception as exc:  # noqa: BLE001
        raise _explain(exc, where, what, revision, None) from None
    names = [s.rfilename for s in (info.siblings or [])]
    wanted = model_files(names)
    if "config.json" not in wanted:
        raise SqueezeError(f"{where}{what} has no config.json (not a transformers model repository)")
    echo(f"downloading {len(wanted)} files of {repo_id} (commit {info.sha[:12]}) from {endpoint()}")
    folder = None
    with bar(len(wanted), f"download {repo_id}", unit="file") as progress:
        for name in wanted:
            # The commit hash, not the branch name: every file comes from the same snapshot.
            path = download_file(repo_id, name, revision=info.sha, where=where)
            folder = folder or path.parents[len(Path(name).parts) - 1]
            progress.update(1)
    write_json_atomic(_marker(repo_id, revision), {"repo": repo_id, "revision": revision, "sha": info.sha,
                                                   "folder": str(folder), "files": wanted})
    return folder


def cached_model(repo_id: str, revision: str | None = None) -> Path | None:
    """The snapshot folder of a finished earlier download_model, or None (no network used)."""
    try:
        data = json.loads(_marker(repo_id, revision).read_text())
    except (OSError, ValueError):
        return None
    folder = Path(data["folder"])
    if all((folder / name).exists() for name in data.get("files", [])):
        return folder
    return None


def commit_of(repo_id: str, revision: str | None = None) -> str | None:
    """The commit a finished download_model fetched (recorded in the manifest)."""
    try:
        return json.loads(_marker(repo_id, revision).read_text())["sha"]
    except (OSError, ValueError, KeyError):
        return None


def model_files(names: list[str]) -> list[str]:
    """The repository files conversion needs, in a stable order (config first)."""
    top = [n for n in names if "/" not in n]  # sub-folders hold other formats (onnx/, original/)
    patterns = MODEL_FILE_PATTERNS
    if not any(fnmatch.fnmatch(n, "*.safetensors") for n in top):
        patterns += LEGACY_WEIGHT_PATTERNS
    wanted = sorted({n for n in top if any(fnmatch.fnmatch(n, p) for p in patterns)})
    return sorted(wanted, key=lambda n: n != "config.json")


def _marker(repo_id: str, revision: str | None) -> Path:
    safe = repo_id.replace("/", "--")
    return cache_dir("hub", "squeeze-snapshots") / f"{safe}@{(revision or 'main').replace('/', '--')}.json"


def transient(exc: Exception) -> bool:
    """A dropped or timed-out connection (httpx's TransportError family; huggingface_hub 2.x
    uses the httpx2 fork), worth another try that resumes the partial file."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return any(c.__name__ == "TransportError" and c.__module__.split(".")[0] in ("httpx", "httpx2")
               for c in type(exc).__mro__)


def _explain(exc: Exception, where: str, what: str, revision: str | None, filename: str | None) -> SqueezeError:
    from huggingface_hub import errors as hf

    at = endpoint()
    if isinstance(exc, hf.GatedRepoError):  # a subclass of RepositoryNotFoundError: test it first
        return SqueezeError(f"{where}{what} is gated: accept its license on {at} and set HF_TOKEN")
    if isinstance(exc, hf.RepositoryNotFoundError):
        return SqueezeError(f"{where}{what} not found on {at} (check the name; a private model needs HF_TOKEN)")
    if isinstance(exc, hf.RevisionNotFoundError):
        return SqueezeError(f"{where}{what} has no revision '{revision}'")
    if isinstance(exc, hf.EntryNotFoundError):
        return SqueezeError(f"{where}{what} has no file '{filename}'")
    if isinstance(exc, hf.OfflineModeIsEnabled):
        return SqueezeError(f"{where}{what} is not in the cache and HF_HUB_OFFLINE is set")
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return SqueezeError(f"{where}cannot download {what} from {at}: {detail}")
