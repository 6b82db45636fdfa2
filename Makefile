# Ferry's build. `make help` lists the targets.
GO        ?= go
BIN       := bin
TESTFLAGS ?= -race -count=1 -timeout 40m
export FERRY_PRIVILEGED_TESTS

.PHONY: help deps build generate check-generated test demo lint bench

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

deps: ## install the Debian packages the build and tests need (idempotent)
	@hack/install-deps.sh

build: ## build ferry, ferry-agent into bin/
	$(GO) build -o $(BIN)/ ./cmd/...

generate: deps ## regenerate the BPF objects and protobuf code from their sources
	$(GO) build -o hack/bin/ google.golang.org/protobuf/cmd/protoc-gen-go google.golang.org/grpc/cmd/protoc-gen-go-grpc
	$(GO) generate ./api/... ./bpf/...

check-generated: generate ## fail if committed generated files differ from their sources
	@git diff --exit-code --stat -- api bpf || { echo "generated files are stale: run make generate and commit" >&2; exit 1; }

test: deps ## run every test (as root with FERRY_PRIVILEGED_TESTS=1 for the kernel ones)
	$(GO) test $(TESTFLAGS) ./...

bench: deps ## Ferry beside no mesh and an HAProxy pair, table and plots in results/<date>/ (QUICK=1: about 6 min)
	$(GO) build -o $(BIN)/ ./cmd/ferry ./cmd/ferry-agent
	$(GO) build -o $(BIN)/fortio fortio.org/fortio
	$(BIN)/ferry bench $(if $(QUICK),--quick) --agent $(BIN)/ferry-agent --fortio $(BIN)/fortio

demo: deps build ## bring up the lab, send traffic between pods and show what crossed the mesh
	$(BIN)/ferry lab demo --agent $(BIN)/ferry-agent

lint: ## go vet, gofmt, and go.mod/go.sum tidy
	$(GO) vet ./...
	@$(GO) mod tidy -diff >/dev/null || { echo "go.mod/go.sum are not tidy: run go mod tidy and commit (go mod tidy -diff shows what changes)" >&2; exit 1; }
	@out=$$(gofmt -l $$(git ls-files '*.go' | grep -v '_bpfel.go$$')); [ -z "$$out" ] || { echo "gofmt: $$out" >&2; exit 1; }
