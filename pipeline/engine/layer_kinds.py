"""Which layers llama.cpp runs with sliding-window attention, as llama.cpp itself decides.

A GGUF may say so in an explicit `<arch>.attention.sliding_window_pattern` array; most do not,
and llama.cpp then applies a pattern of its own per architecture (Gemma 3: five local layers,
then a global one), a fact neither the file nor gguf-py's tables hold. Rather than copy those
rules, the model is loaded and llama.cpp's own report of each layer is read: while loading it
logs `layer N assigned to device X, is_swa = B` for every layer."""

from __future__ import annotations

import functools
import re
from pathlib import Path

from pipeline.engine.backend import capture_log
from pipeline.engine.model import Model
from pipeline.errors import SqueezeError

_LAYER = re.compile(r"layer\s+(?P<il>\d+) assigned to device \S+, is_swa = (?P<swa>[01])")


def sliding_window_layers(path: Path) -> list[bool] | None:
    """Per layer, True when llama.cpp runs it with sliding-window attention; None when no layer
    does (nothing to preserve when layers are removed). The weights are memory-mapped, not read;
    the answer is kept per file (its path, size and modification time), so a prune search that
    writes many pruned files from one base loads the base once."""
    st = Path(path).stat()
    kinds = _sliding_window_layers(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    return list(kinds) if kinds is not None else None


@functools.lru_cache(maxsize=16)
def _sliding_window_layers(path: str, size: int, mtime_ns: int) -> tuple[bool, ...] | None:
    """sliding_window_layers of one version of a file (size and mtime_ns only key the cache)."""
    with capture_log() as lines:
        with Model(path) as model:
            n_layer = model.n_layer
        said = list(lines)
    kinds: dict[int, bool] = {}
    for line in said:
        m = _LAYER.search(line)
        if m and int(m["il"]) < n_layer:  # llama.cpp also reports the output as layer n_layer
            kinds[int(m["il"])] = m["swa"] == "1"
    if sorted(kinds) != list(range(n_layer)):
        raise SqueezeError(f"{path}: llama.cpp did not report every layer's attention kind while loading "
                           f"({len(kinds)} of {n_layer}); this llama.cpp build logs them differently")
    swa = tuple(kinds[il] for il in range(n_layer))
    return swa if any(swa) else None
