# Two commands for a newcomer: `make run` (set up, then fit and serve the shared model) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL ?= ../shared/models/code-qwen3-30m
BUDGET ?= auto
PORT ?= 8000

# MLX's Linux CPU wheel has the reference BLAS; scripts/fast-blas puts OpenBLAS beside the venv and
# FAST preloads it for the matmul-heavy commands (evaluation, benchmarks). Empty where it is absent.
BLAS_DIR := $(VENV)/fastblas/usr/lib/x86_64-linux-gnu
FAST = $(if $(wildcard $(BLAS_DIR)/openblas-pthread/libblas.so.3),LD_LIBRARY_PATH=$(BLAS_DIR):$(BLAS_DIR)/openblas-pthread LD_PRELOAD=$(BLAS_DIR)/openblas-pthread/libblas.so.3,)

.PHONY: setup run test lint bench quality clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,lint]'
	scripts/fast-blas $(VENV)/fastblas
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/ramserve run $(MODEL) --budget $(BUDGET) --port $(PORT)

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check ramserve tests bench
	$(VENV)/bin/ruff format --check ramserve tests bench
	$(VENV)/bin/mypy ramserve

bench: setup
	$(PY) bench/analyze.py && $(PY) bench/allocate.py && $(PY) bench/quantize.py
	$(PY) bench/budget.py && $(PY) bench/serve.py
	$(FAST) $(PY) bench/quality.py

quality: setup
	$(FAST) $(PY) bench/quality.py

clean:
	rm -rf $(VENV) .pytest_cache
