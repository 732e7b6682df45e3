# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# mkdocs 1.6 plugins print a banner about mkdocs 2 at every build; the build is unaffected
MKDOCS := NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true PYTHONPATH=$(CURDIR) $(BIN)/mkdocs

.PHONY: install demo test lint docs clean bench notebooks notebooks-sync

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
	$(BIN)/ruff check manymodels tests benchmarks docs
	$(BIN)/mypy
	PYTHONPATH=$(CURDIR) $(BIN)/lint-imports
	$(MKDOCS) build --strict --quiet --site-dir $(CURDIR)/site

# The documentation site (docs/, mkdocs.yml) into site/: open site/index.html. The reference
# pages are generated from the code at build time (docs/gen_reference.py); nothing is fetched.
docs: $(STAMP)
	$(MKDOCS) build --strict --site-dir $(CURDIR)/site

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
	rm -rf $(VENV) site runs bundles mlruns.db mlartifacts .pytest_cache test-artifacts notebooks/notebook_out
