"""Peak memory of converting a Hugging Face checkpoint with squeeze's convert stage.

Builds random Gemma 3 checkpoints of the 270M class once (bf16 safetensors, as Google ships
them: 640 wide, 4 heads of 256, 2048 FFN, 262144-token vocabulary) into squeeze's cache, then
converts each to F16 with the pinned convert_hf_to_gguf.py and records the converter's peak
resident memory (its own, via wait4) and wall time. Three shapes separate what memory follows:
  - 18 layers (the real 270M layout),
  - 36 layers (more weights in total, same largest tensor),
  - 18 layers with half the vocabulary (a smaller largest tensor: the embedding).
Writes results/bench/convert.json. Timings from a busy machine are only indicative.

    .venv/bin/python scripts/bench_convert.py [--only 18L]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# the calibration text the tokenizer is trained on, where the Makefile and tests find it
if (ROOT.parent / "shared" / "datasets").is_dir():
    os.environ.setdefault("SQUEEZE_DATA", str(ROOT.parent / "shared" / "datasets"))

from bench_common import write_json  # noqa: E402

from pipeline.fsutil import atomic_path, cache_dir  # noqa: E402
from pipeline.sources.hf_convert import run_converter, safetensors_header  # noqa: E402

SHAPES = {  # name: (layers, vocab)
    "270M-18L": (18, 262144),
    "270M-36L": (36, 262144),
    "270M-18L-halfvocab": (18, 131072),
}
HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM = 640, 2048, 4, 1, 256


def build_checkpoint(folder: Path, n_layers: int, vocab: int) -> Path:
    """Random bf16 weights with Gemma 3 270M's shapes, a small sentencepiece tokenizer (the
    converter pads the vocabulary to `vocab_size` as it does for Gemma's unused rows)."""
    import torch
    from safetensors.torch import save_file

    from tests.tiny_gemma import (calibration_text, gemma3_config, gemma3_weights, train_tokenizer,
                                  write_tokenizer_config)

    if (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    train_tokenizer(folder, calibration_text(), 1024)
    write_tokenizer_config(folder)
    config = gemma3_config(vocab, HIDDEN, FFN, n_layers, HEADS, KV_HEADS, HEAD_DIM, sliding_window=512)
    config["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    import numpy as np

    tensors = {name: torch.from_numpy(array).to(torch.bfloat16)
               for name, array in gemma3_weights(config, seed=1, dtype=np.float32)}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    return folder


def bench(name: str, n_layers: int, vocab: int, work: Path) -> dict:
    folder = build_checkpoint(cache_dir("bench", "hf-checkpoints") / name, n_layers, vocab)
    header = safetensors_header(folder / "model.safetensors")
    n_params = sum(int(np_prod(m["shape"])) for m in header.values())
    largest = max(int(np_prod(m["shape"])) for m in header.values())
    out = work / f"{name}-f16.gguf"
    start = time.monotonic()
    extra = run_converter(folder, out, "F16", work / f"{name}.log", echo=lambda _: None)
    seconds = time.monotonic() - start
    row = {"name": name, "layers": n_layers, "vocab": vocab, "params": n_params,
           "safetensors_mib": round((folder / "model.safetensors").stat().st_size / 2**20, 1),
           "gguf_f16_mib": round(out.stat().st_size / 2**20, 1),
           "largest_tensor_f32_mib": round(largest * 4 / 2**20, 1),
           "peak_rss_mib": extra["peak_rss_mib"], "seconds": round(seconds, 1)}
    out.unlink()
    print(json.dumps(row), flush=True)
    return row


def np_prod(shape) -> int:
    n = 1
    for x in shape:
        n *= int(x)
    return n


def scaling(rows: list[dict]) -> str | None:
    """Peak = baseline + k x (largest tensor in f32), fitted on the two vocabulary sizes; the
    36-layer row shows whether the total size matters."""
    by = {r["name"]: r for r in rows}
    if not {"270M-18L", "270M-18L-halfvocab"} <= set(by):
        return None
    a, b = by["270M-18L"], by["270M-18L-halfvocab"]
    k = (a["peak_rss_mib"] - b["peak_rss_mib"]) / (a["largest_tensor_f32_mib"] - b["largest_tensor_f32_mib"])
    base = a["peak_rss_mib"] - k * a["largest_tensor_f32_mib"]
    text = (f"peak RSS ~ {base:.0f} MiB + {k:.2f} x largest tensor in f32 (the token embedding); "
            f"it does not follow the checkpoint size")
    if "270M-36L" in by:
        c = by["270M-36L"]
        text += (f": {c['safetensors_mib']:.0f} MiB of weights at 36 layers peak at {c['peak_rss_mib']:.0f} MiB, "
                 f"{a['safetensors_mib']:.0f} MiB at 18 layers at {a['peak_rss_mib']:.0f} MiB")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(SHAPES), help="run only these shapes")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench" / "convert.json"))
    args = parser.parse_args()
    work = cache_dir("bench", "convert-work")
    rows = [bench(name, *SHAPES[name], work) for name in (args.only or SHAPES)]
    write_json(Path(args.out), {
        "scaling": scaling(rows),
        "what": "peak RSS of convert_hf_to_gguf.py (lazy mode) converting random bf16 Gemma 3 270M-class "
                "checkpoints to F16, measured on the converter process via wait4",
        "machine": f"{platform.machine()}, {platform.python_version()}; shared 2-core machine, "
                   f"so seconds are indicative only",
        "rows": rows,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
