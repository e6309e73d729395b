# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: demo test test-all check install install-test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

# torch first, from the CPU wheel pip finds for exactly 2.13.0; the constraints file then keeps MONAI from pulling a
# CUDA build. dynamic_network_architectures goes in without its dependencies (timm/torchvision are not needed for the
# U-Nets and have no CPU build here); so do nnU-Net v2 and its torch-based helpers (their other dependencies are in the
# test extra; versions in constraints/test.txt). The federated extra (Flower and its Ray-based simulation runtime)
# serves tests/test_federated.py.
$(VENV)/.installed-test: $(VENV)/.installed constraints/test.txt
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints/test.txt -e '.[test,federated]'
	$(PIP) install -q -c constraints/test.txt --no-deps dynamic_network_architectures==0.4.4
	$(PIP) install -q -c constraints/test.txt --no-deps nnunetv2 acvl-utils batchgenerators batchgeneratorsv2
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/medseg demo --out runs/demo

# Tests run in TEST_WORKERS processes (pytest-xdist; work stealing keeps both cores busy to the end).
TEST_WORKERS ?= 2

# The house first (CONTRIBUTING.md): lint, and imports that point down (import-linter's layers contract).
check: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-logo --no-cache

test: check
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=20 -m "not slow" tests

test-all: check
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

clean:
	rm -rf $(VENV) runs .pytest_cache
