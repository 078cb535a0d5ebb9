# make demo   - bring up the bookinfo local cluster and call it (installs what it needs first)
# make test   - every test, unit and integration (root), installing what it needs first
# make lint   - ruff, mypy and the import contract
# make bench  - the latency and cost comparison (bench/README.md); make bench-quick: under 5 minutes
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
MESHCTL := $(VENV)/bin/meshctl
# make test runs the test files on this many pytest workers (pytest-xdist); a file's tests stay on one worker,
# so a module's cluster is built once. TEST_WORKERS=0 runs everything in this one process.
TEST_WORKERS ?= 2
TEST_FLAGS = -q -ra -n $(TEST_WORKERS) --dist loadfile
SITE = $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

.PHONY: all setup system venv demo test test-unit test-integration lint bench bench-quick clean

all: test

setup: system venv

system:
	@bash scripts/setup-system.sh

# The venv uses Debian's Python so that bcc (python3-bpfcc, from Debian) can be linked into it.
$(VENV)/.stamp-deps: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: system $(VENV)/.stamp-deps
	@if [ -d /usr/lib/python3/dist-packages/bcc ] && [ ! -e "$(SITE)/bcc" ]; then \
	    ln -s /usr/lib/python3/dist-packages/bcc "$(SITE)/bcc"; fi

demo: setup
	@$(PY) -m examples.bookinfo.demo

test: setup
	@$(PY) -m pytest $(TEST_FLAGS) tests

test-unit: setup
	@$(PY) -m pytest $(TEST_FLAGS) tests --ignore=tests/integration

test-integration: setup
	@$(PY) -m pytest $(TEST_FLAGS) tests/integration

# The import contract (docs/ARCHITECTURE.md, 'Allowed imports') is a test: it fails on a forbidden import.
lint: setup
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/mypy mesh controlplane ca nodeagent waypoint bpf meshctl localcluster bench examples
	@$(PY) -m pytest -q -p no:cacheprovider tests/unit/test_layers.py

bench: setup
	@$(MESHCTL) bench

bench-quick: setup
	@$(MESHCTL) bench --quick

clean:
	rm -rf $(VENV) build *.egg-info
