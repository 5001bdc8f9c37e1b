#!/usr/bin/env bash
# Builds, offline, the container images the upstream sig-network
# conformance tests run (no registry is reachable), as OCI archives for
#   ctr -n k8s.io images import OUTDIR/*.tar
#
#   scripts/e2e-images.sh [OUTDIR]     (default bin/e2e-images)
#
# Names are those of test/utils/image/manifest.go (checked against
# `e2e.test --list-images`), exactly what the tests ask for (pods use
# IfNotPresent: an imported image is used as is):
#   agnhost:<v>          /agnhost (built by scripts/kube-build.sh), porter's
#                        TLS pair and the image's users, plus the userland
#                        the tests exec in it: Debian's dash as /bin/sh,
#                        bash, busybox applets (seq, sleep, cat, ...), curl,
#                        nc (openbsd, as upstream's Alpine image), dig,
#                        nslookup and getent, each with the shared libraries
#                        ldd lists. Not busybox's sh: Debian builds it to run
#                        its own applets first (nc, nslookup) whatever PATH
#                        says, and their flags differ.
#   jessie-dnsutils:<v>  the DNS tests' second prober: the same userland
#                        (sh, seq, dig, getent) under that name.
#   nginx:<v>            a stand-in: the only conformance test using it
#                        (EndpointSlice ... for Pods matching a Service)
#                        needs its pods running and never talks to nginx;
#                        it runs agnhost's test-webserver on port 80.
#   pause:<v>            test/e2e/pause (Service endpoints latency).
#   coredns/coredns:<v>  CoreDNS built by scripts/kube-build.sh, the cluster
#                        DNS of the e2e cluster.
# Prints one archive path per line on stdout.
set -euo pipefail
# OUTDIR as the caller meant it, before the cd; it is emptied below, so
# refuse what is not a directory of its own.
out=$(realpath -m "${1:-$(dirname "$0")/../bin/e2e-images}")
cd "$(dirname "$0")/.."
export PATH="/usr/local/go/bin:${HOME:-/root}/go/bin:$PATH"

log() { echo "e2e-images: $*" >&2; }
die() { log "error: $*"; exit 1; }

case "$out" in
/ | "$(pwd)" | "$(pwd)/bin" | "$HOME") die "refusing to empty $out: give a directory of its own" ;;
esac
bindir=$(bash scripts/kube-build.sh e2e.test agnhost coredns | tail -n1)
for f in busybox dash bash curl nc.openbsd dig nslookup getent ldd; do
	command -v "$f" >/dev/null || die "$f missing: run scripts/deps.sh --e2e"
done

# The references come from the image manifest of the k8s.io/kubernetes
# module e2e.test was built from, checked against what it lists.
manifest=$(go env GOMODCACHE)/k8s.io/kubernetes@$("$bindir/e2e.test" --version)/test/utils/image/manifest.go
[ -f "$manifest" ] || die "$manifest missing (scripts/kube-build.sh downloads it)"
mapfile -t listed < <("$bindir/e2e.test" --list-images 2>/dev/null)
image() { # image ID (Agnhost, Nginx, ...): the reference the tests use
	local reg name tag ref
	read -r reg name tag < <(sed -nE 's/^[[:space:]]*configs\['"$1"'\] = Config\{list\.([A-Za-z0-9]+), "([^"]+)", "([^"]+)"\}.*/\1 \2 \3/p' "$manifest")
	case "$reg" in
	PromoterE2eRegistry) reg=registry.k8s.io/e2e-test-images ;;
	GcRegistry) reg=registry.k8s.io ;;
	*) die "no configs[$1] of a known registry in $manifest" ;;
	esac
	ref=$reg/$name:$tag
	printf '%s\n' "${listed[@]}" | grep -qxF "$ref" || die "$ref is not among e2e.test --list-images"
	echo "$ref"
}
agnhost_ref=$(image Agnhost)
[ "${agnhost_ref##*:}" = "$("$bindir/agnhost" --version | awk '{print $NF}')" ] ||
	die "$agnhost_ref does not match the built agnhost ($("$bindir/agnhost" --version))"

rm -rf "$out"
mkdir -p "$out"
work=$(mktemp -d /tmp/ebt-images.XXXXXX)
trap 'rm -rf "$work"' EXIT

# pack SRC DEST: SRC at DEST in the root, plus every library ldd lists (at
# the path ldd gives, /lib64/ld-linux-x86-64.so.2 included), dereferenced.
root=$work/root
pack() {
	install -D -m 0755 "$(readlink -f "$1")" "$root$2"
	local lib
	for lib in $(ldd "$1" 2>/dev/null | grep -oE '(^|[[:space:]])/[^ ]+' || true); do
		[ -e "$root$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
	done
}

install -D -m 0755 "$bindir/agnhost" "$root/agnhost"
ln -s agnhost "$root/agnhost-2"
# porter serves TLS with these (the upstream Dockerfile adds them too).
porter=$(dirname "$manifest")/../../images/agnhost/porter
install -m 0644 "$porter/localhost.crt" "$porter/localhost.key" "$root/"
pack "$(command -v busybox)" /bin/busybox
pack "$(command -v dash)" /bin/sh
pack "$(command -v bash)" /bin/bash
pack "$(command -v curl)" /usr/bin/curl
pack "$(command -v nc.openbsd)" /usr/bin/nc
pack "$(command -v dig)" /usr/bin/dig
pack "$(command -v nslookup)" /usr/bin/nslookup
pack "$(command -v getent)" /usr/bin/getent
# Every busybox applet not shadowed by a real tool above.
for applet in $(busybox --list-full); do
	[ -e "$root/$applet" ] || { mkdir -p "$(dirname "$root/$applet")"; ln -s /bin/busybox "$root/$applet"; }
done
# getent hosts must read the kubelet's /etc/hosts before DNS (glibc's
# default without this file asks DNS first and stops at NOTFOUND).
mkdir -p "$root/etc" "$root/tmp" "$root/uploads"
chmod 1777 "$root/tmp"
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
printf 'root:x:0:0:root:/root:/bin/sh\nuser-defined-in-image:x:1000:1000::/home/user-defined-in-image:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\nuser-defined-in-image:x:1000:\ngroup-defined-in-image:x:50000:user-defined-in-image\n' >"$root/etc/group"

# Each tool runs in (a copy of) the root, /proc mounted as in a container,
# with the flags the tests use: connection refused, not "unknown option",
# is the expected failure.
check() {
	local out_
	out_=$(chroot "$work/check" /bin/sh -c "$2" 2>&1) || die "$1 in the image root: $out_"
}
cp -a "$root" "$work/check"
printf '127.0.0.1 localhost\n' >"$work/check/etc/hosts"
mkdir -p "$work/check/proc"
mount -t proc proc "$work/check/proc"
trap 'umount -l "$work/check/proc" 2>/dev/null || true; rm -rf --one-file-system "$work"' EXIT
check "sh, seq, test" 'for i in `seq 1 2`; do test -n "$i" && echo ok; sleep 0; done | grep -c ok | grep -qx 2'
check "curl" 'curl -g -q -s --max-time 15 --connect-timeout 1 --interface 127.0.0.1 -o /tmp/x -w %{http_code} http://127.0.0.1:1/; test $? = 7'
check "nc -t" 'echo hostName | nc -v -t -w 2 127.0.0.1 1 2>&1 | grep -q refused'
check "nc -u" 'echo hostName | nc -w 1 -u 127.0.0.1 1'
check "dig" 'dig -v 2>&1 | grep -q "DiG 9"'
check "nslookup" 'nslookup -version 2>&1 | grep -q "nslookup 9"'
check "getent (files)" 'getent hosts localhost | grep -q 127.0.0.1'
check "sh runs nc from PATH" 'test "$(command -v nc)" = /usr/bin/nc && test "$(command -v nslookup)" = /usr/bin/nslookup'
umount "$work/check/proc"

ociimage() { go run ./tools/ociimage "$@"; }
# As upstream: ENTRYPOINT ["/agnhost"], CMD ["pause"] (pods that give no
# args, e.g. the HostPort spec's host exec pod, just stay up).
ociimage -o "$out/agnhost.tar" -name "$agnhost_ref" -entrypoint /agnhost -cmd pause -tree "$root"
ociimage -o "$out/jessie-dnsutils.tar" -name "$(image JessieDnsutils)" -entrypoint /bin/sh -tree "$root"
ociimage -o "$out/nginx.tar" -name "$(image Nginx)" -entrypoint "/agnhost test-webserver --port 80" -tree "$root"

CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o "$work/pause" ./test/e2e/pause
ociimage -o "$out/pause.tar" -name "$(image Pause)" -entrypoint /pause -file /pause="$work/pause"

coredns_version=$("$bindir/coredns" -version | sed -n 's/^CoreDNS-//p')
ociimage -o "$out/coredns.tar" -name "registry.k8s.io/coredns/coredns:v$coredns_version" \
	-entrypoint /coredns -file /coredns="$bindir/coredns"

ls "$out"/*.tar
