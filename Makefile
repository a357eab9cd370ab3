# Two commands do all set-up on a fresh machine:
#   make run   - install what the service needs and run it embedded (no servers needed)
#   make test  - install and start every real server the tests need, run the whole suite
SHELL := /bin/bash
.DEFAULT_GOAL := help
# `make test` gives each run a run dir of its own unless INGEST_RUN_DIR is set; the
# by-hand targets (services-up/down, bench) use this stable default.
RUN_DIR_GIVEN := $(filter-out undefined,$(origin INGEST_RUN_DIR))
export INGEST_RUN_DIR ?= /tmp/ingest-test-run
# `make uv` puts uv here when it is not on PATH (pip --user); rustup puts cargo in ~/.cargo/bin
export PATH := $(HOME)/.local/bin:$(HOME)/.cargo/bin:$(PATH)
PYTEST_ARGS ?=

.PHONY: help
help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

.PHONY: uv
uv: ## Install uv if missing (pip --user; Debian's python3 gets python3-pip first)
	@scripts/install-uv.sh

.PHONY: cargo
cargo: ## Install cargo if missing (Debian's cargo-web): uv sync builds ingest_native/ with it
	@scripts/install-cargo.sh

.PHONY: install
install: uv cargo ## Install the project and its dev tools into .venv (from uv.lock)
	uv sync --frozen

.PHONY: tools
tools: ## Install every program the tests and scripts run (scripts/services/tools.list)
	scripts/services/tools.sh install

.PHONY: doctor
doctor: ## Check that every program the tests and scripts run is present
	@scripts/check-tools.sh

# make itself exits 143 when SIGTERM reaches it (GNU make re-raises the signal after its child
# ends), whatever the service answers; a supervisor runs `uv run --no-dev ingest run` instead,
# which drains and exits 0 (docs/operations.md).
.PHONY: run
run: uv cargo ## Run the service embedded on :8080 (inbox ./data/inbox/<tenant>/, webhooks)
	uv sync --frozen --no-dev --inexact
	uv run --frozen --no-dev ingest run

# The operator's commands without the dev toolchain (`uv run` alone would install it).
TENANT ?= acme-corp
.PHONY: records
records: uv ## Records of TENANT (default acme-corp) in the sink, newest first
	uv run --frozen --no-dev ingest records --tenant $(TENANT)

.PHONY: dlq
dlq: uv ## DLQ summary of TENANT (default acme-corp): counts by reason, sink, source
	uv run --frozen --no-dev dlqtriage summary --tenant $(TENANT)

.PHONY: services-up
services-up: install tools ## Install and start every test server on free ports; prints the env line to source
	scripts/services/up.sh

.PHONY: services-down
services-down: ## Stop the test servers
	scripts/services/down.sh

.PHONY: test
test: tools install ## Check tools, start all test servers (own ports + run dir), run unit + integration + e2e tests
	@set -o pipefail; scripts/check-tools.sh || exit 1; \
	if [ -z "$(RUN_DIR_GIVEN)" ]; then export INGEST_RUN_DIR="$$(mktemp -d /tmp/ingest-test-run.XXXXXX)"; fresh=1; fi; \
	trap 'rc=$$?; scripts/services/down.sh >/dev/null 2>&1; \
	  if [ "$$rc" = 0 ] && [ -n "$${fresh:-}" ]; then rm -rf "$$INGEST_RUN_DIR"; \
	  else echo "make test: servers data and logs kept in $$INGEST_RUN_DIR"; fi' EXIT; \
	echo "make test: run dir $$INGEST_RUN_DIR"; \
	scripts/services/up.sh && source "$$INGEST_RUN_DIR/all.env" && \
	uv run pytest -p no:cacheprovider $(PYTEST_ARGS)

.PHONY: image
image: ## Build the container image localhost/ingest:latest with podman (root; Dockerfile)
	scripts/image/build.sh

.PHONY: image-test
image-test: install image ## Build the image, then run it as Kubernetes would: ready, a signed record lands, SIGTERM exits 0
	@set -o pipefail; . scripts/image/lib.sh && podman_setup && \
	INGEST_IMAGE_TEST=1 uv run pytest -p no:cacheprovider tests/image -v $(PYTEST_ARGS)

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
