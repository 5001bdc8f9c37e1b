// Package maps is typed access to the datapath's pinned maps. The Go key and
// value types are the ones bpf2go generated from bpf/datapath.h; a raw
// *ebpf.Map never leaves this package.
//
// Single Put/Delete calls need no lock: the kernel serialises them. Entries
// are owned by one attachment (keyed by its host veth ifindex or its pod IP),
// and deletes check ownership so a late DEL never removes a newer pod's entry.
package maps

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"

	"github.com/cilium/ebpf"

	"github.com/ebpf-cni/ebpf-cni/internal/killpoint"
	"github.com/ebpf-cni/ebpf-cni/internal/loader"
)

// ErrNotFound is returned for a key that has no entry.
var ErrNotFound = errors.New("no map entry")

// ErrTaken is returned when a pod address is already mapped to another pod.
var ErrTaken = errors.New("address is mapped to another endpoint")

// Maps holds the node's datapath maps.
type Maps struct {
	d loader.DatapathMaps
}

// Open opens every map of the generated loader.DatapathMaps pinned under
// root. It wraps loader.ErrNotLoaded when no ADD has created them yet.
func Open(root string) (*Maps, error) {
	m := &Maps{}
	v := reflect.ValueOf(&m.d).Elem()
	names := loader.MapNames()
	for i := range v.NumField() {
		name := v.Type().Field(i).Tag.Get("ebpf")
		if !slices.Contains(names, name) {
			continue // the programs' own scratch space: not pinned
		}
		pinned, err := ebpf.LoadPinnedMap(filepath.Join(root, name), nil)
		if err != nil {
			m.d.Close()
			if errors.Is(err, os.ErrNotExist) {
				return nil, fmt.Errorf("open pinned map %s: %w", name, loader.ErrNotLoaded)
			}
			return nil, fmt.Errorf("open pinned map %s: %w", name, err)
		}
		v.Field(i).Set(reflect.ValueOf(pinned))
	}
	return m, nil
}

// Ensure loads the datapath under root if no one did yet (loader.Ensure)
// and opens its maps; on an error nothing is left open.
func Ensure(root string) (*loader.Programs, *Maps, error) {
	progs, err := loader.Ensure(root)
	if err != nil {
		return nil, nil, fmt.Errorf("load datapath under %s: %w", root, err)
	}
	m, err := Open(root)
	if err != nil {
		progs.Close()
		return nil, nil, err
	}
	return progs, m, nil
}

// FromObjects wraps the maps of an unpinned load (tests of the programs).
func FromObjects(objs *loader.DatapathObjects) *Maps {
	return &Maps{d: objs.DatapathMaps}
}

// Close releases the handles; the pins keep the maps.
func (m *Maps) Close() error { return m.d.Close() }

// Endpoint is one entry of endpoints_v1: where a pod address lives.
type Endpoint struct {
	IP      netip.Addr
	Ifindex int
	PodMAC  net.HardwareAddr
	HostMAC net.HardwareAddr
	Shaped  bool // rate-limited: reached through the host veth's qdiscs
}

// Device is one entry of devices_v1: what the pod behind a host veth may send.
type Device struct {
	PodMAC  net.HardwareAddr
	HostMAC net.HardwareAddr
	IPv4    netip.Addr // zero when the pod has none
	IPv6    netip.Addr
	Shaped  bool // rate-limited: what it sends goes through the host veth's qdiscs
	// HostFlows is set by to_pod once the pod received a host-delivered
	// flow from a local pod; from_pod only then looks up host_flows_v1.
	HostFlows bool
}

// Stats are an endpoint's counters, summed over CPUs.
type Stats = loader.DatapathEndpointStats

// Family and flag values come from the C enums through bpf2go.
const (
	familyIPv4    = uint8(loader.DatapathEpFamilyEP_FAMILY_IPV4)
	familyIPv6    = uint8(loader.DatapathEpFamilyEP_FAMILY_IPV6)
	flagIPv4      = loader.DatapathEpFlagsEP_FLAG_IPV4
	flagIPv6      = loader.DatapathEpFlagsEP_FLAG_IPV6
	flagShaped    = loader.DatapathEpFlagsEP_FLAG_SHAPED
	flagHostFlows = loader.DatapathEpFlagsEP_FLAG_HOST_FLOWS
)

func endpointKey(ip netip.Addr) loader.DatapathEndpointKey {
	var k loader.DatapathEndpointKey
	ip = ip.Unmap()
	if ip.Is4() {
		k.Family = familyIPv4
		a := ip.As4()
		copy(k.Addr[:], a[:])
	} else {
		k.Family = familyIPv6
		k.Addr = ip.As16()
	}
	return k
}

func keyAddr(k loader.DatapathEndpointKey) netip.Addr {
	if k.Family == familyIPv4 {
		return netip.AddrFrom4([4]byte(k.Addr[:4]))
	}
	return netip.AddrFrom16(k.Addr)
}

func mac6(hw net.HardwareAddr) ([6]byte, error) {
	if len(hw) != 6 {
		return [6]byte{}, fmt.Errorf("mac %q is not 6 bytes", hw)
	}
	return [6]byte(hw), nil
}

// PutEndpoint makes ip reachable through the host veth ifindex. An entry of
// another pod (another pod MAC) for the same address is never overwritten:
// two networks sharing a pin root with overlapping ranges, or a duplicate
// from a delegated IPAM, fail the ADD instead of hijacking traffic.
func (m *Maps) PutEndpoint(ep Endpoint) error {
	pod, err := mac6(ep.PodMAC)
	if err != nil {
		return err
	}
	host, err := mac6(ep.HostMAC)
	if err != nil {
		return err
	}
	flags := flagIPv6
	if ep.IP.Unmap().Is4() {
		flags = flagIPv4
	}
	if ep.Shaped {
		flags |= flagShaped
	}
	k := endpointKey(ep.IP)
	v := loader.DatapathEndpointInfo{Ifindex: uint32(ep.Ifindex), PodMac: pod, HostMac: host, Flags: flags}
	err = m.d.EndpointsV1.Update(&k, &v, ebpf.UpdateNoExist)
	if errors.Is(err, ebpf.ErrKeyExist) {
		old, lerr := m.Endpoint(ep.IP)
		if lerr == nil && !bytes.Equal(old.PodMAC, ep.PodMAC) {
			return fmt.Errorf("put endpoint %s: %w (pod MAC %s, host ifindex %d)", ep.IP, ErrTaken, old.PodMAC, old.Ifindex)
		}
		err = m.d.EndpointsV1.Put(&k, &v) // the same pod again (a retried ADD)
	}
	if err != nil {
		return fmt.Errorf("put endpoint %s: %w", ep.IP, err)
	}
	return nil
}

// Endpoint looks up ip.
func (m *Maps) Endpoint(ip netip.Addr) (Endpoint, error) {
	k := endpointKey(ip)
	var v loader.DatapathEndpointInfo
	if err := m.d.EndpointsV1.Lookup(&k, &v); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return Endpoint{}, fmt.Errorf("endpoint %s: %w", ip, ErrNotFound)
		}
		return Endpoint{}, fmt.Errorf("lookup endpoint %s: %w", ip, err)
	}
	return toEndpoint(k, v), nil
}

func toEndpoint(k loader.DatapathEndpointKey, v loader.DatapathEndpointInfo) Endpoint {
	return Endpoint{
		IP:      keyAddr(k),
		Ifindex: int(v.Ifindex),
		PodMAC:  net.HardwareAddr(v.PodMac[:]),
		HostMAC: net.HardwareAddr(v.HostMac[:]),
		Shaped:  v.Flags&flagShaped != 0,
	}
}

// DeleteEndpoint removes ip if it still belongs to the pod with podMAC (MACs
// derive from the attachment, so a stale DEL never removes the entry of a
// newer pod that got the address). A missing entry is success.
func (m *Maps) DeleteEndpoint(ip netip.Addr, podMAC net.HardwareAddr) error {
	ep, err := m.Endpoint(ip)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if !bytes.Equal(ep.PodMAC, podMAC) {
		return nil // the address belongs to another endpoint now
	}
	k := endpointKey(ip)
	if err := m.d.EndpointsV1.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete endpoint %s: %w", ip, err)
	}
	return nil
}

// Endpoints lists every entry of endpoints_v1.
func (m *Maps) Endpoints() ([]Endpoint, error) {
	var (
		out []Endpoint
		k   loader.DatapathEndpointKey
		v   loader.DatapathEndpointInfo
	)
	it := m.d.EndpointsV1.Iterate()
	for it.Next(&k, &v) {
		out = append(out, toEndpoint(k, v))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("iterate endpoints: %w", err)
	}
	return out, nil
}

// PutDevice records what the pod behind ifindex may send, and zeroes its counters.
func (m *Maps) PutDevice(ifindex int, d Device) error {
	pod, err := mac6(d.PodMAC)
	if err != nil {
		return err
	}
	host, err := mac6(d.HostMAC)
	if err != nil {
		return err
	}
	v := loader.DatapathDeviceInfo{PodMac: pod, HostMac: host}
	if d.Shaped {
		v.Flags |= flagShaped
	}
	if d.IPv4.IsValid() {
		v.Flags |= flagIPv4
		v.Ipv4 = d.IPv4.As4()
	}
	if d.IPv6.IsValid() {
		v.Flags |= flagIPv6
		v.Ipv6 = d.IPv6.As16()
	}
	// The device entry first: a counters entry without one is never a live
	// ADD's, so DEL and GC may remove it whatever step a crash stopped at.
	key := uint32(ifindex)
	if err := m.d.DevicesV1.Put(&key, &v); err != nil {
		return fmt.Errorf("put device %d: %w", ifindex, err)
	}
	killpoint.At("device-entry")
	zero := make([]Stats, ebpf.MustPossibleCPU())
	if err := m.d.EpStatsV2.Put(&key, zero); err != nil {
		return fmt.Errorf("reset counters of ifindex %d: %w", ifindex, err)
	}
	pzero := make([]PolicyStats, ebpf.MustPossibleCPU())
	if err := m.d.PolicyStatsV1.Put(&key, pzero); err != nil {
		return fmt.Errorf("reset policy counters of ifindex %d: %w", ifindex, err)
	}
	return nil
}

// Device looks up the host veth ifindex.
func (m *Maps) Device(ifindex int) (Device, error) {
	key := uint32(ifindex)
	var v loader.DatapathDeviceInfo
	if err := m.d.DevicesV1.Lookup(&key, &v); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return Device{}, fmt.Errorf("device %d: %w", ifindex, ErrNotFound)
		}
		return Device{}, fmt.Errorf("lookup device %d: %w", ifindex, err)
	}
	return toDevice(v), nil
}

func toDevice(v loader.DatapathDeviceInfo) Device {
	d := Device{PodMAC: net.HardwareAddr(v.PodMac[:]), HostMAC: net.HardwareAddr(v.HostMac[:]), Shaped: v.Flags&flagShaped != 0, HostFlows: v.Flags&flagHostFlows != 0}
	if v.Flags&flagIPv4 != 0 {
		d.IPv4 = netip.AddrFrom4(v.Ipv4)
	}
	if v.Flags&flagIPv6 != 0 {
		d.IPv6 = netip.AddrFrom16(v.Ipv6)
	}
	return d
}

// Devices lists every entry of devices_v1 by ifindex.
func (m *Maps) Devices() (map[int]Device, error) {
	out := map[int]Device{}
	var (
		k uint32
		v loader.DatapathDeviceInfo
	)
	it := m.d.DevicesV1.Iterate()
	for it.Next(&k, &v) {
		out[int(k)] = toDevice(v)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("iterate devices: %w", err)
	}
	return out, nil
}

// DeleteDevice removes the device entry and the counters of ifindex if the
// entry is the pod's with podMAC (an ifindex can be reused by a newer pod),
// and counters left without a device entry. A missing entry is success.
func (m *Maps) DeleteDevice(ifindex int, podMAC net.HardwareAddr) error {
	d, err := m.Device(ifindex)
	if err != nil && !errors.Is(err, ErrNotFound) {
		return err
	}
	if err == nil && !bytes.Equal(d.PodMAC, podMAC) {
		return nil
	}
	key := uint32(ifindex)
	var errs []error
	// The counters and policy first: the device entry is what makes them
	// someone's.
	for _, mp := range []*ebpf.Map{m.d.EpStatsV2, m.d.PolicyStatsV1, m.d.EpPolicyV1, m.d.DevicesV1} {
		if err := mp.Delete(&key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("delete ifindex %d from %s: %w", ifindex, mp, err))
		}
		killpoint.At("counters-deleted")
	}
	return errors.Join(errs...)
}

// SweepStats removes counters entries without a device entry (a crash
// between the two writes) and node counters of devices keep does not want.
func (m *Maps) SweepStats(keepNode func(ifindex int) bool) error {
	var errs []error
	var k uint32
	var stale []uint32
	it := m.d.EpStatsV2.Iterate()
	var per []Stats
	for it.Next(&k, &per) {
		var d loader.DatapathDeviceInfo
		if err := m.d.DevicesV1.Lookup(&k, &d); errors.Is(err, ebpf.ErrKeyNotExist) {
			stale = append(stale, k)
		}
	}
	errs = append(errs, it.Err())
	for _, k := range stale {
		if err := m.d.EpStatsV2.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, err)
		}
	}
	// Policy counters and entries of host veths without a device entry.
	var pol loader.DatapathEpPolicy
	var pst []PolicyStats
	for mp, v := range map[*ebpf.Map]any{m.d.PolicyStatsV1: &pst, m.d.EpPolicyV1: &pol} {
		keys, err := orphanKeys(mp, v, m.d.DevicesV1)
		errs = append(errs, err)
		for _, k := range keys {
			if err := mp.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				errs = append(errs, err)
			}
		}
	}
	stale = stale[:0]
	var nper []NodeStats
	nit := m.d.NodeStatsV1.Iterate()
	for nit.Next(&k, &nper) {
		if !keepNode(int(k)) {
			stale = append(stale, k)
		}
	}
	errs = append(errs, nit.Err())
	for _, k := range stale {
		if err := m.d.NodeStatsV1.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// orphanKeys lists the ifindex keys of mp that devices has no entry for;
// v receives mp's values.
func orphanKeys(mp *ebpf.Map, v any, devices *ebpf.Map) ([]uint32, error) {
	var out []uint32
	var k uint32
	it := mp.Iterate()
	for it.Next(&k, v) {
		var d loader.DatapathDeviceInfo
		if err := devices.Lookup(&k, &d); errors.Is(err, ebpf.ErrKeyNotExist) {
			out = append(out, k)
		}
	}
	return out, it.Err()
}

// Stats sums the per-CPU counters of the endpoint behind ifindex.
func (m *Maps) Stats(ifindex int) (Stats, error) {
	key := uint32(ifindex)
	var per []Stats
	if err := m.d.EpStatsV2.Lookup(&key, &per); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return Stats{}, fmt.Errorf("counters of %d: %w", ifindex, ErrNotFound)
		}
		return Stats{}, fmt.Errorf("lookup counters of %d: %w", ifindex, err)
	}
	return sumStructs(per), nil
}

// sumStructs adds every uint64 field across CPUs, so a counter added to
// a stats struct is summed without touching this code.
func sumStructs[T any](per []T) T {
	var total T
	tv := reflect.ValueOf(&total).Elem()
	for i := range per {
		pv := reflect.ValueOf(per[i])
		for f := 0; f < tv.NumField(); f++ {
			if tv.Field(f).Kind() == reflect.Uint64 {
				tv.Field(f).SetUint(tv.Field(f).Uint() + pv.Field(f).Uint())
			}
		}
	}
	return total
}

// HostFlows counts the flows whose replies take the host path (NATed flows
// the host stack delivered to a local pod).
func (m *Maps) HostFlows() (int, error) {
	var (
		k loader.DatapathFlowKey
		v loader.DatapathFlowInfo
		n int
	)
	it := m.d.HostFlowsV1.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("iterate host flows: %w", err)
	}
	return n, nil
}

// lpmKey is the key of cluster_v1 and tunnel_v1 for p: family and pad are
// the first 32 bits of the prefix.
func lpmKey(p netip.Prefix) loader.DatapathLpmKey {
	p = p.Masked()
	ek := endpointKey(p.Addr())
	return loader.DatapathLpmKey{Prefixlen: uint32(32 + p.Bits()), Family: ek.Family, Addr: ek.Addr}
}

func lpmPrefix(k loader.DatapathLpmKey) netip.Prefix {
	a := keyAddr(loader.DatapathEndpointKey{Family: k.Family, Addr: k.Addr})
	return netip.PrefixFrom(a, int(k.Prefixlen)-32)
}

// PutCluster adds the cluster's pod ranges: traffic between them may take
// the fast path across nodes. Already present ranges are left as they are.
func (m *Maps) PutCluster(prefixes []netip.Prefix) error {
	for _, p := range prefixes {
		k := lpmKey(p)
		var v loader.DatapathClusterInfo
		if err := m.d.ClusterV1.Lookup(&k, &v); err == nil {
			continue
		}
		if err := m.d.ClusterV1.Put(&k, &v); err != nil {
			return fmt.Errorf("put cluster range %s: %w", p, err)
		}
	}
	return nil
}

// Cluster lists the cluster's pod ranges.
func (m *Maps) Cluster() ([]netip.Prefix, error) {
	var (
		out []netip.Prefix
		k   loader.DatapathLpmKey
		v   loader.DatapathClusterInfo
	)
	it := m.d.ClusterV1.Iterate()
	for it.Next(&k, &v) {
		out = append(out, lpmPrefix(k))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("iterate cluster ranges: %w", err)
	}
	return out, nil
}

// Tunnel is where another node's pods are reached in VXLAN mode.
type Tunnel struct {
	Node    netip.Addr       // the peer node's underlay address
	VTEPMAC net.HardwareAddr // the peer's VXLAN device MAC
	Ifindex int              // this node's VXLAN device (0: from_pod leaves it to the FIB)
	MTU     int              // that device's MTU
}

// Tunnels lists tunnel_v1: the other nodes' podCIDRs and their tunnels.
func (m *Maps) Tunnels() (map[netip.Prefix]Tunnel, error) {
	out := map[netip.Prefix]Tunnel{}
	var (
		k loader.DatapathLpmKey
		v loader.DatapathTunnelInfo
	)
	it := m.d.TunnelV1.Iterate()
	for it.Next(&k, &v) {
		t := Tunnel{VTEPMAC: net.HardwareAddr(bytes.Clone(v.VtepMac[:])), Ifindex: int(v.Ifindex), MTU: int(v.Mtu)}
		if v.Family == loader.DatapathEpFamilyEP_FAMILY_IPV4 {
			t.Node = netip.AddrFrom4([4]byte(v.Addr[:4]))
		} else {
			t.Node = netip.AddrFrom16(v.Addr)
		}
		out[lpmPrefix(k)] = t
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("iterate tunnels: %w", err)
	}
	return out, nil
}

// PutTunnel routes podCIDR through the tunnel t.
func (m *Maps) PutTunnel(podCIDR netip.Prefix, t Tunnel) error {
	mac, err := mac6(t.VTEPMAC)
	if err != nil {
		return err
	}
	ek := endpointKey(t.Node)
	v := loader.DatapathTunnelInfo{Family: loader.DatapathEpFamily(ek.Family), VtepMac: mac, Addr: ek.Addr,
		Ifindex: uint32(t.Ifindex), Mtu: uint32(t.MTU)}
	k := lpmKey(podCIDR)
	if err := m.d.TunnelV1.Put(&k, &v); err != nil {
		return fmt.Errorf("put tunnel %s: %w", podCIDR, err)
	}
	return nil
}

// DeleteTunnel removes podCIDR's tunnel; a missing one is success.
func (m *Maps) DeleteTunnel(podCIDR netip.Prefix) error {
	k := lpmKey(podCIDR)
	if err := m.d.TunnelV1.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete tunnel %s: %w", podCIDR, err)
	}
	return nil
}

// NodeStats are a node device's counters, summed over CPUs.
type NodeStats = loader.DatapathNodeStats

// NodeStats sums the per-CPU counters of the node device ifindex (zero
// when it has none yet).
func (m *Maps) NodeStats(ifindex int) (NodeStats, error) {
	key := uint32(ifindex)
	var per []NodeStats
	if err := m.d.NodeStatsV1.Lookup(&key, &per); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return NodeStats{}, nil
		}
		return NodeStats{}, fmt.Errorf("lookup node counters of %d: %w", ifindex, err)
	}
	return sumStructs(per), nil
}

// ResetNodeStats gives the node device ifindex an empty counters entry
// (the programs only count into an existing one).
func (m *Maps) ResetNodeStats(ifindex int) error {
	key := uint32(ifindex)
	zero := make([]NodeStats, ebpf.MustPossibleCPU())
	if err := m.d.NodeStatsV1.Update(&key, zero, ebpf.UpdateNoExist); err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
		return fmt.Errorf("create node counters of %d: %w", ifindex, err)
	}
	return nil
}

// Guarded reports whether nat_guard_v1 holds the pod's end (ip, port,
// protocol) of a connection the host handled.
func (m *Maps) Guarded(ip netip.Addr, port uint16, proto uint8) (bool, error) {
	ek := endpointKey(ip)
	k := loader.DatapathGuardKey{Addr: ek.Addr, Port: htons(port), Proto: proto, Family: ek.Family}
	var v loader.DatapathFlowInfo
	err := m.d.NatGuardV1.Lookup(&k, &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return false, nil
	}
	return err == nil, err
}

// htons puts a port in the network byte order the datapath keys use.
func htons(p uint16) uint16 {
	return binary.NativeEndian.Uint16(binary.BigEndian.AppendUint16(nil, p))
}

// Current reports whether the maps pinned under root are still the ones m
// opened: false once the pins were removed and the datapath re-created (a
// repair), when a holder of m must reopen and program everything again.
func (m *Maps) Current(root string) bool {
	pinned, err := ebpf.LoadPinnedMap(filepath.Join(root, loader.MapEndpoints), nil)
	if err != nil {
		return false
	}
	defer pinned.Close()
	a, errA := pinned.Info()
	b, errB := m.d.EndpointsV1.Info()
	if errA != nil || errB != nil {
		return false
	}
	ida, _ := a.ID()
	idb, _ := b.ID()
	return ida == idb
}
