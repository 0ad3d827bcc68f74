# Set-up and routine tasks. Every target creates .venv on first use: `demo` with what the package
# needs to run, `test` and `bench` with the dev extras too.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
# TIAToolbox, a benchmark peer, in its own environment (it pins older torch; benchmarks/segment.py)
TIA_VENV := .venv-tia
TIA_PYTHON := $(wildcard $(TIA_VENV)/bin/python)

.PHONY: venv test test-fast demo bench tia-venv clean

venv: $(DEV_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(DEV_STAMP)

test: venv
	$(BIN)/python -m pytest

test-fast: venv
	$(BIN)/python -m pytest -m "not slow"

demo: $(STAMP)
	$(BIN)/biopsy demo --out demo-output

bench: venv
	$(BIN)/python benchmarks/segment.py --quick --parts --rss-check --repeat 3 \
		$(if $(TIA_PYTHON),--tia-python $(TIA_PYTHON))
	$(BIN)/python benchmarks/segment_outputs.py --size-px 16000
	$(BIN)/python benchmarks/probability_map.py --size-px 8000
	$(BIN)/python benchmarks/subpixel.py
	$(BIN)/python benchmarks/scoring.py
	$(BIN)/python benchmarks/stability.py
	$(BIN)/python benchmarks/compare_calibration.py

tia-venv: venv
	test -x $(TIA_VENV)/bin/python || $(PYTHON) -m venv $(TIA_VENV)
	$(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))' \
		> $$($(TIA_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/main.pth
	$(BIN)/python -m pip freeze --exclude-editable > $(TIA_VENV)/constraints.txt
	$(TIA_VENV)/bin/pip install --quiet --no-deps tiatoolbox==2.1.3
	$(TIA_VENV)/bin/pip install --quiet -c $(TIA_VENV)/constraints.txt aiohttp click dask \
		defusedxml joblib matplotlib numba pandas psutil scikit-learn zarr timm huggingface-hub \
		transformers umap-learn glymur simpleitk requests universal-pathlib

clean:
	rm -rf $(VENV) $(TIA_VENV) demo-output .pytest_cache
