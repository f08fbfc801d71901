"""The calibration pass's input second moments (H = sum x x^T per distinct input of a dense block
matrix), as one .npz beside the imatrix: `H:<key>` float32 (n_in, n_in), and `of:<weight>` the key
of the input each weight reads (attn_q/k/v share one, ffn_gate/up one)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from pipeline.errors import SqueezeError


class Moments:
    """The file's moments, each H read when first asked for and the last `keep` kept: a large
    model's do not fit in memory together (Gemma 3 12B's ffn_down input alone is 0.94 GB), and
    GPTQ reads them tensor by tensor in the file's order."""

    def __init__(self, path: Path, of: dict[str, str], keys: set[str], keep: int = 2):
        self.path, self.of, self.keys, self.keep = Path(path), of, keys, keep
        self._recent: dict[str, np.ndarray] = {}

    def of_weight(self, name: str) -> np.ndarray | None:
        key = self.of.get(name)
        return None if key is None else self.h(key)

    def h(self, key: str) -> np.ndarray:
        if key in self._recent:
            self._recent[key] = self._recent.pop(key)  # most recent last
            return self._recent[key]
        try:
            with np.load(self.path, allow_pickle=False) as z:
                value = z[f"H:{key}"]
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
            raise SqueezeError(f"{self.path}: H for {key} unreadable ({exc}); rerun the imatrix step") from None
        self._recent[key] = value
        while len(self._recent) > self.keep:
            self._recent.pop(next(iter(self._recent)))
        return value


class MomentsWriter:
    """Writes a moments file a few matrices at a time (an .npz, as np.savez lays it out): a
    model's moments need not be in memory together."""

    def __init__(self, path: Path):
        self._zip = zipfile.ZipFile(path, "w", allowZip64=True)
        self._of: dict[str, str] = {}

    def add(self, h: dict[str, np.ndarray], of: dict[str, str]) -> None:
        for key, value in h.items():
            with self._zip.open(f"H:{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(value, dtype=np.float32))
        self._of.update(of)

    def close(self) -> None:
        for name, key in self._of.items():
            with self._zip.open(f"of:{name}.npy", "w") as f:
                np.lib.format.write_array(f, np.array(key))
        self._zip.close()

    def __enter__(self) -> MomentsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_moments(path: Path, h: dict[str, np.ndarray], of: dict[str, str]) -> None:
    with MomentsWriter(path) as w:
        w.add(h, of)


def read_moments(path: Path) -> Moments:
    """The file's index (which input each weight reads); the matrices are read as asked for."""
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = {k[2:] for k in z.files if k.startswith("H:")}
            of = {k[3:]: str(z[k]) for k in z.files if k.startswith("of:")}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise SqueezeError(f"{path}: not a second-moments file ({exc}); rerun the imatrix step") from None
    missing = sorted(set(of.values()) - keys)
    if missing:
        raise SqueezeError(f"{path}: no H for {missing[0]}, which {len(missing)} weight inputs name")
    return Moments(path, of, keys)
