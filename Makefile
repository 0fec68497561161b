# The README's two commands: `make demo` (set up + run the main job on the bundled atlas) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test benchmark atlas clean

$(BIN)/tumor-personalization: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

setup: $(BIN)/tumor-personalization

demo: setup
	$(BIN)/tumor-personalization demo --out-dir demo_output

test: setup
	$(BIN)/python -m pytest -q Testing

benchmark: setup
	$(BIN)/python benchmarks/solver.py

atlas: setup
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[atlas]"
	$(BIN)/python scripts/make_atlas.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
