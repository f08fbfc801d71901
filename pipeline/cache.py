"""Cached files that know what they were made from.

A file squeeze derives and keeps for reuse (the dequantized test model, a benchmark's imatrix or
base distribution, a dataset extracted from a download) gets a record beside it,
`<name>.made-from.json`: the sha256 of every source it was made from, the versions of the code
that made it, the parameters, and the size and mtime the file had when it was finished. It is
reused only while all of that still holds; a changed source, version or parameter, a missing
record, or a file changed after the fact rebuilds it, and the caller is told why.

Source hashes are the expensive part (a model is hundreds of MB), so a source whose path, size
and mtime are those recorded keeps its recorded hash, as DVC and the run manifest do.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

from pipeline.fsutil import sha256_file, write_json_atomic

RECORD_SUFFIX = ".made-from.json"
RECORD_FORMAT = 1  # of the record itself; a record in another format is not trusted

Source = Union[Path, str]  # a file (hashed) or an identity that is already a hash or revision


@dataclass(frozen=True)
class MadeFrom:
    """What a cached file is keyed by."""

    sources: Mapping[str, Source]
    versions: Mapping[str, str]
    params: Mapping[str, object] = field(default_factory=dict)


def package_versions(*names: str) -> dict[str, str]:
    """Installed versions of Python distributions (read from their metadata, nothing imported)."""
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def record_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + RECORD_SUFFIX)


_hashes: dict[tuple, str] = {}  # (path, size, mtime_ns, inode) -> sha256, for this process


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino


def _source_entry(value: Source, recorded: dict | None) -> dict:
    if not isinstance(value, Path):
        return {"id": str(value)}
    key = _stat_key(value)
    entry = {"path": key[0], "size": key[1], "mtime_ns": key[2]}
    if recorded and all(recorded.get(k) == entry[k] for k in entry) and recorded.get("sha256"):
        digest = recorded["sha256"]
    else:
        digest = _hashes.get(key) or sha256_file(value)
    _hashes[key] = digest
    return {**entry, "sha256": digest}


def _same_source(a: dict, b: dict) -> bool:
    return a.get("sha256", a.get("id")) == b.get("sha256", b.get("id"))


def _plain(values: Mapping) -> dict:
    """As the record stores them (tuples become lists), so recorded and current compare equal."""
    return json.loads(json.dumps(dict(values), default=str))


def read_record(path: Path) -> dict | None:
    try:
        record = json.loads(record_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None


def _file_stamp(path: Path) -> dict:
    st = Path(path).stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _changes(old: Mapping, new: Mapping, what: str) -> str | None:
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            return f"{what} {k} changed ({old.get(k, 'none')} -> {new.get(k, 'none')})"
    return None


def stale_reason(path: Path, made_from: MadeFrom, check_sources: bool = True) -> str | None:
    """Why `path` may not be reused for `made_from`, or None when it may.
    `check_sources=False` compares only versions and parameters (for a source that cannot be
    reached now, such as a hub file while offline)."""
    path = Path(path)
    if not path.exists():
        return f"{path.name} is missing"
    record = read_record(path)
    if record is None:
        return f"{path.name} has no record of what it was made from"
    if record.get("file") != _file_stamp(path):
        return f"{path.name} changed after it was made"
    reason = (_changes(record.get("versions", {}), _plain(made_from.versions), "version of")
              or _changes(record.get("params", {}), _plain(made_from.params), "parameter"))
    if reason or not check_sources:
        return reason
    recorded = record.get("sources", {})
    if set(recorded) != set(made_from.sources):
        return f"sources changed ({', '.join(sorted(recorded))} -> {', '.join(sorted(made_from.sources))})"
    for name, value in made_from.sources.items():
        if not _same_source(recorded[name], _source_entry(value, recorded[name])):
            return f"source {name} changed"
    return None


def write_record(path: Path, made_from: MadeFrom) -> None:
    """Record, beside a finished file, what it was made from."""
    previous = (read_record(path) or {}).get("sources", {})
    write_json_atomic(record_path(path), {
        "format": RECORD_FORMAT,
        "file": _file_stamp(path),
        "sources": {n: _source_entry(v, previous.get(n)) for n, v in made_from.sources.items()},
        "versions": _plain(made_from.versions),
        "params": _plain(made_from.params),
    })


@contextlib.contextmanager
def _build_lock(path: Path):
    """One builder at a time per cached file, across processes (pytest workers, benchmarks)."""
    lock = path.with_name(f".{path.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached(outputs: Path | Sequence[Path], made_from: MadeFrom, build: Callable[[], None],
           on_rebuild: Callable[[str], None] | None = None) -> str | None:
    """Make `outputs` with `build()` (which writes them, atomically) unless each one's record
    says it was made from `made_from`. Returns why they were rebuilt, or None when reused."""
    outputs = [Path(outputs)] if isinstance(outputs, (str, os.PathLike)) else [Path(p) for p in outputs]

    def reason() -> str | None:
        return next((r for r in (stale_reason(p, made_from) for p in outputs) if r), None)

    why = reason()
    if why is None:
        return None
    with _build_lock(outputs[0]):
        why = reason()  # another process may have rebuilt them while this one waited
        if why is None:
            return None
        if on_rebuild:
            on_rebuild(why)
        for p in outputs:  # a half-rebuilt set must never look finished
            record_path(p).unlink(missing_ok=True)
        build()
        for p in outputs:
            write_record(p, made_from)
    return why
