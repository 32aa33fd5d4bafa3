# Developer entry points. Each target does its own set-up on a fresh clone.
#   make test       venv + dependencies + build (CPU and, where nvcc is found, CUDA kernels) + all tests
#                   + test-install
#   make lint       ruff check + ruff format --check (Python), clang-format --dry-run (csrc/); make test runs it
#   make test-install  sdist and wheel from a clean tree, installed into a fresh venv, used from
#                   outside the checkout (tests/install_check.py; CPU kernels only, to keep CI short)
#   make demo       the main job: the shipped synthetic-demo model segments held-out synthetic EM ->
#                   evaluate -> demo_out/ (DEMO_ARGS="--train" trains tiny-cpu from scratch first)
#   make model-synthetic-demo  retrain the shipped synthetic-demo model (35 minutes, one thread) into
#                   runs/synthetic-demo and install it into stt_model/models (MODEL_ARGS=--overwrite to replace)
#   make model-lucchi-tiny  retrain the shipped lucchi-tiny model from LUCCHI (the Lucchi++ training volume;
#                   three runs side by side, ~120 minutes on 2 cores) into runs/lucchi-tiny and install it
#   make build-cpu  quick CPU-only rebuild for iteration (STT_BUILD_CUDA=0)
#   make cmake      build the same sources with CMake (the LibTorch library)
#   make gpu-check  on a GPU machine, with its own python3: build, GPU tests, sanitizer, bench
#                   into OUT (benchmarks/gpu_check.py; 9 minutes at most); CI runs it dry
PYTHON_BOOTSTRAP ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
PYTEST_ARGS ?=

.PHONY: all test test-install demo model-synthetic-demo model-lucchi-tiny build build-cpu cmake clean venv gpu-check

all: test

$(PY):
	$(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=23" setuptools wheel

$(DEPS): requirements/torch.txt requirements/dev.txt | $(PY)
	$(PY) -m pip install -q -r requirements/torch.txt -r requirements/dev.txt
	touch $@

venv: $(DEPS)

build: $(DEPS)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

build-cpu: $(DEPS)
	STT_BUILD_CUDA=0 $(PY) -m pip install -q --no-build-isolation --no-deps -e .

test: build lint
	$(PY) -m stt_kernels
	$(PY) -m pytest tests $(PYTEST_ARGS)
	$(MAKE) test-install

# ruff (lint + format check, ruff.toml) over the Python tree, clang-format (.clang-format) over csrc/.
lint: $(DEPS)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run -Werror $$(git ls-files 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.h' 'csrc/*.cuh' 'tests/libtorch/*.cpp')

test-install: $(DEPS)
	$(PY) tests/install_check.py

OUT ?= gpu_check_out
gpu-check:
	OUT=$(OUT) python3 benchmarks/gpu_check.py

demo: build
	$(PY) -m stt_model.cli demo $(DEMO_ARGS)

model-synthetic-demo: build
	OMP_NUM_THREADS=1 $(PY) -m stt_model.model_recipe --out runs/synthetic-demo --minutes 35 --install $(MODEL_ARGS)

LUCCHI ?= ../shared/data/lucchi_pp_train.h5
model-lucchi-tiny: build
	$(PY) -m stt_model.lucchi_recipe --data $(LUCCHI) --out runs/lucchi-tiny --jobs 3 --install $(MODEL_ARGS)

cmake: $(DEPS)
	cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build build/cmake

clean:
	rm -rf build dist *.egg-info stt_kernels/_C*.so stt_kernels/_cpu_*.so stt_kernels/_build_info.json
