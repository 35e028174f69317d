# Two commands do all the set-up: `make demo` and `make test` create .venv and install what is missing.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
EXTRAS := $(VENV)/.extras-installed

.PHONY: demo test lint

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $(STAMP)

$(EXTRAS): $(STAMP) requirements-extras.txt
	$(VENV)/bin/pip install --quiet -r requirements-extras.txt
	touch $(EXTRAS)

demo: $(STAMP)
	$(VENV)/bin/python train.py --config configs/demo.json

test: $(EXTRAS)
	$(VENV)/bin/python -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
