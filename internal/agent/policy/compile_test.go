package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/ebpf-cni/ebpf-cni/internal/maps"
)

// verdict is what the datapath (bpf/policy.h) decides for a new flow of
// local pod ifindex with peer in direction dir, read from a compiled
// State: the ipcache's longest prefix, then the pod's set with the peer's
// identity, its CIDR class, or any peer.
func verdict(st State, ifindex int, dir uint8, peer netip.Addr, proto uint8, port uint16) bool {
	ep, ok := st.Endpoints[ifindex]
	if !ok {
		return true
	}
	pi := maps.Peer{Identity: maps.IDWorld}
	best := -1
	for p, v := range st.Peers {
		if p.Contains(peer) && p.Bits() > best {
			pi, best = v, p.Bits()
		}
	}
	if pi.Identity == maps.IDHost {
		return true
	}
	if ep.Flags&maps.PolPending != 0 {
		return false
	}
	flag, set := maps.PolIngress, ep.SetIn
	if dir == maps.Egress {
		flag, set = maps.PolEgress, ep.SetOut
	}
	if ep.Flags&flag == 0 {
		return true
	}
	for _, r := range st.Sets[set] {
		if r.Dir != dir || (r.Peer != pi.Identity && (r.Peer != pi.Class || pi.Class == 0) && r.Peer != maps.IDAny) {
			continue
		}
		if r.Proto == 0 || (r.Proto == proto && (r.Bits == 0 || port>>(16-r.Bits) == r.Port>>(16-r.Bits))) {
			return true
		}
	}
	return false
}

func pod(ns, name, ip string, lbls map[string]string, ports ...corev1.ContainerPort) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: lbls},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "c", Ports: ports}}},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}},
	}
}

func ns(name string, lbls map[string]string) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: lbls}}
}

type flow struct {
	pod   string // local pod (its ifindex: its index in the locals, + 1)
	dir   uint8
	peer  string
	proto uint8
	port  uint16
	allow bool
}

// The cluster of every case: namespaces x (team=a) and y (team=b); pods
// x/a (app=web, port "http" 8080/TCP and "dns" 53/UDP), x/b (app=db, "http"
// 9090), y/c (app=web, "http" 7070); x/a and x/b are local.
func cluster() Input {
	return Input{
		Pods: []*corev1.Pod{
			pod("x", "a", "10.0.0.1", map[string]string{"app": "web"},
				corev1.ContainerPort{Name: "http", ContainerPort: 8080}, corev1.ContainerPort{Name: "dns", ContainerPort: 53, Protocol: corev1.ProtocolUDP}),
			pod("x", "b", "10.0.0.2", map[string]string{"app": "db"}, corev1.ContainerPort{Name: "http", ContainerPort: 9090}),
			pod("y", "c", "10.0.1.3", map[string]string{"app": "web"}, corev1.ContainerPort{Name: "http", ContainerPort: 7070}),
		},
		Namespaces: []*corev1.Namespace{ns("x", map[string]string{"team": "a"}), ns("y", map[string]string{"team": "b"})},
		Locals: []Local{{Namespace: "x", Name: "a", Ifindex: 1, IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}},
			{Namespace: "x", Name: "b", Ifindex: 2, IPs: []netip.Addr{netip.MustParseAddr("10.0.0.2")}}},
		NodeAddrs: []netip.Addr{netip.MustParseAddr("192.168.0.10")},
	}
}

func policy(name string, sel map[string]string, types []networkingv1.PolicyType, ing []networkingv1.NetworkPolicyIngressRule,
	eg []networkingv1.NetworkPolicyEgressRule) *networkingv1.NetworkPolicy {
	return &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: name},
		Spec: networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: sel}, PolicyTypes: types,
			Ingress: ing, Egress: eg},
	}
}

var (
	in   = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
	out  = []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}
	both = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}
	tcp  = ptr.To(corev1.ProtocolTCP)
	udp  = ptr.To(corev1.ProtocolUDP)
	sctp = ptr.To(corev1.ProtocolSCTP)
)

func portNum(p int) *intstr.IntOrString { v := intstr.FromInt32(int32(p)); return &v }
func portName(n string) *intstr.IntOrString {
	v := intstr.FromString(n)
	return &v
}

// NetworkPolicy objects in, maps out: every feature of networking.k8s.io/v1,
// checked as the datapath would decide flows.
func TestCompile(t *testing.T) {
	a, b := "a", "b"
	const I, E = maps.Ingress, maps.Egress
	tests := []struct {
		name  string
		pols  []*networkingv1.NetworkPolicy
		nsMod func(*Input)
		flows []flow
	}{
		{name: "no policy: nobody isolated", flows: []flow{
			{a, I, "10.0.1.3", 6, 80, true}, {a, E, "8.8.8.8", 17, 53, true}}},
		{name: "deny all ingress: isolated in that direction only", pols: []*networkingv1.NetworkPolicy{policy("deny", nil, in, nil, nil)},
			flows: []flow{{a, I, "10.0.1.3", 6, 80, false}, {b, I, "10.0.0.1", 6, 80, false}, {a, E, "10.0.1.3", 6, 80, true},
				{a, I, "192.168.0.10", 6, 80, true} /* its node */}},
		{name: "podSelector peer: pods of the policy's namespace with those labels", pols: []*networkingv1.NetworkPolicy{
			policy("p", map[string]string{"app": "db"}, in, []networkingv1.NetworkPolicyIngressRule{{
				From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}}}}}}, nil)},
			flows: []flow{{b, I, "10.0.0.1", 6, 5432, true}, {b, I, "10.0.1.3", 6, 5432, false} /* app=web, but in y */, {a, I, "10.0.1.3", 6, 1, true}}},
		{name: "namespaceSelector peer: every pod of those namespaces", pols: []*networkingv1.NetworkPolicy{
			policy("p", nil, in, []networkingv1.NetworkPolicyIngressRule{{
				From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": "b"}}}}}}, nil)},
			flows: []flow{{a, I, "10.0.1.3", 6, 1, true}, {a, I, "10.0.0.2", 6, 1, false}, {a, I, "172.16.0.1", 6, 1, false}}},
		{name: "both selectors in one peer: AND", pols: []*networkingv1.NetworkPolicy{
			policy("p", nil, in, []networkingv1.NetworkPolicyIngressRule{{
				From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: &metav1.LabelSelector{},
					PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}}}}}}, nil)},
			flows: []flow{{b, I, "10.0.1.3", 6, 1, true}, {b, I, "10.0.0.1", 6, 1, true}, {a, I, "10.0.0.2", 6, 1, false}}},
		{name: "namespace labels change: re-evaluated", pols: []*networkingv1.NetworkPolicy{
			policy("p", nil, in, []networkingv1.NetworkPolicyIngressRule{{
				From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": "a"}}}}}}, nil)},
			nsMod: func(in *Input) { in.Namespaces[1].Labels = map[string]string{"team": "a"} },
			flows: []flow{{a, I, "10.0.1.3", 6, 1, true}}},
		{name: "ipBlock with except, pod addresses included", pols: []*networkingv1.NetworkPolicy{
			policy("p", nil, out, nil, []networkingv1.NetworkPolicyEgressRule{{
				To: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "10.0.0.0/16", Except: []string{"10.0.1.0/24"}}}}}})},
			flows: []flow{{a, E, "10.0.0.2", 6, 1, true}, {a, E, "10.0.1.3", 6, 1, false}, {a, E, "10.0.7.7", 6, 1, true},
				{a, E, "10.1.0.1", 6, 1, false}, {a, E, "192.168.0.10", 6, 1, true} /* its node */}},
		{name: "ipBlock of one pod address", pols: []*networkingv1.NetworkPolicy{
			policy("p", nil, in, []networkingv1.NetworkPolicyIngressRule{{
				From: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "10.0.1.3/32"}}}}}, nil)},
			flows: []flow{{a, I, "10.0.1.3", 6, 1, true}, {a, I, "10.0.0.2", 6, 1, false}}},
		{name: "ports: number, range with endPort, protocol only, UDP and SCTP", pols: []*networkingv1.NetworkPolicy{
			policy("p", nil, in, []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{
				{Protocol: tcp, Port: portNum(80)}, {Protocol: tcp, Port: portNum(1000), EndPort: ptr.To(int32(1100))},
				{Protocol: udp}, {Protocol: sctp, Port: portNum(9)}}}}, nil)},
			flows: []flow{{a, I, "10.0.1.3", 6, 80, true}, {a, I, "10.0.1.3", 6, 81, false}, {a, I, "10.0.1.3", 6, 999, false},
				{a, I, "10.0.1.3", 6, 1000, true}, {a, I, "10.0.1.3", 6, 1064, true}, {a, I, "10.0.1.3", 6, 1100, true},
				{a, I, "10.0.1.3", 6, 1101, false}, {a, I, "8.8.8.8", 17, 4242, true}, {a, I, "10.0.1.3", 132, 9, true},
				{a, I, "10.0.1.3", 132, 10, false}, {a, I, "10.0.1.3", 1, 0, false} /* ICMP: not TCP/UDP/SCTP */}},
		{name: "named ports: ingress on the pod itself (per pod), with protocol", pols: []*networkingv1.NetworkPolicy{
			policy("p", nil, in, []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{
				{Protocol: tcp, Port: portName("http")}, {Protocol: udp, Port: portName("dns")}}}}, nil)},
			flows: []flow{{a, I, "10.0.1.3", 6, 8080, true}, {b, I, "10.0.1.3", 6, 9090, true}, {b, I, "10.0.1.3", 6, 8080, false},
				{a, I, "10.0.1.3", 17, 53, true}, {a, I, "10.0.1.3", 6, 53, false}}},
		{name: "named ports: egress on each destination pod", pols: []*networkingv1.NetworkPolicy{
			policy("p", nil, out, nil, []networkingv1.NetworkPolicyEgressRule{{Ports: []networkingv1.NetworkPolicyPort{
				{Protocol: tcp, Port: portName("http")}}}})},
			flows: []flow{{a, E, "10.0.1.3", 6, 7070, true}, {a, E, "10.0.1.3", 6, 9090, false}, {a, E, "10.0.0.2", 6, 9090, true},
				{a, E, "8.8.8.8", 6, 7070, false} /* not a pod: no named ports */}},
		{name: "rules add up across policies; policyTypes decide isolation", pols: []*networkingv1.NetworkPolicy{
			policy("one", nil, both, []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{{Protocol: tcp, Port: portNum(80)}}}}, nil),
			policy("two", nil, in, []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{{Protocol: tcp, Port: portNum(443)}}}}, nil)},
			flows: []flow{{a, I, "8.8.8.8", 6, 80, true}, {a, I, "8.8.8.8", 6, 443, true}, {a, I, "8.8.8.8", 6, 22, false},
				{a, E, "8.8.8.8", 6, 80, false} /* "one" isolates egress, no egress rule */}},
		{name: "egress only: ingress open", pols: []*networkingv1.NetworkPolicy{policy("p", nil, out, nil, nil)},
			flows: []flow{{a, I, "10.0.1.3", 6, 80, true}, {a, E, "10.0.1.3", 6, 80, false}}},
		{name: "a rule without ports allows every protocol (ICMP too)", pols: []*networkingv1.NetworkPolicy{
			policy("p", nil, in, []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{
				{PodSelector: &metav1.LabelSelector{}}}}}, nil)},
			flows: []flow{{a, I, "10.0.0.2", 1, 0, true}, {a, I, "10.0.0.2", 17, 9, true}, {a, I, "10.0.1.3", 1, 0, false}}},
		{name: "a pod of a namespace with policies, not in the API yet: pending", pols: []*networkingv1.NetworkPolicy{
			policy("p", map[string]string{"app": "nothing"}, in, nil, nil)},
			nsMod: func(in *Input) { in.Pods = in.Pods[1:] },
			flows: []flow{{a, I, "10.0.0.2", 6, 1, false}, {a, E, "10.0.0.2", 6, 1, false}, {a, I, "192.168.0.10", 6, 1, true},
				{b, I, "10.0.1.3", 6, 1, true} /* programmed: not selected */}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			input := cluster()
			input.Policies = tt.pols
			if tt.nsMod != nil {
				tt.nsMod(&input)
			}
			st, errs := NewCompiler().Compile(input)
			if len(errs) > 0 {
				t.Fatalf("compile: %v", errs)
			}
			for _, f := range tt.flows {
				idx := map[string]int{"a": 1, "b": 2}[f.pod]
				got := verdict(st, idx, f.dir, netip.MustParseAddr(f.peer), f.proto, f.port)
				if got != f.allow {
					t.Errorf("x/%s %s %s %d/%d: allowed %v, want %v\nendpoint %+v\nsets %v", f.pod,
						map[uint8]string{I: "from", E: "to"}[f.dir], f.peer, f.proto, f.port, got, f.allow, st.Endpoints[idx], st.Sets)
				}
			}
		})
	}
}

// Port ranges become at most 30 aligned blocks that cover exactly the range.
func TestPortBlocks(t *testing.T) {
	for _, r := range [][2]uint16{{80, 80}, {1000, 1100}, {0, 65535}, {1, 65534}, {32768, 60999}} {
		blocks := portBlocks(r[0], r[1])
		covered := map[int]bool{}
		for _, b := range blocks {
			size := 1 << (16 - b.bits)
			if int(b.port)%size != 0 {
				t.Errorf("%v: block %d/%d not aligned", r, b.port, b.bits)
			}
			for p := int(b.port); p < int(b.port)+size; p++ {
				covered[p] = true
			}
		}
		for p := 0; p < 65536; p++ {
			if covered[p] != (p >= int(r[0]) && p <= int(r[1])) {
				t.Fatalf("%v: port %d covered %v", r, p, covered[p])
			}
		}
		if len(blocks) > 30 {
			t.Errorf("%v: %d blocks", r, len(blocks))
		}
	}
}

// Sets are shared by pods with the same rules and identities stay stable
// across compiles; the applier writes only differences and removes unused
// sets once no pod points at them.
func TestApplyDiffs(t *testing.T) {
	rec := &recorder{}
	c := NewCompiler()
	ap := NewApplier(rec)
	input := cluster()
	input.Policies = []*networkingv1.NetworkPolicy{policy("deny", nil, in, nil, nil)}
	st, _ := c.Compile(input)
	if len(st.Sets) != 1 || st.Endpoints[1].SetIn != st.Endpoints[2].SetIn {
		t.Fatalf("two pods with the same policy: sets %v, endpoints %v", st.Sets, st.Endpoints)
	}
	all := []int{1, 2}
	if err := ap.Apply(st, all); err != nil {
		t.Fatal(err)
	}
	w := ap.Writes()
	st2, _ := c.Compile(input)
	if err := ap.Apply(st2, all); err != nil || ap.Writes() != w {
		t.Errorf("unchanged input: %d writes, %v", ap.Writes()-w, err)
	}
	input.Policies = nil
	st3, _ := c.Compile(input)
	if err := ap.Apply(st3, all); err != nil {
		t.Fatal(err)
	}
	if len(rec.eps) != 0 || len(rec.rules) != 0 {
		t.Errorf("after the policy went: endpoints %v, rules %v", rec.eps, rec.rules)
	}
	if got := fmt.Sprint(rec.peers[netip.MustParsePrefix("10.0.0.1/32")]); got != fmt.Sprint(st.Peers[netip.MustParsePrefix("10.0.0.1/32")]) {
		t.Errorf("identity of 10.0.0.1 changed between compiles: %s", got)
	}
	if !slices.Contains(st.Namespaces, "x") || len(st3.Namespaces) != 0 {
		t.Errorf("namespaces with policies: %v then %v", st.Namespaces, st3.Namespaces)
	}
}

type recorder struct {
	peers map[netip.Prefix]maps.Peer
	rules map[maps.Rule]bool
	eps   map[int]maps.EPPolicy
}

func (r *recorder) init() {
	if r.peers == nil {
		r.peers, r.rules, r.eps = map[netip.Prefix]maps.Peer{}, map[maps.Rule]bool{}, map[int]maps.EPPolicy{}
	}
}
func (r *recorder) PutPeer(p netip.Prefix, v maps.Peer) error { r.init(); r.peers[p] = v; return nil }
func (r *recorder) DeletePeer(p netip.Prefix) error           { r.init(); delete(r.peers, p); return nil }
func (r *recorder) PutRule(x maps.Rule, _ uint32) error       { r.init(); r.rules[x] = true; return nil }
func (r *recorder) DeleteRule(x maps.Rule) error              { r.init(); delete(r.rules, x); return nil }
func (r *recorder) PutEPPolicy(i int, p maps.EPPolicy) error  { r.init(); r.eps[i] = p; return nil }
func (r *recorder) DeleteEPPolicy(i int) error                { r.init(); delete(r.eps, i); return nil }
