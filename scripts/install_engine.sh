#!/usr/bin/env bash
# Install llama-cpp-python into a Python environment, built with squeeze's llama.cpp flags
# (pipeline/engine/build_flags.py). The sdist compiles for ~4-7 minutes on 2 cores, so the wheel is
# kept in pip's cache folder under a name that includes the flags: a later setup, or CI on
# the same machine, installs it in seconds, and a change of flags never reuses a stale build.
#
# GPU=cuda (make setup GPU=cuda) builds llama.cpp's CUDA backend; it needs the CUDA toolkit (nvcc).
# The choice is recorded in the environment (squeeze-gpu), so the reference tools follow it.
set -euo pipefail
PY=${1:-.venv/bin/python}
here=$(cd "$(dirname "$0")/.." && pwd)
export SQUEEZE_GPU="${GPU:-}"
cuda_home=${CUDA_HOME:-/usr/local/cuda}
nvcc=$(command -v nvcc || { test -x "$cuda_home/bin/nvcc" && echo "$cuda_home/bin/nvcc"; } || true)
if [ "$SQUEEZE_GPU" = cuda ]; then
  if [ -z "$nvcc" ]; then
    echo "Error: GPU=cuda: no CUDA toolkit found (nvcc is neither on PATH nor in $cuda_home/bin); install it (or set CUDA_HOME), or drop GPU=cuda for a CPU build" >&2
    exit 1
  fi
  echo "engine: CUDA build, toolkit $nvcc ($("$nvcc" --version | grep -o 'release [0-9.]*'))"
  export CUDACXX="$nvcc"
elif [ -n "$nvcc" ]; then
  echo "engine: CPU build (a CUDA toolkit is at $nvcc: \`make setup GPU=cuda\` builds for the GPU)"
else
  echo "engine: CPU build (no CUDA toolkit found; Metal is on by default on macOS)"
fi
version=$("$PY" "$here/pipeline/engine/build_flags.py" --version)
flags_id=$("$PY" "$here/pipeline/engine/build_flags.py" --id)
wheels="$("$PY" -m pip cache dir)/squeeze-wheels/llama-cpp-python-$version-$flags_id"
if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $version (flags $flags_id); this takes several minutes on 2 cores"
  rm -rf "$wheels.partial"
  CMAKE_ARGS="$("$PY" "$here/pipeline/engine/build_flags.py")" \
    "$PY" -m pip wheel --no-deps --no-cache-dir -w "$wheels.partial" "llama-cpp-python==$version"
  mkdir -p "$(dirname "$wheels")" && rm -rf "$wheels" && mv "$wheels.partial" "$wheels"
fi
"$PY" -m pip install -q --no-deps --force-reinstall "$wheels"/llama_cpp_python-*.whl
"$PY" -m pip install -q "typing_extensions" "numpy" "diskcache" "jinja2"
"$PY" -c "import sys, pathlib; pathlib.Path(sys.prefix, 'squeeze-gpu').write_text('$SQUEEZE_GPU')"
