# Two commands for a fresh machine: `make run` and `make test`.
# Each installs what it needs into .venv from the pinned requirements.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8080
# More pytest arguments for `make test` and `make test-firestore`, e.g. PYTEST_ARGS=tests/test_demo.py or
# PYTEST_ARGS='-k hostile -x'.
PYTEST_ARGS ?=

.PHONY: run run-firestore demo tools test test-firestore lint bench bench-firestore bench-storm bench-storm-deployment \
	bench-idle clean

$(BIN)/gunicorn: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(BIN)/pytest: requirements-dev.txt $(BIN)/gunicorn
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

# The Firestore emulators (tests/emulators.py chooses): Google's Cloud Firestore emulator where it is installed
# (gcloud's cloud-firestore-emulator component, Java), else this npm package, pinned by package-lock.json
# (CANARY_TEST_EMULATOR=npm forces it). The tests' header line "firestore emulator:" says which one ran.
EMULATOR := tests/emulator/node_modules/.package-lock.json
$(EMULATOR): tests/emulator/package-lock.json
	npm ci --prefix tests/emulator --no-audit --no-fund --loglevel=error
	touch $@

## Run the service on the embedded in-memory store with the demo data.
run: $(BIN)/gunicorn
	CANARY_STORE=memory CANARY_SEED=demo/seed.json CANARY_DEV_API=1 PORT=$(PORT) \
		$(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

## Run the service on Firestore: FIRESTORE_EMULATOR_HOST's emulator, or one started here on port 8681 (Google's
## where installed, else the npm one: tests/emulators.py), with the demo data.
run-firestore: $(BIN)/gunicorn
	@if [ -z "$$FIRESTORE_EMULATOR_HOST" ]; then \
		kind=$$($(BIN)/python tests/emulators.py kind) || exit 2; \
		if [ "$$kind" = npm ]; then $(MAKE) -s --no-print-directory $(EMULATOR) || exit 2; fi; \
		echo "run-firestore: starting the $$kind Firestore emulator on 127.0.0.1:8681"; \
		$(BIN)/python tests/emulators.py exec 8681 & emulator=$$!; trap "kill $$emulator" EXIT; \
		$(BIN)/python tests/emulators.py ready 8681 $$emulator || exit 1; \
		export FIRESTORE_EMULATOR_HOST=127.0.0.1:8681; \
	fi; \
	CANARY_STORE=firestore CANARY_SEED=demo/seed.json CANARY_DEV_API=1 PORT=$(PORT) \
		$(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

## The README's walk-through against `make run` (or `make run-firestore`) on PORT, started in another terminal.
demo: $(BIN)/gunicorn
	$(BIN)/python demo/walkthrough.py http://127.0.0.1:$(PORT)

## The development tools alone (pytest, ruff, wsdump: requirements-dev.txt), without running anything.
tools: $(BIN)/pytest

## Lint, then the whole test suite (on the memory store and on the Firestore emulator: Google's where installed,
## else the npm one, which is installed here all the same for the tests of its launcher).
test: $(BIN)/pytest $(EMULATOR)
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

## Only the tests that run on a Firestore emulator: every behavioural test's Firestore case (its id starts with
## "[firestore", the store_kind fixture's parameter) and the modules that exist only for Firestore.
FIRESTORE_TESTS := [firestore or test_firestore.py or test_firestore_listen.py or test_processes.py \
	or test_cross_process.py or test_emulator.py or test_grpc_proxy.py
test-firestore: $(BIN)/pytest $(EMULATOR)
	$(BIN)/pytest -k '$(FIRESTORE_TESTS)' $(PYTEST_ARGS)

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

## bench-storm: 1000 members joining one session at once, then leaving (Firestore behind the proxy, memory);
## then bench-storm-deployment's benchmark.
bench-storm: $(BIN)/pytest $(EMULATOR)
	$(BIN)/python bench/storm.py
	$(BIN)/python bench/storm_deployment.py

## bench-storm-deployment: one session over four processes (issue 15): 1000 joins alternately to 2 instances of
## 2 workers (WEB_CONCURRENCY=2) on the Firestore emulator behind the 100-stream proxy, then all leave, then 100
## members churning for 60 s (bench/storm_deployment.py; `RUNS=3` for the medians of 3).
RUNS ?= 1
bench-storm-deployment: $(BIN)/pytest $(EMULATOR)
	$(BIN)/python bench/storm_deployment.py --runs $(RUNS)

## bench-idle: 10,000 idle clients on one worker (memory store): RSS, and CPU with keepalives and pings running.
bench-idle: $(BIN)/pytest
	$(BIN)/python bench/idle.py

clean:
	rm -rf $(VENV) tests/emulator/node_modules
