#!/usr/bin/env bash
# Installs what building, testing and demoing ebpf-cni needs on Debian 12,
# only when it is missing: Debian packages through apt-get, Go tools through
# `go install`. Safe to run again; run as root.
set -euo pipefail

export PATH="/usr/local/go/bin:${HOME:-/root}/go/bin:$PATH"

# command -> Debian package that provides it
declare -A pkgs=(
	[clang]=clang
	[llvm-strip]=llvm
	[bpftool]=bpftool
	[ip]=iproute2
	[tc]=iproute2
	[nft]=nftables
	[iptables]=iptables
	[iperf3]=iperf3
	[ping]=iputils-ping
	[unshare]=util-linux
)
missing=()
for cmd in "${!pkgs[@]}"; do
	command -v "$cmd" >/dev/null 2>&1 || missing+=("${pkgs[$cmd]}")
done
[ -f /usr/include/bpf/bpf_helpers.h ] || missing+=(libbpf-dev)
[ -x /usr/bin/time ] || missing+=(time)
[ -x /usr/lib/cni/host-local ] || missing+=(containernetworking-plugins)
# Real runtimes of the integration tests.
command -v containerd >/dev/null 2>&1 || missing+=(containerd)
command -v runc >/dev/null 2>&1 || missing+=(runc)
command -v podman >/dev/null 2>&1 || missing+=(podman)
if [ "${1:-}" = "--e2e" ]; then
	command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
	command -v nsenter >/dev/null 2>&1 || missing+=(util-linux)
	# The userland packed into the conformance test images
	# (scripts/e2e-images.sh): sh and friends, curl, nc, dig and nslookup.
	dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
	command -v curl >/dev/null 2>&1 || missing+=(curl)
	command -v nc.openbsd >/dev/null 2>&1 || missing+=(netcat-openbsd)
	command -v dig >/dev/null 2>&1 || missing+=(bind9-dnsutils)
fi

if [ ${#missing[@]} -gt 0 ]; then
	mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
	echo "deps: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v go >/dev/null 2>&1; then
	echo "deps: Go is missing; install Go >= 1.24 (https://go.dev/doc/install)" >&2
	exit 1
fi

gobin="$(go env GOPATH)/bin"
if ! command -v cnitool >/dev/null 2>&1 && [ ! -x "$gobin/cnitool" ]; then
	echo "deps: go install cnitool"
	go install github.com/containernetworking/cni/cnitool@v1.3.0
fi
# Current reference plugins for the chaining tests (Debian's 1.1.1 portmap
# and bandwidth fail CHECK); built from the Go module proxy.
plugins_dir=/usr/local/lib/ebpf-cni/cni-plugins
plugins_version=v1.9.0
if [ ! -x "$plugins_dir/ptp" ] || [ "$(cat "$plugins_dir/VERSION" 2>/dev/null)" != "$plugins_version" ]; then
	echo "deps: go install reference plugins $plugins_version into $plugins_dir"
	mkdir -p "$plugins_dir"
	for p in meta/portmap meta/bandwidth meta/tuning ipam/host-local main/ptp; do
		GOBIN="$plugins_dir" go install "github.com/containernetworking/plugins/plugins/$p@$plugins_version"
	done
	echo "$plugins_version" > "$plugins_dir/VERSION"
fi
if [ "${1:-}" = "--lint" ] && ! command -v staticcheck >/dev/null 2>&1 && [ ! -x "$gobin/staticcheck" ]; then
	echo "deps: go install staticcheck"
	go install honnef.co/go/tools/cmd/staticcheck@v0.8.2
fi
