# Everything a fresh machine needs: `make test` and `make demo` build .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
FMNIST_DIR := /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=

.PHONY: venv data test-quick test test-all demo docs bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install $(TORCH_PINS)
	$(PY) -m pip install -e ".[test,detection]"
	touch $@

venv: $(VENV)/.installed

# Fashion-MNIST is Debian's dataset-fashion-mnist; install it when we may (root), else the
# library falls back to data.root=... or torchvision's download.
data:
	@if [ ! -d $(FMNIST_DIR) ] && [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) \
		|| echo "warning: could not apt-get install dataset-fashion-mnist"; fi

# Test tiers: test-quick is the edit loop (unit tests only), test is what CI runs (unit + integration),
# test-all adds the slow end-to-end runs.
test-quick: venv
	$(PY) -m pytest -m "not slow and not integration" $(PYTEST_ARGS)

test: venv data
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: venv data
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

demo: venv data
	$(VENV)/bin/diffkd demo

# The documentation site (MkDocs, Material theme, mkdocstrings for the API reference), built with --strict so a
# broken link or reference fails; the tables are rendered from benchmarks/results first and must be current.
$(VENV)/.docs-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -e ".[docs]"
	touch $@

docs: $(VENV)/.docs-installed
	$(PY) benchmarks/render.py --check
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
