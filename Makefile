# Local development and CI entry points. Everything runs from this directory; run state lives in .run/.
#   make install   venv + Python deps (skipped while .venv is newer than pyproject.toml),
#                  PostgreSQL (apt), Kafka jars (Maven -> .run/kafka-jars), stripe-mock and kustomize (go -> .run/bin)
#   make test      install, ruff, mypy, then pytest (starts throwaway Kafka/Postgres/stripe-mock/mail sink)
#                  extra pytest arguments: make test PYTEST_ARGS="deploy -x"
#   make test-unit the tests that need no infrastructure (pytest -m "not infra"): seconds, no server
#   make typecheck mypy over kit/ and contracts/ (make typecheck TYPECHECK_PATHS="kit contracts services")
#   make run       install, then the whole stack (python -m deploy.run); Ctrl-C stops it
#   make lint      ruff
#   make bench     python -m bench (python -m bench --json FILE keeps every figure)
#   make chaos     python -m deploy.chaos: load + kill -9 of each service, Kafka and PostgreSQL, then a
#                  reconciliation (lost / doubled / inconsistent must be 0); make chaos CHAOS_ARGS="--duration 60"
#   make asyncapi  regenerate docs/asyncapi/*.json from the FastStream apps

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
TYPECHECK_PATHS ?= kit contracts

.PHONY: install deps test test-unit typecheck lint run bench clean-run asyncapi chaos

install: $(STAMP)
	@$(PY) -m deploy.install

$(STAMP): pyproject.toml
	@test -x $(PY) || { echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo "[install] pip install -e '.[dev,local]': about 200 Python packages (a few minutes the first time)"
	@mkdir -p .run && set -o pipefail && $(PY) -m pip install --disable-pip-version-check -e '.[dev,local]' 2>&1 \
	  | tee .run/pip.log | awk '/^Collecting /{n++; if (n % 10 == 1) {printf "[install] pip: %d packages resolved (%s)\n", n, $$2; fflush()}} \
	    /^Successfully installed/{print "[install] pip: installed " NF-2 " packages"; fflush()}' \
	  || { tail -30 .run/pip.log; echo "[install] pip failed: the whole log is in .run/pip.log"; exit 1; }
	@touch $(STAMP)

deps: $(STAMP)

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy $(TYPECHECK_PATHS)
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

# Unit tests only: a test is `infra` when it uses an infrastructure fixture (deploy/testing.py
# INFRA_FIXTURES) or is marked so; everything else runs here without Kafka, PostgreSQL or any server.
test-unit: $(STAMP)
	$(VENV)/bin/pytest -q -m "not infra" $(PYTEST_ARGS)

typecheck: $(STAMP)
	$(VENV)/bin/mypy $(TYPECHECK_PATHS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

run: install
	$(PY) -m deploy.run

bench: install
	$(PY) -m bench

# A bounded chaos run on its own loopback stack (python -m deploy.chaos --help): load, kill -9 of every
# service and of Kafka, PostgreSQL -m immediate, then reconciliation; exit 1 on anything lost or doubled.
chaos: install
	$(PY) -m deploy.chaos $(CHAOS_ARGS)

# AsyncAPI 3 documents of every service that declares `asyncapi_app` in its consumers.py.
asyncapi: $(STAMP)
	@mkdir -p docs/asyncapi
	@for svc in services/*/consumers.py; do \
	  name=$$(basename $$(dirname $$svc)); \
	  if grep -q "def asyncapi_app" $$svc; then \
	    $(VENV)/bin/faststream docs gen services.$$name.consumers:asyncapi_app --factory --out docs/asyncapi/$$name.json; \
	  fi; \
	done

# Forget local run state (databases, Kafka data, mail, logs); keeps the downloaded jars and binaries.
clean-run:
	rm -rf .run/pg .run/kafka .run/mail .run/logs .run/stripe-standin
