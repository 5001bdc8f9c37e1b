# Connectivity checks shared by ci/e2e-kind.sh (pods in kind) and the local
# emulated cluster (test/integration, network namespaces): both call
# check_pod_to_pod with the command prefix that runs a command "in" a pod and
# the path of ebpf-cni-agent there, so what runs here is what runs there.
#
# check_pod_to_pod CLIENT_EXEC SERVER_IP PORT WANT_SOURCE
#   CLIENT_EXEC: e.g. "kubectl exec -n ebpf-e2e pod-a --" or "ip netns exec ns-a"
#   Dials SERVER_IP:PORT (a `probe serve` there) and checks that the server saw
#   WANT_SOURCE (the client pod's own address: no masquerade in the cluster).
# PROBE: ebpf-cni-agent inside the pod (default /usr/local/bin/ebpf-cni-agent).

check_pod_to_pod() {
	local exec_prefix=$1 server=$2 port=$3 want=$4 seen
	seen=$($exec_prefix "${PROBE:-/usr/local/bin/ebpf-cni-agent}" probe dial "$server:$port" | tr -d '[:space:]')
	if [ "$seen" != "$want" ]; then
		echo "FAIL: $exec_prefix -> $server:$port: server saw '$seen', want '$want'" >&2
		return 1
	fi
	echo "ok: $want -> $server:$port"
}
