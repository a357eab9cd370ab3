# Two commands do all set-up on a fresh machine:
#   make run   - install what the service needs and run it embedded (no servers needed)
#   make test  - install and start every real server the tests need, run the whole suite
SHELL := /bin/bash
.DEFAULT_GOAL := help
export INGEST_RUN_DIR ?= /tmp/ingest-test-run
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
PYTEST_ARGS ?=

.PHONY: help
help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

.PHONY: uv
uv:
	@command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet uv

.PHONY: install
install: uv ## Install the project and its dev tools into .venv (from uv.lock)
	uv sync --frozen

.PHONY: run
run: uv ## Run the service embedded on :8080 (inbox ./data/inbox/<tenant>/, webhooks)
	uv sync --frozen --no-dev --inexact
	uv run --frozen --no-dev ingest run

.PHONY: services-up
services-up: install ## Install and start every test server (Postgres, Redis, Kafka, Neo4j, Typesense, SeaweedFS, sshd)
	scripts/services/up.sh

.PHONY: services-down
services-down: ## Stop the test servers
	scripts/services/down.sh

.PHONY: test
test: install ## Start all test servers, run unit + integration + e2e tests, stop the servers
	@set -o pipefail; trap 'scripts/services/down.sh >/dev/null 2>&1' EXIT; \
	scripts/services/up.sh && source "$$INGEST_RUN_DIR/all.env" && \
	uv run pytest -p no:cacheprovider $(PYTEST_ARGS)

.PHONY: test-unit
test-unit: install ## Unit tests only (no servers)
	uv run pytest tests/unit -q

.PHONY: lint
lint: install ## ruff and mypy (strict) on ingest/
	uv run ruff check ingest tests bench
	uv run ruff format --check ingest
	uv run mypy ingest

.PHONY: bench
bench: install ## Run the benchmarks (see docs/benchmarks.md)
	@set -o pipefail; trap 'scripts/services/down.sh >/dev/null 2>&1' EXIT; \
	scripts/services/up.sh postgres redis && source "$$INGEST_RUN_DIR/all.env" && \
	uv run python bench/bench_embedded.py
