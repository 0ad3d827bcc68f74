# Set-up and routine tasks. Every target creates .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest

test-fast: venv
	$(BIN)/python -m pytest -m "not slow"

demo: venv
	$(BIN)/biopsy demo --out demo-output

bench: venv
	$(BIN)/python benchmarks/segment.py --quick --parts --rss-check --repeat 3
	$(BIN)/python benchmarks/segment_outputs.py --size-px 16000
	$(BIN)/python benchmarks/probability_map.py --size-px 8000
	$(BIN)/python benchmarks/subpixel.py
	$(BIN)/python benchmarks/scoring.py
	$(BIN)/python benchmarks/stability.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
