#!/usr/bin/env bash
# Builds Kubernetes server binaries from the Go module proxy (no git clone,
# no release downloads) and caches them, so the e2e and demo can run a real
# control plane and kubelet against ebpf-cni on a machine whose only way out
# is proxy.golang.org.
#
#   scripts/kube-build.sh [--print-dir] [binary...]
#
# Binaries default to kube-apiserver kube-controller-manager kube-scheduler
# kubelet kubectl; any k8s.io/kubernetes/cmd/<name> works, and so do the
# conformance tools: e2e.test (go test -c k8s.io/kubernetes/test/e2e),
# agnhost (test/images/agnhost, versioned by its VERSION file), coredns
# (the release kubeadm deploys, from a module of its own) and ginkgo (the
# CLI at the version k8s.io/kubernetes requires, to run e2e.test's specs in
# parallel processes). The version is
# KUBE_VERSION, or else the newest v1.34.x the proxy serves. Binaries land in
# ${KUBE_CACHE:-/var/cache/ebpf-cni/kube}/<version>/bin, whose path is always
# the last line of stdout (all messages go to stderr). When every requested
# binary is already there and runs, nothing is built. --print-dir only
# prints that path.
#
# Why a wrapper module: k8s.io/kubernetes replaces its staging modules
# (k8s.io/api, client-go, kubelet, ...) with ./staging/src paths, and a
# dependency's replaces are ignored, so building its commands directly fails.
# The wrapper requires k8s.io/kubernetes and replaces each staging module with
# its published twin v0.<minor>.<patch>, the same source tagged from staging.
set -euo pipefail

export PATH="/usr/local/go/bin:$PATH"
export GOWORK=off GOTOOLCHAIN=local

log() { echo "kube-build: $*" >&2; }
die() { log "error: $*"; exit 1; }

print_only=false
bins=()
for arg in "$@"; do
	case "$arg" in
	--print-dir) print_only=true ;;
	-h | --help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
	-*) die "unknown flag $arg (try --help)" ;;
	*)
		[[ "$arg" =~ ^[a-z0-9-]+$ || "$arg" = e2e.test ]] || die "bad binary name: $arg"
		bins+=("$arg")
		;;
	esac
done
[ ${#bins[@]} -gt 0 ] || bins=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)
cache=${KUBE_CACHE:-/var/cache/ebpf-cni/kube}

# Newest v1.34.x on the proxy; when the proxy cannot be asked, the newest one
# already in the cache, so an offline rerun still finds its binaries.
resolve_version() {
	local v
	if v=$(cd / && go list -m -versions k8s.io/kubernetes 2>/dev/null); then
		v=$(tr ' ' '\n' <<<"$v" | grep -E '^v1\.34\.[0-9]+$' | sort -V | tail -n1 || true)
		[ -n "$v" ] && { echo "$v"; return; }
	fi
	v=$(ls "$cache" 2>/dev/null | grep -E '^v1\.34\.[0-9]+$' | sort -V | tail -n1 || true)
	[ -n "$v" ] || die "cannot list k8s.io/kubernetes versions from the module proxy and nothing is cached in $cache"
	log "module proxy unreachable; using cached $v"
	echo "$v"
}

version=${KUBE_VERSION:-$(resolve_version)}
[[ "$version" =~ ^v1\.([0-9]+)\.([0-9]+)(-[0-9A-Za-z.-]+)?$ ]] || die "KUBE_VERSION must look like v1.34.4, got $version"
minor=${BASH_REMATCH[1]}
staging_version="v0.${version#v1.}" # v1.34.4 -> v0.34.4
bindir="$cache/$version/bin"

if $print_only; then
	echo "$bindir"
	exit 0
fi

# kube_file PATH: a file of the k8s.io/kubernetes module (downloaded once).
kube_file() {
	local dir
	dir=$(go env GOMODCACHE)/k8s.io/kubernetes@$version
	[ -f "$dir/$1" ] ||
		dir=$(cd / && go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
	cat "$dir/$1"
}

# agnhost carries its own version (test/images/agnhost/VERSION, 2.56 for
# v1.34), which the image tag must match.
agnhost_version() { kube_file test/images/agnhost/VERSION | tr -d '[:space:]'; }

# The CoreDNS release kubeadm of this Kubernetes version deploys.
coredns_version() {
	kube_file cmd/kubeadm/app/constants/constants.go |
		sed -n 's/^[[:space:]]*CoreDNSVersion = "\(v[0-9.]*\)"$/\1/p'
}

# The ginkgo k8s.io/kubernetes requires (its go.mod), e.g. v2.21.0.
ginkgo_version() { kube_file go.mod | awk '$1 == "github.com/onsi/ginkgo/v2" {print $2; exit}'; }

# runs NAME PATH: true when PATH is a working binary that reports the
# version it was built for.
runs() {
	local out v want=$version
	[ -x "$2" ] || return 1
	case "$1" in
	coredns)
		v=$(coredns_version | sed 's/^v//')
		[ -n "$v" ] || return 1 # unknown version: nothing can match
		want="CoreDNS-$v"
		out=$(timeout 30 "$2" -version 2>&1) || return 1
		;;
	kubectl) out=$(timeout 30 "$2" version --client 2>&1) || return 1 ;;
	ginkgo)
		v=$(ginkgo_version | sed 's/^v//')
		[ -n "$v" ] || return 1
		want="Ginkgo Version $v"
		out=$(timeout 30 "$2" version 2>&1) || return 1
		;;
	agnhost)
		v=$(agnhost_version)
		[ -n "$v" ] || return 1
		want="version $v" # cobra prints "app version 2.56"
		out=$(timeout 30 "$2" --version 2>&1) || return 1
		;;
	*) out=$(timeout 30 "$2" --version 2>&1) || return 1 ;;
	esac
	grep -qF "$want" <<<"$out"
}

missing() {
	local name
	for name in "${bins[@]}"; do
		runs "$name" "$bindir/$name" || echo "$name"
	done
}

mapfile -t todo < <(missing)
if [ ${#todo[@]} -eq 0 ]; then
	log "cached: ${bins[*]} $version"
	echo "$bindir"
	exit 0
fi

mkdir -p "$bindir"
# Two runs at once would build the same thing twice; the second waits, then
# finds the first one's binaries.
exec 9>"$cache/$version/.lock"
flock 9
mapfile -t todo < <(missing)
if [ ${#todo[@]} -eq 0 ]; then
	log "cached (built by a concurrent run): ${bins[*]} $version"
	echo "$bindir"
	exit 0
fi

work=$(mktemp -d /tmp/kube-build.XXXXXX)
trap 'rm -rf "$work"; rm -f "$bindir"/.*.tmp.$$' EXIT

log "fetching k8s.io/kubernetes@$version go.mod"
gomod=$(cd "$work" && go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
[ -f "$gomod" ] || die "go mod download k8s.io/kubernetes@$version gave no go.mod"
mapfile -t staging < <(grep -oE 'k8s\.io/[A-Za-z0-9._-]+[[:space:]]+=>[[:space:]]+\./staging/' "$gomod" | awk '{print $1}' | sort -u)
[ ${#staging[@]} -gt 0 ] || die "no ./staging replaces in $gomod; the wrapper approach does not fit $version"

{
	echo "module kubebuild.local/wrapper"
	echo
	echo "go $(awk '$1 == "go" {print $2; exit}' "$gomod")"
	echo
	echo "require k8s.io/kubernetes $version"
	echo
	echo "replace ("
	for m in "${staging[@]}"; do
		printf '\t%s => %s %s\n' "$m" "$m" "$staging_version"
	done
	echo ")"
} >"$work/go.mod"
log "wrapper module: k8s.io/kubernetes $version + ${#staging[@]} staging modules at $staging_version"

ldflags="-s -w"
ldflags+=" -X k8s.io/component-base/version.gitVersion=$version"
ldflags+=" -X k8s.io/component-base/version.gitMajor=1"
ldflags+=" -X k8s.io/component-base/version.gitMinor=$minor"
ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
ldflags+=" -X k8s.io/component-base/version.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
# kubectl reports its version through client-go's copy of these variables.
ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$version"
ldflags+=" -X k8s.io/client-go/pkg/version.gitMajor=1"
ldflags+=" -X k8s.io/client-go/pkg/version.gitMinor=$minor"

# build NAME CGO: go build into a temp name next to the target. e2e.test is
# the test binary of test/e2e (its specs register in package init); agnhost
# gets its own version string, as its Makefile sets it.
build() {
	local out="$bindir/.$1.tmp.$$"
	case "$1" in
	e2e.test) (cd "$work" && CGO_ENABLED=$2 go test -c -mod=mod -trimpath -ldflags "$ldflags" \
		-o "$out" k8s.io/kubernetes/test/e2e) ;;
	agnhost) (cd "$work" && CGO_ENABLED=$2 go build -mod=mod -trimpath \
		-ldflags "-s -w -X main.Version=$(agnhost_version)" -o "$out" k8s.io/kubernetes/test/images/agnhost) ;;
	coredns) build_coredns "$out" ;;
	ginkgo) (cd "$work" && CGO_ENABLED=$2 go build -mod=mod -trimpath -ldflags "-s -w" \
		-o "$out" github.com/onsi/ginkgo/v2/ginkgo) ;;
	*) (cd "$work" && CGO_ENABLED=$2 go build -mod=mod -trimpath -ldflags "$ldflags" \
		-o "$out" "k8s.io/kubernetes/cmd/$1") ;;
	esac
}

# build_coredns OUT: CoreDNS with the plugins of kubeadm's Corefile (errors,
# health, ready, kubernetes, prometheus, forward, cache, loop, reload,
# loadbalance, plus log), from a module of its own: its client-go must not
# move the Kubernetes wrapper's dependencies, and leaving out the cloud DNS
# plugins (route53, azure, clouddns, etcd, dnstap, trace) keeps the build
# small. Unlisted directives are only unknown to the Corefile parser.
build_coredns() {
	local v cwork="$work/coredns"
	v=$(coredns_version)
	[ -n "$v" ] || die "no CoreDNSVersion in k8s.io/kubernetes@$version's kubeadm constants"
	mkdir -p "$cwork"
	printf 'module corednsbuild.local/wrapper\n\ngo 1.24.0\n\nrequire github.com/coredns/coredns %s\n' "$v" >"$cwork/go.mod"
	cat >"$cwork/main.go" <<-'EOF'
		// CoreDNS with the plugins kubeadm's Corefile uses.
		package main

		import (
			"github.com/coredns/coredns/coremain"

			_ "github.com/coredns/coredns/plugin/cache"
			_ "github.com/coredns/coredns/plugin/errors"
			_ "github.com/coredns/coredns/plugin/forward"
			_ "github.com/coredns/coredns/plugin/health"
			_ "github.com/coredns/coredns/plugin/kubernetes"
			_ "github.com/coredns/coredns/plugin/loadbalance"
			_ "github.com/coredns/coredns/plugin/log"
			_ "github.com/coredns/coredns/plugin/loop"
			_ "github.com/coredns/coredns/plugin/metrics"
			_ "github.com/coredns/coredns/plugin/ready"
			_ "github.com/coredns/coredns/plugin/reload"
		)

		func main() { coremain.Run() }
	EOF
	log "CoreDNS $v"
	(cd "$cwork" && CGO_ENABLED=0 go build -mod=mod -trimpath \
		-ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$v" -o "$1" .)
}

start=$SECONDS
log "the first build also downloads about 800 MB of modules; expect 5-20 min on 2 cores"
for name in "${todo[@]}"; do
	log "building $name $version (CGO_ENABLED=0)"
	t=$SECONDS
	if ! build "$name" 0; then
		command -v gcc >/dev/null 2>&1 || die "build $name failed and no gcc for a cgo retry"
		log "build $name with CGO_ENABLED=0 failed; retrying with cgo"
		build "$name" 1 || die "build $name failed; see the go output above"
	fi
	runs "$name" "$bindir/.$name.tmp.$$" || die "built $name does not run or does not report its version"
	mv -f "$bindir/.$name.tmp.$$" "$bindir/$name"
	log "built $name in $((SECONDS - t))s"
done
log "done in $((SECONDS - start))s: ${todo[*]}"
echo "$bindir"
