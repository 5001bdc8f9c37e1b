package veth

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
)

// Check compares the live attachment with p and returns one error per drift:
// a missing or changed link, address, route or neighbour on either side.
// Addresses and routes other plugins added are tolerated.
func Check(p Pod) error {
	var drift []error
	hl, err := netlinksafe.LinkByName(p.HostName)
	switch {
	case err != nil:
		drift = append(drift, fmt.Errorf("host veth %s is missing: %w", p.HostName, err))
	default:
		if _, ok := hl.(*netlink.Veth); !ok {
			drift = append(drift, fmt.Errorf("host link %s is a %s, not a veth", p.HostName, hl.Type()))
		}
		if !bytes.Equal(hl.Attrs().HardwareAddr, p.HostMAC) {
			drift = append(drift, fmt.Errorf("host veth %s has MAC %s, want %s", p.HostName, hl.Attrs().HardwareAddr, p.HostMAC))
		}
		if hl.Attrs().MasterIndex != 0 {
			drift = append(drift, fmt.Errorf("host veth %s is enslaved to ifindex %d; ebpf-cni uses no bridge", p.HostName, hl.Attrs().MasterIndex))
		}
		for _, a := range p.Addrs {
			if !hasRoute(netlinksafe.RouteList, hl, hostPrefix(a), netip.Addr{}) {
				drift = append(drift, fmt.Errorf("host route %s dev %s is missing", hostPrefix(a), p.HostName))
			}
		}
	}

	nsh, h, err := openNS(p.NetNS)
	if err != nil {
		return errors.Join(append(drift, err)...)
	}
	defer nsh.Close()
	defer h.Close()
	pl, err := h.LinkByName(p.IfName)
	if err != nil {
		return errors.Join(append(drift, fmt.Errorf("%s is missing in %s: %w", p.IfName, p.NetNS, err))...)
	}
	if !bytes.Equal(pl.Attrs().HardwareAddr, p.PodMAC) {
		drift = append(drift, fmt.Errorf("%s has MAC %s, want %s", p.IfName, pl.Attrs().HardwareAddr, p.PodMAC))
	}
	if p.MTU != 0 && pl.Attrs().MTU != p.MTU {
		drift = append(drift, fmt.Errorf("%s has MTU %d, want %d", p.IfName, pl.Attrs().MTU, p.MTU))
	}
	addrs, err := h.AddrList(pl, netlink.FAMILY_ALL)
	if err != nil {
		return errors.Join(append(drift, fmt.Errorf("list addresses of %s: %w", p.IfName, err))...)
	}
	for _, a := range p.Addrs {
		found := false
		for _, got := range addrs {
			ga, _ := netip.AddrFromSlice(got.IP)
			ones, _ := got.Mask.Size()
			if ga.Unmap() == a && ones == a.BitLen() {
				found = true
			}
		}
		if !found {
			drift = append(drift, fmt.Errorf("address %s is missing on %s", hostPrefix(a), p.IfName))
		}
	}
	fams := map[bool]bool{}
	for _, a := range p.Addrs {
		fams[a.Is4()] = true
	}
	for _, dst := range p.Routes {
		if fams[dst.Addr().Is4()] && !hasRoute(h.RouteList, pl, dst, gateway(dst.Addr())) {
			drift = append(drift, fmt.Errorf("route %s via %s is missing in the pod", dst, gateway(dst.Addr())))
		}
	}
	neighs, err := h.NeighList(pl.Attrs().Index, netlink.FAMILY_ALL)
	if err == nil {
		for is4 := range fams {
			gw := GatewayV6
			if is4 {
				gw = GatewayV4
			}
			found := false
			for _, n := range neighs {
				na, _ := netip.AddrFromSlice(n.IP)
				if na.Unmap() == gw && bytes.Equal(n.HardwareAddr, p.HostMAC) {
					found = true
				}
			}
			if !found {
				drift = append(drift, fmt.Errorf("neighbour %s lladdr %s is missing in the pod", gw, p.HostMAC))
			}
		}
	}
	return errors.Join(drift...)
}

func hasRoute(list func(netlink.Link, int) ([]netlink.Route, error), l netlink.Link, dst netip.Prefix, gw netip.Addr) bool {
	fam := netlink.FAMILY_V6
	if dst.Addr().Is4() {
		fam = netlink.FAMILY_V4
	}
	routes, err := list(l, fam)
	if err != nil {
		return false
	}
	for _, r := range routes {
		var rd netip.Prefix
		if r.Dst != nil {
			a, _ := netip.AddrFromSlice(r.Dst.IP)
			ones, _ := r.Dst.Mask.Size()
			rd = netip.PrefixFrom(a.Unmap(), ones)
		} else {
			rd = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
			if fam == netlink.FAMILY_V4 {
				rd = netip.PrefixFrom(netip.IPv4Unspecified(), 0)
			}
		}
		if rd != dst {
			continue
		}
		if !gw.IsValid() {
			return true
		}
		rg, _ := netip.AddrFromSlice(r.Gw)
		if rg.Unmap() == gw {
			return true
		}
	}
	return false
}
