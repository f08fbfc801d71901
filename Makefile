# squeeze: `make setup`, then `make recipe=NAME` (= squeeze run recipes/NAME.yaml).
recipe ?= gemma3-270m-pruned
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SQUEEZE := $(VENV)/bin/squeeze
# Optional dependency groups: `convert` (torch CPU, transformers, sentencepiece) converts Hugging
# Face checkpoints and the tests need it; `make setup EXTRAS=gemma270m,test` skips it.
EXTRAS ?= gemma270m,convert,test
# `make setup GPU=cuda` builds the engine with llama.cpp's CUDA backend (needs the CUDA toolkit);
# the default is a CPU build, and a later `make` keeps what setup built (`GPU=` goes back to the
# CPU). Metal on macOS is on without asking. CUDA_ARCHS=86,90 picks the GPU architectures
# (default 90-real: the H100/H200 alone; ggml's own default is 7 of them, several times the build).
GPU ?= $(shell cat $(VENV)/squeeze-gpu 2>/dev/null)
CUDA_ARCHS ?= $(shell cat $(VENV)/squeeze-cuda-archs 2>/dev/null)
export GPU CUDA_ARCHS
BUILD := $(or $(GPU),cpu)$(if $(filter cuda,$(GPU)),-$(or $(CUDA_ARCHS),default))
# Where the public datasets live (wikitext-2, calibration text, task sets); users point it at
# their own copies, and known datasets are downloaded when online.
SQUEEZE_DATA ?= $(abspath ../shared/datasets)
export SQUEEZE_DATA

.PHONY: run setup status plan test reference bench clean-results

run: setup
	$(SQUEEZE) run recipes/$(recipe).yaml

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install_engine.sh pipeline/build/build_flags.py $(VENV)/.gpu-$(BUILD)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	bash scripts/install_engine.sh $(PY)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

# A change of GPU= or CUDA_ARCHS= reinstalls the engine (each build has its own cached wheel).
$(VENV)/.gpu-$(BUILD):
	mkdir -p $(VENV) && rm -f $(VENV)/.gpu-* && touch $@

status: setup
	$(SQUEEZE) status recipes/$(recipe).yaml

plan: setup
	$(SQUEEZE) plan recipes/$(recipe).yaml

# The reference llama.cpp CLI tools (llama-imatrix, llama-perplexity, ...) the cross-check tests
# compare against, built from the llama-cpp-python sdist of the pinned version.
reference: setup
	$(SQUEEZE) toolchain --build

test: setup reference
	$(PY) -m pytest -q --durations=40 tests

# Every benchmark record in results/bench/, regenerated one benchmark at a time (hours: see
# `python scripts/bench_all.py --list`); `make bench only=targets,allocate` for some of them.
bench: setup reference
	$(PY) scripts/bench_all.py $(if $(only),--only $(only))

clean-results:
	rm -rf results/$(recipe)
