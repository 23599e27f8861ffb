# Two entry points for a fresh machine: `make run` (dev agent) and `make test` (whole suite).
# Each creates its own virtualenv in .venv and installs the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test demo demo-ui bench bench-density bench-cluster lint clean

$(STAMP): pyproject.toml setup.py nomad_client/client/drivers/supervise.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/nomad-client agent -dev

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# The web UI served by a task over HTTPS through its Task API socket; prints the URL and
# the management token, runs until Ctrl-C.
demo-ui: $(STAMP)
	$(BIN)/python scripts/demo_ui.py

bench: $(STAMP)
	$(BIN)/python bench/taskapi_bench.py

# Task density; e.g. `make bench-density DENSITY_ARGS="--tasks 1000 --driver exec"`.
DENSITY_ARGS ?=
bench-density: $(STAMP)
	$(BIN)/python bench/density_bench.py $(DENSITY_ARGS)

# Cluster mode: 3 etcd, 2 servers, 3 clients beside an embedded agent; e.g.
# `make bench-cluster CLUSTER_ARGS="--count 100 --rounds 3"`.
CLUSTER_ARGS ?=
bench-cluster: $(STAMP)
	$(BIN)/python bench/cluster_bench.py $(CLUSTER_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check nomad_client tests bench scripts
	$(BIN)/mypy nomad_client

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
