"""Uploads to the Hugging Face hub: create or update a model repository with a set of local files.

Only what changed is sent. The repository's file list (each file's git blob id and, for LFS files,
its sha256) is read first and compared with the local files (sizes first, hashes only when the
sizes agree), so publishing an unchanged run sends no file at all and makes no commit.

huggingface_hub does the transfers of the rest: it asks the hub which files go to LFS (preupload),
asks the LFS batch endpoint where to put each object, sends big objects in parts and retries a part
whose connection dropped (the parts before it stay sent), and then commits all files in one commit,
so the repository never shows half a publish. The LFS batch answer leaves out objects the hub holds
already, so after a publish that failed for good (the network gone for minutes), the next one skips
every file that was sent completely. With hf_xet installed huggingface_hub sends through the hub's
Xet storage instead, which likewise skips the chunks the hub already has.

The endpoint ($HF_ENDPOINT) and token ($HF_TOKEN) are the ones downloads use (pipeline.sources.hub).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.errors import SqueezeError
from pipeline.fsutil import sha256_file
from pipeline.sources.hub import endpoint, quiet_progress_bars, token, transient
from pipeline.units import MiB

# The hub's rule for owner and repository names: letters, digits, '-', '_', '.', not starting
# with '-' or '.', no '--' or '..', at most 96 characters each.
REPO_ID = re.compile(r"(?!.*(--|\.\.))[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")

# Whole-publish retries on top of huggingface_hub's own per-request retries; each starts by
# listing the repository again, so what was committed or stored already is not sent twice.
ATTEMPTS = 3


@dataclass(frozen=True)
class LocalFile:
    path_in_repo: str
    path: Path
    sha256: str | None = None  # when the caller knows it already (a hash cache); hashed here otherwise


@dataclass
class Published:
    repo_id: str
    url: str
    commit: str | None  # None when nothing changed and no commit was made
    sent: list[str] = field(default_factory=list)  # paths in the repository, new or changed
    unchanged: list[str] = field(default_factory=list)
    others: list[str] = field(default_factory=list)  # on the hub but not among the files given (left alone)


def check_repo_id(repo_id: str) -> None:
    if not REPO_ID.fullmatch(repo_id or ""):
        raise SqueezeError(f"--repo: '{repo_id}' is not a hub repository id (expected owner/name: letters, "
                           "digits, '-', '_', '.')")


def publish_files(repo_id: str, files: list[LocalFile], *, private: bool, message: str, description: str = "",
                  echo: Callable[[str], None] = print) -> Published:
    """Create the model repository `repo_id` if needed (private when asked) and commit to it the
    files that are new or differ from what it holds."""
    check_repo_id(repo_id)
    quiet_progress_bars()
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return _publish(repo_id, files, private, message, description, echo)
        except SqueezeError:
            raise
        except Exception as exc:  # noqa: BLE001 - translated into one line below
            if attempt < ATTEMPTS and _transient_cause(exc):
                echo(f"publish: the connection to {endpoint()} dropped ({_first_line(exc)}); trying again")
                continue
            raise _explain(exc, repo_id) from None
    raise AssertionError("unreachable")


def _publish(repo_id, files, private, message, description, echo) -> Published:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=endpoint(), token=token())
    url = str(api.create_repo(repo_id, private=True if private else None, exist_ok=True))
    info = api.model_info(repo_id)
    if private and not info.private:
        raise SqueezeError(f"{repo_id} on {endpoint()} is public; --private only applies to a new repository "
                           "(make it private in its settings, or leave out --private)")
    # the listing and the commit refer to one revision: a push in between fails the commit
    remote = {f.path: f for f in api.list_repo_tree(repo_id, recursive=True, revision=info.sha)
              if isinstance(f, RepoFile)}
    changed, unchanged = [], []
    for f in files:
        (unchanged if _same(f, remote.get(f.path_in_repo)) else changed).append(f)
    ours = {f.path_in_repo for f in files}
    result = Published(repo_id, url, None, [f.path_in_repo for f in changed], [f.path_in_repo for f in unchanged],
                       sorted(p for p in remote if p not in ours and p != ".gitattributes"))
    if not changed:
        echo(f"{repo_id}: all {len(files)} files are up to date on {endpoint()}; nothing sent")
        return result
    total = sum(f.path.stat().st_size for f in changed)
    echo(f"{repo_id}: sending {len(changed)} of {len(files)} files ({total / MiB:.1f} MiB) to {endpoint()}")
    operations = []
    for f in changed:
        op = CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=str(f.path))
        if f.sha256:
            op.upload_info.sha256 = bytes.fromhex(f.sha256)  # saves huggingface_hub hashing it again
        operations.append(op)
    commit = api.create_commit(repo_id, operations, commit_message=message, commit_description=description,
                               parent_commit=info.sha)
    result.commit = commit.oid
    return result


def _same(local: LocalFile, remote) -> bool:
    """Whether the hub's file holds the local file's bytes (LFS files by sha256, others by git blob id)."""
    if remote is None or remote.size != local.path.stat().st_size:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == (local.sha256 or sha256_file(local.path))
    return remote.blob_id == git_blob_id(local.path)


def git_blob_id(path: Path) -> str:
    """The id git gives a file's content: sha1 of 'blob <size>\\0' and the bytes."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _causes(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _transient_cause(exc: Exception) -> bool:
    """huggingface_hub wraps a failed LFS transfer in a RuntimeError; look at what it wraps."""
    return any(isinstance(e, Exception) and transient(e) for e in _causes(exc))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _explain(exc: Exception, repo_id: str) -> SqueezeError:
    from huggingface_hub import errors as hf

    at = endpoint()
    for e in _causes(exc):
        response = getattr(e, "response", None)
        status = getattr(response, "status_code", None)
        if status in (401, 403) or isinstance(e, hf.RepositoryNotFoundError):
            return SqueezeError(f"cannot publish to {repo_id} on {at}: not allowed (HTTP {status}); set HF_TOKEN "
                                f"to a token with write access to {repo_id.split('/')[0]}")
        if status == 412:
            return SqueezeError(f"cannot publish to {repo_id}: it changed on {at} while publishing; run again")
        if isinstance(e, hf.HfHubHTTPError):
            server = getattr(e, "server_message", None) or _first_line(e)
            return SqueezeError(f"cannot publish to {repo_id} on {at}: {server.strip().splitlines()[0]}")
    return SqueezeError(f"cannot publish to {repo_id} on {at}: {_first_line(exc)}")
