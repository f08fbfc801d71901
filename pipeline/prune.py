"""Stage prune: drop whole layers from the unquantized base with gguf-py, before quantizing.

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

The quantize stage then quantizes the pruned base like any other.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.errors import SqueezeError
from pipeline.gguf_index import encode_kv, read_index, read_metadata, write_gguf
from pipeline.imatrix_file import Imatrix, ImatrixEntry
from pipeline.progress import bar

_BLOCK = re.compile(r"^blk\.(\d+)\.")

# How llama.cpp derives the local/global layer pattern when the GGUF has no
# `sliding_window_pattern` array: (period n, dense_first), from each architecture's
# load_swa_pattern(ml, n, dense_first) call. dense_first=False: layer il is global when
# il % n == n - 1; dense_first=True: global when il % n == 0 (llama_hparams::set_swa_pattern).
SWA_DEFAULT_PATTERN = {
    "gemma2": (2, False),
    "gemma3": (6, False),
    "gemma3n": (5, False),
    "gemma-embedding": (6, False),
    "cohere2": (4, False),
    "exaone4": (4, False),
    "olmo2": (4, False),
    "gpt-oss": (2, False),
}

# Arrays under `<arch>.` that can have n_layer entries by coincidence but are not per layer.
_NOT_PER_LAYER = {"rope.dimension_sections"}


def check_prune_set(drop, n_layers: int, where: str = "") -> tuple[int, ...]:
    """The sorted layer set, or one line saying what is wrong with it."""
    drop = tuple(sorted(set(int(x) for x in drop)))
    for layer in drop:
        if not 0 <= layer < n_layers:
            raise SqueezeError(f"{where}layer {layer} is out of range: the model has {n_layers} layers "
                               f"(0-{n_layers - 1})")
    if len(drop) >= n_layers:
        raise SqueezeError(f"{where}prunes {len(drop)} of {n_layers} layers; at least one must stay")
    return drop


def layer_map(n_layers: int, drop) -> dict[int, int]:
    """Original layer number -> new number, for the layers that stay."""
    keep = [i for i in range(n_layers) if i not in set(drop)]
    return {old: new for new, old in enumerate(keep)}


def renamed(name: str, mapping: dict[int, int]) -> str | None:
    """A tensor (or imatrix entry) name under the new numbering; None when its layer is dropped."""
    m = _BLOCK.match(name)
    if not m:
        return name
    new = mapping.get(int(m.group(1)))
    return None if new is None else f"blk.{new}.{name[m.end():]}"


def swa_pattern(meta: dict, arch: str, n_layers: int) -> list[bool] | None:
    """Per original layer, True when llama.cpp runs it with sliding-window attention; None when
    the model has no interleaved sliding window (nothing to preserve). `meta`: key -> value as
    pipeline.gguf_index.read_metadata decodes it."""
    value = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(value, tuple):  # an explicit array: llama.cpp copies it over defaults of false
        values = [bool(v) for v in (value[1] or [])]
        return (values + [False] * n_layers)[:n_layers]
    window = meta.get(f"{arch}.attention.sliding_window")
    if not window or arch not in SWA_DEFAULT_PATTERN:
        return None
    period, dense_first = SWA_DEFAULT_PATTERN[arch]
    if isinstance(value, int):  # a scalar period replaces the architecture's default
        period = value
    if period == 0:
        return [True] * n_layers
    if dense_first:
        return [il % period != 0 for il in range(n_layers)]
    return [il % period < period - 1 for il in range(n_layers)]


_U32, _I32, _BOOL, _ARRAY = 4, 5, 7, 9


def prune_gguf(src: Path, dst: Path, drop, *, keep_swa_pattern: bool = True) -> dict:
    """Write `src` without the layers in `drop` (original numbers) to `dst`.

    Metadata entries are copied as raw bytes except the ones that change, and tensor data byte
    for byte (no type changes), so pruning costs one file copy.
    `keep_swa_pattern=False` reproduces llama.cpp's behaviour (the pattern is re-derived from the
    new indices); it exists for the benchmark that measures what the fix is worth.
    Returns what was done: layers kept, the old and new sliding-window patterns."""
    src, dst = Path(src), Path(dst)
    kvs, alignment = read_metadata(src)
    meta = {kv.key: kv.value for kv in kvs}
    arch = meta.get("general.architecture")
    count_key = f"{arch}.block_count"
    if not isinstance(arch, str) or not isinstance(meta.get(count_key), int):
        raise SqueezeError(f"{src}: no general.architecture / block_count: not a model GGUF")
    n_layers = meta[count_key]
    drop = check_prune_set(drop, n_layers, f"{src.name}: prune: ")
    mapping = layer_map(n_layers, drop)
    kept = sorted(mapping)
    pattern = swa_pattern(meta, arch, n_layers)
    pattern_key = f"{arch}.attention.sliding_window_pattern"

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
        new = renamed(name, mapping)
        if new is not None:
            tensors.append((new, entry))
    with bar(total=len(tensors), desc=f"prune {list(drop)}", unit="tensor") as progress:
        write_gguf(dst, src, entries, tensors, alignment, progress=lambda i: progress.update(1))
    return {"dropped": list(drop), "kept": kept, "n_layers": len(kept),
            "swa_before": pattern, "swa_after": [pattern[i] for i in kept] if pattern and keep_swa_pattern else None}


def remap_imatrix(im: Imatrix, n_layers: int, drop) -> Imatrix:
    """The importance matrix of the pruned model: dropped layers' entries removed, the others
    renamed to their new layer numbers (so llama_model_quantize finds them)."""
    mapping = layer_map(n_layers, check_prune_set(drop, n_layers, "imatrix: prune: "))
    out = Imatrix(datasets=list(im.datasets), chunk_count=im.chunk_count, chunk_size=im.chunk_size,
                  legacy=im.legacy)
    for name, entry in im.entries.items():
        new = renamed(name, mapping)
        if new is not None:
            out.entries[new] = ImatrixEntry(entry.sums, entry.counts)
    return out


def prune_tag(drop) -> str:
    """The file-name tag of a prune set: 'p13-15' (original numbers)."""
    return "p" + "-".join(str(x) for x in sorted(drop))


# ---- the stage --------------------------------------------------------------------------------
# Calibration chunks the automatic choice measures each candidate set on (few: the runs multiply).
AUTO_PROBE_CHUNKS = 4


def prune_sets(ctx) -> dict[str, tuple[int, ...] | int]:
    """tag -> explicit layer set, or tag -> K for `prune: {auto: K}`, over all variants."""
    recipe = ctx.recipe
    out: dict[str, tuple[int, ...] | int] = {}
    for v in recipe.variants:
        k = recipe.prune_auto_for(v)
        if k is not None:
            out[f"auto{k}"] = k
        elif recipe.prune_for(v):
            out[prune_tag(recipe.prune_for(v))] = recipe.prune_for(v)
    return out


def variant_prune_tag(ctx, v) -> str | None:
    k = ctx.recipe.prune_auto_for(v)
    if k is not None:
        return f"auto{k}"
    layers = ctx.recipe.prune_for(v)
    return prune_tag(layers) if layers else None


def variant_layers(ctx, v) -> tuple[int, ...]:
    """The original numbers of the layers a variant drops (for auto: read from the choice)."""
    import json

    k = ctx.recipe.prune_auto_for(v)
    if k is None:
        return ctx.recipe.prune_for(v)
    return tuple(json.loads(ctx.prune_choice_path(f"auto{k}").read_text())["layers"])


def _auto_where(ctx, v=None) -> str:
    w = ctx.recipe.where
    for v in ([v] if v else []) + list(ctx.recipe.variants):
        if v.prune_auto is not None:
            return w("variants", v.name, "prune", "auto")
    return w("select", "prune", "auto")


def steps(ctx) -> list:
    from pipeline.engine import engine_versions
    from pipeline.imatrix import imatrix_input
    from pipeline.runner import Step

    imatrix = imatrix_input(ctx)
    n_layers = ctx.model_info.n_layers
    out = []
    for tag, what in prune_sets(ctx).items():
        outputs = [ctx.pruned_base_path(tag)] + ([ctx.pruned_imatrix_path(tag)] if imatrix else [])
        inputs = [ctx.base_path] + ([imatrix] if imatrix else [])
        if isinstance(what, int):
            if what >= n_layers:
                raise SqueezeError(f"{_auto_where(ctx)}cannot prune {what} of the model's {n_layers} layers; "
                                   f"K must be at most {n_layers - 1}")
            outputs.append(ctx.prune_choice_path(tag))
            if ctx.layers_path in _planned_outputs(ctx) or ctx.layers_path.exists():
                inputs.append(ctx.layers_path)
            params = {"prune.auto": what, "prune.auto.chunks": AUTO_PROBE_CHUNKS, **_probe_params(ctx)}
            produces = f"pruned/{ctx.pruned_base_path(tag).name} ({what} layers picked by measured KLD)"
        else:
            check_prune_set(what, n_layers, f"{ctx.recipe.where('select', 'prune')}")
            params = {"prune.layers": list(what)}
            produces = f"pruned/{ctx.pruned_base_path(tag).name} (layers {list(what)} dropped, " \
                       f"sliding-window pattern kept)"
        out.append(Step(f"prune {tag}", "prune", params, inputs, outputs, _action(ctx, tag, what, imatrix),
                        versions=engine_versions(), produces=produces))
    return out


def _planned_outputs(ctx) -> set:
    cal = ctx.recipe.calibration
    return {ctx.layers_path} if cal is not None and not cal.imatrix else set()


def _probe_params(ctx) -> dict:
    cal = ctx.recipe.calibration
    if cal is not None:
        return {"calibration.datasets": list(cal.datasets), "calibration.ctx": cal.ctx}
    return {"score.dataset": ctx.recipe.score.dataset, "score.ctx": ctx.recipe.score.ctx}


def probe_for(ctx, chunks: int, cache: Path | None = None):
    """A KLD probe on the calibration text (the scoring text only when there is no calibration)."""
    from pipeline.datasets import read_text, resolve_dataset
    from pipeline.sensitivity import KLDProbe

    recipe = ctx.recipe
    cal = recipe.calibration
    here = Path(recipe.path).parent if recipe.path else None
    if cal is not None and cal.datasets:
        path = resolve_dataset(cal.datasets[0], here, recipe.where("calibration", "datasets", 0))
        n_ctx = cal.ctx
    else:
        path = resolve_dataset(recipe.score.dataset, here, recipe.where("score", "dataset"))
        n_ctx = recipe.score.ctx
    return KLDProbe(ctx.base_path, read_text(path), n_ctx, chunks, ctx.threads, cache)


def _action(ctx, tag, what, imatrix):
    def run(io):
        import json

        from pipeline.imatrix_file import read_imatrix, write_imatrix

        n_layers = ctx.model_info.n_layers
        extra = {}
        if isinstance(what, int):
            from pipeline.prune_auto import choose_layers, default_candidates, proxy_ranking
            from pipeline.sensitivity import block_influence, imatrix_layer_stats

            cossim = {}
            if imatrix:
                cossim = {k: v["cossim"] for k, v in imatrix_layer_stats(read_imatrix(imatrix)).items()}
            bi = block_influence(ctx.layers_path)
            ranking = proxy_ranking(n_layers, cossim, bi)
            probe = probe_for(ctx, AUTO_PROBE_CHUNKS)
            choice = choose_layers(ctx.base_path, what, n_layers, probe, ranking,
                                   default_candidates(what, n_layers), ctx.folder, _auto_where(ctx))
            choice["proxies"] = {"cossim": cossim, "block_influence": bi}
            io.out(ctx.prune_choice_path(tag)).write_text(json.dumps(choice, indent=2) + "\n")
            layers = tuple(choice["layers"])
            extra = {"layers": list(layers), "probe_kld": choice["kld"]}
        else:
            layers = what
        info = prune_gguf(ctx.base_path, io.out(ctx.pruned_base_path(tag)), layers)
        if imatrix:
            write_imatrix(io.out(ctx.pruned_imatrix_path(tag)), remap_imatrix(read_imatrix(imatrix), n_layers, layers))
        return {**extra, "swa_after": info["swa_after"]}
    return run
