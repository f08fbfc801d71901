"""Files that are either complete or absent: temporary names, atomic renames, content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.errors import SqueezeError

PARTIAL_MARK = ".partial-"


def cache_dir(*parts: str) -> Path:
    """squeeze's cache ($SQUEEZE_CACHE, else ~/.cache/squeeze), created on demand."""
    root = Path(os.environ.get("SQUEEZE_CACHE") or Path.home() / ".cache" / "squeeze")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def partial_name(path: Path) -> Path:
    """A sibling name that no reader mistakes for the finished file (same filesystem, so rename is atomic)."""
    return path.with_name(f".{path.name}{PARTIAL_MARK}{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path; on success rename it to `path`, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def build_folder(target: Path, build) -> None:
    """`build(folder)` fills a hidden sibling of `target`, which then takes `target`'s place: a
    folder is never seen half-built, and a failed build leaves nothing behind."""
    target = Path(target)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(work)
        work.chmod(0o755)  # mkdtemp makes it private
        shutil.rmtree(target, ignore_errors=True)
        work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def remove_partials(folder: Path) -> list[Path]:
    """Delete what killed runs left behind (temporary names only; finished files are untouched)."""
    removed = []
    if folder.is_dir():
        for p in folder.rglob(f"*{PARTIAL_MARK}*"):
            with contextlib.suppress(OSError):
                p.unlink() if p.is_file() else None
                removed.append(p)
    return removed


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_text(path: Path) -> str:
    """A UTF-8 text file, or one line naming the file and the first bad byte."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SqueezeError(f"{path}: not UTF-8 text (byte {exc.start})") from None


# A large file is written only when the disk has room for it and this much more.
DISK_MARGIN_FRACTION = 0.02
DISK_MARGIN_BYTES = 16 << 20


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= (1 << 30) else f"{n / (1 << 20):.1f} MiB"


def ensure_free_space(what: str, folder: Path, needed: int) -> None:
    """Refuse, in one line, to start writing `needed` bytes into `folder` (its filesystem) when the
    disk has less free than that plus a margin: a full disk mid-write leaves nothing usable."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:  # the folder may not exist yet
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    want = int(needed * (1 + DISK_MARGIN_FRACTION)) + DISK_MARGIN_BYTES
    if free < want:
        raise SqueezeError(f"{what}: not enough disk space in {folder}: it writes about {_gib(needed)} "
                           f"(needs {_gib(want)} with margin), {_gib(free)} free")
