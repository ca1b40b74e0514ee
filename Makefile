# The two commands: `make demo` (run the pipeline on the embedded demo shop) and `make test`.
# Both create .venv and install everything on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARCH := $(shell uname -m)
# torch/torchvision pins that install from this machine's local wheels (see README).
ifeq ($(ARCH),aarch64)
TORCH_PINS ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
endif

.PHONY: demo ablations test lint install clean-venv

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/kgrank run configs/demo.yaml

# the demo run plus leave-one-modality-out ablations (a fusion network and a ranker per family)
ablations: $(VENV)/.installed
	$(BIN)/kgrank run configs/demo.yaml ranking.ablations=true name=demo-ablations

test: $(VENV)/.installed
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check kgrank tests benchmarks
	$(BIN)/mypy

clean-venv:
	rm -rf $(VENV)
