# One command each on a fresh Debian machine: `make run` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= /var/lib/dataplane
export DATA_DIR

.PHONY: setup run test lint bench install clean

setup:
	@VENV=$(VENV) scripts/setup.sh

run: setup
	$(VENV)/bin/dataplane

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) scripts/bench/api.py
	$(PY) scripts/bench/images.py
	$(PY) scripts/bench/guest.py
	$(PY) scripts/bench/lifecycle.py
	$(PY) scripts/bench/agent.py
	$(PY) scripts/bench/events.py
	$(PY) scripts/bench/volumes.py
	$(PY) scripts/bench/network.py
	$(PY) scripts/bench/logs.py

# The venv in $(PREFIX)/venv, the systemd unit, and /etc/dataplane/env (see deploy/README.md).
install: setup
	@DATA_DIR=$(DATA_DIR) scripts/install.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info
