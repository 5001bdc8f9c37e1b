package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/vishvananda/netlink"

	"github.com/ebpf-cni/ebpf-cni/internal/flock"
	"github.com/ebpf-cni/ebpf-cni/internal/loader"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
	"github.com/ebpf-cni/ebpf-cni/internal/veth"
)

// cmdGC removes every attachment of this network that is not in
// cni.dev/valid-attachments (reservation, map entries, link pins, host
// veth, record), then node-wide orphans: map entries and link pins whose
// host veth no longer exists. It keeps going past errors and reports them.
func cmdGC(args *skel.CmdArgs) (types.Result, error) {
	conf, err := parseConfig(args.StdinData)
	if err != nil {
		return nil, err
	}
	var in struct {
		Valid  []types.GCAttachment `json:"cni.dev/valid-attachments"`
		Legacy []types.GCAttachment `json:"cni.dev/attachments"`
	}
	if err := json.Unmarshal(args.StdinData, &in); err != nil {
		return nil, &decodeError{err}
	}
	valid := map[types.GCAttachment]bool{}
	for _, a := range append(in.Valid, in.Legacy...) {
		valid[a] = true
	}
	keep := func(cid, ifname string) bool {
		return valid[types.GCAttachment{ContainerID: cid, IfName: ifname}]
	}

	var errs []error
	states, err := listStates(conf.StateDir, conf.Name)
	errs = append(errs, err)
	for _, st := range states {
		if keep(st.ContainerID, st.IfName) {
			continue
		}
		release := func() error {
			if !conf.builtin {
				return nil // the delegated plugin gets its own GC below
			}
			alloc, err := conf.allocator()
			if err != nil {
				return err
			}
			_, err = alloc.Release(st.ContainerID, st.IfName, flock.DefaultWait)
			return err
		}
		errs = append(errs, teardown(conf, st.ContainerID, st.IfName, nil, release))
	}

	if conf.builtin {
		errs = append(errs, gcReservations(conf, keep))
	} else if err := invoke.DelegateGC(context.Background(), conf.IPAMConf.Type, args.StdinData, nil); err != nil {
		errs = append(errs, fmt.Errorf("ipam plugin %s GC: %w", conf.IPAMConf.Type, err))
	}
	errs = append(errs, gcOrphans(conf.PinRoot))
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("gc: %w", err)
	}
	return nil, nil
}

// gcReservations tears down attachments that hold a built-in reservation
// but are not kept, including those whose ADD died before it wrote its
// record: their veth, entries and pins go with the address.
func gcReservations(conf *NetConf, keep func(cid, ifname string) bool) error {
	alloc, err := conf.allocator()
	if err != nil {
		return err
	}
	recs, err := alloc.Records()
	if err != nil {
		return err
	}
	var errs []error
	done := map[[2]string]bool{}
	for _, r := range recs {
		owner := [2]string{r.ContainerID, r.IfName}
		if keep(r.ContainerID, r.IfName) || done[owner] {
			continue
		}
		done[owner] = true
		release := func() error {
			_, err := alloc.Release(r.ContainerID, r.IfName, flock.DefaultWait)
			if err == nil {
				err = alloc.ReleaseIP(r.IP, flock.DefaultWait) // also without an owner index
			}
			return err
		}
		errs = append(errs, teardown(conf, r.ContainerID, r.IfName, []netip.Addr{r.IP}, release))
	}
	return errors.Join(errs...)
}

// gcOrphans drops node-wide state whose host veth is gone: endpoint and
// device entries keyed by a vanished ifindex, and link pins of vanished
// veths. Each is re-checked right before it is removed: ADD creates the veth
// before its entries and pins, so nothing of a concurrent ADD is touched.
func gcOrphans(root string) error {
	ours := func(idx int) bool {
		l, err := netlink.LinkByIndex(idx)
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return false
		}
		return err != nil || strings.HasPrefix(l.Attrs().Name, veth.HostPrefix) // unsure: keep
	}
	var errs []error
	m, err := maps.Open(root)
	if err == nil {
		defer m.Close()
		eps, err := m.Endpoints()
		errs = append(errs, err)
		for _, ep := range eps {
			if !ours(ep.Ifindex) {
				errs = append(errs, m.DeleteEndpoint(ep.IP, ep.PodMAC))
			}
		}
		devs, err := m.Devices()
		errs = append(errs, err)
		for idx, d := range devs {
			if !ours(idx) {
				errs = append(errs, m.DeleteDevice(idx, d.PodMAC))
			}
		}
	} else if !errors.Is(err, loader.ErrNotLoaded) {
		errs = append(errs, err)
	}

	pins, err := os.ReadDir(loader.LinkDir(root))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	for _, p := range pins {
		name := p.Name()
		i := strings.LastIndexByte(name, '-')
		if i <= 0 {
			continue
		}
		_, err := netlink.LinkByName(name[:i])
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			errs = append(errs, loader.Detach(root, 0, name[:i]))
		}
	}
	return errors.Join(errs...)
}
