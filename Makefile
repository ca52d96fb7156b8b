# Two commands on a fresh machine: `make run` (the service) and `make test` (the whole suite).
# Each builds .venv on first use. TORCH_SPEC picks the torch build: the CPU wheel by default;
# on a CUDA host, e.g. `make run TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: install run test fuzz demo openapi bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m service

demo: install
	$(PY) -m engine demo

openapi: install
	$(PY) -m service.openapi

test: install
	$(PY) -m pytest -q

# The long fuzz run: FUZZ_EXAMPLES generated cases per operation (CI runs 50).
FUZZ_EXAMPLES ?= 1000
fuzz: install
	ATTN_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -s tests/test_service_fuzz.py

clean:
	rm -rf $(VENV)
