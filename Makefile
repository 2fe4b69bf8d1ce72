# Two entry points: `make run` (the main job on the embedded default) and `make test`.
# Both create .venv if it is absent and install from the pinned constraints.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1
export PREFECT_HOME ?= $(abspath .prefect)
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: run test install install-dev init clean stack stack-down

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Run-time state that git ignores: the DVC remote folder, MLflow's SQLite store, Prefect's home.
init: $(VENV)/.installed
	@[ -d .dvc ] || $(BIN)/dvc init -q
	@mkdir -p .dvc-remote .prefect .distillery
	@$(BIN)/python -c "from distillery.core.tracking import init_mlflow; init_mlflow()"

run: init
	$(BIN)/distillery run pqd
	$(BIN)/dvc push -q

test: install-dev
	$(BIN)/python -m pytest

# The team stack on this machine, all on 127.0.0.1 (flows/stack.py): an MLflow server, a Prefect server and a
# process worker on the project's work pool, state and logs in .stack/. Ports: MLFLOW_PORT=5000 PREFECT_PORT=4200.
stack: $(VENV)/.installed
	@$(BIN)/python -m flows.stack up

stack-down:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m flows.stack down; fi

clean: stack-down
	rm -rf .distillery .prefect mlflow.db mlartifacts .dvc-remote .stack
