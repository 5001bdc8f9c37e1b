package services

import (
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/ebpf-cni/ebpf-cni/internal/maps"
)

// table is an in-memory Table that checks the applier's write order: a
// frontend's count never points past its slots, a slot never at a missing
// backend.
type table struct {
	t        *testing.T
	svc      map[slotKey]maps.Service
	backends map[uint32]maps.Backend
	matches  map[[2]uint32]bool
}

type slotKey struct {
	f    maps.Frontend
	slot uint16
}

func newTable(t *testing.T) *table {
	return &table{t: t, svc: map[slotKey]maps.Service{}, backends: map[uint32]maps.Backend{}, matches: map[[2]uint32]bool{}}
}

func (x *table) PutService(f maps.Frontend, s maps.Service) error {
	for i := uint16(1); i <= s.Count; i++ {
		if _, ok := x.svc[slotKey{f, i}]; !ok {
			x.t.Errorf("frontend %s written with count %d before its slot %d", f, s.Count, i)
		}
	}
	x.svc[slotKey{f, 0}] = s
	return nil
}

func (x *table) PutSlot(f maps.Frontend, slot uint16, backend uint32) error {
	if _, ok := x.backends[backend]; !ok {
		x.t.Errorf("slot %d of %s points at backend %d before it exists", slot, f, backend)
	}
	x.svc[slotKey{f, slot}] = maps.Service{ID: backend}
	return nil
}

func (x *table) DeleteSlot(f maps.Frontend, slot uint16) error {
	if fe, ok := x.svc[slotKey{f, 0}]; ok && slot > 0 && slot <= fe.Count {
		x.t.Errorf("slot %d of %s deleted while the frontend counts %d", slot, f, fe.Count)
	}
	delete(x.svc, slotKey{f, slot})
	return nil
}

func (x *table) PutBackend(id uint32, b maps.Backend) error { x.backends[id] = b; return nil }

func (x *table) DeleteBackend(id uint32) error {
	for k, v := range x.svc {
		if k.slot > 0 && v.ID == id {
			x.t.Errorf("backend %d deleted while slot %d of %s uses it", id, k.slot, k.f)
		}
	}
	delete(x.backends, id)
	return nil
}

func (x *table) PutAffinityMatch(id, b uint32) error { x.matches[[2]uint32{id, b}] = true; return nil }
func (x *table) DeleteAffinityMatch(id, b uint32) error {
	delete(x.matches, [2]uint32{id, b})
	return nil
}

// dump renders what the datapath would resolve: one line per frontend,
// "addr:port/proto scope [flags] timeout -> backends".
func (x *table) dump() []string {
	var out []string
	for k, v := range x.svc {
		if k.slot != 0 {
			continue
		}
		var bs []string
		for i := uint16(1); i <= v.Count; i++ {
			b := x.backends[x.svc[slotKey{k.f, i}].ID]
			bs = append(bs, b.Addr.String())
			if v.Flags&maps.SvcAffinity != 0 && !x.matches[[2]uint32{v.ID, x.svc[slotKey{k.f, i}].ID}] {
				bs[len(bs)-1] += "(no affinity match)"
			}
		}
		sort.Strings(bs)
		scope := map[maps.Scope]string{maps.ScopeInt: "int", maps.ScopeExt: "ext"}[k.f.Scope]
		line := fmt.Sprintf("%s/%d %s%s", netip.AddrPortFrom(k.f.Addr, k.f.Port), k.f.Proto, scope, flagNames(v.Flags))
		if v.AffinityTimeout > 0 {
			line += fmt.Sprintf(" %ds", v.AffinityTimeout)
		}
		out = append(out, line+" -> "+strings.Join(bs, ","))
	}
	sort.Strings(out)
	return out
}

func flagNames(f maps.SvcFlags) string {
	var s string
	for _, n := range []struct {
		f    maps.SvcFlags
		name string
	}{{maps.SvcNodePort, "nodeport"}, {maps.SvcExternal, "external"}, {maps.SvcLocal, "local"}, {maps.SvcAffinity, "affinity"}, {maps.SvcAddress, "address"}} {
		if f&n.f != 0 {
			s += " " + n.name
		}
	}
	return s
}

// Objects.

type ep struct {
	addr                        string
	node                        string
	ready, serving, terminating *bool
}

func slice(name, svc string, family discoveryv1.AddressType, ports map[string]int32, eps ...ep) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "default", Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: family,
	}
	names := make([]string, 0, len(ports))
	for n := range ports {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		proto := corev1.ProtocolTCP
		pn := n
		if strings.HasPrefix(n, "udp:") {
			proto, pn = corev1.ProtocolUDP, strings.TrimPrefix(n, "udp:")
		}
		s.Ports = append(s.Ports, discoveryv1.EndpointPort{Name: ptr.To(pn), Port: ptr.To(ports[n]), Protocol: ptr.To(proto)})
	}
	for _, e := range eps {
		d := discoveryv1.Endpoint{Addresses: []string{e.addr}, Conditions: discoveryv1.EndpointConditions{Ready: e.ready, Serving: e.serving, Terminating: e.terminating}}
		if e.node != "" {
			d.NodeName = ptr.To(e.node)
		}
		s.Endpoints = append(s.Endpoints, d)
	}
	return s
}

func service(name string, mod func(*corev1.Service)) *corev1.Service {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeClusterIP, ClusterIP: "10.96.0.10", ClusterIPs: []string{"10.96.0.10"},
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP, TargetPort: intstr.FromString("web")}}},
	}
	if mod != nil {
		mod(s)
	}
	return s
}

var (
	yes = ptr.To(true)
	no  = ptr.To(false)
)

// Service and EndpointSlice objects in, map contents out: every feature of
// the Service datapath as kube-proxy defines it.
func TestDesired(t *testing.T) {
	web := map[string]int32{"http": 8080}
	two := []ep{{addr: "10.244.0.5", node: "n1"}, {addr: "10.244.1.7", node: "n2"}}
	tests := []struct {
		name   string
		svc    *corev1.Service
		slices []*discoveryv1.EndpointSlice
		want   []string
		skip   []string
	}{
		{
			name:   "ClusterIP: ready endpoints, target port from the slice, other ports of the address refused",
			svc:    service("a", nil),
			slices: []*discoveryv1.EndpointSlice{slice("a-1", "a", discoveryv1.AddressTypeIPv4, web, two...)},
			want:   []string{"10.96.0.10:0/0 int address -> ", "10.96.0.10:80/6 int -> 10.244.0.5:8080,10.244.1.7:8080"},
		},
		{
			name:   "no endpoints: a frontend without backends (refused at once)",
			svc:    service("a", nil),
			slices: nil,
			want:   []string{"10.96.0.10:0/0 int address -> ", "10.96.0.10:80/6 int -> "},
		},
		{
			name: "several ports, TCP and UDP, named target ports resolved per slice, endpoints in two slices",
			svc: service("dns", func(s *corev1.Service) {
				s.Spec.Ports = []corev1.ServicePort{{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP}, {Name: "dns-tcp", Port: 53, Protocol: corev1.ProtocolTCP}}
			}),
			slices: []*discoveryv1.EndpointSlice{
				slice("dns-1", "dns", discoveryv1.AddressTypeIPv4, map[string]int32{"udp:dns": 5353, "dns-tcp": 5353}, ep{addr: "10.244.0.2"}),
				slice("dns-2", "dns", discoveryv1.AddressTypeIPv4, map[string]int32{"udp:dns": 1053, "dns-tcp": 1053}, ep{addr: "10.244.0.3"}),
			},
			want: []string{"10.96.0.10:0/0 int address -> ", "10.96.0.10:53/17 int -> 10.244.0.2:5353,10.244.0.3:1053",
				"10.96.0.10:53/6 int -> 10.244.0.2:5353,10.244.0.3:1053"},
		},
		{
			name: "dual stack: each ClusterIP with the slices of its family",
			svc: service("ds", func(s *corev1.Service) {
				s.Spec.ClusterIPs = []string{"10.96.0.10", "fd00:96::10"}
			}),
			slices: []*discoveryv1.EndpointSlice{
				slice("ds-4", "ds", discoveryv1.AddressTypeIPv4, web, ep{addr: "10.244.0.5"}),
				slice("ds-6", "ds", discoveryv1.AddressTypeIPv6, web, ep{addr: "fd00:244::5"}),
			},
			want: []string{"10.96.0.10:0/0 int address -> ", "10.96.0.10:80/6 int -> 10.244.0.5:8080",
				"[fd00:96::10]:0/0 int address -> ", "[fd00:96::10]:80/6 int -> [fd00:244::5]:8080"},
		},
		{
			name: "not ready and terminating: only ready endpoints while there are some",
			svc:  service("a", nil),
			slices: []*discoveryv1.EndpointSlice{slice("a-1", "a", discoveryv1.AddressTypeIPv4, web,
				ep{addr: "10.244.0.5"}, ep{addr: "10.244.0.6", ready: no, serving: yes, terminating: yes},
				ep{addr: "10.244.0.7", ready: no, serving: no})},
			want: []string{"10.96.0.10:0/0 int address -> ", "10.96.0.10:80/6 int -> 10.244.0.5:8080"},
		},
		{
			name: "no ready endpoint left: the serving terminating ones, never the not serving",
			svc:  service("a", nil),
			slices: []*discoveryv1.EndpointSlice{slice("a-1", "a", discoveryv1.AddressTypeIPv4, web,
				ep{addr: "10.244.0.6", ready: no, serving: yes, terminating: yes},
				ep{addr: "10.244.0.7", ready: no, serving: no, terminating: yes}, ep{addr: "10.244.0.8", ready: no})},
			want: []string{"10.96.0.10:0/0 int address -> ", "10.96.0.10:80/6 int -> 10.244.0.6:8080"},
		},
		{
			name: "NodePort, externalTrafficPolicy Cluster: every node address, all endpoints both ways",
			svc: service("np", func(s *corev1.Service) {
				s.Spec.Type = corev1.ServiceTypeNodePort
				s.Spec.Ports[0].NodePort = 30080
			}),
			slices: []*discoveryv1.EndpointSlice{slice("np-1", "np", discoveryv1.AddressTypeIPv4, web, two...)},
			want: []string{"0.0.0.0:30080/6 ext nodeport -> 10.244.0.5:8080,10.244.1.7:8080",
				"0.0.0.0:30080/6 int nodeport -> 10.244.0.5:8080,10.244.1.7:8080",
				"10.96.0.10:0/0 int address -> ", "10.96.0.10:80/6 int -> 10.244.0.5:8080,10.244.1.7:8080"},
		},
		{
			name: "NodePort, externalTrafficPolicy Local: this node's endpoints from outside, all from the node's sockets",
			svc: service("np", func(s *corev1.Service) {
				s.Spec.Type = corev1.ServiceTypeNodePort
				s.Spec.Ports[0].NodePort = 30080
				s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
			}),
			slices: []*discoveryv1.EndpointSlice{slice("np-1", "np", discoveryv1.AddressTypeIPv4, web, two...)},
			want: []string{"0.0.0.0:30080/6 ext nodeport local -> 10.244.0.5:8080",
				"0.0.0.0:30080/6 int nodeport -> 10.244.0.5:8080,10.244.1.7:8080",
				"10.96.0.10:0/0 int address -> ", "10.96.0.10:80/6 int -> 10.244.0.5:8080,10.244.1.7:8080"},
		},
		{
			name: "externalTrafficPolicy Local, endpoints on other nodes only: dropped from outside (local, none)",
			svc: service("np", func(s *corev1.Service) {
				s.Spec.Type = corev1.ServiceTypeNodePort
				s.Spec.Ports[0].NodePort = 30080
				s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
			}),
			slices: []*discoveryv1.EndpointSlice{slice("np-1", "np", discoveryv1.AddressTypeIPv4, web, ep{addr: "10.244.1.7", node: "n2"})},
			want: []string{"0.0.0.0:30080/6 ext nodeport local -> ", "0.0.0.0:30080/6 int nodeport -> 10.244.1.7:8080",
				"10.96.0.10:0/0 int address -> ", "10.96.0.10:80/6 int -> 10.244.1.7:8080"},
		},
		{
			name: "externalTrafficPolicy Local without any endpoint: refused by the host (not local)",
			svc: service("np", func(s *corev1.Service) {
				s.Spec.Type = corev1.ServiceTypeNodePort
				s.Spec.Ports[0].NodePort = 30080
				s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
			}),
			want: []string{"0.0.0.0:30080/6 ext nodeport -> ", "0.0.0.0:30080/6 int nodeport -> ",
				"10.96.0.10:0/0 int address -> ", "10.96.0.10:80/6 int -> "},
		},
		{
			name: "internalTrafficPolicy Local: the ClusterIP reaches this node's endpoints only",
			svc: service("a", func(s *corev1.Service) {
				s.Spec.InternalTrafficPolicy = ptr.To(corev1.ServiceInternalTrafficPolicyLocal)
			}),
			slices: []*discoveryv1.EndpointSlice{slice("a-1", "a", discoveryv1.AddressTypeIPv4, web, two...)},
			want:   []string{"10.96.0.10:0/0 int address -> ", "10.96.0.10:80/6 int -> 10.244.0.5:8080"},
		},
		{
			name: "external IPs and load-balancer addresses: from sockets and from outside",
			svc: service("lb", func(s *corev1.Service) {
				s.Spec.Type = corev1.ServiceTypeLoadBalancer
				s.Spec.Ports[0].NodePort = 30081
				s.Spec.ExternalIPs = []string{"203.0.113.7", "2001:db8::7"}
				s.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: "198.51.100.9"}}
			}),
			slices: []*discoveryv1.EndpointSlice{slice("lb-1", "lb", discoveryv1.AddressTypeIPv4, web, ep{addr: "10.244.0.5", node: "n1"})},
			want: []string{"0.0.0.0:30081/6 ext nodeport -> 10.244.0.5:8080", "0.0.0.0:30081/6 int nodeport -> 10.244.0.5:8080",
				"10.96.0.10:0/0 int address -> ", "10.96.0.10:80/6 int -> 10.244.0.5:8080",
				"198.51.100.9:80/6 ext external -> 10.244.0.5:8080", "198.51.100.9:80/6 int external -> 10.244.0.5:8080",
				"203.0.113.7:80/6 ext external -> 10.244.0.5:8080", "203.0.113.7:80/6 int external -> 10.244.0.5:8080"},
		},
		{
			name: "session affinity ClientIP: default timeout",
			svc: service("a", func(s *corev1.Service) {
				s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
			}),
			slices: []*discoveryv1.EndpointSlice{slice("a-1", "a", discoveryv1.AddressTypeIPv4, web, two...)},
			want:   []string{"10.96.0.10:0/0 int address -> ", "10.96.0.10:80/6 int affinity 10800s -> 10.244.0.5:8080,10.244.1.7:8080"},
		},
		{
			name: "session affinity ClientIP: its timeout",
			svc: service("a", func(s *corev1.Service) {
				s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
				s.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr.To(int32(60))}}
			}),
			slices: []*discoveryv1.EndpointSlice{slice("a-1", "a", discoveryv1.AddressTypeIPv4, web, two...)},
			want:   []string{"10.96.0.10:0/0 int address -> ", "10.96.0.10:80/6 int affinity 60s -> 10.244.0.5:8080,10.244.1.7:8080"},
		},
		{
			name: "headless: nothing",
			svc: service("h", func(s *corev1.Service) {
				s.Spec.ClusterIP, s.Spec.ClusterIPs = "None", []string{"None"}
			}),
			slices: []*discoveryv1.EndpointSlice{slice("h-1", "h", discoveryv1.AddressTypeIPv4, web, two...)},
		},
		{
			name: "ExternalName: nothing",
			svc: service("x", func(s *corev1.Service) {
				s.Spec.Type, s.Spec.ExternalName = corev1.ServiceTypeExternalName, "example.org"
				s.Spec.ClusterIP, s.Spec.ClusterIPs = "", nil
			}),
		},
		{
			name: "SCTP: skipped with a reason, the rest served",
			svc: service("s", func(s *corev1.Service) {
				s.Spec.Ports = append(s.Spec.Ports, corev1.ServicePort{Name: "sctp", Port: 9, Protocol: corev1.ProtocolSCTP})
			}),
			slices: []*discoveryv1.EndpointSlice{slice("s-1", "s", discoveryv1.AddressTypeIPv4, web, ep{addr: "10.244.0.5"})},
			want:   []string{"10.96.0.10:0/0 int address -> ", "10.96.0.10:80/6 int -> 10.244.0.5:8080"},
			skip:   []string{"sctp"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			want, skipped := Desired(tt.svc, tt.slices, "n1")
			x := newTable(t)
			if err := NewApplier(x).Apply("default/"+tt.svc.Name, want); err != nil {
				t.Fatal(err)
			}
			if got := x.dump(); !slices.Equal(got, tt.want) {
				t.Errorf("maps:\n  %s\nwant:\n  %s", strings.Join(got, "\n  "), strings.Join(tt.want, "\n  "))
			}
			var names []string
			for _, s := range skipped {
				names = append(names, s.Port)
			}
			if !slices.Equal(names, tt.skip) {
				t.Errorf("skipped %v, want %v", skipped, tt.skip)
			}
		})
	}
}

// Updates write only what changed, in an order readers can follow; shared
// backends live while any frontend uses them; removal and restart leave
// exactly the desired entries.
func TestApplierUpdates(t *testing.T) {
	x := newTable(t)
	ap := NewApplier(x)
	be := func(s string) maps.Backend { return maps.Backend{Addr: netip.MustParseAddrPort(s), Proto: 6} }
	fe := func(ip string, port uint16) maps.Frontend {
		return maps.Frontend{Addr: netip.MustParseAddr(ip), Port: port, Proto: 6, Scope: maps.ScopeInt}
	}
	a := []Frontend{{Key: fe("10.96.0.1", 80), Backends: []maps.Backend{be("10.0.0.1:80"), be("10.0.0.2:80"), be("10.0.0.3:80")}}}
	b := []Frontend{{Key: fe("10.96.0.2", 80), Backends: []maps.Backend{be("10.0.0.2:80")}}}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(ap.Apply("default/a", a))
	must(ap.Apply("default/b", b))
	if len(x.backends) != 3 {
		t.Fatalf("%d backends, want 3 (10.0.0.2:80 shared)", len(x.backends))
	}
	w := ap.Writes()
	must(ap.Apply("default/a", a))
	if ap.Writes() != w {
		t.Errorf("an unchanged Service made %d writes", ap.Writes()-w)
	}
	// Scale a down to one backend: the shared backend stays for b.
	a[0].Backends = a[0].Backends[:1]
	must(ap.Apply("default/a", a))
	if got := x.dump(); !slices.Equal(got, []string{"10.96.0.1:80/6 int -> 10.0.0.1:80", "10.96.0.2:80/6 int -> 10.0.0.2:80"}) {
		t.Errorf("after scale-down: %v", got)
	}
	if len(x.backends) != 2 || len(x.svc) != 4 {
		t.Errorf("after scale-down: %d backends and %d entries, want 2 and 4", len(x.backends), len(x.svc))
	}
	// Delete a.
	must(ap.Apply("default/a", nil))
	if got := x.dump(); !slices.Equal(got, []string{"10.96.0.2:80/6 int -> 10.0.0.2:80"}) || len(x.backends) != 1 {
		t.Errorf("after deleting a: %v, %d backends", got, len(x.backends))
	}
	// A restart: a new applier restores from the maps; Services that still
	// exist are claimed (and rewritten), the rest pruned.
	must(ap.Apply("default/c", []Frontend{{Key: fe("10.96.0.3", 443), Backends: []maps.Backend{be("10.0.0.9:443")}}}))
	var entries []maps.ServiceEntry
	for k, v := range x.svc {
		entries = append(entries, maps.ServiceEntry{Frontend: k.f, Slot: k.slot, Service: v})
	}
	ap2 := NewApplier(x)
	ap2.Restore(entries, x.backends)
	must(ap2.Apply("default/b", b))
	n, err := ap2.Prune()
	must(err)
	if n != 1 {
		t.Errorf("pruned %d frontends, want 1 (c is gone)", n)
	}
	if got := x.dump(); !slices.Equal(got, []string{"10.96.0.2:80/6 int -> 10.0.0.2:80"}) || len(x.backends) != 1 {
		t.Errorf("after restart and prune: %v, %d backends", got, len(x.backends))
	}
	// Session affinity turned on and off: matches follow.
	b[0].Flags, b[0].AffinityTimeout = maps.SvcAffinity, 30
	must(ap2.Apply("default/b", b))
	if len(x.matches) != 1 {
		t.Errorf("%d affinity matches, want 1", len(x.matches))
	}
	b[0].Flags, b[0].AffinityTimeout = 0, 0
	must(ap2.Apply("default/b", b))
	if len(x.matches) != 0 {
		t.Errorf("%d affinity matches after affinity went off, want 0", len(x.matches))
	}
	// A frontend claimed by two Services: the second is refused.
	if err := ap2.Apply("default/d", b); err == nil {
		t.Errorf("a second Service took over frontend %s", b[0].Key)
	}
}
