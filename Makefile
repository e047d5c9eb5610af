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
	# the official Cityscapes evaluation, the reference of tests/test_cityscapes_ap.py; without
	# its dependencies: they include the Python 2 `typing` backport (pyquaternion, the one it
	# imports, is in the test extra)
	$(PY) -m pip install --quiet --no-deps cityscapesscripts==2.3.0
	touch $@

install: $(VENV)/.installed

# The main job in one `kedro run`; then DVC records that run as the @default stages of
# dvc.yaml (deps, params, outputs in dvc.lock), so `dvc status` sees them up to date.
DEFAULT_STAGES := synthetic@default ingestion@default training@default evaluation@default export@default

run: install
	$(VENV)/bin/kedro run
	$(VENV)/bin/dvc commit --force --quiet $(DEFAULT_STAGES)

test: install
	$(PY) -m pytest

lint: install
	$(PY) -m ruff check src tests benchmarks
