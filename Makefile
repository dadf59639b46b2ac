# Two commands do everything on a fresh machine (see README):
#   make demo   -- create .venv, install pathdb, search the bundled toy model, print the results
#   make test   -- create .venv if needed, run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build of torch; on this machine kind pip takes a local wheel. GPU users: see README.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.pathdb-installed
DB     ?= pathdb.duckdb

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pathdb search --db $(DB) --run-name demo --replace
	$(BIN)/pathdb query paths demo --db $(DB) --top 10
	$(BIN)/pathdb query signed demo --db $(DB) --top 8

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check pathdb search cli migrations tests benchmarks examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
