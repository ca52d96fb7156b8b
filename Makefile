# Two commands on a fresh machine: `make run` (the service) and `make test` (the whole suite).
# Each builds .venv on first use. TORCH_SPEC picks the torch build: the CPU wheel by default;
# on a CUDA host, e.g. `make run TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
# The Triton that torch 2.13.0's CUDA build requires (its wheel's metadata on PyPI); `make lock`
# pins it, so that the tests' Triton is the one a GPU deployment runs.
TRITON_SPEC ?= triton==3.7.1
LOCK_VENV ?= /tmp/attention-service-lock

.PHONY: install run test fuzz demo openapi lock clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m engine build
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

# Re-pin constraints.txt: resolve the project's dependencies afresh in a scratch venv, newest
# releases within pyproject.toml's ranges. Review the diff and run `make test` before committing.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(LOCK_VENV)/bin/python -m pip install -q -e ".[dev]" "$(TRITON_SPEC)"
	{ grep '^#' constraints.txt; $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV)
