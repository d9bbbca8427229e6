# Two entry points, each installing what it needs into .venv first:
#   make analyze   the main job (tuckerlib analyze on the bundled example)
#   make test      the whole suite: ruff, tests + doctests, docs build with warnings as errors
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONSTRAINTS := constraints.txt
JOBS ?= 2

.PHONY: analyze test lint pytest docs bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed-%: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[$*]"
	touch $@

analyze: $(VENV)/.installed-torch,cli
	$(BIN)/tuckerlib analyze

test: $(VENV)/.installed-test,docs
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n $(JOBS)
	$(BIN)/sphinx-build -W --keep-going -n -q -b html docs docs/_build/html

bench: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/bench_primitives.py

clean:
	rm -rf $(VENV) docs/_build docs/api/generated .pytest_cache .hypothesis
