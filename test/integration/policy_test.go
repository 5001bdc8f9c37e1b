package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/ebpf-cni/ebpf-cni/internal/agent/policy"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
	nodefile "github.com/ebpf-cni/ebpf-cni/internal/node"
)

// addAs wires p as pod namespace/name (CNI_ARGS, as a runtime passes them).
func (n *node) addAs(p *pod, namespace, name string) {
	n.t.Helper()
	out, err := n.cnitool("add", p, fmt.Sprintf("K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s", namespace, name))
	if err != nil {
		n.t.Fatal(err)
	}
	p.setResult(n.t, out)
}

// outsideNS is a namespace outside the node that reaches its pods through
// the host (a veth to the root namespace, the pods' range routed via the
// host): what it sends arrives in to_pod.
func outsideNS(t *testing.T, n *node, podNet string) (*pod, netip.Addr) {
	t.Helper()
	name := n.name + "-ext"
	freshNetns(t, name)
	host := n.name + "-e"
	run(t, "ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", name)
	t.Cleanup(func() { exec.Command("ip", "link", "del", host).Run() })
	run(t, "ip", "addr", "add", "10.251.0.1/24", "dev", host)
	run(t, "ip", "link", "set", host, "up")
	run(t, "ip", "-n", name, "addr", "add", "10.251.0.2/24", "dev", "eth0")
	run(t, "ip", "-n", name, "link", "set", "eth0", "up")
	run(t, "ip", "-n", name, "route", "add", podNet, "via", "10.251.0.1")
	return &pod{n: n, ns: name, path: "/var/run/netns/" + name}, netip.MustParseAddr("10.251.0.2")
}

// NetworkPolicy with pods wired by the plugin and real packets, compiled
// from policy objects by the agent's compiler: same-node traffic judged
// before the redirect, replies of allowed connections, the node's own
// traffic, traffic the host delivers from outside (to_pod), a new pod
// pending until its policy is in place, and the counters, inspect and the
// monitor's drop events.
func TestPolicy(t *testing.T) {
	n := newNode(t, nil)
	n.writeConflist()
	web, db, other := n.newNS(), n.newNS(), n.newNS()
	n.addAs(web, "x", "web")
	n.addAs(db, "x", "db")
	n.addAs(other, "y", "other")
	for _, p := range []*pod{web, db, other} {
		serveIn(t, p, "serve", ":8080")
		serveIn(t, p, "serve", ":9090")
	}
	ext, _ := outsideNS(t, n, "10.250.0.0/24")
	m, err := maps.Open(n.pinRoot)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()

	mkPod := func(ns, name string, ip netip.Addr, app string) *corev1.Pod {
		return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"app": app}},
			Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "c",
				Ports: []corev1.ContainerPort{{Name: "api", ContainerPort: 9090}}}}},
			Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIPs: []corev1.PodIP{{IP: ip.String()}}}}
	}
	input := policy.Input{
		Pods: []*corev1.Pod{mkPod("x", "web", web.ip(false), "web"), mkPod("x", "db", db.ip(false), "db"),
			mkPod("y", "other", other.ip(false), "web")},
		Namespaces: []*corev1.Namespace{{ObjectMeta: metav1.ObjectMeta{Name: "x"}}, {ObjectMeta: metav1.ObjectMeta{Name: "y"}}},
		Policies: []*networkingv1.NetworkPolicy{{
			ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "db-from-web"},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "db"}},
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
				Ingress: []networkingv1.NetworkPolicyIngressRule{
					{From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}}}},
						Ports: []networkingv1.NetworkPolicyPort{{Port: ptr.To(intstr.FromString("api"))}}},
					{From: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "10.251.0.0/24"}}},
						Ports: []networkingv1.NetworkPolicyPort{{Port: ptr.To(intstr.FromInt32(8080))}}},
				},
			},
		}},
	}
	comp := policy.NewCompiler()
	ap := policy.NewApplier(m)
	program := func() {
		t.Helper()
		locals, err := policy.Locals(n.stateDir)
		if err != nil {
			t.Fatal(err)
		}
		input.Locals = locals
		if input.NodeAddrs, err = policy.NodeAddrs(); err != nil {
			t.Fatal(err)
		}
		st, errs := comp.Compile(input)
		if len(errs) > 0 {
			t.Fatal(errs)
		}
		var local []int
		for _, l := range locals {
			local = append(local, l.Ifindex)
		}
		if err := ap.Apply(st, local); err != nil {
			t.Fatal(err)
		}
		if err := nodefile.WritePolicy(n.stateDir, nodefile.Policy{Namespaces: st.Namespaces, Selecting: st.Selecting}); err != nil {
			t.Fatal(err)
		}
	}
	program()

	// The monitor, reading drop events while the flows below run.
	mon := exec.Command(filepath.Join(binDir, "ebpf-cni"), "monitor", "--json", "-n", "2", "--timeout", "20s",
		"--pin-root", n.pinRoot, "--state-dir", n.stateDir)
	var monOut bytes.Buffer
	mon.Stdout, mon.Stderr = &monOut, &monOut
	if err := mon.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)

	dial := func(from *pod, to netip.AddrPort) error {
		return probeCmd(from, -1, "dial", to.String()).Run()
	}
	db9090 := netip.AddrPortFrom(db.ip(false), 9090)
	for _, c := range []struct {
		what  string
		from  *pod
		to    netip.AddrPort
		allow bool
	}{
		{"web -> db on its named port api (9090)", web, db9090, true},
		{"web -> db on 8080", web, netip.AddrPortFrom(db.ip(false), 8080), false},
		{"other (app=web in another namespace) -> db", other, db9090, false},
		{"outside, through the host, to 8080 (ipBlock)", ext, netip.AddrPortFrom(db.ip(false), 8080), true},
		{"outside to 9090", ext, db9090, false},
		{"db -> web (db's egress is open; web not isolated)", db, netip.AddrPortFrom(web.ip(false), 8080), true},
	} {
		err := dial(c.from, c.to)
		if (err == nil) != c.allow {
			peers, _ := m.Peers()
			rules, _ := m.Rules()
			t.Errorf("%s: %v, want allowed %v\npeers %v\nrules %v", c.what, err, c.allow, peers, rules)
		}
	}
	// The node itself (a kubelet probe) is always allowed.
	if out, err := probeCmd(nil, -1, "dial", db9090.String()).CombinedOutput(); err != nil {
		t.Errorf("host -> isolated db: %v %s", err, out)
	}
	if err := mon.Wait(); err != nil {
		t.Errorf("monitor: %v: %s", err, monOut.String())
	}
	var drops []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(monOut.String()), "\n") {
		var d map[string]any
		if err := json.Unmarshal([]byte(line), &d); err != nil {
			t.Fatalf("monitor output %q: %v", line, err)
		}
		drops = append(drops, d)
	}
	if len(drops) != 2 || drops[0]["pod"] != "x/db" || drops[0]["direction"] != "ingress" || drops[0]["reason"] != "policy" ||
		!strings.HasPrefix(drops[0]["src"].(string), web.ip(false).String()+":") || drops[0]["dst"] != db.ip(false).String()+":8080" {
		t.Errorf("monitor reported %v, want web's SYN to db:8080 first, dropped by db's ingress policy", drops)
	}
	rep := n.inspect()[db.ip(false)]
	if !rep.Policy.Ingress || rep.Policy.Egress || rep.Policy.Counters.IngressAllowed != 2 || rep.Policy.Counters.IngressDenied < 3 ||
		len(rep.Policy.Selecting) != 1 || rep.Policy.Selecting[0] != "x/db-from-web" {
		t.Errorf("inspect of db: %+v", rep.Policy)
	}

	// A new pod of x (a namespace with policies) is pending from ADD on:
	// only the node reaches it, until its policy is programmed.
	late := n.newNS()
	n.addAs(late, "x", "late")
	serveIn(t, late, "serve", ":8080")
	if rep := n.inspect()[late.ip(false)]; !rep.Policy.Pending {
		t.Errorf("new pod of x not pending: %+v", rep.Policy)
	}
	if err := dial(web, netip.AddrPortFrom(late.ip(false), 8080)); err == nil {
		t.Errorf("a pending pod was reachable from another pod")
	}
	if out, err := probeCmd(nil, -1, "dial", netip.AddrPortFrom(late.ip(false), 8080).String()).CombinedOutput(); err != nil {
		t.Errorf("host -> pending pod: %v %s", err, out)
	}
	input.Pods = append(input.Pods, mkPod("x", "late", late.ip(false), "late"))
	program()
	if err := dial(web, netip.AddrPortFrom(late.ip(false), 8080)); err != nil {
		t.Errorf("web -> late after its (empty) policy was programmed: %v", err)
	}
	// A pod of a namespace without policies is never pending.
	free := n.newNS()
	n.addAs(free, "y", "free")
	if rep := n.inspect()[free.ip(false)]; rep.Policy.Pending || rep.Policy.Ingress {
		t.Errorf("new pod of y isolated: %+v", rep.Policy)
	}
	// DEL removes its policy entry.
	n.del(late)
	if pols, _ := m.EPPolicies(); len(pols) != 1 {
		t.Errorf("policy entries after DEL: %v, want db's only", pols)
	}
}
