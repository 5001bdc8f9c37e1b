package maps

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"

	"github.com/ebpf-cni/ebpf-cni/internal/loader"
)

// The Service maps (bpf/datapath.h): lb_svc_v1 holds frontends (slot 0)
// and their backend slots, lb_backends_v1 the backends by ID,
// lb_affinity_match_v1 which backends a frontend with session affinity may
// stick to, lb_nodeaddr_v1 and lb_snat_v1 the node's addresses for
// NodePorts and masquerade, lb_nat_v1 the tc path's translated flows.

// Scope says which clients a frontend serves.
type Scope uint32

const (
	// ScopeExt: packets from outside the node (tc, NodePort and external IPs).
	ScopeExt = Scope(loader.DatapathLbScopeLB_SCOPE_EXT)
	// ScopeInt: sockets of the node, pods and host processes (cgroup hooks).
	ScopeInt = Scope(loader.DatapathLbScopeLB_SCOPE_INT)
)

// SvcFlags are a frontend's flags (enum svc_flags).
type SvcFlags = loader.DatapathSvcFlags

// Frontend flags, from the C enum.
const (
	SvcNodePort = loader.DatapathSvcFlagsSVC_NODEPORT
	SvcExternal = loader.DatapathSvcFlagsSVC_EXTERNAL
	SvcLocal    = loader.DatapathSvcFlagsSVC_LOCAL
	SvcAffinity = loader.DatapathSvcFlagsSVC_AFFINITY
	SvcAddress  = loader.DatapathSvcFlagsSVC_ADDRESS
)

// Frontend is the key of a frontend. The NodePort frontend's address is
// the unspecified address of its family (any address of lb_nodeaddr_v1);
// an SvcAddress frontend has port and protocol 0.
type Frontend struct {
	Addr  netip.Addr
	Port  uint16
	Proto uint8
	Scope Scope
}

func (f Frontend) String() string {
	return fmt.Sprintf("%s/%d scope %d", netip.AddrPortFrom(f.Addr, f.Port), f.Proto, f.Scope)
}

// Service is a frontend's value.
type Service struct {
	ID              uint32
	Count           uint16
	Flags           SvcFlags
	AffinityTimeout uint32 // seconds
}

// Backend is one backend: an address, port and protocol.
type Backend struct {
	Addr  netip.AddrPort
	Proto uint8
}

func svcKey(f Frontend, slot uint16) loader.DatapathSvcKey {
	a := endpointKey(f.Addr)
	return loader.DatapathSvcKey{Addr: a.Addr, Port: htons(f.Port), Slot: slot, Proto: f.Proto, Family: a.Family,
		Scope: loader.DatapathLbScope(f.Scope)}
}

func keyFrontend(k loader.DatapathSvcKey) (Frontend, uint16) {
	return Frontend{Addr: keyAddr(loader.DatapathEndpointKey{Family: k.Family, Addr: k.Addr}), Port: htons(k.Port),
		Proto: k.Proto, Scope: Scope(k.Scope)}, k.Slot
}

// PutService writes a frontend (slot 0). Its slots 1..Count must be
// written first: readers use Count at once.
func (m *Maps) PutService(f Frontend, s Service) error {
	k := svcKey(f, 0)
	v := loader.DatapathSvcInfo{Id: s.ID, Count: s.Count, Flags: s.Flags, AffinityTimeout: s.AffinityTimeout}
	if err := m.d.LbSvcV1.Put(&k, &v); err != nil {
		return fmt.Errorf("put service %s: %w", f, err)
	}
	return nil
}

// PutSlot points slot (1..) of frontend f at a backend.
func (m *Maps) PutSlot(f Frontend, slot uint16, backend uint32) error {
	k := svcKey(f, slot)
	v := loader.DatapathSvcInfo{Id: backend}
	if err := m.d.LbSvcV1.Put(&k, &v); err != nil {
		return fmt.Errorf("put slot %d of %s: %w", slot, f, err)
	}
	return nil
}

// DeleteSlot removes slot (0: the frontend itself); absent is fine.
func (m *Maps) DeleteSlot(f Frontend, slot uint16) error {
	k := svcKey(f, slot)
	if err := m.d.LbSvcV1.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete slot %d of %s: %w", slot, f, err)
	}
	return nil
}

// ServiceEntry is one entry of lb_svc_v1.
type ServiceEntry struct {
	Frontend Frontend
	Slot     uint16
	Service  Service // slot 0; else only ID (the backend's) is set
}

// ServiceEntries dumps lb_svc_v1.
func (m *Maps) ServiceEntries() ([]ServiceEntry, error) {
	var (
		k   loader.DatapathSvcKey
		v   loader.DatapathSvcInfo
		out []ServiceEntry
	)
	it := m.d.LbSvcV1.Iterate()
	for it.Next(&k, &v) {
		f, slot := keyFrontend(k)
		out = append(out, ServiceEntry{Frontend: f, Slot: slot,
			Service: Service{ID: v.Id, Count: v.Count, Flags: v.Flags, AffinityTimeout: v.AffinityTimeout}})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("dump services: %w", err)
	}
	return out, nil
}

// PutBackend writes backend id.
func (m *Maps) PutBackend(id uint32, b Backend) error {
	a := endpointKey(b.Addr.Addr())
	v := loader.DatapathBackendInfo{Addr: a.Addr, Port: htons(b.Addr.Port()), Proto: b.Proto, Family: a.Family}
	if err := m.d.LbBackendsV1.Put(&id, &v); err != nil {
		return fmt.Errorf("put backend %d (%s): %w", id, b.Addr, err)
	}
	return nil
}

// DeleteBackend removes backend id; absent is fine.
func (m *Maps) DeleteBackend(id uint32) error {
	if err := m.d.LbBackendsV1.Delete(&id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete backend %d: %w", id, err)
	}
	return nil
}

// Backends dumps lb_backends_v1.
func (m *Maps) Backends() (map[uint32]Backend, error) {
	var (
		id  uint32
		v   loader.DatapathBackendInfo
		out = map[uint32]Backend{}
	)
	it := m.d.LbBackendsV1.Iterate()
	for it.Next(&id, &v) {
		a := keyAddr(loader.DatapathEndpointKey{Family: v.Family, Addr: v.Addr})
		out[id] = Backend{Addr: netip.AddrPortFrom(a, htons(v.Port)), Proto: v.Proto}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("dump backends: %w", err)
	}
	return out, nil
}

// PutAffinityMatch lets clients of frontend id stick to backend.
func (m *Maps) PutAffinityMatch(id, backend uint32) error {
	k := loader.DatapathAffinityMatch{Id: id, Backend: backend}
	one := uint32(1)
	if err := m.d.LbAffinityMatchV1.Put(&k, &one); err != nil {
		return fmt.Errorf("put affinity match %d/%d: %w", id, backend, err)
	}
	return nil
}

// DeleteAffinityMatch ends stickiness of frontend id's clients to backend.
func (m *Maps) DeleteAffinityMatch(id, backend uint32) error {
	k := loader.DatapathAffinityMatch{Id: id, Backend: backend}
	if err := m.d.LbAffinityMatchV1.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete affinity match %d/%d: %w", id, backend, err)
	}
	return nil
}

// AffinityMatches dumps lb_affinity_match_v1 as frontend ID -> backends.
func (m *Maps) AffinityMatches() (map[uint32][]uint32, error) {
	var (
		k   loader.DatapathAffinityMatch
		v   uint32
		out = map[uint32][]uint32{}
	)
	it := m.d.LbAffinityMatchV1.Iterate()
	for it.Next(&k, &v) {
		out[k.Id] = append(out[k.Id], k.Backend)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("dump affinity matches: %w", err)
	}
	return out, nil
}

// PutNodeAddr makes addr one where NodePorts are served.
func (m *Maps) PutNodeAddr(addr netip.Addr) error {
	k := endpointKey(addr)
	var v loader.DatapathNodeaddrInfo
	if err := m.d.LbNodeaddrV1.Put(&k, &v); err != nil {
		return fmt.Errorf("put node address %s: %w", addr, err)
	}
	return nil
}

// DeleteNodeAddr removes addr; absent is fine.
func (m *Maps) DeleteNodeAddr(addr netip.Addr) error {
	k := endpointKey(addr)
	if err := m.d.LbNodeaddrV1.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete node address %s: %w", addr, err)
	}
	return nil
}

// NodeAddrs dumps lb_nodeaddr_v1.
func (m *Maps) NodeAddrs() ([]netip.Addr, error) {
	var (
		k   loader.DatapathEndpointKey
		v   loader.DatapathNodeaddrInfo
		out []netip.Addr
	)
	it := m.d.LbNodeaddrV1.Iterate()
	for it.Next(&k, &v) {
		out = append(out, keyAddr(k))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("dump node addresses: %w", err)
	}
	return out, nil
}

// SetSNAT sets the address external traffic of its family is masqueraded
// to; the zero Addr of a family (pass netip.Addr{} with v6 true) clears it.
func (m *Maps) SetSNAT(addr netip.Addr, v6 bool) error {
	idx := uint32(0)
	if v6 {
		idx = 1
	}
	var v loader.DatapathSnatInfo
	if addr.IsValid() {
		v.Addr = endpointKey(addr).Addr
		v.Set = 1
	}
	if err := m.d.LbSnatV1.Put(&idx, &v); err != nil {
		return fmt.Errorf("set masquerade address %s: %w", addr, err)
	}
	return nil
}

// NATTimeouts say how long an idle translated flow of the tc path lives.
type NATTimeouts struct {
	TCP     time.Duration // established
	Closing time.Duration // after a FIN or RST
	UDP     time.Duration
}

// SweepNAT removes translated flows idle for longer than their timeout,
// both directions at once, and returns how many flows went. now is the
// CLOCK_MONOTONIC time the datapath's bpf_ktime_get_ns uses.
func (m *Maps) SweepNAT(now time.Duration, t NATTimeouts) (int, error) {
	var (
		k    loader.DatapathFlowKey
		v    loader.DatapathNatEntry
		dead = map[loader.DatapathFlowKey]bool{}
	)
	it := m.d.LbNatV1.Iterate()
	for it.Next(&k, &v) {
		limit := t.UDP
		if k.Proto == 6 {
			limit = t.TCP
			if v.Flags&loader.DatapathNatFlagsNAT_CLOSING != 0 {
				limit = t.Closing
			}
		}
		if now-time.Duration(v.SeenNs) <= limit {
			continue
		}
		// The pair is the reverse of the tuple this entry rewrites to.
		pair := loader.DatapathFlowKey{Saddr: v.Daddr, Daddr: v.Saddr, Sport: v.Dport, Dport: v.Sport, Proto: k.Proto, Family: k.Family}
		dead[k], dead[pair] = true, true
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("dump translated flows: %w", err)
	}
	var errs []error
	for k := range dead {
		if err := m.d.LbNatV1.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, err)
		}
	}
	return len(dead) / 2, errors.Join(errs...)
}

// NATFlows counts the entries of lb_nat_v1 (two per translated flow).
func (m *Maps) NATFlows() (int, error) {
	var (
		k loader.DatapathFlowKey
		v loader.DatapathNatEntry
		n int
	)
	it := m.d.LbNatV1.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	return n, it.Err()
}

// LBStats are the Service datapath's counters, summed over CPUs.
type LBStats = loader.DatapathLbStats

// LBStats reads lb_stats_v1.
func (m *Maps) LBStats() (LBStats, error) {
	var per []loader.DatapathLbStats
	zero := uint32(0)
	if err := m.d.LbStatsV1.Lookup(&zero, &per); err != nil {
		return LBStats{}, fmt.Errorf("read service counters: %w", err)
	}
	return sumStructs(per), nil
}

// ServiceCIDRs dumps lb_svc_cidr_v1.
func (m *Maps) ServiceCIDRs() ([]netip.Prefix, error) {
	var (
		k   loader.DatapathLpmKey
		v   loader.DatapathClusterInfo
		out []netip.Prefix
	)
	it := m.d.LbSvcCidrV1.Iterate()
	for it.Next(&k, &v) {
		out = append(out, lpmPrefix(k))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("dump service ranges: %w", err)
	}
	return out, nil
}

// PutServiceCIDR adds a Service range: connections to its addresses that
// no Service has are refused.
func (m *Maps) PutServiceCIDR(p netip.Prefix) error {
	k := lpmKey(p)
	var v loader.DatapathClusterInfo
	if err := m.d.LbSvcCidrV1.Put(&k, &v); err != nil {
		return fmt.Errorf("put service range %s: %w", p, err)
	}
	return nil
}

// DeleteServiceCIDR removes a Service range; absent is fine.
func (m *Maps) DeleteServiceCIDR(p netip.Prefix) error {
	k := lpmKey(p)
	if err := m.d.LbSvcCidrV1.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete service range %s: %w", p, err)
	}
	return nil
}
