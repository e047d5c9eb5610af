# Two entry points for a fresh clone: `make run` (install + the main job) and
# `make test` (install + the test suite). Both create .venv on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python

# Nothing this project runs may phone home.
export KEDRO_DISABLE_TELEMETRY = 1
export DO_NOT_TRACK = 1
export MLFLOW_DISABLE_TELEMETRY = true
export DVC_NO_ANALYTICS = 1
export GRADIO_ANALYTICS_ENABLED = False

.PHONY: install run test lint

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/kedro run

test: install
	$(PY) -m pytest

lint: install
	$(PY) -m ruff check src tests benchmarks
