# Two commands for a fresh clone: `make train` and `make test`.
# Both create .venv with the project installed on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

.PHONY: install train test
install: $(VENV)/.installed

train: $(VENV)/.installed
	$(PY) train_main.py --backbone=inceptionv3 --unfreeze_at=5 $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --maxprocesses=4 tests
