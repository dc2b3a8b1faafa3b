# Two entry points: `make run` (main job) and `make test` (whole suite).
# TORCH_SPEC pins the CPU wheel this project is developed with; the package itself
# only requires torch>=2.1, so override it freely: make test TORCH_SPEC='torch>=2.1'
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install bench docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python scripts/width_sweep.py --out results/width_sweep

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_empirical.py --out results/benchmarks

# The documentation site (mkdocs-material, API reference by mkdocstrings) into site/;
# --strict turns every warning, including docstrings griffe cannot read, into a failure.
DOCS_STAMP := $(VENV)/.installed-docs

$(DOCS_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) results build *.egg-info
