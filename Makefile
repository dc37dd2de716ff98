# Fresh machine: `make run` starts the embedded service with the example nodes and a mock CRM;
# `make test` builds the virtualenv, installs everything and runs the whole suite (README,
# "Run it, test it" and "Before you start"). `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The package with its dev extras (tests, linters, fuzzers, deploy-test tools): everything but run.
STAMP := $(VENV)/.installed
# The runtime package only: all `make run` needs, a fraction of the install time.
RUN_STAMP := $(VENV)/.installed-run
# The unit tests: no RabbitMQ, Redis or Asterisk, nothing long.
FAST := not integration and not asterisk and not slow and not deploy

.DEFAULT_GOAL := help
.PHONY: help run test test-fast lint typecheck services bench clean image stack-up stack-down

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' \
		$(MAKEFILE_LIST)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,peers]'
	touch $(STAMP) $(RUN_STAMP)

run: $(RUN_STAMP) ## the embedded gateway on 127.0.0.1:4573 (metrics :9100) + mock CRM; Ctrl-C stops both
	exec bash tools/run_embedded.sh

test: $(STAMP) services lint typecheck ## what CI runs: services, tools, ruff, mypy, all tests incl. real Asterisk (root)
	$(BIN)/python -m pytest

test-fast: $(STAMP) ## tests/unit: no RabbitMQ/Redis/Asterisk/containers, no slow forms (~1.5 min); no root
	$(BIN)/python -m pytest tests/unit -m "$(FAST)"

lint: $(STAMP) ## ruff check + ruff format --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP) ## mypy (strict)
	$(BIN)/mypy

services: ## install/start local Redis + RabbitMQ and the deploy-test tools (apt needs root)
	bash tools/ensure_services.sh
	bash tools/ensure_tools.sh
	bash tools/container/ensure_podman.sh || echo "services: no container engine:" \
		"tests/deploy/ fails under CI=true and skips elsewhere" >&2

# The smoke form is the one tests/load/test_bench_smoke.py runs in the suite.
bench: $(STAMP) services ## the benchmark (README "Benchmark"); BENCH_SMOKE=1: its ~45 s smoke form
	if [ -n "$$BENCH_SMOKE" ]; then $(BIN)/python -m bench.run --smoke; else $(BIN)/python -m bench.run --profile; fi

# Images are cached outside the checkout (~/.cache/callerid/images, and the engine's storage):
# a second `make image` with unchanged inputs takes seconds (docs/operations.md, "Containers
# without a registry, compose on podman").
image: ## build callerid:local with podman/docker (bases made offline when no registry answers)
	bash tools/container/ensure_podman.sh
	bash tools/container/build_image.sh

stack-up: $(STAMP) image ## docker-compose.yml up and healthy (all but Grafana here), 3 resolvers
	$(BIN)/python -m tools.container.stack up --scale resolver=3

stack-down: $(STAMP) ## the compose stack down: containers, networks, volumes (images stay)
	$(BIN)/python -m tools.container.stack down

clean: ## remove .venv and the tool caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
