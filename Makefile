# Two commands for a newcomer: `make run` (set up, then fit and serve the model in models/) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL ?= models/code-qwen3-30m
BUDGET ?= auto
PORT ?= 8000

# MLX's Linux CPU wheel has the reference BLAS; scripts/fast-blas puts OpenBLAS beside the venv and
# FAST preloads it for the matmul-heavy commands (the profile's self-Fisher pass, evaluation, tests).
# Empty where it is absent.
# (A shell test, not $(wildcard): make caches directory listings, and setup creates the file mid-run.)
BLAS_DIR := $(CURDIR)/$(VENV)/fastblas/usr/lib/x86_64-linux-gnu
BLAS_LIB := $(BLAS_DIR)/openblas-pthread/libblas.so.3
FAST = $(shell test -e $(BLAS_LIB) && echo LD_LIBRARY_PATH=$(BLAS_DIR):$(BLAS_DIR)/openblas-pthread LD_PRELOAD=$(BLAS_LIB))

.PHONY: setup run test lint bench quality clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,lint]'
	scripts/fast-blas $(VENV)/fastblas
	touch $@

setup: $(VENV)/.installed

run: setup
	$(FAST) $(VENV)/bin/ramserve run $(MODEL) --budget $(BUDGET) --port $(PORT)

test: setup
	$(FAST) $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check ramserve tests bench
	$(VENV)/bin/ruff format --check ramserve tests bench
	$(VENV)/bin/mypy ramserve

bench: setup
	$(FAST) $(PY) bench/analyze.py && $(PY) bench/allocate.py && $(PY) bench/quantize.py
	$(FAST) $(PY) bench/budget.py && $(FAST) $(PY) bench/serve.py && $(FAST) $(PY) bench/load.py
	$(FAST) $(PY) bench/quality.py && $(FAST) $(PY) bench/split_analysis.py

quality: setup
	$(FAST) $(PY) bench/quality.py

clean:
	rm -rf $(VENV) .pytest_cache
