# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean bench notebooks notebooks-sync

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m manymodels.demo

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -x --durations=15

lint: $(STAMP)
	$(BIN)/ruff check manymodels tests benchmarks
	$(BIN)/mypy

# Open the notebooks in Jupyter (installs the `notebooks` extra once). Each .ipynb is paired
# with a .py (jupytext percent format): edit either, then `make notebooks-sync`.
$(VENV)/.notebooks: $(STAMP)
	$(BIN)/pip install -q -e ".[test,dev,notebooks]"
	touch $@

notebooks: $(VENV)/.notebooks
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/jupyter notebook notebooks/

notebooks-sync: $(STAMP)
	$(BIN)/jupytext --sync notebooks/*.py
	$(BIN)/jupyter nbconvert --clear-output --inplace notebooks/*.ipynb

bench: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/train.py

clean:
	rm -rf $(VENV) runs bundles mlruns.db mlartifacts .pytest_cache test-artifacts notebooks/notebook_out
