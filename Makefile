# One entry point. `make demo` sets up and runs the demo; `make test` sets up, lints and tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= train,eval,demo,dev
# Offline by default (tiny random models, with a banner saying so). Real models (Hub access, a GPU):
#   make demo DEMO_ARGS="--base CompVis/stable-diffusion-v1-4 --safe_encoder Adeely93/SafeR_CLIP"
DEMO_ARGS ?= --tiny
BENCH_ARGS ?=
# open_clip needs torchvision. On x86_64 machines without CUDA the only PyPI pair that imports is
# torch 2.14.1 + torchvision 0.29.1 (CUDA builds that also run on the CPU); on aarch64 2.9.1 + 0.24.1.
ARCH := $(shell uname -m)
ifeq ($(ARCH),aarch64)
TORCH_PINS ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
endif

.PHONY: setup demo smoke test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install $(TORCH_PINS)
	$(BIN)/python -m pip install -e ".[$(EXTRAS)]" $(TORCH_PINS)
	touch $@

demo: setup
	$(BIN)/python demos/app.py $(DEMO_ARGS)

smoke: setup
	$(BIN)/python demos/app.py --tiny --smoke_test

lint: setup
	$(BIN)/ruff check .

test: setup lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
