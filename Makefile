# fleetfl: `make demo` and `make test` work from a fresh clone (they create .venv/ themselves).
#
# Installs are locked: locks/<extra>-<arch>.txt pins every package with its hashes, one file per
# install path (coordinator, dev, device) and platform (x86_64, aarch64), for CPython 3.11.
# `make lock` re-resolves them with uv; `make test-latest` runs the suite on the newest versions
# pyproject.toml allows, so drift shows up as a known failure before the locks move.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
ARCH := $(shell uname -m)
LOCKS := locks
ARCHES := x86_64 aarch64
UV_VERSION := 0.13.9
# CPU-only torch, pinned and installed first so no resolver ever pulls a CUDA build. On x86_64
# the locks pin the CPU build (2.13.0+cpu), which pip finds in a find-links directory or
# PyTorch's CPU wheel index; on aarch64 PyPI's torch (<2.11) is the CPU build.
TORCH_PIN := torch==2.13.0
TORCH_FIRST := $(if $(filter x86_64,$(ARCH)),$(PIP) install -q $(TORCH_PIN),@true)
LATEST_VENV := .venv-latest

.PHONY: demo test test-latest lint install install-dev lock check-arch clean pi-check ray-check service-check

$(PY):
	$(PYTHON) -m venv $(VENV)

check-arch:
	@test -f $(LOCKS)/dev-$(ARCH).txt || { echo "fleetfl: no lock for $(ARCH) (locks exist \
	for: $(ARCHES)); install unlocked with: pip install -e '.[dev]'" >&2; exit 2; }

# torch first (pip), then uv installs the lock: --require-hashes, so every package,
# dependencies included, must match the lock's hash (uv: ~10 s here, pip: ~100 s).
UV_INSTALL := $(VENV)/bin/uv pip install --quiet --python $(PY)
$(VENV)/.uv: | $(PY)
	$(PIP) install -q uv==$(UV_VERSION)
	touch $@

$(VENV)/.installed: pyproject.toml $(LOCKS)/coordinator-$(ARCH).txt | check-arch $(VENV)/.uv
	$(TORCH_FIRST)
	$(UV_INSTALL) --require-hashes -r $(LOCKS)/coordinator-$(ARCH).txt
	$(UV_INSTALL) --no-deps -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(LOCKS)/dev-$(ARCH).txt | check-arch $(VENV)/.uv
	$(TORCH_FIRST)
	$(UV_INSTALL) --require-hashes -r $(LOCKS)/dev-$(ARCH).txt
	$(UV_INSTALL) --no-deps -e .
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/fleetfl simulate --out runs/demo

lint: install-dev
	$(VENV)/bin/ruff check .

test: install-dev
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=15

# A device on aarch64 under qemu-user: an arm64 Debian root, the locked [device] install, and a
# client joining a coordinator on 127.0.0.1 for 2 rounds (root, qemu-user-static, debootstrap;
# slow: see BENCHMARKS.md). It prints one JSON line; tests/test_pi_check.py reruns the client
# part once the root exists.
pi-check: install-dev
	bash scripts/pi_check.sh

# The coordinator service for real: SuperLink, 3 devices over TLS, a device killed, the
# coordinator crashed and resumed (about 2.5-4 min; CI runs it after `make test`).
service-check: install-dev
	FLEETFL_SERVICE_E2E=1 $(PY) -m pytest -q tests/test_service_e2e.py

# The Ray scenarios: a simulation on two Ray nodes started on 127.0.0.1, and the local engine
# against Ray on the full stack (about 2.5 min; CI runs it after `make test`).
ray-check: install-dev
	FLEETFL_RAY_CLUSTER=1 $(PY) -m pytest -q -k ray tests/test_ray_cluster.py tests/test_engines_e2e.py

# The newest versions pyproject.toml allows, in a venv of their own (the locked .venv stays).
test-latest:
	$(PYTHON) -m venv $(LATEST_VENV)
	$(if $(filter x86_64,$(ARCH)),$(LATEST_VENV)/bin/pip install -q $(TORCH_PIN),@true)
	$(LATEST_VENV)/bin/pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST_VENV)/bin/pip list --format freeze > $(LATEST_VENV)/versions.txt
	$(LATEST_VENV)/bin/ruff check .
	$(LATEST_VENV)/bin/python -m pytest -q

# Re-resolve every lock with uv (dev first; the others are constrained to its versions so
# that one venv can hold any two of them). PIP_FIND_LINKS, if set, is where the CPU torch
# wheel for x86_64 is found.
lock: | $(VENV)/.uv
	mkdir -p $(LOCKS)
	set -e; for arch in $(ARCHES); do \
	  opts="--python-version 3.11 --python-platform $$arch-manylinux_2_28 --generate-hashes \
	    --custom-compile-command 'make lock' --quiet -c $(LOCKS)/constraints.txt $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))"; \
	  eval $(VENV)/bin/uv pip compile pyproject.toml --extra dev $$opts -o $(LOCKS)/dev-$$arch.txt; \
	  eval $(VENV)/bin/uv pip compile pyproject.toml --extra coordinator $$opts \
	    -c $(LOCKS)/dev-$$arch.txt -o $(LOCKS)/coordinator-$$arch.txt; \
	  eval $(VENV)/bin/uv pip compile pyproject.toml --extra device $$opts \
	    -c $(LOCKS)/dev-$$arch.txt -o $(LOCKS)/device-$$arch.txt; \
	done

clean:
	rm -rf $(VENV) $(LATEST_VENV) runs .pytest_cache .ruff_cache
