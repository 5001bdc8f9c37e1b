package main

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/ebpf-cni/ebpf-cni/internal/config"
	"github.com/ebpf-cni/ebpf-cni/internal/endpoint"
	"github.com/ebpf-cni/ebpf-cni/internal/ipam"
	"github.com/ebpf-cni/ebpf-cni/internal/loader"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
	"github.com/ebpf-cni/ebpf-cni/internal/veth"
)

// cmdCheck compares the attachment with prevResult (interface, addresses,
// routes) and with what only ebpf-cni knows (map entries, program
// attachments, reservations). Every drift is reported, not just the first.
// It takes no lock and changes nothing.
func cmdCheck(args *skel.CmdArgs, conf *config.NetConf) (types.Result, error) {
	if conf.PrevResult == nil {
		return nil, config.Invalid("prevResult", "missing: CHECK needs the result of ADD")
	}
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return nil, &config.DecodeError{Err: fmt.Errorf("prevResult: %w", err)}
	}
	rec, err := endpoint.NewStore(conf.StateDir, conf.Name).Read(args.ContainerID, args.IfName)
	if err != nil {
		return nil, err
	}
	if rec == nil {
		return nil, types.NewError(types.ErrUnknownContainer,
			fmt.Sprintf("no attachment %s/%s on network %s", args.ContainerID, args.IfName, conf.Name), "")
	}

	podIdx := -1
	for i, ifc := range prev.Interfaces {
		if ifc.Name == args.IfName && ifc.Sandbox == args.Netns {
			podIdx = i
		}
	}
	if podIdx < 0 {
		return nil, fmt.Errorf("prevResult has no interface %s in %s", args.IfName, args.Netns)
	}
	var addrs []netip.Addr
	for _, ipc := range prev.IPs {
		if ipc.Interface != nil && *ipc.Interface == podIdx {
			if p, ok := ipam.PrefixOf(ipc.Address); ok {
				addrs = append(addrs, p.Addr())
			}
		}
	}
	var drift []error
	for _, a := range rec.Addrs() {
		if !slices.Contains(addrs, a) {
			drift = append(drift, fmt.Errorf("address %s of the attachment is not in prevResult", a))
		}
	}
	var routes []netip.Prefix
	for _, r := range prev.Routes {
		gw, _ := netip.AddrFromSlice(r.GW)
		if p, ok := ipam.PrefixOf(r.Dst); ok && (gw.Unmap() == veth.GatewayV4 || gw.Unmap() == veth.GatewayV6) {
			routes = append(routes, p.Masked())
		}
	}
	podMAC, hostMAC := rec.MACs()
	drift = append(drift, veth.Check(veth.Pod{
		NetNS: args.Netns, IfName: args.IfName, HostName: rec.HostVeth, MTU: rec.MTU,
		PodMAC: podMAC, HostMAC: hostMAC, Addrs: addrs, Routes: routes,
	}))

	idx := veth.HostIndex(rec.HostVeth)
	drift = append(drift, checkDatapath(conf, rec, idx, addrs))
	drift = append(drift, conf.Addresses.Check(ipam.Owner{ContainerID: args.ContainerID, IfName: args.IfName}, addrs))
	if err := errors.Join(drift...); err != nil {
		return nil, fmt.Errorf("check %s/%s: %w", args.ContainerID, args.IfName, err)
	}
	return nil, nil
}

func checkDatapath(conf *config.NetConf, rec *endpoint.Record, idx int, addrs []netip.Addr) error {
	if idx == 0 {
		return nil // the missing veth is already reported
	}
	m, err := maps.Open(conf.PinRoot)
	if err != nil {
		return fmt.Errorf("datapath maps: %w", err)
	}
	defer m.Close()
	var drift []error
	for _, a := range addrs {
		ep, err := m.Endpoint(a)
		switch {
		case err != nil:
			drift = append(drift, fmt.Errorf("endpoints map: %w", err))
		case ep.Ifindex != idx:
			drift = append(drift, fmt.Errorf("endpoints map: %s points at ifindex %d, want %d (%s)", a, ep.Ifindex, idx, rec.HostVeth))
		}
	}
	if _, err := m.Device(idx); err != nil {
		drift = append(drift, fmt.Errorf("devices map: %w", err))
	}
	att, err := loader.Attached(conf.PinRoot, idx, rec.HostVeth)
	if err != nil {
		return errors.Join(append(drift, err)...)
	}
	for _, a := range att {
		if a.Mode == "" {
			drift = append(drift, fmt.Errorf("no ebpf-cni program on %s %s", rec.HostVeth, a.Hook))
		}
	}
	return errors.Join(drift...)
}
