"""The run manifest: for every finished step, the recipe values, engine versions and input/output
hashes it was made from. A step is redone only when one of those differs, and the reason is said.

Big files are hashed once and the hash cached by (path, size, mtime), as DVC does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.fsutil import sha256_file, write_json_atomic

MANIFEST_SCHEMA = 1


class HashCache:
    def __init__(self, path: Path):
        self.path = path
        try:
            self._data = json.loads(path.read_text())
        except (OSError, ValueError):
            self._data = {}
        self._dirty = False

    def digest(self, file: Path) -> dict:
        st = file.stat()
        key = str(file.resolve())
        hit = self._data.get(key)
        if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns:
            return {"size": st.st_size, "sha256": hit["sha256"]}
        digest = sha256_file(file)
        self._data[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self._dirty = True
        return {"size": st.st_size, "sha256": digest}

    def save(self) -> None:
        if self._dirty:
            write_json_atomic(self.path, self._data)
            self._dirty = False


@dataclass
class StepRecord:
    stage: str
    params: dict
    versions: dict
    inputs: dict  # path -> {size, sha256}
    outputs: dict  # path -> {size, sha256}
    seconds: float = 0.0
    finished: str = ""
    extra: dict = field(default_factory=dict)


class Manifest:
    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / "manifest.json"
        self.hashes = HashCache(folder / ".hashes.json")
        self.steps: dict[str, StepRecord] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except ValueError:
                data = {}
            if data.get("schema") == MANIFEST_SCHEMA:
                self.steps = {k: StepRecord(**v) for k, v in data.get("steps", {}).items()}

    def rel(self, path: Path) -> str:
        """Paths inside the results folder are stored relative to it, so the folder can move."""
        path = Path(path)
        try:
            return str(path.resolve().relative_to(self.folder.resolve()))
        except ValueError:
            return str(path.resolve())

    def abs(self, key: str) -> Path:
        p = Path(key)
        return p if p.is_absolute() else self.folder / p

    def save(self) -> None:
        self.hashes.save()
        data = {"schema": MANIFEST_SCHEMA,
                "steps": {k: vars(v) for k, v in sorted(self.steps.items())}}
        write_json_atomic(self.path, data)

    def digest(self, path: Path) -> dict:
        return self.hashes.digest(path)

    def forget(self, key: str) -> None:
        self.steps.pop(key, None)


def params_diff(old: dict, new: dict) -> list[str]:
    """Names of the recipe values that differ (for 'rerun, select.prune changed')."""
    keys = sorted(set(old) | set(new))
    return [k for k in keys if _canon(old.get(k)) != _canon(new.get(k))]


def _canon(value):
    return json.dumps(value, sort_keys=True, default=str)


def same_file(record: dict, path: Path, manifest: Manifest) -> bool:
    if not path.exists():
        return False
    st = path.stat()
    if st.st_size != record.get("size"):
        return False
    return manifest.digest(path)["sha256"] == record.get("sha256")
