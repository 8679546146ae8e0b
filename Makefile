# One entry point for people and CI. `make test` and `make run` install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

# The inference data plane (Go, dataplane/): built from source with the pinned go.mod/go.sum.
DATAPLANE := $(BIN)/loopmesh-dataplane
DATAPLANE_SRC := $(shell find dataplane -name '*.go' -o -name 'go.mod' -o -name 'go.sum' 2>/dev/null)

.PHONY: deps test unit lint typecheck protos check-protos run infra-up infra-down bench clean dataplane-test

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "LoopMesh needs Python 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

$(DATAPLANE): $(STAMP) $(DATAPLANE_SRC)
	@command -v go >/dev/null || { echo "Go is needed to build dataplane/ (https://go.dev/dl/)"; exit 1; }
	cd dataplane && go build -trimpath -o $(abspath $(DATAPLANE)) ./cmd/loopmesh-dataplane

deps: $(STAMP) $(DATAPLANE)
	bash scripts/system-deps.sh
	$(BIN)/loopmesh infra fetch

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	@test -z "$$(cd dataplane && gofmt -l .)" || { cd dataplane && gofmt -l .; echo "gofmt: files above"; exit 1; }
	cd dataplane && go vet ./...

dataplane-test:
	cd dataplane && go test ./...

typecheck: $(STAMP)
	$(BIN)/mypy --strict services/loopmesh

protos: $(STAMP)
	$(BIN)/python scripts/protogen.py

check-protos: $(STAMP)
	$(BIN)/python scripts/protogen.py --check

test: deps lint typecheck check-protos dataplane-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The pure-logic tier alone: no Java, Kafka or Triton needed.
unit: $(STAMP)
	$(BIN)/python -m pytest -m unit $(PYTEST_ARGS)

run: deps
	$(BIN)/loopmesh run

infra-up: deps
	$(BIN)/loopmesh infra up

infra-down: $(STAMP)
	$(BIN)/loopmesh infra down

bench: deps
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .loopmesh .mypy_cache .ruff_cache .pytest_cache

# compose.yaml brought up for real with podman (no Docker daemon or image registry needed):
# installs podman, builds a Debian base and every image, runs the smoke, tears down.
.PHONY: compose-test
compose-test: deps
	VENV=$(VENV) bash scripts/compose-test.sh
