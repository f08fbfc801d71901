#!/usr/bin/env bash
# Install llama-cpp-python into a Python environment, built with squeeze's llama.cpp flags
# (pipeline/engine/build_flags.py). The sdist compiles for ~4-7 minutes on 2 cores, so the wheel is
# kept in pip's cache folder under a name that includes the flags: a later setup, or CI on
# the same machine, installs it in seconds, and a change of flags never reuses a stale build.
set -euo pipefail
PY=${1:-.venv/bin/python}
here=$(cd "$(dirname "$0")/.." && pwd)
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
