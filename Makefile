# The project's commands; the one place that lists the backends and the test
# folders each runs. `make test` is what CI (.ci/run) runs.
#
#   make test    the whole suite on TensorFlow, the layer's suite on JAX and torch
#   make docs    the documentation site, built strictly (a warning is an error)
#   make lint    ruff check and ruff format --check
#
# The first target run creates .venv with the dev extra and $(TORCH); on a
# machine without a GPU, `make TORCH=torch==2.13.0+cpu test` (or any CPU-only
# build your index has) skips several GB of CUDA libraries.

VENV ?= .venv
# The torch requirement installed for the torch backend's tests.
TORCH ?= torch
PYTHON := $(VENV)/bin/python
# pytest-xdist workers per backend; "auto" is one per CPU core.
WORKERS ?= auto
PYTEST := $(PYTHON) -m pytest -q -n $(WORKERS)

.PHONY: test test-tensorflow test-jax test-torch docs lint

test: test-tensorflow test-jax test-torch

test-tensorflow: $(VENV)/.installed
	KERAS_BACKEND=tensorflow $(PYTEST) tests

test-jax: $(VENV)/.installed
	KERAS_BACKEND=jax $(PYTEST) tests/bn_keras

test-torch: $(VENV)/.installed
	KERAS_BACKEND=torch $(PYTEST) tests/bn_keras

# NO_MKDOCS_2_WARNING: mkdocs-material's banner about MkDocs 2, not a warning
# about these docs (real warnings still fail the strict build).
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

$(VENV)/.installed: pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e ".[dev]" "$(TORCH)"
	touch $@
