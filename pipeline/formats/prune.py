"""Dropping whole layers from the unquantized base GGUF with gguf-py, before quantizing.

llama.cpp's own pruning (`llama-quantize --prune-layers`, the `prune_layers` struct) renames the
tensors and sets the block count, but leaves every other per-layer fact to be re-derived from
the new layer index. For models with interleaved sliding-window attention (Gemma 2/3, Cohere 2,
...) that silently turns global layers into local ones and back, and with them their RoPE base
(llama.cpp picks the SWA RoPE base by `hparams.is_swa(il)`). squeeze writes a pruned base
instead, in which:

- the surviving `blk.N.*` tensors are renumbered 0..n-1 and their bytes copied unchanged;
- `<arch>.block_count` is the new count and every per-layer metadata array is shortened;
- `<arch>.attention.sliding_window_pattern` is written as a bool array (true = sliding window)
  holding each survivor's *original* kind, which llama.cpp reads before its index rule;
- `squeeze.pruned_layers` records the original numbers of the dropped layers;
- the importance matrix is renamed to the new numbering (entries of dropped layers removed).

The quantize stage then quantizes the pruned base like any other (pipeline.stages.prune decides
which sets to write).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf

from pipeline.errors import SqueezeError
from pipeline.formats.gguf_index import encode_kv, read_index, read_metadata, write_gguf
from pipeline.formats.imatrix_file import Imatrix, ImatrixEntry
from pipeline.formats.tensor_names import layer_map, renumber
from pipeline.progress import bar

# Arrays under `<arch>.` that can have n_layer entries by coincidence but are not per layer.
_NOT_PER_LAYER = {"rope.dimension_sections"}


def check_prune_set(drop, n_layers: int, where: str = "", where_item=None) -> tuple[int, ...]:
    """The sorted layer set, or one line saying what is wrong with it. `where_item(i)` locates
    the i-th listed layer (a recipe's line), else `where` is used for every message."""
    listed = [int(x) for x in drop]
    for i, layer in enumerate(listed):
        if not 0 <= layer < n_layers:
            at = where_item(i) if where_item else where
            raise SqueezeError(f"{at}layer {layer} is out of range: the model has {n_layers} layers "
                               f"(0-{n_layers - 1})")
    drop = tuple(sorted(set(listed)))
    if len(drop) >= n_layers:
        raise SqueezeError(f"{where}prunes all {n_layers} layers; at least one must stay")
    return drop


_I32, _BOOL, _ARRAY = (int(gguf.GGUFValueType.INT32), int(gguf.GGUFValueType.BOOL),
                      int(gguf.GGUFValueType.ARRAY))


@dataclass(frozen=True)
class PruneResult:
    dropped: tuple[int, ...]  # original numbers
    kept: tuple[int, ...]  # original numbers of the survivors, in their new order
    swa_before: list[bool] | None  # sliding-window kind per original layer (None: no interleaving)
    swa_after: list[bool] | None  # as written for the survivors (None: not written)


def prune_gguf(src: Path, dst: Path, drop, *, swa_layers: list[bool] | None,
               keep_swa_pattern: bool = True) -> PruneResult:
    """Write `src` without the layers in `drop` (original numbers) to `dst`.

    Metadata entries are copied as raw bytes except the ones that change, and tensor data byte
    for byte (no type changes), so pruning costs one file copy.
    `swa_layers`: per original layer, whether llama.cpp runs it with sliding-window attention
    (pipeline.engine.layer_kinds.sliding_window_layers; None when no layer does). The survivors'
    kinds are written as an explicit pattern: without one llama.cpp would derive them from the
    new layer numbers, turning a global layer local. `keep_swa_pattern=False` reproduces that
    behaviour; it exists for the benchmark that measures what the fix is worth.
    Returns what was done: layers kept, the old and new sliding-window patterns."""
    src, dst = Path(src), Path(dst)
    kvs, alignment = read_metadata(src)
    meta = {kv.key: kv.value for kv in kvs}
    arch = meta.get(gguf.Keys.General.ARCHITECTURE)
    count_key = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    if not isinstance(arch, str) or not isinstance(meta.get(count_key), int):
        raise SqueezeError(f"{src}: no general.architecture / block_count: not a model GGUF")
    n_layers = meta[count_key]
    drop = check_prune_set(drop, n_layers, f"{src.name}: prune: ")
    kept = sorted(layer_map(n_layers, drop))
    pattern = list(swa_layers) if swa_layers is not None and any(swa_layers) else None
    if pattern is not None and len(pattern) != n_layers:
        raise SqueezeError(f"{src}: {len(pattern)} sliding-window layer kinds given for a model of {n_layers} layers")
    pattern_key = gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch)

    entries = []
    for kv in kvs:
        if kv.key == count_key:
            entries.append(encode_kv(kv.key, len(kept), kv.vtype))
        elif kv.key == pattern_key and pattern is not None:
            continue  # rewritten below from the survivors' kinds
        elif (kv.vtype == _ARRAY and kv.value[1] is not None and len(kv.value[1]) == n_layers
              and kv.key.startswith(arch + ".") and kv.key[len(arch) + 1:] not in _NOT_PER_LAYER):
            entries.append(encode_kv(kv.key, [kv.value[1][i] for i in kept], _ARRAY, kv.value[0]))  # per layer
        elif kv.key != "squeeze.pruned_layers":
            entries.append(kv.raw)
    if pattern is not None and keep_swa_pattern:
        entries.append(encode_kv(pattern_key, [pattern[i] for i in kept], _ARRAY, _BOOL))
    entries.append(encode_kv("squeeze.pruned_layers", list(drop), _ARRAY, _I32))

    tensors = []
    for name, entry in read_index(src).items():
        new = renumber(name, drop)
        if new is not None:
            tensors.append((new, entry))
    with bar(total=len(tensors), desc=f"prune {list(drop)}", unit="tensor") as progress:
        write_gguf(dst, src, entries, tensors, alignment, progress=lambda i: progress.update(1))
    return PruneResult(tuple(drop), tuple(kept), pattern,
                       [pattern[i] for i in kept] if pattern and keep_swa_pattern else None)


def remap_imatrix(im: Imatrix, n_layers: int, drop) -> Imatrix:
    """The importance matrix of the pruned model: dropped layers' entries removed, the others
    renamed to their new layer numbers (so llama_model_quantize finds them)."""
    drop = check_prune_set(drop, n_layers, "imatrix: prune: ")
    out = Imatrix(datasets=list(im.datasets), chunk_count=im.chunk_count, chunk_size=im.chunk_size,
                  legacy=im.legacy)
    for name, entry in im.entries.items():
        new = renumber(name, drop)
        if new is not None:
            out.entries[new] = ImatrixEntry(entry.sums, entry.counts)
    return out
