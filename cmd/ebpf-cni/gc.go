package main

import (
	"errors"
	"fmt"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/ebpf-cni/ebpf-cni/internal/config"
	"github.com/ebpf-cni/ebpf-cni/internal/endpoint"
	"github.com/ebpf-cni/ebpf-cni/internal/flock"
	"github.com/ebpf-cni/ebpf-cni/internal/loader"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
	"github.com/ebpf-cni/ebpf-cni/internal/node"
	"github.com/ebpf-cni/ebpf-cni/internal/uplink"
)

// cmdGC removes every attachment of this network that is not in
// cni.dev/valid-attachments (reservation, map entries, link pins, host
// veth, record), including those whose ADD died before it wrote a record,
// then node-wide orphans: map entries and link pins whose host veth no
// longer exists. It keeps going past errors and reports them.
func cmdGC(_ *skel.CmdArgs, conf *config.NetConf) (types.Result, error) {
	n := network(conf)
	store := n.Store()
	var errs []error
	errs = append(errs, n.SweepPreviousBoot(node.BootID()))
	recs, damaged, err := store.List()
	errs = append(errs, err)
	done := map[[2]string]bool{} // judged
	torn := map[[2]string]bool{} // torn down
	remove := func(cid, ifname string) {
		k := [2]string{cid, ifname}
		if conf.Valid(cid, ifname) || done[k] {
			return
		}
		done[k] = true
		// Skip an attachment whose ADD or DEL runs now: the next GC sees it.
		lk, err := store.TryLockAttachment(cid, ifname)
		if errors.Is(err, flock.ErrBusy) {
			return
		}
		if err != nil {
			errs = append(errs, err)
			return
		}
		if err := n.Teardown(cid, ifname, nil); err != nil {
			errs = append(errs, err)
			lk.Release()
			return
		}
		torn[k] = true
		lk.ReleaseAndRemove()
	}
	for _, r := range recs {
		remove(r.ContainerID, r.IfName)
	}
	for _, a := range damaged {
		remove(a.ContainerID, a.IfName)
	}
	left, err := conf.Addresses.Leftovers(conf.Valid)
	errs = append(errs, err)
	for _, o := range left {
		remove(o.ContainerID, o.IfName)
	}
	// Release only what this GC tore down (and records no index owns):
	// an attachment whose ADD completed after the listing above is not
	// this GC's to judge; the next one sees it.
	errs = append(errs, conf.Addresses.GC(func(cid, ifname string) bool {
		return !torn[[2]string{cid, ifname}]
	}))
	errs = append(errs, store.SweepTemp(time.Minute))
	errs = append(errs, endpoint.SweepOrphans(conf.PinRoot))
	errs = append(errs, gcNodeDevices(conf))
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("gc: %w", err)
	}
	return nil, nil
}

// network is the config's network as the endpoint model sees it.
func network(conf *config.NetConf) endpoint.Net {
	return endpoint.Net{Name: conf.Name, StateDir: conf.StateDir, PinRoot: conf.PinRoot, IPAM: conf.Addresses}
}

// gcNodeDevices drops the attachments of node devices that are gone and,
// when the network takes part in the fast path, chooses the devices anew
// (a device added since the first ADD is picked up here).
func gcNodeDevices(conf *config.NetConf) error {
	if err := loader.SweepNodes(conf.PinRoot); err != nil || !conf.FastPath() {
		return err
	}
	progs, err := loader.Open(conf.PinRoot)
	if errors.Is(err, loader.ErrNotLoaded) {
		return nil // no ADD yet: nothing to keep up
	}
	if err != nil {
		return err
	}
	defer progs.Close()
	m, err := maps.Open(conf.PinRoot)
	if err != nil {
		return err
	}
	defer m.Close()
	_, err = uplink.Ensure(progs, m, conf.StateDir, conf.ClusterPrefixes, conf.Devices, true)
	return err
}
