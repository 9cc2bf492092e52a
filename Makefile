# Two commands for a fresh clone: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch 2.13.0 (CPU) is pinned by constraints.txt; a local wheel folder is used when the machine has one.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP_INSTALL := $(BIN)/python -m pip install -q -c constraints.txt $(FIND_LINKS)

.PHONY: demo test lint docs bench bench-gpu browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.lab-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP_INSTALL) -e '.[lab]'
	touch $@

$(VENV)/.dev-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP_INSTALL) -e '.[dev]'
	touch $@ $(VENV)/.lab-installed $(VENV)/.docs-installed

$(VENV)/.docs-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP_INSTALL) -e '.[docs]'
	touch $@

demo: $(VENV)/.lab-installed
	$(BIN)/python -m gradguard lab --quick

test: $(VENV)/.dev-installed browser
	$(BIN)/python -m pytest

# ruff on everything, mypy on src (configured in pyproject.toml: [tool.mypy]).
lint: $(VENV)/.dev-installed
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/mypy

# The documentation site, into site/, in strict mode: a broken link, page or API reference fails the build.
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(VENV)/.dev-installed
	$(BIN)/python benchmarks/bench_stats.py
	$(BIN)/python benchmarks/bench_guard.py

# One CUDA GPU, under 5 minutes; without CUDA it says so and exits 0. It needs a CUDA build of torch: where
# the venv's is a CPU build, point PYTHON_GPU at a Python that has one (`make bench-gpu PYTHON_GPU=python3`).
PYTHON_GPU ?= $(BIN)/python
bench-gpu: $(VENV)/.dev-installed
	$(PYTHON_GPU) benchmarks/bench_gpu.py

# Headless Chromium for the report's browser test; skipped (the test says why) where apt-get is missing.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed; the browser test will be skipped"; \
	else echo "no apt-get as root here; the browser test will be skipped"; fi

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache
