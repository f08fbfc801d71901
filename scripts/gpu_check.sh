#!/usr/bin/env bash
# The GPU path, checked on a machine with one NVIDIA GPU in under 8 minutes, from a CUDA wheel built
# elsewhere (`make setup GPU=cuda`): the default recipe with every layer offloaded against the same
# recipe on the CPU (PPL and KLD of every variant), the in-memory probes with the model in device memory
# against the CPU's, the imatrix from device memory (cb_eval) against the CPU's, and llama.cpp's load
# report (every requested layer on the GPU). Writes results/bench/gpu.json; scripts/gpu_verdict.py holds
# the tolerances, and any claim outside its tolerance fails the check (exit 1, one line a miss).
#
#   scripts/gpu_check.sh --pack   here: stage what travels (<= 64 MiB) into .whl/ and .gpu-check/
#   scripts/gpu_check.sh          there, from the repository root, with .whl and .gpu-check carried
#
# What travels: the CUDA llama-cpp-python wheel, wheels of squeeze's dependencies the GPU machine's
# Python lacks, and a small random Gemma 3 (6 layers, rows of 256: ggml-cuda pads quantized rows to
# 512, so the probes' writes into device buffers cross the padding) with slices of the calibration
# and wikitext-2 sets. The 270M example model (253 MB) cannot travel; with a model on that machine,
# SQUEEZE_GPU_CHECK_MODEL=/path/model.gguf uses it instead. cuBLAS and cudart come from that machine:
# its CUDA toolkit, or the nvidia-cublas / nvidia-cuda-runtime wheels of its Python (CUDA 13 driver).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
check=.gpu-check
die() { echo "Error: gpu_check: $*" >&2; exit 1; }

if [ "${1:-}" = --pack ]; then
  PY=${PYTHON:-.venv/bin/python}
  flags_id=$(SQUEEZE_GPU=cuda SQUEEZE_CUDA_ARCHS="${CUDA_ARCHS:-}" "$PY" pipeline/build/build_flags.py --id)
  version=$("$PY" pipeline/build/build_flags.py --version)
  grep -qx "/$check/" .git/info/exclude 2>/dev/null || echo "/$check/" >> .git/info/exclude
  rm -rf .whl "$check" && mkdir -p .whl "$check/datasets"
  # squeeze's dependencies missing from the GPU machine's image (Python 3.12; see the device notes)
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "gguf==$("$PY" -c 'from importlib.metadata import version; print(version("gguf"))')" \
    "diskcache==$("$PY" -c 'from importlib.metadata import version; print(version("diskcache"))')"
  export SQUEEZE_DATA=${SQUEEZE_DATA:-$(cd ../shared/datasets && pwd)}
  cp -r "$SQUEEZE_DATA/imatrix-calibration" "$SQUEEZE_DATA/wikitext-2-raw" "$check/datasets/"
  cp "$SQUEEZE_DATA"/*.txt "$SQUEEZE_DATA"/*.md "$check/datasets/" 2>/dev/null || true
  chmod -R u+w "$check"  # copies of a read-only store; the next --pack replaces them
  SQUEEZE_PROGRESS=0 "$PY" - "$check" <<'EOF'
import subprocess, sys, tempfile, textwrap
from pathlib import Path
from tests.tiny_gemma import build_tiny_gemma3, calibration_text
out = Path(sys.argv[1])
with tempfile.TemporaryDirectory() as tmp:
    hf = build_tiny_gemma3(Path(tmp) / "tiny-gemma3", calibration_text(), n_layers=6)
    recipe = Path(tmp) / "convert.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        version: 1
        model: {{source: "{hf}", base_type: F16}}
        variants: {{Q8_0: Q8_0}}
        """))
    subprocess.run([sys.executable, "-m", "pipeline", "run", str(recipe), "--results", f"{tmp}/r"], check=True,
                   capture_output=True)
    (out / "model.gguf").write_bytes(next(Path(f"{tmp}/r").rglob("base-f16.gguf")).read_bytes())
EOF
  wheel=$(ls "$("$PY" -m pip cache dir)/squeeze-wheels/llama-cpp-python-$version-$flags_id"/*.whl 2>/dev/null) ||
    die "no CUDA wheel ($flags_id) in pip's cache: build it first with \`make setup GPU=cuda VENV=<another venv>\`"
  "$PY" pipeline/build/slim_wheel.py "$wheel" ".whl/$(basename "$wheel")"  # wheels built before setup slimmed them
  du -sh .whl/* "$check"
  total=$(du -sk .whl "$check" | awk '{s += $1} END {print int(s / 1024)}')
  [ "$total" -lt 60 ] || die "what travels is $total MiB, over the 64 MiB a device call carries (with the repo)"
  echo "ready: run \`scripts/gpu_check.sh\` on the GPU machine with carry [\".whl\", \"$check\"] ($total MiB)"
  exit 0
fi

# ---- on the GPU machine ------------------------------------------------------------------------
# --rehearse: the same measurements with nothing offloaded, here, with this environment's engine:
# checks the harness itself where no GPU is lent (its numbers compare the CPU with itself).
layers=-1 limit=450
if [ "${1:-}" = --rehearse ]; then
  layers=0 limit=3600 PY=${PYTHON:-.venv/bin/python}  # 2 shared cores take ~4 min a recipe run
else
command -v nvidia-smi >/dev/null && nvidia-smi -L | grep -q GPU || die "no NVIDIA GPU here (nvidia-smi -L lists none)"
ls .whl/llama_cpp_python-*.whl >/dev/null 2>&1 || die "no .whl/llama_cpp_python-*.whl: run \`scripts/gpu_check.sh --pack\` where it was built and carry .whl"
site=/tmp/squeeze-gpu-site
rm -rf "$site"
# --no-deps and one version of each: the image's numpy, yaml, pandas... stay; the engine is the carried one
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The wheel's RUNPATH names ../../nvidia/cu13/lib beside it; here cuBLAS is wherever that machine keeps it.
libs=$("$PY" - <<'EOF'
import glob, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
found = [d for r in roots for d in glob.glob(f"{r}/nvidia/cu13/lib") + glob.glob(f"{r}/nvidia/*/lib")
         if glob.glob(f"{d}/libcublas.so.13") or glob.glob(f"{d}/libcudart.so.13")]
found += [d for d in glob.glob("/usr/local/cuda*/lib*") + glob.glob("/usr/local/cuda*/targets/*/lib")
          if glob.glob(f"{d}/libcublas.so.13")]
print(":".join(dict.fromkeys(found)))
EOF
)
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
seen=$("$PY" -c "
from pipeline.engine.backend import gpu_backends, supports_gpu_offload
print(gpu_backends().get('CUDA', 0) if supports_gpu_offload() else 0)" 2>&1 | tail -1) || true
[ "$seen" -ge 1 ] 2>/dev/null ||
  die "the carried engine does not load or sees no GPU ($seen; cuBLAS and cudart looked for in: ${libs:-nowhere})"
fi

export SQUEEZE_PROGRESS=0 SQUEEZE_DATA="${SQUEEZE_DATA:-$PWD/$check/datasets}"
model=${SQUEEZE_GPU_CHECK_MODEL:-$PWD/$check/model.gguf}
[ -f "$model" ] || die "no model at $model: carry $check (made by --pack) or set SQUEEZE_GPU_CHECK_MODEL"
work=$(mktemp -d)
# 8 minutes at most: the two recipe runs take about 1 minute each on 16 cores; each is cut off at 3
timeout "$limit" "$PY" - "$model" "$work" "$layers" "$limit" <<'EOF'
import json, os, subprocess, sys, time
from pathlib import Path
import numpy as np
import yaml

model, work, offload, limit = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, "scripts")
from bench_common import provenance  # noqa: E402  (its clock and CPU count start here: the whole check)
from pipeline.engine.model import Model

with Model(model) as m:
    n_layer = m.n_layer
default = yaml.safe_load(Path("recipes/gemma3-270m-pruned.yaml").read_text())
seconds, kept = {}, lambda layers: [l for l in layers if l < n_layer - 1] or [n_layer // 2]


def run(where: str, n_gpu_layers: int) -> Path:
    recipe = dict(default, model={**default["model"], "source": str(model), "n_gpu_layers": n_gpu_layers},
                  description=f"gpu_check: the default recipe on {model.name}, n_gpu_layers {n_gpu_layers}")
    recipe["calibration"] = {**default["calibration"], "chunks": 8}
    recipe["score"] = {k: v for k, v in default["score"].items() if k != "tasks"} | {"chunks": 8}
    recipe["variants"] = {name: {**v, "prune": kept(v["prune"])} if "prune" in v else v
                          for name, v in default["variants"].items()}
    path = work / f"{where}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(path), "--results", str(work / where)],
                          capture_output=True, text=True, timeout=limit * 0.4)
    if proc.returncode != 0:
        sys.exit(f"Error: gpu_check: the recipe on the {where} failed: {(proc.stdout + proc.stderr).strip().splitlines()[-1]}")
    manifest = json.loads(next((work / where).rglob("manifest.json")).read_text())
    steps = manifest.get("steps", manifest)
    seconds[where] = {k: s.get("seconds") for k, s in steps.items() if isinstance(s, dict) and "seconds" in s}
    seconds[where]["total"] = round(time.monotonic() - start, 2)
    for path in sorted((work / where).rglob("scores/*.json")):
        row = json.loads(path.read_text())
        if isinstance(row, dict) and "ppl" in row and "variant" in row:
            scores[where][row["variant"]] = {"ppl": row["ppl"], "mean_kld": row["mean_kld"]}
            scores[where]["base"] = {"ppl": row["ppl_base"]}
    return next((work / where).rglob("imatrix.gguf"))


scores = {"gpu": {}, "cpu": {}}
gpu_imatrix, cpu_imatrix = run("gpu", offload), run("cpu", 0)
compared = {name: {"gpu": scores["gpu"][name], "cpu": scores["cpu"][name]}
            for name in scores["cpu"] if name in scores["gpu"]}

from pipeline.engine.load_report import load_report
placed = load_report(model, offload)  # llama.cpp's own word on where the layers went

from pipeline.formats.imatrix_file import read_imatrix
g, c = read_imatrix(gpu_imatrix).normalized(), read_imatrix(cpu_imatrix).normalized()
rel = {n: float(np.linalg.norm(g[n] - c[n]) / max(np.linalg.norm(c[n]), 1e-30)) for n in c if n in g}
imatrix = {"tensors": len(c), "same_tensors": set(g) == set(c), "max_rel_l2": max(rel.values()),
           "median_rel_l2": float(np.median(list(rel.values()))), "worst": max(rel, key=rel.get)}

# the probes of tests/test_memory_probe.py, on the model in device memory against the CPU
from pipeline.choose.groups import probe_types
from pipeline.choose.memory_probe import MemoryProbe
from pipeline.formats.model_info import read_model_info
from pipeline.fsutil import read_text
from pipeline.sources.datasets import resolve_dataset

text = read_text(resolve_dataset("groups_merged"))[:30000]
info = read_model_info(model)
cases = {"layer removed": ({}, [n_layer // 2]), "attention of 1 low": (probe_types(info, (1, "attn")), []),
         "MLP of 2 low": (probe_types(info, (2, "mlp")), []),
         "a mix of types": ({"token_embd.weight": "Q5_0", "blk.0.ffn_down.weight": "Q3_K",
                             "blk.1.attn_k.weight": "IQ4_NL", "blk.2.ffn_up.weight": "Q4_0"}, [])}
klds = {}
for where, layers in (("gpu", offload), ("cpu", 0)):
    with MemoryProbe(model, text, 256, 2, n_gpu_layers=layers, imatrix_path=cpu_imatrix) as probe:
        before = probe.logits()
        klds[where] = {label: probe.kld(types, removed) for label, (types, removed) in cases.items()}
        restored = bool(np.array_equal(before, probe.logits()))  # the device copy put back exactly
    klds[f"{where}_restored_bit_identical"] = restored
probes = {label: {"gpu": klds["gpu"][label], "cpu": klds["cpu"][label],
                  "rel_diff": abs(klds["gpu"][label] - klds["cpu"][label]) / max(klds["cpu"][label], 1e-12)}
          for label in cases}
from gpu_verdict import TOLERANCES, failures

out = {"model": {"file": model.name, "layers": n_layer, "bytes": model.stat().st_size},
       "seconds": seconds, "scores": compared, "probes": probes,
       "probe_restored_bit_identical_on_gpu": klds["gpu_restored_bit_identical"], "imatrix_gpu_vs_cpu": imatrix,
       "requested_gpu_layers": offload,
       "load_report": {"offloaded": placed.offloaded, "layers": placed.layers, "device_mib": placed.device_mib,
                       "buffers_mib": placed.buffers}}
import shutil
smi = shutil.which("nvidia-smi")
gpu_name = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip() if smi else "none"
out["gpu"] = gpu_name
out.update(provenance(threads=os.cpu_count()))
out["target"] = {"tolerances": TOLERANCES, "claims": "every requested layer on the GPU (llama.cpp's load report); "
                 "the offloaded recipe's PPL and KLD equal the CPU run's; the imatrix from device memory equals "
                 "the CPU's; each in-memory probe's KLD on the GPU equals the CPU's, weights put back exactly"}
# a rehearsal offloads nothing, so only the load report's claim cannot hold there
missed = failures(out) if offload else [m for m in failures(out) if not m.startswith("load report")]
out["verdict"] = "met" if not missed else "missed"
out["missed"] = missed
target = Path("results/bench/gpu.json" if offload else work / "gpu-rehearsal.json")
target.parent.mkdir(parents=True, exist_ok=True)
target.write_text(json.dumps(out, indent=1) + "\n")
print(json.dumps(out, indent=1))
for line in missed:
    print(f"Error: gpu_check: {line}", file=sys.stderr)
sys.exit(1 if missed else 0)
EOF
[ -n "${OUT:-}" ] && cp results/bench/gpu.json "$OUT/" || true
