# Two commands for a fresh machine: `make run` and `make test`.
# Each installs what it needs into .venv from the pinned requirements.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8080

.PHONY: run run-firestore test lint bench bench-firestore bench-storm bench-idle clean

$(BIN)/gunicorn: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(BIN)/pytest: requirements-dev.txt $(BIN)/gunicorn
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

# The Firestore emulator the tests start (npm package, pinned by package-lock.json).
EMULATOR := tests/emulator/node_modules/.package-lock.json
$(EMULATOR): tests/emulator/package-lock.json
	npm ci --prefix tests/emulator --no-audit --no-fund --loglevel=error
	touch $@

## Run the service on the embedded in-memory store with the demo data.
run: $(BIN)/gunicorn
	CANARY_STORE=memory CANARY_SEED=demo/seed.json CANARY_DEV_API=1 PORT=$(PORT) \
		$(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

## Run the service on Firestore: FIRESTORE_EMULATOR_HOST's emulator, or the bundled one
## started here on port 8681, with the demo data.
run-firestore: $(BIN)/gunicorn $(EMULATOR)
	@if [ -z "$$FIRESTORE_EMULATOR_HOST" ]; then \
		node tests/emulator/start.js 8681 & trap "kill $$!" EXIT; \
		export FIRESTORE_EMULATOR_HOST=127.0.0.1:8681; \
		for _ in $$(seq 100); do (: > /dev/tcp/127.0.0.1/8681) 2>/dev/null && break; sleep 0.1; done; \
	fi; \
	CANARY_STORE=firestore CANARY_SEED=demo/seed.json CANARY_DEV_API=1 PORT=$(PORT) \
		$(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

## Lint, then the whole test suite (on the memory store and on the Firestore emulator).
test: $(BIN)/pytest $(EMULATOR)
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: $(BIN)/pytest
	$(BIN)/ruff check .

## Benchmarks (not part of the tests): print figures for this machine (docs/benchmarks.md).
## bench: memory, fan-out and ping CPU against the floor (fanout.py), then other clients during a flood (flood.py).
bench: $(BIN)/pytest
	$(BIN)/python bench/fanout.py
	$(BIN)/python bench/flood.py

## bench-firestore: latencies through Firestore, and 1/100/1000 images watched by one process.
bench-firestore: $(BIN)/pytest $(EMULATOR)
	$(BIN)/python bench/firestore_latency.py

## bench-storm: 1000 members joining one session at once, then leaving (Firestore behind the proxy, memory).
bench-storm: $(BIN)/pytest $(EMULATOR)
	$(BIN)/python bench/storm.py

## bench-idle: 10,000 idle clients on one worker (memory store): RSS, and CPU with keepalives and pings running.
bench-idle: $(BIN)/pytest
	$(BIN)/python bench/idle.py

clean:
	rm -rf $(VENV) tests/emulator/node_modules
