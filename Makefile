# Fresh machine: `make run` starts the embedded service with the example nodes and a mock CRM;
# `make test` builds the virtualenv, installs everything and runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck services bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

services:
	bash tools/ensure_services.sh
	bash tools/ensure_tools.sh

run: $(STAMP)
	bash tools/run_embedded.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) services lint typecheck
	$(BIN)/python -m pytest

# Full run about 5 min (BENCH_SMOKE=1 for the 20-second form CI runs through the test suite).
bench: $(STAMP) services
	if [ -n "$$BENCH_SMOKE" ]; then $(BIN)/python -m bench.run --smoke; else $(BIN)/python -m bench.run --profile; fi

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
