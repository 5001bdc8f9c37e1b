// Package uplink chooses and attaches the node devices of the cross-node
// fast path: the devices that carry routes into the cluster's pod ranges and
// the devices of the default routes (IPv4 and IPv6), or the devices a
// network config names ("devices"). A metadata-mode VXLAN device among them
// (ebpf-cni-agent's, in VXLAN mode) gets the overlay role.
//
// The choice is made once per node: on the first ADD with clusterCIDRs,
// and again when a device chosen before lost its attachment (deleted,
// re-created) or GC runs. It is remembered in <stateDir>/node-devices.json,
// so a normal ADD only checks that the remembered attachments are live (a
// route dump costs O(pods): every pod has a host route).
package uplink

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"

	"github.com/vishvananda/netlink"

	"github.com/ebpf-cni/ebpf-cni/internal/atomicfile"
	"github.com/ebpf-cni/ebpf-cni/internal/config"
	"github.com/ebpf-cni/ebpf-cni/internal/loader"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
	"github.com/ebpf-cni/ebpf-cni/internal/nl"
	"github.com/ebpf-cni/ebpf-cni/internal/veth"
)

// stateFile remembers the chosen devices under the state directory.
const stateFile = "node-devices.json"

// Ensure attaches the fast path's programs to the node's devices unless
// the remembered choice is still attached. force chooses anew (GC). Each
// device gets its counters entry in m.
func Ensure(progs *loader.Programs, m *maps.Maps, stateDir string, cluster []netip.Prefix, names []string, force bool) ([]loader.NodeDevice, error) {
	path := filepath.Join(stateDir, stateFile)
	if !force {
		var known []loader.NodeDevice
		if b, err := os.ReadFile(path); err == nil && json.Unmarshal(b, &known) == nil && len(known) > 0 &&
			!slices.ContainsFunc(known, func(d loader.NodeDevice) bool { return !progs.NodeAttached(d) }) {
			return known, nil
		}
	}
	devs, err := Select(cluster, names)
	if err != nil {
		return nil, err
	}
	var errs []error
	for _, d := range devs {
		errs = append(errs, m.ResetNodeStats(d.Index), progs.AttachNode(d))
	}
	if err := errors.Join(errs...); err != nil {
		return devs, err
	}
	b, err := json.Marshal(devs)
	if err != nil {
		return devs, err
	}
	return devs, atomicfile.Write(path, b, 0o644)
}

// Select chooses the devices: those named (in order), or those found from
// the routes into cluster and the default routes.
func Select(cluster []netip.Prefix, names []string) ([]loader.NodeDevice, error) {
	if len(names) > 0 {
		var out []loader.NodeDevice
		for i, n := range names {
			l, err := netlink.LinkByName(n)
			if err != nil {
				return nil, config.Invalid(fmt.Sprintf("devices[%d]", i), "%q: no such network interface on this node", n)
			}
			if d, ok := device(l); ok {
				out = append(out, d)
			}
		}
		return out, nil
	}
	seen := map[int]bool{}
	var out []loader.NodeDevice
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := nl.RouteListFiltered(fam, &netlink.Route{Table: 254}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return nil, fmt.Errorf("list routes: %w", err)
		}
		for _, r := range routes {
			if !wanted(r, cluster) {
				continue
			}
			idxs := []int{r.LinkIndex}
			for _, nh := range r.MultiPath {
				idxs = append(idxs, nh.LinkIndex)
			}
			for _, idx := range idxs {
				if idx <= 0 || seen[idx] {
					continue
				}
				seen[idx] = true
				l, err := netlink.LinkByIndex(idx)
				if err != nil {
					continue
				}
				if m := l.Attrs().MasterIndex; m > 0 { // a bond's (or bridge's) port: its master
					if ml, err := netlink.LinkByIndex(m); err == nil && !seen[m] {
						seen[m] = true
						l = ml
					} else {
						continue
					}
				}
				if d, ok := device(l); ok {
					out = append(out, d)
				}
			}
		}
	}
	return out, nil
}

// wanted: a default route, or a route into one of the cluster's ranges.
func wanted(r netlink.Route, cluster []netip.Prefix) bool {
	if r.Dst == nil {
		return true
	}
	a, ok := netip.AddrFromSlice(r.Dst.IP)
	if !ok {
		return false
	}
	ones, _ := r.Dst.Mask.Size()
	p := netip.PrefixFrom(a.Unmap(), ones)
	if p.Bits() == 0 {
		return true
	}
	for _, c := range cluster {
		if c.Overlaps(p) {
			return true
		}
	}
	return false
}

// device gives l its role, or refuses it: loopback, pods' host veths,
// devices without an Ethernet header (tun, wireguard, ipip: a peer
// redirect would hand the pod a frame without one) and VXLAN devices not in
// metadata mode (someone else's overlay).
func device(l netlink.Link) (loader.NodeDevice, bool) {
	a := l.Attrs()
	d := loader.NodeDevice{Name: a.Name, Index: a.Index, Role: loader.RoleUplink}
	switch v := l.(type) {
	case *netlink.Veth:
		if veth.IsHostVeth(a.Name) {
			return d, false
		}
	case *netlink.Vxlan:
		if !v.FlowBased {
			return d, false
		}
		d.Role = loader.RoleOverlay
		return d, true
	}
	if a.Flags&0x8 != 0 || len(a.HardwareAddr) != 6 { // IFF_LOOPBACK, or no Ethernet address
		return d, false
	}
	return d, true
}

// Holding returns the devices that hold any of addrs (the node addresses
// where NodePorts are served), as uplinks: from_node on their ingress
// translates traffic from outside to Services.
func Holding(addrs []netip.Addr) ([]loader.NodeDevice, error) {
	all, err := nl.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	seen := map[int]bool{}
	var out []loader.NodeDevice
	for _, a := range all {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok || !slices.Contains(addrs, ip.Unmap()) || seen[a.LinkIndex] {
			continue
		}
		seen[a.LinkIndex] = true
		l, err := netlink.LinkByIndex(a.LinkIndex)
		if err != nil {
			continue
		}
		if d, ok := device(l); ok {
			out = append(out, d)
		}
	}
	return out, nil
}

// Forget drops the remembered choice (ebpf-cni uninstall): the next ADD
// chooses anew.
func Forget(stateDir string) error {
	err := os.Remove(filepath.Join(stateDir, stateFile))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("forget node devices: %w", err)
	}
	return nil
}
