# Two entry points on a fresh machine: `make demo` and `make test`.
# Each creates its own virtual environment in .venv and pins the CPU build of torch there.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: demo test test-fast lint docs benchmark clean FORCE

# the torch requirement, rewritten only when it changes: another TORCH=... installs again
$(VENV)/.torch: FORCE
	@mkdir -p $(VENV)
	@echo "$(TORCH)" | cmp -s - $@ || echo "$(TORCH)" > $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[dev]"
	touch $@

demo: $(VENV)/.installed  ## train on pbmc68k, write demo_out/ (h5ad, plots, model, summary)
	$(PY) scripts/demo.py --out demo_out

test: $(VENV)/.installed  ## the whole suite, slow end-to-end checks included
	$(PY) -m pytest

test-fast: $(VENV)/.installed  ## the suite without the slow end-to-end checks
	$(PY) -m pytest -m "not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

docs: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[doc]"
	$(VENV)/bin/sphinx-build -W -b html docs docs/_build/html

clean:
	rm -rf $(VENV) demo_out docs/_build lightning_logs .pytest_cache
