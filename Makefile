PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint clean

# Re-installs only when pyproject.toml changes, so both targets are idempotent and fast the second time.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,ray]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lmforge run --config recipes/demo.yaml

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest

# Whole recipes end to end (one per model family x objective), minutes each on 2 cores.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -rA --durations=10

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf runs .pytest_cache
