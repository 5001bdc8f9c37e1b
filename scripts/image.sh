#!/usr/bin/env bash
# Builds the ebpf-cni OCI image archive without a container engine: static
# ebpf-cni and ebpf-cni-agent binaries packed by tools/ociimage. Load it with
#   ctr -n k8s.io images import bin/ebpf-cni-image.tar
#   kind load image-archive bin/ebpf-cni-image.tar
# usage: scripts/image.sh [IMAGE_NAME] (default localhost/ebpf-cni:dev)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/go/bin:${HOME:-/root}/go/bin:$PATH"
name=${1:-localhost/ebpf-cni:dev}
mkdir -p bin/image
CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o bin/image/ebpf-cni ./cmd/ebpf-cni
CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o bin/image/ebpf-cni-agent ./cmd/ebpf-cni-agent
go run ./tools/ociimage -o bin/ebpf-cni-image.tar -name "$name" -entrypoint /usr/local/bin/ebpf-cni-agent \
	-file /usr/local/bin/ebpf-cni=bin/image/ebpf-cni -file /usr/local/bin/ebpf-cni-agent=bin/image/ebpf-cni-agent
echo "bin/ebpf-cni-image.tar ($name)"
