"""The calibration pass's input second moments (H = sum x x^T per distinct input of a dense block
matrix), as one .npz beside the imatrix: `H:<key>` float32 (n_in, n_in), and `of:<weight>` the key
of the input each weight reads (attn_q/k/v share one, ffn_gate/up one)."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import SqueezeError


@dataclass
class Moments:
    h: dict[str, np.ndarray]  # key -> H
    of: dict[str, str]  # weight name -> key

    def of_weight(self, name: str) -> np.ndarray | None:
        key = self.of.get(name)
        return None if key is None else self.h[key]


def write_moments(path: Path, h: dict[str, np.ndarray], of: dict[str, str]) -> None:
    arrays = {f"H:{k}": np.asarray(v, dtype=np.float32) for k, v in h.items()}
    arrays.update({f"of:{name}": np.array(key) for name, key in of.items()})
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def read_moments(path: Path) -> Moments:
    try:
        with np.load(path, allow_pickle=False) as z:
            h = {k[2:]: z[k] for k in z.files if k.startswith("H:")}
            of = {k[3:]: str(z[k]) for k in z.files if k.startswith("of:")}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise SqueezeError(f"{path}: not a second-moments file ({exc}); rerun the imatrix step") from None
    missing = sorted(set(of.values()) - set(h))
    if missing:
        raise SqueezeError(f"{path}: no H for {missing[0]}, which {len(missing)} weight inputs name")
    return Moments(h, of)
