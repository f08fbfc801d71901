#!/usr/bin/env bash
# Install llama-cpp-python into a Python environment, built with squeeze's llama.cpp flags
# (pipeline/build/build_flags.py). The sdist compiles for ~4-7 minutes on 2 cores, so the wheel is
# kept in pip's cache folder under a name that includes the flags: a later setup, or CI on
# the same machine, installs it in seconds, and a change of flags never reuses a stale build. The
# wheel is slimmed first (pipeline/build/slim_wheel.py): each library once, not six times.
#
# GPU=cuda (make setup GPU=cuda) builds llama.cpp's CUDA backend; it needs the CUDA toolkit (nvcc)
# and cuBLAS, which a toolkit installed from pip lacks: then the matching `nvidia-cublas` wheel is
# installed into the environment first. CUDA_ARCHS=86,90 limits the GPU architectures (default: 90,
# the H100/H200). Both choices are recorded in the environment (squeeze-gpu, squeeze-cuda-archs),
# so the reference tools follow them. Anything missing is said in one line before compiling.
set -euo pipefail
PY=${1:-.venv/bin/python}
here=$(cd "$(dirname "$0")/.." && pwd)
export SQUEEZE_GPU="${GPU:-}"
export SQUEEZE_CUDA_ARCHS="${CUDA_ARCHS:-}"
flags="$here/pipeline/build/build_flags.py"
cublas_args=""
cuda_home=${CUDA_HOME:-/usr/local/cuda}
nvcc=$(command -v nvcc || { test -x "$cuda_home/bin/nvcc" && echo "$cuda_home/bin/nvcc"; } || true)
if [ "$SQUEEZE_GPU" = cuda ]; then
  if [ -z "$nvcc" ]; then
    echo "Error: GPU=cuda: no CUDA toolkit found (nvcc is neither on PATH nor in $cuda_home/bin); install it (or set CUDA_HOME), or drop GPU=cuda for a CPU build" >&2
    exit 1
  fi
  archs=$("$PY" "$flags" --cuda-archs)
  echo "engine: CUDA build for architectures $archs, toolkit $nvcc ($("$nvcc" --version | grep -o 'release [0-9.]*'))"
  export CUDACXX="$nvcc"
  if ! cublas_args=$("$PY" "$flags" --cublas 2>/dev/null); then
    wheel=$("$PY" "$flags" --cublas-wheel)
    echo "engine: the CUDA toolkit has no cuBLAS; installing $wheel from the package index"
    "$PY" -m pip install -q "$wheel" >/dev/null 2>&1 || true
    cublas_args=$("$PY" "$flags" --cublas)  # says what is missing, in one line, and stops
  fi
elif [ -n "$nvcc" ]; then
  echo "engine: CPU build (a CUDA toolkit is at $nvcc: \`make setup GPU=cuda\` builds for the GPU)"
else
  echo "engine: CPU build (no CUDA toolkit found; Metal is on by default on macOS)"
fi
version=$("$PY" "$flags" --version)
flags_id=$("$PY" "$flags" --id)
wheels="$("$PY" -m pip cache dir)/squeeze-wheels/llama-cpp-python-$version-$flags_id"
if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $version (flags $flags_id); this takes several minutes on 2 cores"
  rm -rf "$wheels.partial"
  CMAKE_ARGS="$("$PY" "$flags") $cublas_args" \
    "$PY" -m pip wheel --no-deps --no-cache-dir -w "$wheels.partial" "llama-cpp-python==$version"
  # one copy of each library the package loads (a wheel stores each symlink as a full copy)
  "$PY" "$here/pipeline/build/slim_wheel.py" "$wheels.partial"/llama_cpp_python-*.whl
  mkdir -p "$(dirname "$wheels")" && rm -rf "$wheels" && mv "$wheels.partial" "$wheels"
fi
"$PY" -m pip install -q --no-deps --force-reinstall "$wheels"/llama_cpp_python-*.whl
"$PY" -m pip install -q "typing_extensions" "numpy" "diskcache" "jinja2"
"$PY" -c "import sys, pathlib; pathlib.Path(sys.prefix, 'squeeze-gpu').write_text('$SQUEEZE_GPU')
pathlib.Path(sys.prefix, 'squeeze-cuda-archs').write_text('$SQUEEZE_CUDA_ARCHS')"
