# Set-up is two commands: `make demo` (the main job) and `make test` (the whole suite).
# Each creates .venv on first use and installs what it needs into it.

PYTHON ?= python3
VENV ?= .venv
# This machine's pip takes these two from local disk. GPU users: pass the CUDA build they want, e.g.
#   make demo TORCH_SPEC="torch==2.14.1 torchvision==0.29.1" TORCH_INDEX=<your CUDA wheel index URL>
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TORCH_INDEX ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

demo: $(STAMP)
	$(BIN)/fpt demo --out demo_output

test: $(STAMP) lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
