"""llama.cpp's importance-matrix files: the GGUF format (`<tensor>.in_sum2`, `<tensor>.counts`,
`imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`) and the legacy `.dat` format,
read and written exactly as llama.cpp's common/imatrix-loader.cpp and tools/imatrix do."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from pipeline.errors import DamagedFile, SqueezeError
from pipeline.formats.gguf_io import open_gguf


@dataclass
class ImatrixEntry:
    sums: np.ndarray  # float32, (n_mat, ne0): sum of squared input activations per column
    counts: np.ndarray  # int64, (n_mat,): rows (tokens) accumulated per matrix (expert)


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    def normalized(self) -> dict[str, np.ndarray]:
        """Per-column mean of squared activations: what llama-quantize hands llama_model_quantize."""
        out = {}
        for name, e in self.entries.items():
            if self.legacy:
                ncall = int(e.counts[0]) if len(e.counts) else 0
                out[name] = (e.sums / ncall if ncall > 0 else e.sums).astype(np.float32).ravel()
            else:
                counts = e.counts.astype(np.float32)[:, None]
                vals = np.where(counts > 0, e.sums / np.where(counts > 0, counts, 1), 1.0)
                out[name] = vals.astype(np.float32).ravel()
        return out


def read_imatrix(path: Path, remedy: str = "make it again") -> Imatrix:
    """A GGUF or legacy .dat imatrix; a truncated or damaged file is one line naming it (DamagedFile,
    whose `remedy` the caller may know better: the runner says which stage to force)."""
    path = Path(path)
    if not path.is_file():
        raise SqueezeError(f"{path}: imatrix file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _read_gguf(path, remedy)
    return _read_legacy(path, remedy)


def _read_gguf(path: Path, remedy: str) -> Imatrix:
    reader = open_gguf(path, "imatrix", remedy)
    # gguf-py reads a file cut inside the last tensor's padding without complaint; llama.cpp's
    # imatrix loader reads the whole padded data section and does not
    align = 32
    f = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if f is not None:
        align = int(f.contents())
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    need = -(-end // align) * align
    size = path.stat().st_size
    if size < need:
        raise DamagedFile(path, f"truncated imatrix file ({size} bytes; its tensors need {need})", remedy)
    im = Imatrix()
    f = reader.get_field("imatrix.datasets")
    if f is not None:
        im.datasets = [str(x) for x in f.contents()]
    for key, attr in (("imatrix.chunk_count", "chunk_count"), ("imatrix.chunk_size", "chunk_size")):
        f = reader.get_field(key)
        if f is not None:
            setattr(im, attr, int(f.contents()))
    sums, counts = {}, {}
    for t in reader.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = t
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = t
    if not sums:
        raise DamagedFile(path, "not an imatrix file (no <tensor>.in_sum2 entries)", remedy)
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise DamagedFile(path, f"damaged imatrix file ({name} has {'sums' if name in sums else 'counts'} "
                                    f"but no {'counts' if name in sums else 'sums'})", remedy)
        s, c = sums[name], counts[name]
        n_mat = int(c.shape[1]) if len(c.shape) > 1 else 1
        if n_mat < 1 or s.data.size % n_mat or c.data.size != n_mat:
            raise DamagedFile(path, f"damaged imatrix file ({name}: {s.data.size} sums and {c.data.size} "
                                    f"counts for {n_mat} matrices)", remedy)
        im.entries[name] = ImatrixEntry(
            np.array(s.data, dtype=np.float32).reshape(n_mat, -1),
            np.rint(np.array(c.data, dtype=np.float32).ravel()).astype(np.int64))
    return im


def _read_legacy(path: Path, remedy: str) -> Imatrix:
    data = path.read_bytes()
    im = Imatrix(legacy=True)
    pos = 0

    def take(fmt):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise DamagedFile(path, f"truncated imatrix file (ends at byte {len(data)} inside entry "
                                    f"{len(im.entries) + 1})", remedy)
        vals = struct.unpack_from(fmt, data, pos)
        pos += size
        return vals

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > 1_000_000:
        raise DamagedFile(path, "not an imatrix file (neither GGUF nor llama.cpp's legacy .dat)", remedy)
    for _ in range(n_entries):
        (length,) = take("<i")
        if not 0 < length < 4096:
            raise DamagedFile(path, f"damaged imatrix file (entry name length {length})", remedy)
        name = take(f"<{length}s")[0].decode("utf-8", "replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise DamagedFile(path, f"damaged imatrix file ({name} has {nval} values)", remedy)
        sums = np.frombuffer(bytes(take(f"<{nval * 4}s")[0]), dtype=np.float32).copy()
        im.entries[name] = ImatrixEntry(sums.reshape(1, -1), np.array([ncall], dtype=np.int64))
    if pos + 4 <= len(data):
        (im.chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            if length > 0 and pos + length <= len(data):
                im.datasets.append(take(f"<{length}s")[0].decode("utf-8", "replace"))
    return im


def write_imatrix(path: Path, im: Imatrix) -> None:
    """GGUF imatrix, as tools/imatrix writes it (general.type=imatrix, F32 sums and counts)."""
    writer = gguf.GGUFWriter(str(path), arch="imatrix")
    # tools/imatrix writes no general.architecture; gguf-py always adds one, which llama.cpp ignores.
    writer.add_string("general.type", "imatrix")
    writer.add_array("imatrix.datasets", list(im.datasets))
    writer.add_uint32("imatrix.chunk_count", int(im.chunk_count))
    writer.add_uint32("imatrix.chunk_size", int(im.chunk_size))
    for name in sorted(im.entries):
        e = im.entries[name]
        writer.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(e.sums, dtype=np.float32))
        writer.add_tensor(f"{name}.counts", e.counts.astype(np.float32).reshape(-1, 1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def combine_imatrices(parts: list[Imatrix], chunk_size: int = 512) -> Imatrix:
    """Several imatrix files as one, as `llama-imatrix --in-file a --in-file b` adds them: GGUF
    sums and counts add up; a legacy file's normalized sums count as its ncall chunks of
    `chunk_size` tokens (the CLI's n_ctx, 512 unless told)."""
    out = Imatrix(chunk_size=chunk_size)
    for im in parts:
        for name, e in im.entries.items():
            # float32 arithmetic throughout, as the CLI's collector adds them
            if im.legacy:
                sums = e.sums.reshape(1, -1).astype(np.float32) * np.float32(chunk_size)
                counts = e.counts[:1].astype(np.int64) * chunk_size
            else:
                sums, counts = e.sums.astype(np.float32), e.counts.astype(np.int64)
            cur = out.entries.get(name)
            if cur is None:
                out.entries[name] = ImatrixEntry(np.zeros_like(sums) + sums, counts.copy())
                continue
            if cur.sums.size != sums.size:
                raise SqueezeError(f"{name}: {sums.size} values in one imatrix, {cur.sums.size} in another; "
                                   f"they were made for different models")
            if len(cur.counts) == 1 and len(counts) > 1:  # an older file with one count for all experts
                cur.counts = np.repeat(cur.counts, len(counts))
            elif im.legacy and len(counts) == 1:  # a legacy count applies to every expert
                counts = np.repeat(counts, len(cur.counts))
            elif len(counts) != len(cur.counts):
                raise SqueezeError(f"{name}: {len(counts)} counts in one imatrix, {len(cur.counts)} in another")
            cur.sums = (cur.sums.reshape(-1) + sums.reshape(-1)).reshape(len(cur.counts), -1)
            cur.counts = cur.counts + counts
        out.datasets.extend(im.datasets)
    for e in out.entries.values():
        e.sums = e.sums.reshape(len(e.counts), -1)
    out.chunk_count = max((int(e.counts.max()) for e in out.entries.values() if len(e.counts)), default=0) // chunk_size
    return out


def check_against_model(im: Imatrix, path: Path, info) -> None:
    """Fail in one line when the imatrix was made for another model: an entry names a tensor the
    model lacks, or its rows have another length (info: pipeline.formats.model_info.ModelInfo)."""
    shapes = {t.name: t.shape for t in info.tensors}
    for name, e in sorted(im.entries.items()):
        if name not in shapes:
            raise SqueezeError(f"{path}: imatrix entry {name} is not a tensor of the model ({info.arch}, "
                               f"{info.n_layers} layers); the imatrix was made for another model")
        shape = shapes[name]
        if shape is None:
            continue
        n_mat = int(np.prod(shape[2:])) if len(shape) > 2 else 1
        if e.sums.size != shape[0] * n_mat:
            raise SqueezeError(f"{path}: imatrix entry {name} has {e.sums.size} values, the model's tensor "
                               f"{'x'.join(map(str, shape))} needs {shape[0] * n_mat}; the imatrix was made "
                               f"for another model")
