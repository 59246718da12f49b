# taskyard: `make run` runs the whole stack on embedded defaults; `make test` passes the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast bench lint services browser install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## The development stack: embedded Redis, a worker per profile, beat and the demo producer.
run: $(STAMP)
	$(BIN)/taskyard up -A examples.bdc --producer examples.bdc.demo

## The whole suite against real Redis, PostgreSQL and RabbitMQ (started when not running).
test: $(STAMP) services browser
	./scripts/ensure-prometheus.sh
	$(BIN)/python -m pytest

## Unit tests only (no worker processes).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not browser"

services:
	./scripts/ensure-services.sh

## Headless Chromium for the dashboard tests (Debian's chromium package).
browser:
	./scripts/ensure-browser.sh

bench: $(STAMP) services
	bash scripts/ensure-bench-peers.sh
	$(BIN)/python -m benchmarks

## Lint, format check and types (CI runs it before the tests).
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy src

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info src/*.egg-info
