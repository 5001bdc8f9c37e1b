package routes

// The netlink side of the controller. Every route it makes carries protocol
// Proto, so a reconcile finds its own routes (and only those) and removes
// the ones of nodes that are gone, including after an agent restart.
//
// Native mode routes each podCIDR via the node's InternalIP (one L2
// underlay, as in kind). VXLAN mode sends it through the vxlan device Device:
// every node's VTEP address is the network address of its first IPv4
// podCIDR (which the built-in IPAM never hands out), its VTEP MAC derives
// from its InternalIP, and static neighbour and FDB entries replace learning.

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ebpf-cni/ebpf-cni/internal/nl"
)

// Proto marks ebpf-cni's routes (rtnetlink protocol number).
const Proto = netlink.RouteProtocol(0xeb)

// Device is the VXLAN device of overlay mode.
const Device = "ebpf-vxlan"

// VXLAN parameters: the Linux default port and an ID of our own.
const (
	vxlanID   = 0xeb
	vxlanPort = 8472
	// Overhead is what VXLAN takes from the underlay MTU (IPv4 underlay;
	// an IPv6 underlay takes 20 bytes more).
	Overhead = 50
)

// Mode is how pod traffic reaches other nodes.
type Mode string

const (
	Native Mode = "native"
	VXLAN  Mode = "vxlan"
)

// Peer is another node.
type Peer struct {
	Name     string
	NodeIP   netip.Addr
	PodCIDRs []netip.Prefix
}

// Router reconciles this node's routes to its peers.
type Router struct {
	Mode    Mode
	LocalIP netip.Addr     // this node's InternalIP (VXLAN source)
	Local   []netip.Prefix // this node's podCIDRs
}

// VTEPMAC is the VXLAN device MAC of the node with InternalIP ip.
func VTEPMAC(ip netip.Addr) net.HardwareAddr {
	a := ip.As16()
	return net.HardwareAddr{0x0e, 0xeb, a[12], a[13], a[14], a[15]}
}

// vtep is a node's VXLAN address: its first IPv4 podCIDR's network address.
func vtep(cidrs []netip.Prefix) (netip.Addr, bool) {
	for _, p := range cidrs {
		if p.Addr().Is4() {
			return p.Masked().Addr(), true
		}
	}
	return netip.Addr{}, false
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// MTU returns the pod MTU this mode allows over an underlay of mtu.
func (r *Router) MTU(underlay int) int {
	if r.Mode == VXLAN {
		return underlay - r.overhead()
	}
	return underlay
}

func (r *Router) overhead() int {
	if r.LocalIP.Is6() {
		return Overhead + 20
	}
	return Overhead
}

// Sync makes the node's routes exactly those to peers' podCIDRs and returns
// how many routes it added and removed.
func (r *Router) Sync(peers []Peer) (added, removed int, err error) {
	var dev netlink.Link
	if r.Mode == VXLAN {
		if dev, err = r.ensureVXLAN(); err != nil {
			return 0, 0, err
		}
	}
	want := map[netip.Prefix]*netlink.Route{}
	wantNeigh := map[string]bool{} // VTEP IPs and MACs of live peers (VXLAN)
	var errs []error
	for _, p := range peers {
		for _, cidr := range p.PodCIDRs {
			if cidr.Addr().Is4() != p.NodeIP.Is4() && r.Mode == Native {
				continue // no route across families
			}
			rt := &netlink.Route{Dst: ipNet(cidr.Masked()), Protocol: Proto}
			if r.Mode == Native {
				rt.Gw = p.NodeIP.AsSlice()
			} else {
				v, ok := vtep(p.PodCIDRs)
				if !ok || !cidr.Addr().Is4() {
					continue
				}
				rt.Gw, rt.LinkIndex, rt.Flags = v.AsSlice(), dev.Attrs().Index, int(netlink.FLAG_ONLINK)
				errs = append(errs, r.peerEntries(dev, p, v))
				wantNeigh[v.String()], wantNeigh[VTEPMAC(p.NodeIP).String()] = true, true
			}
			want[cidr.Masked()] = rt
		}
	}
	have, err := r.List()
	if err != nil {
		return 0, 0, err
	}
	for _, rt := range have {
		dst := prefixOf(rt.Dst)
		w, ok := want[dst]
		if ok && sameRoute(rt, w) {
			delete(want, dst)
			continue
		}
		if err := netlink.RouteDel(&rt); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("remove route %s: %w", dst, err))
			continue
		}
		removed++
	}
	if dev != nil {
		errs = append(errs, pruneNeighbours(dev, wantNeigh))
	}
	for dst, rt := range want {
		if err := netlink.RouteReplace(rt); err != nil {
			errs = append(errs, fmt.Errorf("route %s via %s: %w", dst, rt.Gw, err))
			continue
		}
		added++
	}
	return added, removed, errors.Join(errs...)
}

func sameRoute(a netlink.Route, b *netlink.Route) bool {
	return net.IP.Equal(a.Gw, b.Gw) && (b.LinkIndex == 0 || a.LinkIndex == b.LinkIndex)
}

func prefixOf(n *net.IPNet) netip.Prefix {
	if n == nil {
		return netip.Prefix{}
	}
	a, _ := netip.AddrFromSlice(n.IP)
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones)
}

// List returns the routes this package made (protocol Proto).
func (r *Router) List() ([]netlink.Route, error) {
	var out []netlink.Route
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rs, err := nl.RouteListFiltered(fam, &netlink.Route{Protocol: Proto}, netlink.RT_FILTER_PROTOCOL)
		if err != nil {
			return nil, fmt.Errorf("list routes: %w", err)
		}
		out = append(out, rs...)
	}
	slices.SortFunc(out, func(a, b netlink.Route) int { return prefixOf(a.Dst).Addr().Compare(prefixOf(b.Dst).Addr()) })
	return out, nil
}

// ensureVXLAN creates (or checks) the VXLAN device with this node's VTEP
// address and MAC.
func (r *Router) ensureVXLAN() (netlink.Link, error) {
	mac := VTEPMAC(r.LocalIP)
	l, err := netlinksafe.LinkByName(Device)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if !errors.As(err, &nf) {
			return nil, fmt.Errorf("find %s: %w", Device, err)
		}
		under, err := underlay(r.LocalIP)
		if err != nil {
			return nil, err
		}
		v := &netlink.Vxlan{
			LinkAttrs:    netlink.LinkAttrs{Name: Device, HardwareAddr: mac, MTU: under.Attrs().MTU - r.overhead()},
			VxlanId:      vxlanID,
			VtepDevIndex: under.Attrs().Index,
			SrcAddr:      r.LocalIP.AsSlice(),
			Port:         vxlanPort,
			Learning:     false,
		}
		if err := netlink.LinkAdd(v); err != nil {
			return nil, fmt.Errorf("create %s: %w", Device, err)
		}
		if l, err = netlinksafe.LinkByName(Device); err != nil {
			return nil, fmt.Errorf("find %s: %w", Device, err)
		}
	}
	// An existing device from before a node address change: peers derive
	// this node's VTEP MAC from its current address.
	if v, ok := l.(*netlink.Vxlan); ok && !net.IP.Equal(v.SrcAddr, r.LocalIP.AsSlice()) {
		if err := netlink.LinkDel(l); err != nil {
			return nil, fmt.Errorf("recreate %s for the new node address: %w", Device, err)
		}
		return r.ensureVXLAN()
	}
	if !bytes.Equal(l.Attrs().HardwareAddr, mac) {
		if err := netlink.LinkSetHardwareAddr(l, mac); err != nil {
			return nil, fmt.Errorf("set %s MAC: %w", Device, err)
		}
	}
	if own, ok := vtep(r.Local); ok {
		addr := &netlink.Addr{IPNet: ipNet(netip.PrefixFrom(own, 32))}
		if err := netlink.AddrReplace(l, addr); err != nil {
			return nil, fmt.Errorf("address %s on %s: %w", own, Device, err)
		}
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return nil, fmt.Errorf("set %s up: %w", Device, err)
	}
	return l, nil
}

// peerEntries installs the static neighbour (VTEP IP -> MAC) and FDB (MAC ->
// node IP) entries of a peer.
func (r *Router) peerEntries(dev netlink.Link, p Peer, v netip.Addr) error {
	mac := VTEPMAC(p.NodeIP)
	neigh := &netlink.Neigh{LinkIndex: dev.Attrs().Index, State: netlink.NUD_PERMANENT, IP: v.AsSlice(), HardwareAddr: mac}
	if err := netlink.NeighSet(neigh); err != nil {
		return fmt.Errorf("neighbour %s of %s: %w", v, p.Name, err)
	}
	fdb := &netlink.Neigh{
		LinkIndex: dev.Attrs().Index, Family: unix.AF_BRIDGE, State: netlink.NUD_PERMANENT,
		Flags: netlink.NTF_SELF, IP: p.NodeIP.AsSlice(), HardwareAddr: mac,
	}
	if err := netlink.NeighSet(fdb); err != nil {
		return fmt.Errorf("fdb entry of %s: %w", p.Name, err)
	}
	return nil
}

// underlay finds the link holding ip.
func underlay(ip netip.Addr) (netlink.Link, error) {
	links, err := nl.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	for _, l := range links {
		addrs, err := nl.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			continue
		}
		for _, a := range addrs {
			if x, ok := netip.AddrFromSlice(a.IP); ok && x.Unmap() == ip {
				return l, nil
			}
		}
	}
	return nil, fmt.Errorf("no link holds the node address %s", ip)
}

// UnderlayMTU is the MTU of the link holding ip.
func UnderlayMTU(ip netip.Addr) (int, error) {
	l, err := underlay(ip)
	if err != nil {
		return 0, err
	}
	return l.Attrs().MTU, nil
}

// pruneNeighbours removes the VXLAN device's permanent neighbour and FDB
// entries of peers that are gone.
func pruneNeighbours(dev netlink.Link, want map[string]bool) error {
	var errs []error
	for _, fam := range []int{netlink.FAMILY_V4, unix.AF_BRIDGE} {
		neighs, err := nl.NeighList(dev.Attrs().Index, fam)
		if err != nil {
			errs = append(errs, fmt.Errorf("list %s entries: %w", Device, err))
			continue
		}
		for _, n := range neighs {
			if n.State&netlink.NUD_PERMANENT == 0 {
				continue
			}
			key := n.IP.String()
			if fam == unix.AF_BRIDGE {
				key = n.HardwareAddr.String()
			}
			if !want[key] {
				n := n
				if err := netlink.NeighDel(&n); err != nil && !errors.Is(err, unix.ENOENT) {
					errs = append(errs, fmt.Errorf("remove stale %s entry %s: %w", Device, key, err))
				}
			}
		}
	}
	return errors.Join(errs...)
}
