# Two commands for a fresh machine: `make run` and `make test`.
# Each installs what it needs into .venv from the pinned requirements.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8080

.PHONY: run test lint bench clean

$(BIN)/gunicorn: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(BIN)/pytest: requirements-dev.txt $(BIN)/gunicorn
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

## Run the service on the embedded in-memory store with the demo data.
run: $(BIN)/gunicorn
	CANARY_STORE=memory CANARY_SEED=demo/seed.json CANARY_DEV_API=1 PORT=$(PORT) \
		$(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

## Lint, then the whole test suite.
test: $(BIN)/pytest
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: $(BIN)/pytest
	$(BIN)/ruff check .

## Benchmarks (not part of the tests): prints figures for this machine.
bench: $(BIN)/pytest
	$(BIN)/python bench/fanout.py

clean:
	rm -rf $(VENV)
