# The README's two commands: `make demo` (set up + run the main job on the bundled atlas) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-stock-slicer benchmark atlas clean

$(BIN)/tumor-personalization: pyproject.toml setup.py TumorPersonalizationLib/slicer_deps.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

setup: $(BIN)/tumor-personalization

demo: setup
	$(BIN)/tumor-personalization demo --out-dir demo_output

test: setup test-stock-slicer
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=15 Testing

# ---- the module as a stock 3D Slicer runs it (docs/slicer.md) -----------------------------------------------------
# Environments holding only what a Slicer release ships (its SuperBuild's numpy, scipy, SimpleITK; no matplotlib,
# tqdm, cma, dask, psutil) plus what the module's own dependency step installs. Slicer 5.6/5.8 embed Python 3.9,
# 5.10/5.12 Python 3.12. torch (from Slicer's PyTorch extension inside Slicer) is installed only where the CPU wheel
# is at hand: the Python of constraints.txt's build; a torch for 3.9 or 3.12 would be a multi-GB CUDA download. So the
# torch-free checks run on real 3.9 and 3.12 interpreters, and the full panel run on $(PYTHON) with Slicer 5.8's
# package set.
PYTHON39 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.9*/bin/python3.9) $(shell command -v python3.9))
PYTHON312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) $(shell command -v python3.12))
STOCK := .stock-slicer
SLICER58_PACKAGES := numpy==1.26.4 scipy==1.13.1 SimpleITK==2.3.1
SLICER510_PACKAGES := numpy==2.0.2 scipy==1.13.1 SimpleITK==2.5.2
STOCK_TESTS := Testing/stock_slicer

$(STOCK)/py39/bin/pytest:
	@test -n "$(PYTHON39)" || { echo "test-stock-slicer: no Python 3.9 interpreter found (set PYTHON39=...)"; exit 1; }
	$(PYTHON39) -m venv --clear $(STOCK)/py39
	$(STOCK)/py39/bin/python -m pip install --quiet --only-binary=:all: $(SLICER58_PACKAGES) pytest

$(STOCK)/py312/bin/pytest:
	@test -n "$(PYTHON312)" || { echo "test-stock-slicer: no Python 3.12 interpreter found (set PYTHON312=...)"; exit 1; }
	$(PYTHON312) -m venv --clear $(STOCK)/py312
	$(STOCK)/py312/bin/python -m pip install --quiet --only-binary=:all: $(SLICER510_PACKAGES) pytest

# Slicer 5.8's packages and torch, then the module's dependency step: what slicer_deps reports missing is installed
# with Slicer's numpy and SimpleITK pinned, as the module does inside Slicer (nothing else).
$(STOCK)/py-torch/done: constraints.txt TumorPersonalizationLib/slicer_deps.py
	$(PYTHON) -m venv --clear $(STOCK)/py-torch
	$(STOCK)/py-torch/bin/python -m pip install --quiet --only-binary=:all: -c constraints.txt $(SLICER58_PACKAGES) torch
	PYTHONPATH=. $(STOCK)/py-torch/bin/python -m TumorPersonalizationLib.slicer_deps constraints > $(STOCK)/py-torch/pins.txt
	PYTHONPATH=. $(STOCK)/py-torch/bin/python -m TumorPersonalizationLib.slicer_deps missing > $(STOCK)/py-torch/missing.txt
	test ! -s $(STOCK)/py-torch/missing.txt || $(STOCK)/py-torch/bin/python -m pip install --quiet \
		-c $(STOCK)/py-torch/pins.txt -r $(STOCK)/py-torch/missing.txt
	PYTHONPATH=. $(STOCK)/py-torch/bin/python -m TumorPersonalizationLib.slicer_deps torch
	touch $@

test-stock-slicer: setup $(STOCK)/py39/bin/pytest $(STOCK)/py312/bin/pytest $(STOCK)/py-torch/done
	PYTHONPATH=$(CURDIR) TUMORPERSONALIZATION_STOCK_SLICER=1 $(STOCK)/py39/bin/python -m pytest -q -p no:cacheprovider \
		$(STOCK_TESTS)/test_stock_python.py Testing/test_extension_index.py
	PYTHONPATH=$(CURDIR) TUMORPERSONALIZATION_STOCK_SLICER=1 $(STOCK)/py312/bin/python -m pytest -q -p no:cacheprovider \
		$(STOCK_TESTS)/test_stock_python.py Testing/test_extension_index.py
	TUMORPERSONALIZATION_STOCK_SLICER=1 STOCK_SLICER_PYTHON=$(CURDIR)/$(STOCK)/py-torch/bin/python \
		$(BIN)/python -m pytest -q $(STOCK_TESTS)/test_stock_panel_run.py

benchmark: setup
	$(BIN)/python benchmarks/solver.py

atlas: setup
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[atlas]"
	$(BIN)/python scripts/make_atlas.py

clean:
	rm -rf $(VENV) $(STOCK) demo_output .pytest_cache
