# `make demo` and `make test` do all set-up on a fresh machine: create .venv, install, run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned for the reference machine (CPU, Python 3.11); override for your CUDA build, e.g.
#   make test TORCH_SPEC="torch==2.6.0 torchvision==0.21.0"   (torch >= 2.6)
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_output
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint install clean gpu-wheels

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) requirements.txt setup.py
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -r requirements.txt "pytest>=7" "timm>=1.0" "safetensors>=0.4" "tensorboard>=2.10"
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m dinov2.demo --output-dir $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS) tests

# the quick set for the edit loop (no multi-process, cluster or slow tests)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not distributed and not cluster" $(PYTEST_ARGS) tests

lint: $(STAMP)
	$(PY) -m pip install --quiet "ruff>=0.6"
	$(VENV)/bin/ruff check dinov2 tests scripts
	$(VENV)/bin/ruff format --check dinov2 tests scripts

# wheels/ for an offline GPU machine (scripts/gpu_check.py, README "GPU check"): its Python, the
# torchvision for its torch, what it already has (e.g. GPU_WHEELS_SKIP="numpy pillow"); scripts/gpu_wheels.sh
GPU_PYTHON ?= 3.12
GPU_TORCHVISION ?= 0.26
GPU_WHEELS_SKIP ?=
gpu-wheels: $(PY)
	PIP="$(PY) -m pip" GPU_PYTHON="$(GPU_PYTHON)" GPU_TORCHVISION="$(GPU_TORCHVISION)" \
	    GPU_WHEELS_SKIP="$(GPU_WHEELS_SKIP)" bash scripts/gpu_wheels.sh wheels

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build *.egg-info
