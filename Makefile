# Two entry points: `make run` (the main job, minutes) and `make test` (whole suite).
# `make run` installs the programs' extra (.[apps]), `make test` the developers' (.[dev]).
# TORCH_SPEC pins the CPU wheel this project is developed with; the package itself
# only requires torch>=2.1, so override it freely: make test TORCH_SPEC='torch>=2.1'
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: run full test install bench docs lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# One stamp per extra: a changed setup.cfg reinstalls.
$(VENV)/.installed-%: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[$*]"
	touch $@

install: $(VENV)/.installed-dev

# The main job: width sweep up to width 1024, its conclusions printed (summary.md).
run: $(VENV)/.installed-apps
	$(BIN)/ntk-torch sweep --out results/sweep

# The documented run of docs/width_sweep (widths up to 4096).
full: $(VENV)/.installed-apps
	$(BIN)/ntk-torch sweep --full --out results/sweep_full

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/bench_overhead.py --out results/benchmarks
	$(BIN)/python benchmarks/bench_empirical.py --out results/benchmarks

# The documentation site (mkdocs-material, API reference by mkdocstrings) into site/;
# --strict turns every warning, including docstrings griffe cannot read, into a failure.
docs: $(VENV)/.installed-docs
	$(BIN)/mkdocs build --strict --site-dir site

# pyflakes, isort, pycodestyle and Google docstrings on public names (pyproject.toml).
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) results build *.egg-info
