package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/ebpf-cni/ebpf-cni/internal/loader"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
	"github.com/ebpf-cni/ebpf-cni/internal/veth"
)

// cmdCheck compares the attachment with prevResult (interface, addresses,
// routes) and with what only ebpf-cni knows (map entries, program
// attachments, reservations). Every drift is reported, not just the first.
func cmdCheck(args *skel.CmdArgs) (types.Result, error) {
	conf, err := parseConfig(args.StdinData)
	if err != nil {
		return nil, err
	}
	if conf.PrevResult == nil {
		return nil, invalid("prevResult", "missing: CHECK needs the result of ADD")
	}
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return nil, &decodeError{fmt.Errorf("prevResult: %w", err)}
	}
	st, err := readState(conf.StateDir, conf.Name, args.ContainerID, args.IfName)
	if err != nil {
		return nil, err
	}
	if st == nil {
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
			if p, ok := prefixOf(ipc.Address); ok {
				addrs = append(addrs, p.Addr())
			}
		}
	}
	var drift []error
	for _, a := range st.addrs() {
		if !slices.Contains(addrs, a) {
			drift = append(drift, fmt.Errorf("address %s of the attachment is not in prevResult", a))
		}
	}
	var routes []netip.Prefix
	for _, r := range prev.Routes {
		gw, _ := netip.AddrFromSlice(r.GW)
		if p, ok := prefixOf(r.Dst); ok && (gw.Unmap() == veth.GatewayV4 || gw.Unmap() == veth.GatewayV6) {
			routes = append(routes, p.Masked())
		}
	}
	podMAC, hostMAC := st.macs()
	drift = append(drift, veth.Check(veth.Pod{
		NetNS: args.Netns, IfName: args.IfName, HostName: st.HostVeth, MTU: st.MTU,
		PodMAC: podMAC, HostMAC: hostMAC, Addrs: addrs, Routes: routes,
	}))

	idx := veth.HostIndex(st.HostVeth)
	drift = append(drift, checkDatapath(conf, st, idx, addrs))
	drift = append(drift, checkIPAM(conf, args, addrs))
	if err := errors.Join(drift...); err != nil {
		return nil, fmt.Errorf("check %s/%s: %w", args.ContainerID, args.IfName, err)
	}
	return nil, nil
}

func checkDatapath(conf *NetConf, st *endpointState, idx int, addrs []netip.Addr) error {
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
			drift = append(drift, fmt.Errorf("endpoints map: %s points at ifindex %d, want %d (%s)", a, ep.Ifindex, idx, st.HostVeth))
		}
	}
	if _, err := m.Device(idx); err != nil {
		drift = append(drift, fmt.Errorf("devices map: %w", err))
	}
	att, err := loader.Attached(conf.PinRoot, idx, st.HostVeth)
	if err != nil {
		return errors.Join(append(drift, err)...)
	}
	for _, a := range att {
		if a.Mode == "" {
			drift = append(drift, fmt.Errorf("no ebpf-cni program on %s %s", st.HostVeth, a.Hook))
		}
	}
	return errors.Join(drift...)
}

func checkIPAM(conf *NetConf, args *skel.CmdArgs, addrs []netip.Addr) error {
	if !conf.builtin {
		if err := invoke.DelegateCheck(context.Background(), conf.IPAMConf.Type, args.StdinData, nil); err != nil {
			return fmt.Errorf("ipam plugin %s CHECK: %w", conf.IPAMConf.Type, err)
		}
		return nil
	}
	held := reserved(conf, args.ContainerID, args.IfName)
	var drift []error
	for _, a := range addrs {
		if !slices.Contains(held, a) {
			drift = append(drift, fmt.Errorf("ipam: %s is not reserved for %s/%s", a, args.ContainerID, args.IfName))
		}
	}
	return errors.Join(drift...)
}
