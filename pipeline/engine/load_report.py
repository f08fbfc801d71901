"""Where llama.cpp put a model's layers and weights, as its own load log reports it: the
"offloaded N/M layers to GPU" line and the size of each model buffer (CPU, CPU_Mapped, CUDA0...).

Why the log: llama.cpp decides placement inside llama_model_load_from_file (layers it cannot fit,
tensors a backend does not support stay behind), and the log is the one place it says what it did;
n_gpu_layers is only what was asked."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.engine.backend import capture_log
from pipeline.engine.model import Model

_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_BUFFER = re.compile(r"(\S+) model buffer size\s*=\s*([\d.]+) MiB")
HOST_BUFFERS = ("CPU", "CPU_Mapped", "CPU_REPACK", "CUDA_Host")


@dataclass(frozen=True)
class LoadReport:
    offloaded: int       # layers llama.cpp says it put on a GPU (the output layer counts as one)
    layers: int          # layers it could have offloaded (n_layer + 1)
    buffers: dict[str, float] = field(default_factory=dict)  # buffer name -> MiB

    @property
    def device_mib(self) -> float:
        """MiB of weights in buffers that are not host memory."""
        return sum(mib for name, mib in self.buffers.items() if name not in HOST_BUFFERS)

    @property
    def all_offloaded(self) -> bool:
        return self.offloaded == self.layers and self.device_mib > 0


def parse_load_log(lines: list[str] | str) -> LoadReport:
    """The report from llama.cpp's load log; a log without the offload line reads as 0 of 0."""
    text = lines if isinstance(lines, str) else "".join(lines)
    found = _OFFLOADED.search(text)
    offloaded, layers = (int(found.group(1)), int(found.group(2))) if found else (0, 0)
    buffers: dict[str, float] = {}
    for name, mib in _BUFFER.findall(text):
        buffers[name] = buffers.get(name, 0.0) + float(mib)
    return LoadReport(offloaded, layers, buffers)


def load_report(path: Path, n_gpu_layers: int) -> LoadReport:
    """Load `path` once with `n_gpu_layers` and read back where llama.cpp put it. A build without
    a GPU backend logs no offload line: then none of the n_layer + 1 layers was offloaded."""
    with capture_log() as lines:
        with Model(path, n_gpu_layers=n_gpu_layers) as model:
            n_layer = model.n_layer
    report = parse_load_log(lines)
    if report.layers == 0:
        report = LoadReport(0, n_layer + 1, report.buffers)
    return report
