# Set-up is idempotent: `make test` / `make demo` create .venv when missing, reuse an installed
# torch (the venv sees the system site-packages when the system python already has torch), and
# otherwise install torch==2.13.0 first (on this machine pip resolves it to the local CPU wheel),
# so the project install never pulls the CUDA packages on a machine without CUDA.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test bench bench-full lint clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "reusing the installed torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m mapconnet.demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m pytest bench -q --benchmark-only --benchmark-json=bench/results/cpu-quick.json -m "not full"
	$(PY) -m bench.report

bench-full: $(STAMP)
	$(PY) -m pytest bench -q --benchmark-only --benchmark-json=bench/results/cpu-full.json
	$(PY) -m bench.report

lint: $(STAMP)
	$(PY) -m pip install -q "ruff==0.17.6"
	$(PY) -m ruff check kernels mapconnet bench tests train.py evaluate.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
