"""The run manifest: for every finished step, the recipe values, engine versions and input/output
hashes it was made from. A step is redone only when one of those differs, and the reason is said.

Big files are hashed once and the hash cached by (path, size, mtime), as DVC does.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from datetime import datetime
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
        if not isinstance(self._data, dict):  # a cache: whatever it held is hashed again
            self._data = {}
        self._dirty = False

    def digest(self, file: Path) -> dict:
        st = file.stat()
        key = str(file.resolve())
        hit = self._data.get(key)
        if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns \
                and isinstance(hit.get("sha256"), str):
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
    peak_rss_bytes: int = 0  # the step's own high-water mark of resident memory; 0: not measured
    extra: dict = field(default_factory=dict)


class Manifest:
    """`set_aside`: where an unreadable manifest.json was moved (it is kept, not deleted), with
    `notice` saying so; the steps it cannot vouch for are then redone.

    `read_only`: for commands that only look (`status`, `report`, `card`, `compare`): a damaged
    manifest is reported in `notice` and left in place, byte for byte, so looking never changes
    what the next `run` finds; only `run` sets it aside."""

    def __init__(self, folder: Path, read_only: bool = False):
        self.folder = folder
        self.read_only = read_only
        self.path = folder / "manifest.json"
        self.hashes = HashCache(folder / ".hashes.json")
        self.steps: dict[str, StepRecord] = {}
        self.set_aside: Path | None = None
        self.notice: str | None = None
        # step key -> one-line reason, for steps that failed under --keep-going until they succeed
        self.failures: dict[str, str] = {}
        if self.path.exists():
            self.steps, problem = _read_steps(self.path)
            if problem is not None and read_only:
                kept = f"; {len(self.steps)} readable step records used" if self.steps else ""
                self.notice = (f"{self.path}: {problem}; left in place (`squeeze run` sets it aside){kept}, "
                               f"and every step it cannot vouch for shows as stale or missing")
            elif problem is not None:
                self._set_aside(problem)
            else:
                self.failures = _read_failures(self.path)

    def _set_aside(self, problem: str) -> None:
        stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        os.replace(self.path, target)
        self.save()  # what could be read, so a later run (or `status`) starts from the same place
        self.set_aside = target
        kept = f"; {len(self.steps)} readable step records kept" if self.steps else ""
        self.notice = (f"{self.path}: {problem}; set aside as {target.name}{kept}, and every step it "
                       f"cannot vouch for runs again")

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
        if self.read_only:
            raise RuntimeError(f"{self.path}: opened read-only, not saved")  # a caller's bug, not bad input
        self.hashes.save()
        data = {"schema": MANIFEST_SCHEMA,
                "steps": {k: vars(v) for k, v in sorted(self.steps.items())}}
        if self.failures:
            data["failures"] = dict(sorted(self.failures.items()))
        write_json_atomic(self.path, data)

    def digest(self, path: Path) -> dict:
        return self.hashes.digest(path)

    def forget(self, key: str) -> None:
        self.steps.pop(key, None)


_RECORD_FIELDS = {f.name: f for f in dataclasses.fields(StepRecord)}
_REQUIRED = {name for name, f in _RECORD_FIELDS.items()
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


def _read_steps(path: Path) -> tuple[dict[str, StepRecord], str | None]:
    """The step records of a manifest file, and what is wrong with it (None when nothing is).
    Records that do not have the shape a finished step leaves are dropped, the others kept."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # also UnicodeDecodeError
        return {}, f"not valid JSON ({str(exc).splitlines()[0]})"
    if not isinstance(data, dict) or not isinstance(data.get("steps"), dict):
        return {}, "not a squeeze manifest (no mapping of steps)"
    if data.get("schema") != MANIFEST_SCHEMA:
        return {}, f"manifest schema {data.get('schema')!r}, this squeeze reads {MANIFEST_SCHEMA}"
    steps, bad = {}, []
    for key, value in data["steps"].items():
        if _well_formed(value):
            steps[key] = StepRecord(**value)
        else:
            bad.append(key)
    if bad:
        return steps, f"step record{'s' if len(bad) > 1 else ''} {', '.join(repr(k) for k in bad[:3])}" \
                      f"{' ...' if len(bad) > 3 else ''} damaged"
    return steps, None


def _read_failures(path: Path) -> dict[str, str]:
    """The `failures` section (step key -> reason); a damaged one is dropped: the steps rerun anyway."""
    failures = json.loads(path.read_bytes()).get("failures", {})
    if not isinstance(failures, dict):
        return {}
    return {k: v for k, v in failures.items() if isinstance(v, str)}


def _well_formed(value) -> bool:
    if not isinstance(value, dict) or not _REQUIRED <= set(value) or not set(value) <= set(_RECORD_FIELDS):
        return False
    if not isinstance(value["stage"], str) or not all(isinstance(value[k], dict) for k in ("params", "versions")):
        return False
    for files in (value["inputs"], value["outputs"]):
        if not isinstance(files, dict) or not all(
                isinstance(d, dict) and isinstance(d.get("size"), int) and isinstance(d.get("sha256"), str)
                for d in files.values()):
            return False
    return isinstance(value.get("extra", {}), dict)


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
