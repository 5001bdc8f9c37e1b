# ebpf-cni: `make demo` shows it working, `make test` proves it.
# Both install what they need (scripts/deps.sh) on a fresh Debian 12 as root.

SHELL   := /bin/bash
export PATH := /usr/local/go/bin:$(HOME)/go/bin:$(PATH)
BIN     := bin/ebpf-cni
GOFILES := $(shell find . -name '*.go' -not -path './.git/*')

.PHONY: e2e-netpol all build generate check-generate deps test test-unit test-bpf test-integration lint demo bench soak fuzz e2e clean install

all: build

# Static and stripped: no dynamic loader at every CNI call, fewer pages to
# fault in (start-up is paid by every ADD and DEL; see BENCHMARKS.md).
export CGO_ENABLED := 0
RELEASE_FLAGS := -trimpath -ldflags=-s\ -w

$(BIN): $(GOFILES) internal/loader/datapath_bpfel.o go.mod go.sum
	go build $(RELEASE_FLAGS) -o $@ ./cmd/ebpf-cni

build: $(BIN)

deps:
	@bash scripts/deps.sh

# Recompile bpf/ with bpf2go (Debian's clang) into internal/loader.
generate:
	go generate ./tools/

# Fails when the committed bpf2go output is not what bpf/ compiles to.
check-generate:
	@bash scripts/check-generate.sh

# Everything: generated code fresh, vet, unit, BPF program and integration tests.
test: deps check-generate
	go vet ./...
	go test -count=1 ./...

# No root needed: config, results, errors, IPAM, generated types, agent controllers.
test-unit:
	go test -count=1 ./cmd/... ./internal/config/ ./internal/ipam/ ./internal/loader/ ./internal/agent/...

test-bpf:
	go test -count=1 -v ./internal/maps/

test-integration: deps
	go test -count=1 -v ./test/integration/

lint:
	@bash scripts/deps.sh --lint
	@bash scripts/check-generate.sh
	@out=$$(gofmt -l $(GOFILES)); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	go vet ./...
	staticcheck ./...

# Kubernetes levels: an emulated 3-node cluster on a real kube-apiserver
# (native and VXLAN; Services, NetworkPolicy), a single-node cluster with a
# real kubelet on containerd where the DaemonSet of deploy/ installs
# ebpf-cni, and the upstream sig-network [Conformance] specs (e2e.test) on
# that node with CoreDNS and without kube-proxy: ebpf-cni serves Services
# (KUBE_PROXY=iptables or nftables runs them against kube-proxy instead).
# The Kubernetes v1.34 binaries, e2e.test, agnhost, CoreDNS and ginkgo are
# built from the Go module proxy once and cached by scripts/kube-build.sh.
KUBE_BINS  := kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl kube-proxy e2e.test agnhost coredns ginkgo
KUBE_PROXY ?= off
e2e: build
	@bash scripts/deps.sh --e2e
	bash scripts/kube-build.sh $(KUBE_BINS)
	E2E_KUBE_PROXY=$(KUBE_PROXY) go test -tags e2e -count=1 -v -timeout 60m -run 'MultiNode|KubeletCluster|KubeletConformance' ./test/integration/

# The upstream NetworkPolicy suite (e2e.test --focus '[sig-network] Netpol')
# on the single-node kubelet cluster without kube-proxy; E2E_PROCS ginkgo
# processes (default 3). Report and log in bin/netpol.
e2e-netpol: build
	@bash scripts/deps.sh --e2e
	bash scripts/kube-build.sh $(KUBE_BINS)
	go test -tags e2e -count=1 -v -timeout 200m -run 'KubeletNetpol' ./test/integration/

# Datapath and churn figures side by side with veth, bridge and ptp, and
# Service traffic through kube-proxy (iptables, nftables) and ebpf-cni's BPF
# Services on a real kube-apiserver (etcd from Debian, kube-apiserver and
# kube-proxy built from the Go module proxy and cached); writes BENCHMARKS.md.
bench: build
	@bash scripts/deps.sh --e2e
	bash scripts/kube-build.sh kube-apiserver kube-proxy
	go build -o bin/rr ./bench/rr
	go build -o bin/ebpf-cni-agent ./cmd/ebpf-cni-agent
	go run ./bench/run -plugin $(BIN) -rr bin/rr -agent bin/ebpf-cni-agent -out BENCHMARKS.md $(BENCH_ARGS)

# 1000 ADD/DEL cycles, 50 at once, through cnitool: no address held twice,
# nothing leaked; writes SOAK.md (make bench includes the same section).
soak: deps build
	go run ./bench/run -plugin $(BIN) -sections soak -out SOAK.md $(SOAK_ARGS)

# Each fuzz target for FUZZTIME (config and CNI_ARGS parsing; the BPF
# programs on random frames, as root). make test runs their seed corpora.
FUZZTIME ?= 30s
fuzz:
	go test -run=NONE -fuzz=FuzzParse$$ -fuzztime=$(FUZZTIME) ./internal/config/
	go test -run=NONE -fuzz=FuzzParseArgs -fuzztime=$(FUZZTIME) ./internal/config/
	go test -run=NONE -fuzz=FuzzFromPod -fuzztime=$(FUZZTIME) ./internal/maps/
	go test -run=NONE -fuzz=FuzzFromNode -fuzztime=$(FUZZTIME) ./internal/maps/

demo: deps build
	@bash scripts/demo.sh $(BIN)

install: build
	install -D -m 0755 $(BIN) /opt/cni/bin/ebpf-cni

clean:
	rm -rf bin
