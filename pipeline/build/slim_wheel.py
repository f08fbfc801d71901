"""Rewrite a llama-cpp-python wheel with one copy of each shared library it actually loads.

Why: a wheel cannot hold symbolic links, so every library CMake installs as a chain of links
(libggml-cuda.so -> .so.0 -> .so.0.25.3) is stored as three full copies, and the CMake install also
puts a second set beside the package (lib/, include/) that the Python package never loads. For
the CPU build that is 23 MiB where 6 would do; for a CUDA build, whose libggml-cuda is 81 MB
unpacked, 142 MiB, too large to carry to a GPU machine with the device tool (64 MiB).

What stays: under llama_cpp/lib/ the names the Python package opens (lib<name>.so for each name it
passes to load_shared_library: llama, ggml, mtmd, llava) and every library those need by soname
(DT_NEEDED, followed transitively through the same folder, as the dynamic loader does with their
RUNPATH $ORIGIN); every file outside lib folders (the Python code, the dist-info). RECORD is
written anew for what stays.

Usage: python -m pipeline.build.slim_wheel WHEEL [OUT]   (OUT defaults to WHEEL, replaced atomically)
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE_LIB = "llama_cpp/lib/"
LOADED_NAMES = ("llama", "ggml", "mtmd", "llava")  # what llama_cpp's modules pass to load_shared_library
_DT_NEEDED = 1
_SHT_DYNAMIC = 6


def needed_libraries(elf: bytes) -> list[str]:
    """The DT_NEEDED sonames of a 64-bit little-endian ELF shared object (what every Linux x86-64
    and aarch64 build is), read from its .dynamic section and the string table it links to."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    out = []
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != _SHT_DYNAMIC:
            continue
        strtab_offset = sections[link][4]
        for pos in range(offset, offset + size, entsize or 16):
            tag, value = struct.unpack_from("<qQ", elf, pos)
            if tag == 0:
                break
            if tag == _DT_NEEDED:
                start = strtab_offset + value
                out.append(elf[start:elf.index(b"\0", start)].decode())
    return out


def kept_names(wheel: zipfile.ZipFile) -> set[str]:
    """Archive names to keep: everything outside lib folders, and the libraries the package loads."""
    names = wheel.namelist()
    libs = {n[len(PACKAGE_LIB):]: n for n in names if n.startswith(PACKAGE_LIB) and "/" not in n[len(PACKAGE_LIB):]}
    todo = [f"lib{name}.so" for name in LOADED_NAMES if f"lib{name}.so" in libs]
    keep = set()
    while todo:
        lib = todo.pop()
        if lib in keep:
            continue
        keep.add(lib)
        todo += [n for n in needed_libraries(wheel.read(libs[lib])) if n in libs]
    top_level_libs = ("lib/", "lib64/", "include/", "bin/")
    return ({n for n in names if not n.startswith(PACKAGE_LIB) and not n.startswith(top_level_libs)
             and not n.endswith(".dist-info/RECORD")} | {libs[k] for k in keep})


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def slim(wheel_path: Path, out: Path | None = None) -> tuple[int, int]:
    """Write the slim wheel to `out` (default: over `wheel_path`); returns (bytes before, after)."""
    out = Path(out or wheel_path)
    before = wheel_path.stat().st_size
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(wheel_path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            keep = kept_names(src)
            record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
            lines = []
            for info in src.infolist():
                if info.filename in keep:
                    data = src.read(info)
                    dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
                    lines.append(_record_line(info.filename, data))
            dst.writestr(record_name, "\n".join(lines + [f"{record_name},,"]) + "\n")
        os.chmod(tmp, wheel_path.stat().st_mode & 0o777)  # mkstemp makes it private
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return before, out.stat().st_size


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__.strip().splitlines()[-1])
    wheel = Path(sys.argv[1])
    b, a = slim(wheel, Path(sys.argv[2]) if len(sys.argv) == 3 else None)
    print(f"{wheel.name}: {b / 2**20:.1f} MiB -> {a / 2**20:.1f} MiB (one copy of each library it loads)")
