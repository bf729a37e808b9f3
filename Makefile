# One command from a fresh clone: `make test` builds .venv, installs the CPU build of torch and
# the package with its test extras, then runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2
# One thread per pytest worker: tiny LAPACK calls slow down by orders of magnitude when the
# workers' thread pools oversubscribe the cores.
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

.PHONY: install test test-all lint bench demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test,lint]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(TEST_ENV) $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) tests

test-all: $(STAMP)
	$(TEST_ENV) $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) -m '' tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks

demo: $(STAMP)
	$(BIN)/python examples/iwrm_autogram.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
