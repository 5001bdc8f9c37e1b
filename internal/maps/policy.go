package maps

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"

	"github.com/ebpf-cni/ebpf-cni/internal/loader"
)

// The NetworkPolicy maps (bpf/datapath.h): ipcache_v1 (address -> peer
// identity and CIDR class), policy_v1 (policy sets: what each allows),
// ep_policy_v1 (a local pod's identity, sets and isolation), ct_v1 (flows
// judged and allowed), policy_stats_v1 and policy_events_v1.

// Reserved identities and the first one of pods, from the C enum.
const (
	IDAny   = uint32(loader.DatapathPolicyIdentityID_ANY)
	IDHost  = uint32(loader.DatapathPolicyIdentityID_HOST)
	IDWorld = uint32(loader.DatapathPolicyIdentityID_WORLD)
	IDFirst = uint32(loader.DatapathPolicyIdentityID_FIRST)
)

// Directions of a policy rule, from the C enum.
const (
	Ingress = uint8(loader.DatapathPolicyDirPOLICY_INGRESS)
	Egress  = uint8(loader.DatapathPolicyDirPOLICY_EGRESS)
)

// EPPolicy flags, from the C enum.
const (
	PolIngress = loader.DatapathEpPolicyFlagsPOL_INGRESS
	PolEgress  = loader.DatapathEpPolicyFlagsPOL_EGRESS
	PolPending = loader.DatapathEpPolicyFlagsPOL_PENDING
)

// Peer is what an address of ipcache_v1 is.
type Peer struct {
	Identity uint32
	Class    uint32 // CIDR class (ipBlocks it lies in); 0: none
}

// PutPeer maps prefix (a pod's /32 or /128, an ipBlock's prefix) to p.
func (m *Maps) PutPeer(prefix netip.Prefix, p Peer) error {
	k := lpmKey(prefix)
	v := loader.DatapathPeerInfo{Identity: loader.DatapathPolicyIdentity(p.Identity), CidrClass: p.Class}
	if err := m.d.IpcacheV1.Put(&k, &v); err != nil {
		return fmt.Errorf("put peer %s: %w", prefix, err)
	}
	return nil
}

// DeletePeer removes prefix; absent is fine.
func (m *Maps) DeletePeer(prefix netip.Prefix) error {
	k := lpmKey(prefix)
	if err := m.d.IpcacheV1.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete peer %s: %w", prefix, err)
	}
	return nil
}

// Peers dumps ipcache_v1.
func (m *Maps) Peers() (map[netip.Prefix]Peer, error) {
	var (
		k   loader.DatapathLpmKey
		v   loader.DatapathPeerInfo
		out = map[netip.Prefix]Peer{}
	)
	it := m.d.IpcacheV1.Iterate()
	for it.Next(&k, &v) {
		out[lpmPrefix(k)] = Peer{Identity: uint32(v.Identity), Class: v.CidrClass}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("dump peers: %w", err)
	}
	return out, nil
}

// Rule is one entry of policy_v1: set allows peer in direction dir, for
// protocol proto (0: any, with any port) and the ports Port..Port+2^(16-Bits)-1
// (Bits 0: any port of proto; 16: exactly Port).
type Rule struct {
	Set   uint32
	Peer  uint32
	Dir   uint8
	Proto uint8
	Port  uint16
	Bits  uint8
}

// ruleBase is the key bits fixed by set, peer and direction.
const ruleBase = 32 + 32 + 8

func ruleKey(r Rule) loader.DatapathPolicyKey {
	k := loader.DatapathPolicyKey{Set: r.Set, Peer: r.Peer, Dir: r.Dir}
	k.Prefixlen = ruleBase
	if r.Proto != 0 {
		k.Proto = r.Proto
		k.Prefixlen += 8 + uint32(r.Bits)
		k.Dport = htons(r.Port)
	}
	return k
}

// (The trie compares keys bytewise from set on; set, peer, direction and
// protocol are always matched whole, only the big-endian port by prefix.)

// PutRule adds a rule.
func (m *Maps) PutRule(r Rule, rule uint32) error {
	k := ruleKey(r)
	v := loader.DatapathPolicyEntry{Rule: rule}
	if err := m.d.PolicyV1.Put(&k, &v); err != nil {
		return fmt.Errorf("put policy rule %+v: %w", r, err)
	}
	return nil
}

// DeleteRule removes a rule; absent is fine.
func (m *Maps) DeleteRule(r Rule) error {
	k := ruleKey(r)
	if err := m.d.PolicyV1.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete policy rule %+v: %w", r, err)
	}
	return nil
}

// Rules dumps policy_v1.
func (m *Maps) Rules() ([]Rule, error) {
	var (
		k   loader.DatapathPolicyKey
		v   loader.DatapathPolicyEntry
		out []Rule
	)
	it := m.d.PolicyV1.Iterate()
	for it.Next(&k, &v) {
		r := Rule{Set: k.Set, Peer: k.Peer, Dir: k.Dir}
		if k.Prefixlen > ruleBase {
			r.Proto = k.Proto
			r.Bits = uint8(k.Prefixlen - ruleBase - 8)
			r.Port = htons(k.Dport)
		}
		out = append(out, r)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("dump policy rules: %w", err)
	}
	return out, nil
}

// EPPolicy is a local pod's entry of ep_policy_v1.
type EPPolicy struct {
	Identity uint32
	SetIn    uint32
	SetOut   uint32
	Flags    loader.DatapathEpPolicyFlags
}

// PutEPPolicy sets the policy of the pod behind host veth ifindex.
func (m *Maps) PutEPPolicy(ifindex int, p EPPolicy) error {
	k := uint32(ifindex)
	v := loader.DatapathEpPolicy{Identity: loader.DatapathPolicyIdentity(p.Identity), SetIn: p.SetIn, SetOut: p.SetOut, Flags: p.Flags}
	if err := m.d.EpPolicyV1.Put(&k, &v); err != nil {
		return fmt.Errorf("put policy of ifindex %d: %w", ifindex, err)
	}
	return nil
}

// DeleteEPPolicy makes the pod behind ifindex not isolated; absent is fine.
func (m *Maps) DeleteEPPolicy(ifindex int) error {
	k := uint32(ifindex)
	if err := m.d.EpPolicyV1.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete policy of ifindex %d: %w", ifindex, err)
	}
	return nil
}

// EPPolicies dumps ep_policy_v1 by ifindex.
func (m *Maps) EPPolicies() (map[int]EPPolicy, error) {
	var (
		k   uint32
		v   loader.DatapathEpPolicy
		out = map[int]EPPolicy{}
	)
	it := m.d.EpPolicyV1.Iterate()
	for it.Next(&k, &v) {
		out[int(k)] = EPPolicy{Identity: uint32(v.Identity), SetIn: v.SetIn, SetOut: v.SetOut, Flags: v.Flags}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("dump pod policies: %w", err)
	}
	return out, nil
}

// PolicyStats are a pod's policy counters, summed over CPUs.
type PolicyStats = loader.DatapathPolicyStats

// PolicyStats reads the policy counters of the pod behind ifindex.
func (m *Maps) PolicyStats(ifindex int) (PolicyStats, error) {
	key := uint32(ifindex)
	var per []PolicyStats
	if err := m.d.PolicyStatsV1.Lookup(&key, &per); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return PolicyStats{}, fmt.Errorf("policy counters of %d: %w", ifindex, ErrNotFound)
		}
		return PolicyStats{}, fmt.Errorf("lookup policy counters of %d: %w", ifindex, err)
	}
	return sumStructs(per), nil
}

// SweepCT removes tracked flows idle longer than their timeout (the
// datapath ignores them already; this frees the entries).
func (m *Maps) SweepCT(now time.Duration, t NATTimeouts) (int, error) {
	var (
		k    loader.DatapathFlowKey
		v    loader.DatapathCtEntry
		dead []loader.DatapathFlowKey
	)
	it := m.d.CtV1.Iterate()
	for it.Next(&k, &v) {
		limit := t.UDP
		if k.Proto == 6 {
			limit = t.TCP
			if v.Flags&loader.DatapathCtFlagsCT_CLOSING != 0 {
				limit = t.Closing
			}
		}
		if now-time.Duration(v.SeenNs) > limit {
			dead = append(dead, k)
		}
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("dump tracked flows: %w", err)
	}
	var errs []error
	for i := range dead {
		if err := m.d.CtV1.Delete(&dead[i]); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, err)
		}
	}
	return len(dead), errors.Join(errs...)
}

// PolicyEvent is a packet a policy dropped, as the datapath reports it.
type PolicyEvent struct {
	Time     time.Duration // CLOCK_MONOTONIC
	Ifindex  int           // the pod's host veth
	Identity uint32        // the peer's
	Src, Dst netip.AddrPort
	Proto    uint8
	Dir      uint8 // Ingress: the pod's ingress policy denied it; Egress: its egress
	Pending  bool  // the pod's policy was not programmed yet
}

// Events reads drop events of a node (one reader at a time: a ring
// buffer has one consumer position).
type Events struct {
	rd *ringbuf.Reader
	m  *ebpf.Map
}

// OpenEvents opens the drop events of the datapath pinned under root.
func OpenEvents(root string) (*Events, error) {
	m, err := ebpf.LoadPinnedMap(filepath.Join(root, loader.MapPolicyEvents), nil)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", loader.MapPolicyEvents, err)
	}
	rd, err := ringbuf.NewReader(m)
	if err != nil {
		m.Close()
		return nil, fmt.Errorf("read %s: %w", loader.MapPolicyEvents, err)
	}
	return &Events{rd: rd, m: m}, nil
}

// Events reads the drop events of m's datapath.
func (m *Maps) Events() (*Events, error) {
	c, err := m.d.PolicyEventsV1.Clone()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", loader.MapPolicyEvents, err)
	}
	rd, err := ringbuf.NewReader(c)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("read %s: %w", loader.MapPolicyEvents, err)
	}
	return &Events{rd: rd, m: c}, nil
}

// SetDeadline makes Read return os.ErrDeadlineExceeded after t.
func (e *Events) SetDeadline(t time.Time) { e.rd.SetDeadline(t) }

// Read waits for the next event.
func (e *Events) Read() (PolicyEvent, error) {
	rec, err := e.rd.Read()
	if err != nil {
		return PolicyEvent{}, err
	}
	var v loader.DatapathPolicyEvent
	if _, err := binary.Decode(rec.RawSample, binary.NativeEndian, &v); err != nil {
		return PolicyEvent{}, fmt.Errorf("decode drop event: %w", err)
	}
	src := keyAddr(loader.DatapathEndpointKey{Family: v.Family, Addr: v.Saddr})
	dst := keyAddr(loader.DatapathEndpointKey{Family: v.Family, Addr: v.Daddr})
	return PolicyEvent{Time: time.Duration(v.TsNs), Ifindex: int(v.Ifindex), Identity: uint32(v.Identity),
		Src: netip.AddrPortFrom(src, htons(v.Sport)), Dst: netip.AddrPortFrom(dst, htons(v.Dport)), Proto: v.Proto,
		Dir: uint8(v.Dir), Pending: v.Why == loader.DatapathDropWhyWHY_PENDING}, nil
}

// Close stops reading.
func (e *Events) Close() error {
	err := e.rd.Close()
	e.m.Close()
	return err
}
