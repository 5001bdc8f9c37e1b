package services

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/ebpf-cni/ebpf-cni/internal/maps"
)

// Frontend is one frontend as the datapath needs it: its key, flags and
// backends (in slot order).
type Frontend struct {
	Key             maps.Frontend
	Flags           maps.SvcFlags
	AffinityTimeout uint32
	Backends        []maps.Backend
}

// defaultAffinityTimeout is Kubernetes' default for sessionAffinity
// ClientIP (sessionAffinityConfig.clientIP.timeoutSeconds).
const defaultAffinityTimeout = 10800

// Skipped is a Service port the datapath does not serve, with the reason
// (reported as a log line and a metric).
type Skipped struct {
	Port   string
	Reason string
}

// endpoint is one endpoint of a Service port, as kube-proxy reads it.
type endpoint struct {
	addr                        netip.AddrPort
	ready, serving, terminating bool
	local                       bool
}

// Desired computes the frontends of svc on node from its EndpointSlices,
// as kube-proxy would program them:
//
//   - every ClusterIP (one per family) and port, for sockets of the node
//     (scope INT), with the internalTrafficPolicy's endpoints; and each
//     ClusterIP on any other port, refused (SVC_ADDRESS);
//   - the NodePort on every node address (the wildcard) and every external
//     IP and load-balancer address: for sockets of the node (INT) with the
//     cluster's endpoints, for clients outside the node (EXT) with the
//     externalTrafficPolicy's (Local: this node's only, client address
//     kept, dropped when there are none here but some elsewhere);
//   - endpoints: ready ones; only when none is ready, the serving and
//     terminating ones; sessionAffinity ClientIP on every frontend.
//
// Headless and ExternalName Services have none; ports of protocols other
// than TCP and UDP are returned as skipped.
func Desired(svc *corev1.Service, eps []*discoveryv1.EndpointSlice, node string) ([]Frontend, []Skipped) {
	if svc == nil || svc.Spec.Type == corev1.ServiceTypeExternalName {
		return nil, nil
	}
	ips := clusterIPs(svc)
	if len(ips) == 0 {
		return nil, nil // headless
	}
	var out []Frontend
	var skipped []Skipped
	affinity, timeout := maps.SvcFlags(0), uint32(0)
	if svc.Spec.SessionAffinity == corev1.ServiceAffinityClientIP {
		affinity, timeout = maps.SvcAffinity, defaultAffinityTimeout
		if c := svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil {
			timeout = uint32(*c.ClientIP.TimeoutSeconds)
		}
	}
	internalLocal := svc.Spec.InternalTrafficPolicy != nil && *svc.Spec.InternalTrafficPolicy == corev1.ServiceInternalTrafficPolicyLocal
	externalLocal := svc.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal
	nodePorts := svc.Spec.Type == corev1.ServiceTypeNodePort || svc.Spec.Type == corev1.ServiceTypeLoadBalancer
	for _, ip := range ips {
		out = append(out, Frontend{Key: maps.Frontend{Addr: ip, Scope: maps.ScopeInt}, Flags: maps.SvcAddress})
	}
	for _, sp := range svc.Spec.Ports {
		var proto uint8
		switch sp.Protocol {
		case corev1.ProtocolTCP, "":
			proto = 6
		case corev1.ProtocolUDP:
			proto = 17
		default:
			skipped = append(skipped, Skipped{Port: portName(sp), Reason: fmt.Sprintf("protocol %s is not served (TCP and UDP are)", sp.Protocol)})
			continue
		}
		for _, ip := range ips {
			all := endpointsOf(eps, sp, ip.Is4(), node)
			cluster, local := categorize(all)
			be := func(set []endpoint) []maps.Backend {
				out := make([]maps.Backend, 0, len(set))
				for _, e := range set {
					out = append(out, maps.Backend{Addr: e.addr, Proto: proto})
				}
				return out
			}
			internal := cluster
			if internalLocal {
				internal = local
			}
			external, extFlags := cluster, maps.SvcFlags(0)
			if externalLocal {
				external = local
				// Endpoints elsewhere only: dropped, as kube-proxy does. None
				// at all: the host refuses (SVC_LOCAL unset, see from_node).
				if len(all) > 0 {
					extFlags = maps.SvcLocal
				}
			}
			port := uint16(sp.Port)
			out = append(out, Frontend{Key: maps.Frontend{Addr: ip, Port: port, Proto: proto, Scope: maps.ScopeInt},
				Flags: affinity, AffinityTimeout: timeout, Backends: be(internal)})
			var extAddrs []netip.Addr
			if nodePorts && sp.NodePort != 0 {
				wild := netip.IPv4Unspecified()
				if ip.Is6() {
					wild = netip.IPv6Unspecified()
				}
				for _, scope := range []maps.Scope{maps.ScopeInt, maps.ScopeExt} {
					f := Frontend{Key: maps.Frontend{Addr: wild, Port: uint16(sp.NodePort), Proto: proto, Scope: scope},
						Flags: maps.SvcNodePort | affinity, AffinityTimeout: timeout, Backends: be(cluster)}
					if scope == maps.ScopeExt {
						f.Flags |= extFlags
						f.Backends = be(external)
					}
					out = append(out, f)
				}
			}
			for _, s := range svc.Spec.ExternalIPs {
				if a, err := netip.ParseAddr(s); err == nil && a.Is4() == ip.Is4() {
					extAddrs = append(extAddrs, a)
				}
			}
			if svc.Spec.Type == corev1.ServiceTypeLoadBalancer {
				for _, in := range svc.Status.LoadBalancer.Ingress {
					if a, err := netip.ParseAddr(in.IP); err == nil && a.Is4() == ip.Is4() {
						extAddrs = append(extAddrs, a)
					}
				}
			}
			for _, a := range extAddrs {
				out = append(out,
					Frontend{Key: maps.Frontend{Addr: a, Port: port, Proto: proto, Scope: maps.ScopeInt},
						Flags: maps.SvcExternal | affinity, AffinityTimeout: timeout, Backends: be(cluster)},
					Frontend{Key: maps.Frontend{Addr: a, Port: port, Proto: proto, Scope: maps.ScopeExt},
						Flags: maps.SvcExternal | extFlags | affinity, AffinityTimeout: timeout, Backends: be(external)})
			}
		}
	}
	return dedupe(out), skipped
}

// dedupe keeps the first frontend of each key (two ports of one Service
// claiming the same NodePort or address:port: the API forbids most).
func dedupe(in []Frontend) []Frontend {
	seen := map[maps.Frontend]bool{}
	out := in[:0]
	for _, f := range in {
		if !seen[f.Key] {
			seen[f.Key] = true
			out = append(out, f)
		}
	}
	return out
}

func portName(sp corev1.ServicePort) string {
	if sp.Name != "" {
		return sp.Name
	}
	return fmt.Sprintf("%d/%s", sp.Port, sp.Protocol)
}

// clusterIPs are the Service's ClusterIPs, one per family.
func clusterIPs(svc *corev1.Service) []netip.Addr {
	raw := svc.Spec.ClusterIPs
	if len(raw) == 0 && svc.Spec.ClusterIP != "" {
		raw = []string{svc.Spec.ClusterIP}
	}
	var out []netip.Addr
	for _, s := range raw {
		if s == corev1.ClusterIPNone {
			return nil
		}
		if a, err := netip.ParseAddr(s); err == nil {
			out = append(out, a.Unmap())
		}
	}
	return out
}

// endpointsOf are the endpoints of Service port sp in the slices of one
// family: the slice port of the same name and protocol gives the number,
// the first address of each endpoint the address; duplicates (an endpoint
// moving between slices) count once.
func endpointsOf(list []*discoveryv1.EndpointSlice, sp corev1.ServicePort, v4 bool, node string) []endpoint {
	want := discoveryv1.AddressTypeIPv6
	if v4 {
		want = discoveryv1.AddressTypeIPv4
	}
	proto := sp.Protocol
	if proto == "" {
		proto = corev1.ProtocolTCP
	}
	seen := map[netip.AddrPort]bool{}
	var out []endpoint
	for _, s := range list {
		if s.AddressType != want {
			continue
		}
		var port int32
		found := false
		for _, p := range s.Ports {
			pp := corev1.ProtocolTCP
			if p.Protocol != nil {
				pp = *p.Protocol
			}
			name := ""
			if p.Name != nil {
				name = *p.Name
			}
			if name == sp.Name && pp == proto && p.Port != nil {
				port, found = *p.Port, true
				break
			}
		}
		if !found || port <= 0 || port > 65535 {
			continue
		}
		for _, e := range s.Endpoints {
			if len(e.Addresses) == 0 {
				continue
			}
			a, err := netip.ParseAddr(e.Addresses[0])
			if err != nil || a.Unmap().Is4() != v4 {
				continue
			}
			ap := netip.AddrPortFrom(a.Unmap(), uint16(port))
			if seen[ap] {
				continue
			}
			seen[ap] = true
			ready := e.Conditions.Ready == nil || *e.Conditions.Ready
			serving := ready
			if e.Conditions.Serving != nil {
				serving = *e.Conditions.Serving
			}
			terminating := e.Conditions.Terminating != nil && *e.Conditions.Terminating
			out = append(out, endpoint{addr: ap, ready: ready, serving: serving, terminating: terminating,
				local: e.NodeName != nil && *e.NodeName == node})
		}
	}
	slices.SortFunc(out, func(a, b endpoint) int {
		if c := a.addr.Addr().Compare(b.addr.Addr()); c != 0 {
			return c
		}
		return cmp.Compare(a.addr.Port(), b.addr.Port())
	})
	return out
}

// categorize splits endpoints as kube-proxy does: the cluster's are the
// ready ones, or, when none is ready, the serving and terminating ones;
// the local ones likewise among those on this node.
func categorize(eps []endpoint) (cluster, local []endpoint) {
	pick := func(onlyLocal bool) []endpoint {
		var ready, fallback []endpoint
		for _, e := range eps {
			if onlyLocal && !e.local {
				continue
			}
			if e.ready {
				ready = append(ready, e)
			} else if e.serving && e.terminating {
				fallback = append(fallback, e)
			}
		}
		if len(ready) > 0 {
			return ready
		}
		return fallback
	}
	return pick(false), pick(true)
}
