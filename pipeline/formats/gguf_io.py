"""Checking a GGUF file before it is read: one line naming the file and what is wrong with it
(truncated, a header that does not parse, tensor data outside the file), and gguf-py's reader
behind that check for the files squeeze reads with it (imatrix files)."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf

from pipeline.errors import DamagedFile, SqueezeError
from pipeline.formats.gguf_index import read_index


def gguf_problem(path: Path, kind: str = "GGUF") -> str | None:
    """What is wrong with a GGUF file in a few words, or None when its header reads and every
    tensor's data lies inside the file -- the check llama.cpp's model loader makes ("tensor data is
    not within the file bounds"), which gguf-py answers with a reshape error or an IndexError."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return f"empty {kind} file (0 bytes)"
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        article = "an" if kind[0] in "aeiouAEIOU" else "a"
        return f"truncated {kind} file ({size} bytes)" if b"GGUF".startswith(magic) else \
            f"not {article} {kind} file (it starts with {magic!r}, not b'GGUF')"
    if size >= 8:
        with open(path, "rb") as f:
            f.seek(4)
            (version,) = struct.unpack("<I", f.read(4))
        if version not in (2, 3):
            return f"damaged {kind} file (GGUF version {version}; llama.cpp reads versions 2 and 3)"
    try:
        index = read_index(path)
        end = max((e.offset + e.n_bytes for e in index.values()), default=0)
    except SqueezeError as exc:  # an unsupported version, an unknown value type
        return f"damaged {kind} file ({str(exc).removeprefix(f'{path}: ')})"
    except (struct.error, ValueError, KeyError, OverflowError):  # the header ends before it says it does
        return f"truncated or damaged {kind} file (its header does not fit in its {size} bytes)"
    if size < end:
        return f"truncated {kind} file ({size} bytes; its tensors need {end})"
    return None


def check_gguf(path: Path, kind: str = "GGUF", remedy: str = "delete it and rerun") -> None:
    """Nothing when `path` is a whole GGUF file, else one line naming it and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise SqueezeError(f"{path}: {kind} file not found")
    problem = gguf_problem(path, kind)
    if problem is not None:
        raise DamagedFile(path, problem, remedy)


def open_gguf(path: Path, kind: str = "GGUF", remedy: str = "delete it and rerun") -> gguf.GGUFReader:
    """gguf-py's reader, or one line naming the file and what is wrong with it."""
    path = Path(path)
    check_gguf(path, kind, remedy)
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # noqa: BLE001 - gguf-py raises ValueError, IndexError, KeyError ... on bad bytes
        detail = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DamagedFile(path, f"damaged {kind} file (gguf-py: {detail})", remedy) from None
