#!/usr/bin/env bash
# kind e2e for users' CI (needs docker and kind; cannot run on a machine
# without a container engine): create the cluster of ci/kind-config.yaml,
# load the locally built image, install ebpf-cni with `kubectl apply -f
# deploy/`, wait for the nodes to turn Ready, then check pod-to-pod traffic
# on one node and across nodes with ci/checks.sh. Dumps logs on failure.
set -Eeuo pipefail  # -E: the ERR trap (log dump) fires inside functions too
cd "$(dirname "$0")/.."
cluster=${KIND_CLUSTER:-ebpf-cni-e2e}
ns=ebpf-e2e
. ci/checks.sh

dump() {
	echo "=== e2e failed: logs" >&2
	kubectl get nodes -o wide >&2 || true
	kubectl get pods -A -o wide >&2 || true
	kubectl -n kube-system logs ds/ebpf-cni --all-containers --tail=200 >&2 || true
	for n in $(kind get nodes --name "$cluster"); do
		docker exec "$n" sh -c 'ls -l /etc/cni/net.d /opt/cni/bin; ip route; /opt/cni/bin/ebpf-cni inspect' >&2 || true
	done
}
trap 'dump' ERR

kind create cluster --name "$cluster" --config ci/kind-config.yaml --wait 0s
bash scripts/image.sh localhost/ebpf-cni:dev
kind load image-archive --name "$cluster" bin/ebpf-cni-image.tar
kubectl apply -f deploy/
kubectl -n kube-system rollout status ds/ebpf-cni --timeout=180s
kubectl wait --for=condition=Ready nodes --all --timeout=180s

kubectl create namespace "$ns"
workers=($(kubectl get nodes -l '!node-role.kubernetes.io/control-plane' -o jsonpath='{.items[*].metadata.name}'))
run_pod() { # name node
	kubectl -n "$ns" run "$1" --image=localhost/ebpf-cni:dev --image-pull-policy=IfNotPresent \
		--overrides="{\"spec\":{\"nodeName\":\"$2\"}}" --command -- /usr/local/bin/ebpf-cni-agent probe serve :8080
}
run_pod a1 "${workers[0]}"
run_pod a2 "${workers[0]}"
run_pod b1 "${workers[1]}"
kubectl -n "$ns" wait --for=condition=Ready pod --all --timeout=120s
ip() { kubectl -n "$ns" get pod "$1" -o jsonpath='{.status.podIP}'; }

check_pod_to_pod "kubectl -n $ns exec a1 --" "$(ip a2)" 8080 "$(ip a1)"   # same node (BPF redirect)
check_pod_to_pod "kubectl -n $ns exec a1 --" "$(ip b1)" 8080 "$(ip a1)"   # across nodes
check_pod_to_pod "kubectl -n $ns exec b1 --" "$(ip a1)" 8080 "$(ip b1)"
kubectl delete namespace "$ns" --wait
kind delete cluster --name "$cluster"
echo "kind e2e passed"
