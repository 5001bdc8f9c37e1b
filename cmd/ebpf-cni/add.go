package main

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netlink"

	"github.com/ebpf-cni/ebpf-cni/internal/config"
	"github.com/ebpf-cni/ebpf-cni/internal/endpoint"
	"github.com/ebpf-cni/ebpf-cni/internal/killpoint"
	"github.com/ebpf-cni/ebpf-cni/internal/loader"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
	"github.com/ebpf-cni/ebpf-cni/internal/nat"
	"github.com/ebpf-cni/ebpf-cni/internal/nl"
	"github.com/ebpf-cni/ebpf-cni/internal/node"
	"github.com/ebpf-cni/ebpf-cni/internal/uplink"
	"github.com/ebpf-cni/ebpf-cni/internal/veth"
)

// rollback is ADD's undo list: each step acquired registers its undo right
// after, and on failure they run in reverse with their errors joined to the
// ADD's (none is dropped).
type rollback []func() error

func (r *rollback) add(undo func() error) { *r = append(*r, undo) }

// run undoes everything when *err is set; deferred once by ADD.
func (r *rollback) run(err *error) {
	if *err == nil {
		return
	}
	for i := len(*r) - 1; i >= 0; i-- {
		if uerr := (*r)[i](); uerr != nil {
			*err = errors.Join(*err, fmt.Errorf("undo: %w", uerr))
		}
	}
}

// cmdAdd: config → attachment lock → IPAM → datapath pins → veth,
// addresses, routes → device entry → attach → endpoint entries → record +
// masquerade → result. Each step registers its undo, so a failure leaves
// nothing behind; the attachment lock keeps a runtime's retry from ever
// overlapping (and undoing) the first call.
func cmdAdd(args *skel.CmdArgs, conf *config.NetConf) (_ types.Result, retErr error) {
	pa, err := config.ParseArgs(args.Args)
	if err != nil {
		return nil, err
	}
	mtu := conf.MTU
	if mtu == 0 {
		mtu = defaultMTU()
	}
	net := network(conf)
	store := net.Store()
	lk, err := store.LockAttachment(args.ContainerID, args.IfName)
	if err != nil {
		return nil, err
	}
	defer lk.Release()
	boot := node.BootID()
	// Best effort: what a previous boot left is GC's to report.
	_ = net.SweepPreviousBoot(boot)

	if err := veth.CheckAbsent(args.Netns, args.IfName); err != nil {
		return nil, err
	}
	var undo rollback
	defer undo.run(&retErr)
	owner := pa.Owner(args.ContainerID, args.IfName)
	owner.BootID = boot
	lease, err := conf.Addresses.Add(owner)
	if err != nil {
		return nil, err
	}
	if !lease.Held { // a retried ADD's addresses are not this call's to release
		undo.add(func() error { return conf.Addresses.Del(owner) })
	}
	killpoint.At("add-ipam")

	progs, m, err := maps.Ensure(conf.PinRoot)
	if err != nil {
		return nil, err
	}
	defer progs.Close()
	defer m.Close()
	if conf.FastPath() {
		// Node-wide, once: kept when this ADD fails, like the pins.
		if err := m.PutCluster(conf.ClusterPrefixes); err != nil {
			return nil, err
		}
		if _, err := uplink.Ensure(progs, m, conf.StateDir, conf.ClusterPrefixes, conf.Devices, false); err != nil {
			return nil, fmt.Errorf("attach node devices: %w", err)
		}
	}

	addrs := lease.Addrs()
	podMAC, hostMAC := veth.MACs(args.ContainerID, args.IfName)
	host, pod, err := veth.Setup(veth.Pod{
		NetNS:    args.Netns,
		IfName:   args.IfName,
		HostName: veth.HostName(args.ContainerID, args.IfName),
		MTU:      mtu,
		PodMAC:   podMAC,
		HostMAC:  hostMAC,
		Addrs:    addrs,
		Routes:   lease.Routes,
	})
	if err != nil {
		return nil, err
	}
	undo.add(func() error { return veth.Teardown(host.Name) })
	killpoint.At("add-veth")

	dev := maps.Device{PodMAC: podMAC, HostMAC: hostMAC, Shaped: conf.Shaped()}
	for _, a := range addrs {
		if a.Is4() {
			dev.IPv4 = a
		} else {
			dev.IPv6 = a
		}
	}
	if err := m.PutDevice(host.Index, dev); err != nil {
		return nil, err
	}
	undo.add(func() error { return m.DeleteDevice(host.Index, podMAC) }) // its policy entry too
	killpoint.At("add-device")
	if pending(conf.StateDir, owner.PodNamespace) {
		// NetworkPolicy: a new pod of a namespace with policies is isolated
		// (only its node may talk to it) until ebpf-cni-agent programmed
		// its policy; it is so before its first packet.
		if err := m.PutEPPolicy(host.Index, maps.EPPolicy{Flags: maps.PolPending}); err != nil {
			return nil, err
		}
	}
	mode, err := progs.Attach(host.Index, host.Name, loader.Mode(conf.Attach))
	if err != nil {
		return nil, err
	}
	undo.add(func() error { return loader.Detach(conf.PinRoot, host.Index, host.Name) })
	killpoint.At("add-attached")
	for _, a := range addrs {
		if err := m.PutEndpoint(maps.Endpoint{IP: a, Ifindex: host.Index, PodMAC: podMAC, HostMAC: hostMAC, Shaped: conf.Shaped()}); err != nil {
			return nil, err
		}
		undo.add(func() error { return m.DeleteEndpoint(a, podMAC) })
	}
	killpoint.At("add-endpoints")
	if err := veth.EnableForwarding(addrs); err != nil {
		return nil, err
	}

	unlock, err := store.Lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	rec := &endpoint.Record{
		ContainerID: args.ContainerID, IfName: args.IfName, NetNS: args.Netns,
		HostVeth: host.Name, HostIndex: host.Index,
		PodMAC: podMAC.String(), HostMAC: hostMAC.String(),
		IPs: lease.IPs, MTU: mtu, PodNamespace: owner.PodNamespace, PodName: owner.PodName,
		Attach: string(mode), IPAM: conf.Addresses.Name(), Shaped: conf.Shaped(), BootID: boot,
		PinRoot: conf.PinRoot, ClusterCIDRs: conf.ClusterPrefixes,
	}
	if err := store.Write(rec); err != nil {
		return nil, err
	}
	undo.add(func() error { return store.Remove(args.ContainerID, args.IfName) })
	killpoint.At("add-record")
	if *conf.Masquerade {
		var nets []netip.Prefix
		for _, p := range lease.IPs {
			nets = append(nets, p.Masked())
		}
		if err := nat.Ensure(conf.Name, nets, conf.ClusterPrefixes); err != nil {
			return nil, err
		}
	}
	killpoint.At("add-nat")
	return buildResult(conf, host, pod, mtu, addrs, lease.Routes)
}

// buildResult extends prevResult (when a plugin ran before us) with the host
// veth, the pod interface, the pod's addresses and routes.
func buildResult(conf *config.NetConf, host, pod veth.Link, mtu int, addrs []netip.Addr, routes []netip.Prefix) (types.Result, error) {
	res := &current.Result{CNIVersion: current.ImplementedSpecVersion, DNS: conf.DNS}
	if conf.PrevResult != nil {
		prev, err := current.NewResultFromResult(conf.PrevResult)
		if err != nil {
			return nil, &config.DecodeError{Err: fmt.Errorf("prevResult: %w", err)}
		}
		res = prev
		res.CNIVersion = current.ImplementedSpecVersion
		if res.DNS.IsEmpty() {
			res.DNS = conf.DNS
		}
	}
	res.Interfaces = append(res.Interfaces,
		&current.Interface{Name: host.Name, Mac: host.MAC.String(), Mtu: mtu},
		&current.Interface{Name: pod.Name, Mac: pod.MAC.String(), Mtu: mtu, Sandbox: pod.Sandbox},
	)
	podIdx := len(res.Interfaces) - 1
	for _, a := range addrs {
		gw := veth.GatewayV6
		if a.Is4() {
			gw = veth.GatewayV4
		}
		res.IPs = append(res.IPs, &current.IPConfig{
			Interface: &podIdx,
			Address:   net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())},
			Gateway:   gw.AsSlice(),
		})
	}
	for _, r := range routes {
		gw := veth.GatewayV6
		if r.Addr().Is4() {
			gw = veth.GatewayV4
		}
		res.Routes = append(res.Routes, &types.Route{
			Dst: net.IPNet{IP: r.Addr().AsSlice(), Mask: net.CIDRMask(r.Bits(), r.Addr().BitLen())},
			GW:  gw.AsSlice(),
		})
	}
	out, err := res.GetAsVersion(conf.CNIVersion)
	if err != nil {
		return nil, fmt.Errorf("convert result to %s: %w", conf.CNIVersion, err)
	}
	return out, nil
}

// defaultMTU is the MTU of the device holding the host's default route
// (IPv4 first, then IPv6), 1500 when there is none.
func defaultMTU() int {
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := nl.RouteListFiltered(fam, &netlink.Route{Table: 254}, netlink.RT_FILTER_TABLE)
		if err != nil {
			continue
		}
		for _, r := range routes {
			if (r.Dst == nil || isDefault(r.Dst)) && r.LinkIndex > 0 {
				if l, err := netlink.LinkByIndex(r.LinkIndex); err == nil {
					return l.Attrs().MTU
				}
			}
		}
	}
	return 1500
}

func isDefault(n *net.IPNet) bool {
	ones, _ := n.Mask.Size()
	return ones == 0
}

// pending reports whether a new pod of namespace starts isolated: its
// namespace has NetworkPolicies (the agent's hand-off says so), or the
// hand-off cannot be read (fail closed: the agent rewrites it).
func pending(stateDir, namespace string) bool {
	pol, err := node.ReadPolicy(stateDir)
	if err != nil {
		return true
	}
	return slices.Contains(pol.Namespaces, namespace)
}
