# fleetfl: `make demo` and `make test` work from a fresh clone (they create .venv/ themselves).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# CPU-only torch, pinned and installed first so no resolver ever pulls a CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: demo test lint install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[coordinator]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[dev]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/fleetfl simulate --out runs/demo

lint: install-dev
	$(VENV)/bin/ruff check .

test: install-dev
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
