package routes

// The netlink side of the controller. Every route it makes carries protocol
// Proto, so a reconcile finds its own routes (and only those) and removes
// the ones of nodes that are gone, including after an agent restart.
//
// Native mode routes each podCIDR via the node's InternalIP of the same
// family (one L2 underlay, as in kind). VXLAN mode routes every podCIDR of
// the other nodes (IPv4 and IPv6) on-link through Device, a metadata-mode
// (external) VXLAN device without ARP: the datapath's to_overlay program
// gives each packet its tunnel key from tunnel_v1 (podCIDR -> node
// address, VTEP MAC), which Sync keeps equal to the routes. The device
// holds the network address of each own podCIDR (never handed out by the
// built-in IPAM), the source of host-originated traffic into the overlay;
// its MAC derives from the node's InternalIP, so peers know it.

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

	"github.com/ebpf-cni/ebpf-cni/internal/loader"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
	"github.com/ebpf-cni/ebpf-cni/internal/nl"
)

// Proto marks ebpf-cni's routes (rtnetlink protocol number).
const Proto = netlink.RouteProtocol(0xeb)

// Device is the VXLAN device of overlay mode.
const Device = "ebpf-vxlan"

// VXLAN parameters: the Linux default port. A metadata-mode device takes
// every VNI; the datapath sends 0xeb.
const (
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
	// PinRoot is the plugin's pin root, where VXLAN mode keeps tunnel_v1
	// and attaches the overlay programs to Device.
	PinRoot string
}

// VTEPMAC is the VXLAN device MAC of the node with InternalIP ip.
func VTEPMAC(ip netip.Addr) net.HardwareAddr {
	a := ip.As16()
	return net.HardwareAddr{0x0e, 0xeb, a[12], a[13], a[14], a[15]}
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

// Sync makes the node's routes exactly those to peers' podCIDRs (and, in
// VXLAN mode, tunnel_v1 exactly their tunnels) and returns how many routes
// it added and removed.
func (r *Router) Sync(peers []Peer) (added, removed int, err error) {
	var dev netlink.Link
	if r.Mode == VXLAN {
		if dev, err = r.ensureVXLAN(); err != nil {
			return 0, 0, err
		}
	}
	want := map[netip.Prefix]*netlink.Route{}
	tunnels := map[netip.Prefix]maps.Tunnel{}
	for _, p := range peers {
		for _, cidr := range p.PodCIDRs {
			cidr = cidr.Masked()
			rt := &netlink.Route{Dst: ipNet(cidr), Protocol: Proto}
			if r.Mode == Native {
				if cidr.Addr().Is4() != p.NodeIP.Is4() {
					continue // no route across families
				}
				rt.Gw = p.NodeIP.AsSlice()
			} else {
				rt.LinkIndex, rt.Scope = dev.Attrs().Index, netlink.SCOPE_LINK
				tunnels[cidr] = maps.Tunnel{Node: p.NodeIP, VTEPMAC: VTEPMAC(p.NodeIP), Ifindex: dev.Attrs().Index, MTU: dev.Attrs().MTU}
			}
			want[cidr] = rt
		}
	}
	var errs []error
	if r.Mode == VXLAN {
		// Tunnels first: a route into the device without its tunnel
		// entry would drop the packets routed there.
		errs = append(errs, r.syncTunnels(tunnels))
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
	for dst, rt := range want {
		if err := netlink.RouteReplace(rt); err != nil {
			errs = append(errs, fmt.Errorf("route %s via %s: %w", dst, rt.Gw, err))
			continue
		}
		added++
	}
	return added, removed, errors.Join(errs...)
}

// syncTunnels makes tunnel_v1 hold exactly want.
func (r *Router) syncTunnels(want map[netip.Prefix]maps.Tunnel) error {
	m, err := maps.Open(r.PinRoot)
	if err != nil {
		return fmt.Errorf("tunnel map: %w", err)
	}
	defer m.Close()
	have, err := m.Tunnels()
	if err != nil {
		return err
	}
	var errs []error
	for p := range have {
		if _, ok := want[p]; !ok {
			errs = append(errs, m.DeleteTunnel(p))
		}
	}
	for p, t := range want {
		if h, ok := have[p]; ok && h.Node == t.Node && bytes.Equal(h.VTEPMAC, t.VTEPMAC) && h.Ifindex == t.Ifindex && h.MTU == t.MTU {
			continue
		}
		errs = append(errs, m.PutTunnel(p, t))
	}
	return errors.Join(errs...)
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

// ensureVXLAN creates (or checks) the metadata-mode VXLAN device with this
// node's MAC and addresses, and attaches the overlay programs to it.
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
			LinkAttrs: netlink.LinkAttrs{Name: Device, HardwareAddr: mac, MTU: under.Attrs().MTU - r.overhead()},
			FlowBased: true,
			Port:      vxlanPort,
			Learning:  false,
		}
		if err := netlink.LinkAdd(v); err != nil {
			return nil, fmt.Errorf("create %s: %w", Device, err)
		}
		if l, err = netlinksafe.LinkByName(Device); err != nil {
			return nil, fmt.Errorf("find %s: %w", Device, err)
		}
	}
	// A device of an older agent (per-peer FDB entries, not in metadata
	// mode) is replaced: the datapath sets each packet's tunnel key.
	if v, ok := l.(*netlink.Vxlan); !ok || !v.FlowBased {
		if err := netlink.LinkDel(l); err != nil {
			return nil, fmt.Errorf("replace %s by a metadata-mode device: %w", Device, err)
		}
		return r.ensureVXLAN()
	}
	if !bytes.Equal(l.Attrs().HardwareAddr, mac) {
		if err := netlink.LinkSetHardwareAddr(l, mac); err != nil {
			return nil, fmt.Errorf("set %s MAC: %w", Device, err)
		}
	}
	if l.Attrs().RawFlags&unix.IFF_NOARP == 0 {
		// Nothing on the overlay answers ARP or ND: every neighbour
		// resolves to the device's own MAC, to_overlay writes the peer's.
		if err := netlink.LinkSetARPOff(l); err != nil {
			return nil, fmt.Errorf("set %s noarp: %w", Device, err)
		}
	}
	for _, p := range r.Local {
		own := p.Masked().Addr()
		addr := &netlink.Addr{IPNet: ipNet(netip.PrefixFrom(own, own.BitLen()))}
		if own.Is6() {
			addr.Flags = unix.IFA_F_NODAD
		}
		if err := netlink.AddrReplace(l, addr); err != nil {
			return nil, fmt.Errorf("address %s on %s: %w", own, Device, err)
		}
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return nil, fmt.Errorf("set %s up: %w", Device, err)
	}
	if err := r.attachOverlay(l); err != nil {
		return nil, err
	}
	return l, nil
}

// attachOverlay loads the datapath (the plugin's build, pinned under the
// pin root) if no ADD did yet, and attaches the overlay programs to dev.
func (r *Router) attachOverlay(dev netlink.Link) error {
	progs, m, err := maps.Ensure(r.PinRoot)
	if err != nil {
		return fmt.Errorf("%s: %w", Device, err)
	}
	defer progs.Close()
	defer m.Close()
	d := loader.NodeDevice{Name: Device, Index: dev.Attrs().Index, Role: loader.RoleOverlay}
	if err := m.ResetNodeStats(d.Index); err != nil {
		return err
	}
	if err := progs.AttachNode(d); err != nil {
		return fmt.Errorf("attach overlay programs to %s: %w", Device, err)
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
