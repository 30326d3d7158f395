# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint proto proto-check bench clean mutation screenshots

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: this takes the local CPU wheel instead of gigabytes of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,ui]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xeno-fl simulate

test: $(STAMP)
	$(PY) -m pytest -q -n 2

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy common server client xeno

# A PNG of every tab of the desktop app from a freshly seeded demo (no display needed).
screenshots: $(STAMP)
	rm -rf data/ui-screenshots
	QT_QPA_PLATFORM=offscreen $(VENV)/bin/xeno-fl ui --demo --home data/ui-screenshots --user demo --screenshot docs/ui

# Deliberate one-line bugs (scripts/mutation.py): each must make its tests fail. Not in `make test`.
mutation: $(STAMP)
	$(PY) scripts/mutation.py

proto: $(STAMP)
	$(PY) scripts/gen_proto.py

proto-check: $(STAMP)
	$(PY) scripts/gen_proto.py --check

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
