package main

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/skel"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/ebpf-cni/ebpf-cni/internal/flock"
	"github.com/ebpf-cni/ebpf-cni/internal/ipam"
)

// lease is what IPAM gave an attachment.
type lease struct {
	ips    []netip.Prefix // address with its subnet's mask
	routes []netip.Prefix // destinations the pod routes via the gateway
}

func (c *NetConf) allocator() (*ipam.Allocator, error) {
	store, err := ipam.NewDiskStore(filepath.Join(c.IPAMConf.DataDir, c.Name))
	if err != nil {
		return nil, fmt.Errorf("open ipam store: %w", err)
	}
	return ipam.NewAllocator(store, c.sets), nil
}

// ipamAdd reserves the attachment's addresses with the built-in IPAM or
// the delegated plugin.
func ipamAdd(c *NetConf, args *skel.CmdArgs, pa podArgs) (lease, error) {
	if !c.builtin {
		return delegateAdd(c, args)
	}
	alloc, err := c.allocator()
	if err != nil {
		return lease{}, err
	}
	recs, err := alloc.Allocate(ipam.Owner{
		ContainerID: args.ContainerID, IfName: args.IfName,
		PodNamespace: pa.Namespace, PodName: pa.Name,
	}, flock.DefaultWait)
	if err != nil {
		return lease{}, fmt.Errorf("allocate address: %w", err)
	}
	var l lease
	for i, r := range recs {
		for _, rg := range c.sets[i] {
			if rg.Subnet.Contains(r.IP) {
				l.ips = append(l.ips, netip.PrefixFrom(r.IP, rg.Subnet.Bits()))
				break
			}
		}
	}
	l.routes = withDefaults(l.ips, c.routes)
	return l, nil
}

func delegateAdd(c *NetConf, args *skel.CmdArgs) (lease, error) {
	r, err := invoke.DelegateAdd(context.Background(), c.IPAMConf.Type, args.StdinData, nil)
	if err != nil {
		return lease{}, fmt.Errorf("ipam plugin %s: %w", c.IPAMConf.Type, err)
	}
	res, err := current.NewResultFromResult(r)
	if err != nil {
		delegateDel(c, args)
		return lease{}, fmt.Errorf("convert result of ipam plugin %s: %w", c.IPAMConf.Type, err)
	}
	var l lease
	fams := map[bool]bool{}
	for _, ipc := range res.IPs {
		p, ok := prefixOf(ipc.Address)
		if !ok || fams[p.Addr().Is4()] {
			continue // one address per family: the pod has one interface
		}
		fams[p.Addr().Is4()] = true
		l.ips = append(l.ips, p)
	}
	if len(l.ips) == 0 {
		delegateDel(c, args)
		return lease{}, fmt.Errorf("ipam plugin %s returned no address", c.IPAMConf.Type)
	}
	var routes []netip.Prefix
	for _, rt := range res.Routes {
		if p, ok := prefixOf(rt.Dst); ok {
			routes = append(routes, p.Masked())
		}
	}
	l.routes = withDefaults(l.ips, routes)
	return l, nil
}

// ipamDel releases the attachment's addresses; nothing reserved is success.
func ipamDel(c *NetConf, args *skel.CmdArgs) error {
	if !c.builtin {
		return delegateDel(c, args)
	}
	alloc, err := c.allocator()
	if err != nil {
		return err
	}
	if _, err := alloc.Release(args.ContainerID, args.IfName, flock.DefaultWait); err != nil {
		return fmt.Errorf("release addresses: %w", err)
	}
	return nil
}

func delegateDel(c *NetConf, args *skel.CmdArgs) error {
	if err := invoke.DelegateDel(context.Background(), c.IPAMConf.Type, args.StdinData, nil); err != nil {
		return fmt.Errorf("ipam plugin %s DEL: %w", c.IPAMConf.Type, err)
	}
	return nil
}

// withDefaults adds a default route for each family of ips that has none.
func withDefaults(ips, routes []netip.Prefix) []netip.Prefix {
	has := map[bool]bool{}
	for _, r := range routes {
		has[r.Addr().Is4()] = true
	}
	out := append([]netip.Prefix(nil), routes...)
	for _, ip := range ips {
		is4 := ip.Addr().Is4()
		if has[is4] {
			continue
		}
		has[is4] = true
		if is4 {
			out = append(out, netip.PrefixFrom(netip.IPv4Unspecified(), 0))
		} else {
			out = append(out, netip.PrefixFrom(netip.IPv6Unspecified(), 0))
		}
	}
	return out
}

func prefixOf(n net.IPNet) (netip.Prefix, bool) {
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	a = a.Unmap()
	ones, bits := n.Mask.Size()
	if bits == 0 {
		ones = a.BitLen()
	}
	if a.Is4() && bits == 128 {
		if ones < 96 {
			return netip.Prefix{}, false // an IPv6 mask shorter than ::ffff:0:0/96
		}
		ones -= 96
	}
	return netip.PrefixFrom(a, ones), true
}
