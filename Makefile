PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-slow lint clean

# Re-installs only when pyproject.toml changes, so every target is idempotent and fast the second time.
# The demo needs the core dependencies only; tests add the dev extras (peers for parity tests and
# benchmarks, ray for the Ray executor's test).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,ray]'
	touch $(DEV_STAMP)

demo: $(STAMP)
	$(BIN)/lmforge run --config recipes/demo.yaml

test: $(DEV_STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest

# Whole recipes end to end (one per model family x objective), minutes each on 2 cores.
test-slow: $(DEV_STAMP)
	$(BIN)/python -m pytest -m slow -rA --durations=10

lint: $(DEV_STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf runs .pytest_cache
