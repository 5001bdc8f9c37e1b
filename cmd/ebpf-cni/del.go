package main

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/ebpf-cni/ebpf-cni/internal/loader"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
	"github.com/ebpf-cni/ebpf-cni/internal/nat"
	"github.com/ebpf-cni/ebpf-cni/internal/veth"
)

// cmdDel undoes ADD in reverse and keeps going past errors. It succeeds when
// repeated, when ADD never ran or failed half-way, and when the netns is
// gone: the addresses and map entries are released all the same.
func cmdDel(args *skel.CmdArgs) (types.Result, error) {
	conf, err := parseConfig(args.StdinData)
	if err != nil {
		return nil, err
	}
	var extra []netip.Addr
	if conf.PrevResult != nil {
		if res, err := current.NewResultFromResult(conf.PrevResult); err == nil {
			for _, ipc := range res.IPs {
				if p, ok := prefixOf(ipc.Address); ok {
					extra = append(extra, p.Addr())
				}
			}
		}
	}
	return nil, teardown(conf, args.ContainerID, args.IfName, extra, func() error { return ipamDel(conf, args) })
}

// teardown removes one attachment: map entries (before its addresses are
// released, so they cannot be handed to a new pod while still mapped), link
// pins and filters, the veth, the addresses, the record, and the network's
// masquerade rules once its last endpoint is gone.
func teardown(conf *NetConf, containerID, ifname string, extra []netip.Addr, release func() error) error {
	var errs []error
	st, err := readState(conf.StateDir, conf.Name, containerID, ifname)
	errs = append(errs, err)
	hostName := veth.HostName(containerID, ifname)
	podMAC, _ := veth.MACs(containerID, ifname)
	addrs := extra
	live := veth.HostIndex(hostName) // 0 once the veth is gone
	idx := live
	if st != nil {
		addrs = append(addrs, st.addrs()...)
		if idx == 0 {
			idx = st.HostIndex // veth gone with the netns; entries checked by pod MAC
		}
	}
	addrs = append(addrs, reserved(conf, containerID, ifname)...)

	m, err := maps.Open(conf.PinRoot)
	switch {
	case err == nil:
		// Entries are removed only while they still carry this attachment's
		// pod MAC: an address or ifindex reused by a newer pod is left alone.
		for _, a := range addrs {
			errs = append(errs, m.DeleteEndpoint(a, podMAC))
		}
		if idx > 0 {
			errs = append(errs, m.DeleteDevice(idx, podMAC))
		}
		m.Close()
	case errors.Is(err, loader.ErrNotLoaded):
		// no datapath on this node: nothing mapped
	default:
		errs = append(errs, err)
	}
	errs = append(errs, loader.Detach(conf.PinRoot, live, hostName))
	errs = append(errs, veth.Teardown(hostName))
	if release != nil {
		errs = append(errs, release())
	}

	unlock, err := lockNetwork(conf.StateDir, conf.Name)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	defer unlock()
	errs = append(errs, removeState(conf.StateDir, conf.Name, containerID, ifname))
	if left, err := hasStates(conf.StateDir, conf.Name); err == nil && !left {
		errs = append(errs, nat.Remove(conf.Name))
	} else if err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("delete %s/%s: %w", containerID, ifname, err)
	}
	return nil
}

// reserved lists the built-in IPAM's addresses of an attachment.
func reserved(conf *NetConf, containerID, ifname string) []netip.Addr {
	if !conf.builtin {
		return nil
	}
	alloc, err := conf.allocator()
	if err != nil {
		return nil
	}
	recs, err := alloc.Owned(containerID, ifname)
	if err != nil {
		return nil
	}
	out := make([]netip.Addr, len(recs))
	for i, r := range recs {
		out[i] = r.IP
	}
	return out
}
