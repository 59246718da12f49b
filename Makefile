# taskyard: `make run` runs the whole stack on embedded defaults; `make test` passes the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast bench lint format services browser install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## The development stack: embedded Redis, a worker per profile, beat and the demo producer.
run: $(STAMP)
	$(BIN)/taskyard up -A examples.bdc --producer examples.bdc.demo

## The whole suite against real Redis, PostgreSQL and RabbitMQ (started when not running), on
## TEST_WORKERS parallel pytest-xdist workers (each on its own Redis database: tests/servers.py;
## tests on RabbitMQ or PostgreSQL take turns: tests/conftest.py), with a coverage summary and
## the 25 slowest tests printed. Three workers on this 2-core machine: most tests wait on worker
## processes (the last CI run on two took 11 min 19 s, the first on three 10 min 4 s).
TEST_WORKERS ?= 3
test: $(STAMP) services browser
	./scripts/ensure-prometheus.sh
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup --cov --cov-report=term

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

## Lint, format check and types (CI runs it before the tests): mypy --strict on the package,
## and on the tests and benchmarks with the relaxations of pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy src
	$(BIN)/mypy tests benchmarks

## Rewrite the code in the house format and apply ruff's safe fixes.
format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks examples
	$(BIN)/ruff check --fix src tests benchmarks examples

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info src/*.egg-info
