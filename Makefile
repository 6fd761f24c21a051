# Two commands for a newcomer: `make run` (set up, then fit and serve the shared model) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL ?= ../shared/models/code-qwen3-30m
BUDGET ?= auto
PORT ?= 8000

.PHONY: setup run test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,lint]'
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

clean:
	rm -rf $(VENV) .pytest_cache
