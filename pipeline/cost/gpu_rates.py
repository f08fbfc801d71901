"""What a GPU would do to a run's model evaluation, from its vendor specifications: an estimate
for `squeeze plan --estimate --gpu NAME`, not a measurement.

Two rules turn a spec sheet into rates for llama.cpp:
- Token generation (one token per decode: speed tg, drift continuations) reads every weight once
  per token, so it is bound by memory bandwidth: tokens/s ~ TG_EFFICIENCY x bandwidth / model bytes.
- Prompt processing (batches of hundreds of tokens: calibration, perplexity/KLD, tasks, speed
  pp) is bound by arithmetic: tokens/s ~ PP_EFFICIENCY x dense FP16 tensor FLOP/s / (2 x
  parameters per token).

The efficiencies are assumptions (llama.cpp's CUDA/Metal backends reach roughly this share of
the peak on large models), not measurements; small models reach less. Only model evaluation moves
to the GPU: llama.cpp quantizes on the CPU, and conversion, pruning and squeeze's numpy work on
the logits stay on the rates measured on this machine.

The host. Everything but model evaluation runs on the CPU of the machine the GPU sits in, so an
estimate for a GPU also prices CPU work for a host (`--cpu-threads N`; without it, the GPU's
`host_threads` below), scaled from this machine's rates by the thread scaling measured here
(pipeline.cost.rates). The defaults are what a node of that class usually gives one GPU:
- H100, H200, A100: 32 threads. SXM nodes hold 8 GPUs and 2 sockets of 48-64 cores (DGX H100:
  2 x 56-core Xeon 8480C; DGX A100: 2 x 64-core EPYC 7742), so one GPU's share is 14-32 cores;
  cloud slices of one such GPU (e.g. 26-32 vCPUs) sit in that range too.
- RTX 4090, RTX 3090: 16 threads, a desktop workstation's 8-core, 16-thread CPU.
- L4, T4: 8 threads, the common cloud instance of one such GPU (g2-standard-8, g4dn.2xlarge).
- Apple: the same chip's CPU cores (M2 Max 12, M2 Ultra 24, M3 Max 16).

Sources: NVIDIA's data sheets (H100 SXM5, H200 SXM, A100 SXM4 80GB, L4, T4; GeForce RTX 4090
and 3090 from the Ada and Ampere architecture whitepapers, FP16 tensor with FP32 accumulate),
dense (not the 2:4 sparsity) figures. Apple publishes bandwidth but no FLOP figures: theirs are
ALUs x clock (FP32, which FP16 matches on Apple GPUs) as commonly derived, the least certain rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import SqueezeError, did_you_mean

# Shares of the peak llama.cpp reaches (see the module docstring: assumptions, not measurements).
TG_EFFICIENCY = 0.7
PP_EFFICIENCY = 0.35


@dataclass(frozen=True)
class GPU:
    name: str
    bandwidth_gb_s: float  # memory bandwidth, GB/s (vendor spec)
    fp16_tflops: float  # dense FP16 tensor (or shader, Apple) TFLOP/s
    memory_gib: float
    source: str
    host_threads: int = 32  # CPU threads of the usual host for one such GPU (module docstring)

    @property
    def tg_bytes_per_s(self) -> float:
        return TG_EFFICIENCY * self.bandwidth_gb_s * 1e9

    @property
    def pp_flops(self) -> float:
        return PP_EFFICIENCY * self.fp16_tflops * 1e12


GPUS = {g.name.lower(): g for g in (
    GPU("H100", 3350, 989, 80, "H100 SXM5 data sheet: 3.35 TB/s HBM3, 989 TFLOPS FP16 tensor (dense)", 32),
    GPU("H200", 4800, 989, 141, "H200 SXM data sheet: 4.8 TB/s HBM3e, 989 TFLOPS FP16 tensor (dense)", 32),
    GPU("A100", 2039, 312, 80, "A100 SXM4 80GB data sheet: 2,039 GB/s HBM2e, 312 TFLOPS FP16 tensor (dense)", 32),
    GPU("RTX4090", 1008, 165, 24, "Ada whitepaper: 1,008 GB/s GDDR6X, 165 TFLOPS FP16 tensor, FP32 accumulate", 16),
    GPU("RTX3090", 936, 71, 24, "Ampere GA102 whitepaper: 936 GB/s GDDR6X, 71 TFLOPS FP16 tensor, FP32 accumulate",
        16),
    GPU("L4", 300, 121, 24, "L4 data sheet: 300 GB/s GDDR6, 121 TFLOPS FP16 tensor (dense)", 8),
    GPU("T4", 320, 65, 16, "T4 data sheet: 320 GB/s GDDR6, 65 TFLOPS FP16 tensor", 8),
    GPU("M2-Max", 400, 13.6, 96, "Apple: 400 GB/s unified memory; 38-core GPU 13.6 TFLOPS FP32 (ALUs x clock)", 12),
    GPU("M2-Ultra", 800, 27.2, 192, "Apple: 800 GB/s unified memory; 76-core GPU 27.2 TFLOPS FP32 (ALUs x clock)",
        24),
    GPU("M3-Max", 400, 16.4, 128, "Apple: 400 GB/s unified memory (40-core GPU); 16.4 TFLOPS FP32 (ALUs x clock)",
        16),
)}


def _key(name: str) -> str:
    return name.lower().replace(" ", "").replace("_", "-").removeprefix("nvidia").removeprefix("geforce") \
        .removeprefix("apple").lstrip("-")


def gpu(name: str) -> GPU:
    """A GPU of the table by name (case and spaces ignored: 'h100', 'RTX 4090', 'm2 max')."""
    key = _key(name)
    for k, g in GPUS.items():
        if _key(k) == key or _key(k).replace("-", "") == key.replace("-", ""):
            return g
    names = [g.name for g in GPUS.values()]
    raise SqueezeError(f"--gpu: no rates for '{name}'{did_you_mean(name, names)} (known: {', '.join(names)})")
