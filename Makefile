# servicedb-operator — the two commands that matter: `make dev` and `make test`.
SHELL := /bin/bash
# Compiled dependencies live outside the work tree, so a fresh clone (CI) reuses them.
CARGO_TARGET_DIR ?= $(HOME)/.cache/servicedb/cargo-target
export CARGO_TARGET_DIR
SERVICEDB := $(CARGO_TARGET_DIR)/debug/servicedb

.PHONY: help build test lint fmt crds crds-check dev dev-down

help: ## list targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

build: ## build the servicedb binary
	cargo build --bins

test: ## unit tests and every test against the real test environment (started if not up)
	bash hack/test.sh

lint: ## cargo fmt --check and clippy with warnings as errors
	bash hack/install-deps.sh apt
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

fmt: ## format the code
	cargo fmt --all

# The CRDs are committed twice: crds/ (kubectl users) and the chart's crds/ (Helm installs
# them from there). One target writes both so they cannot drift apart.
CRD_FILES := crds/servicedb.io_crds.yaml charts/servicedb-operator/crds/servicedb.io_crds.yaml

crds: build ## regenerate crds/ and the chart's copy from the API types
	$(SERVICEDB) crd > crds/servicedb.io_crds.yaml
	cp crds/servicedb.io_crds.yaml charts/servicedb-operator/crds/servicedb.io_crds.yaml

crds-check: build ## fail when crds/ or the chart's copy differ from `servicedb crd`
	@set -e; for f in $(CRD_FILES); do \
	  $(SERVICEDB) crd | diff -u $$f - >/dev/null || { echo "$$f is stale: run make crds" >&2; exit 1; }; \
	done; echo "CRDs are up to date: $(CRD_FILES)"

dev: ## local control plane + operator + the examples, doing real work (Ctrl-C to stop)
	bash hack/dev.sh

dev-down: ## stop what `make dev` left running and the test environment
	bash hack/testenv.sh down

include hack/Makefile.testenv.mk
include hack/bench-relay.mk
