# tfmir developer entry points. `make demo` and `make test` work from a fresh clone:
# they create .venv when it is missing and install tfmir into it first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tfmir-installed
DEMO_DIR ?= demo_output
PYTEST_ARGS ?=

.PHONY: install demo test test-large benchmark clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tfmir demo --output_dir=$(DEMO_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

test-large: $(STAMP)
	$(BIN)/python -m pytest -m large $(PYTEST_ARGS)

benchmark: $(STAMP)
	$(BIN)/python benchmarks/embed_throughput.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) build dist *.egg-info .pytest_cache
