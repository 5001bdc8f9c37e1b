#!/usr/bin/env bash
# The ebpf-cni demo: two "pods" (network namespaces) wired by cnitool through
# a conflist of type ebpf-cni, their traffic, what the datapath saw, and a
# bpftool dump of the pinned endpoints map. Everything it creates is removed
# on exit, also when interrupted.
set -euo pipefail
bin=$(realpath "${1:-bin/ebpf-cni}")
export PATH="/usr/local/go/bin:${HOME:-/root}/go/bin:$PATH"

work=$(mktemp -d /tmp/ebpf-cni-demo.XXXXXX)
pins=/sys/fs/bpf/ebpf-cni-demo
net=ebpf-demo
export CNI_PATH="$work/bin:/usr/lib/cni" NETCONFPATH="$work/net.d"
mkdir -p "$work/bin" "$work/net.d"
cp "$bin" "$work/bin/ebpf-cni"

cleanup() {
	set +e
	for p in demo-a demo-b; do
		[ -e /var/run/netns/$p ] && cnitool del $net /var/run/netns/$p >/dev/null 2>&1
		ip netns del $p 2>/dev/null
	done
	rm -rf "$pins" "$work"
}
trap cleanup EXIT INT TERM

cat > "$NETCONFPATH/10-ebpf-demo.conflist" <<CONF
{
  "cniVersion": "1.1.0",
  "name": "$net",
  "plugins": [
    {
      "type": "ebpf-cni",
      "pinRoot": "$pins",
      "stateDir": "$work/state",
      "ipam": {
        "ranges": [[{ "subnet": "10.99.0.0/24" }], [{ "subnet": "fd00:99::/120" }]],
        "dataDir": "$work/ipam"
      }
    }
  ]
}
CONF
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "conflist ($NETCONFPATH/10-ebpf-demo.conflist)"
cat "$NETCONFPATH/10-ebpf-demo.conflist"

for p in demo-a demo-b; do
	ip netns add $p
	step "cnitool add $net /var/run/netns/$p"
	CNI_ARGS="K8S_POD_NAMESPACE=demo;K8S_POD_NAME=$p" cnitool add $net /var/run/netns/$p
	echo
done
a4=$(ip netns exec demo-a ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)
b4=$(ip netns exec demo-b ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)
b6=$(ip netns exec demo-b ip -6 -o addr show dev eth0 scope global | awk '{print $4}' | cut -d/ -f1)

step "demo-a: addresses and routes (no bridge: a veth to the host, a link-local gateway)"
ip netns exec demo-a ip -br addr show dev eth0
ip netns exec demo-a ip route
ip netns exec demo-a ip neigh

step "demo-a -> demo-b ping over IPv4 and IPv6 (bpf_redirect_peer, veth to veth)"
ip netns exec demo-a ping -c 3 -i 0.2 "$b4"
ip netns exec demo-a ping -6 -c 3 -i 0.2 "$b6"
step "demo-b -> demo-a ping"
ip netns exec demo-b ping -c 2 -i 0.2 "$a4"

step "ebpf-cni inspect (endpoints, TCX attachments, per-endpoint counters)"
"$bin" inspect --pin-root "$pins" --state-dir "$work/state" --ipam-dir "$work/ipam"

step "bpftool map dump pinned $pins/endpoints_v1 (BTF field names)"
bpftool map dump pinned "$pins/endpoints_v1"

step "cnitool check / del"
cnitool check $net /var/run/netns/demo-a && echo "CHECK demo-a: ok"
for p in demo-a demo-b; do cnitool del $net /var/run/netns/$p && echo "DEL $p: ok"; done
echo "endpoints left in the map: $(bpftool -j map dump pinned "$pins/endpoints_v1" | grep -o '"key"' | wc -l)"
