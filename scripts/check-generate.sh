#!/usr/bin/env bash
# Recompiles bpf/ into a scratch copy of the module and compares the result
# with the committed internal/loader/datapath_bpfel.{go,o}. Skipped (said so)
# only when clang is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v clang >/dev/null 2>&1; then
	echo "check-generate: clang not installed, committed BPF objects not verified"
	exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/internal/loader"
cp -r go.mod go.sum bpf tools "$tmp/"
(cd "$tmp/tools" && go generate . >/dev/null)
for f in datapath_bpfel.go datapath_bpfel.o; do
	if ! cmp -s "$tmp/internal/loader/$f" "internal/loader/$f"; then
		echo "check-generate: internal/loader/$f is stale: run 'make generate' and commit" >&2
		exit 1
	fi
done
echo "check-generate: committed BPF objects match bpf/"
