# Two commands do everything on a fresh machine (see README):
#   make demo   -- create .venv, install pathdb, search the bundled toy model, print the results
#   make test   -- create .venv if needed, run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build of torch; on this machine kind pip takes a local wheel. GPU users: see README.
TORCH  ?= torch==2.13.0
# The default TransformerLens major for .venv (the full suite's reference hooks build HookedTransformers,
# which TL 4 removed); pathdb itself accepts >=3.9,<5 and `make test-tl4` checks the 4.x route.
TL     ?= transformer-lens>=3.9,<4
STAMP  := $(VENV)/.pathdb-installed
DB     ?= pathdb.duckdb

.PHONY: demo test lint install clean test-tl4

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[dev]' "$(TL)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pathdb search --db $(DB) --run-name demo --replace
	$(BIN)/pathdb query paths demo --db $(DB) --top 10
	$(BIN)/pathdb query signed demo --db $(DB) --top 8

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The other TransformerLens major (4.x, TransformerBridge): a fresh second venv with TL 4 and pathdb
# (no deps re-resolved), then the bridge parity suite against the TL 3.9 venv above (see README).
VENV_TL4 ?= .venv-tl4
TL4      ?= transformer-lens==4.3.0
test-tl4: $(STAMP)
	rm -rf $(VENV_TL4)
	$(PYTHON) -m venv $(VENV_TL4)
	$(VENV_TL4)/bin/python -m pip install --quiet "$(TORCH)"
	$(VENV_TL4)/bin/python -m pip install --quiet "$(TL4)" pytest pytest-timeout hypothesis
	$(VENV_TL4)/bin/python -m pip install --quiet -e .
	$(VENV_TL4)/bin/python -c "import transformer_lens.model_bridge, importlib.metadata as m; v = m.version('transformer-lens'); assert v.startswith('4.'), v"
	PATHDB_REQUIRE_TL39=1 PATHDB_TL39_PYTHON=$(abspath $(BIN))/python $(VENV_TL4)/bin/python -m pytest -q -p no:cacheprovider tests/test_tl4_parity.py tests/test_hf_checkpoints.py

lint: $(STAMP)
	$(BIN)/ruff check pathdb search cli migrations tests benchmarks examples
	$(BIN)/ruff format --check pathdb search cli migrations tests benchmarks examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(VENV_TL4) .pytest_cache .mypy_cache .ruff_cache
