package endpoint

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"

	"github.com/ebpf-cni/ebpf-cni/internal/atomicfile"
	"github.com/ebpf-cni/ebpf-cni/internal/ipam"
	"github.com/ebpf-cni/ebpf-cni/internal/killpoint"
	"github.com/ebpf-cni/ebpf-cni/internal/loader"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
	"github.com/ebpf-cni/ebpf-cni/internal/nat"
	"github.com/ebpf-cni/ebpf-cni/internal/veth"
)

// Net is one network on the node, as tearing down its attachments needs it.
type Net struct {
	Name     string
	StateDir string
	PinRoot  string
	IPAM     ipam.Manager
}

// Store is the network's record store.
func (n Net) Store() Store { return NewStore(n.StateDir, n.Name) }

// Teardown removes one attachment: map entries (before its addresses are
// released, so they cannot be handed to a new pod while still mapped), the
// veth, its link pins, the addresses, the record, and the network's
// masquerade rules once its last attachment is gone. It keeps going past
// errors and joins them; what is already gone is success, so DEL twice, DEL
// after the netns is gone and DEL of an ADD that never ran all succeed.
// extra are addresses known from elsewhere (a DEL's prevResult).
func (n Net) Teardown(containerID, ifname string, extra []netip.Addr) error {
	var errs []error
	store := n.Store()
	rec, err := store.Read(containerID, ifname)
	if !errors.Is(err, ErrDamaged) { // damaged: removed below like any other
		errs = append(errs, err)
	}
	hostName := veth.HostName(containerID, ifname)
	podMAC, _ := veth.MACs(containerID, ifname)
	addrs := extra
	idx := veth.HostIndex(hostName) // 0 once the veth is gone
	if rec != nil {
		addrs = append(addrs, rec.Addrs()...)
		if idx == 0 {
			idx = rec.HostIndex // veth gone with the netns; entries checked by pod MAC
		}
	}
	addrs = append(addrs, n.IPAM.Held(containerID, ifname)...)

	errs = append(errs, unmap(n.PinRoot, addrs, idx, podMAC))
	killpoint.At("del-unmapped")
	// The veth goes before its link pins: the kernel drops a deleted
	// device's TCX programs with it, and unpinning a link whose device is
	// gone detaches nothing, where detaching from a live device waits out
	// an RCU grace period per hook. Filters of legacy tc go with the
	// device too; a device that is not a veth (left alone) is detached.
	errs = append(errs, veth.Teardown(hostName))
	killpoint.At("del-veth-gone")
	errs = append(errs, loader.Detach(n.PinRoot, veth.HostIndex(hostName), hostName))
	killpoint.At("del-detached")
	errs = append(errs, n.IPAM.Del(ipam.Owner{ContainerID: containerID, IfName: ifname}))
	killpoint.At("del-released")

	unlock, err := store.Lock()
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	defer unlock()
	errs = append(errs, store.Remove(containerID, ifname))
	killpoint.At("del-record-removed")
	if left, err := store.Any(); err == nil && !left {
		errs = append(errs, nat.Remove(n.Name))
	} else if err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("delete %s/%s: %w", containerID, ifname, err)
	}
	return nil
}

// unmap removes the attachment's map entries, only while they still carry
// its pod MAC: an address or ifindex reused by a newer pod is left alone.
func unmap(pinRoot string, addrs []netip.Addr, ifindex int, podMAC []byte) error {
	m, err := maps.Open(pinRoot)
	if errors.Is(err, loader.ErrNotLoaded) {
		return nil // no datapath on this node: nothing mapped
	}
	if err != nil {
		return err
	}
	defer m.Close()
	var errs []error
	for _, a := range addrs {
		errs = append(errs, m.DeleteEndpoint(a, podMAC))
	}
	if ifindex > 0 {
		errs = append(errs, m.DeleteDevice(ifindex, podMAC))
	}
	return errors.Join(errs...)
}

// SweepOrphans drops node-wide state whose host veth is gone: endpoint and
// device entries keyed by a vanished ifindex, and link pins of vanished
// veths. Each is re-checked right before it is removed: ADD creates the veth
// before its entries and pins, so nothing of a concurrent ADD is touched.
func SweepOrphans(pinRoot string) error {
	ours := func(idx int) bool {
		l, err := netlink.LinkByIndex(idx)
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return false
		}
		return err != nil || strings.HasPrefix(l.Attrs().Name, veth.HostPrefix) // unsure: keep
	}
	var errs []error
	m, err := maps.Open(pinRoot)
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
	if m != nil {
		// Counters of a crash between the device and counters writes, and
		// of node devices that are gone.
		errs = append(errs, m.SweepStats(func(idx int) bool {
			_, err := netlink.LinkByIndex(idx)
			var nf netlink.LinkNotFoundError
			return !errors.As(err, &nf)
		}))
	}
	orphans, err := loader.Orphans(pinRoot)
	errs = append(errs, err)
	for _, ifname := range orphans {
		errs = append(errs, loader.Detach(pinRoot, 0, ifname))
	}
	return errors.Join(errs...)
}

// SweepPreviousBoot tears down the attachments recorded in another boot
// than current (their pods, veths and pins went with the reboot; their
// addresses and records did not), and has IPAM reclaim reservations of
// previous boots. Attachments of this boot are never touched. The network
// remembers the boot it swept in, so an ADD pays one small file read when
// there is nothing to do.
func (n Net) SweepPreviousBoot(current string) error {
	store := n.Store()
	if b, err := os.ReadFile(store.bootFile()); err == nil && string(b) == current {
		return nil
	}
	recs, _, err := store.List()
	errs := []error{err}
	for _, r := range recs {
		if r.BootID != "" && r.BootID != current {
			errs = append(errs, n.Teardown(r.ContainerID, r.IfName, nil))
		}
	}
	errs = append(errs, n.IPAM.Reclaim(current))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("reclaim attachments of a previous boot: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(store.bootFile()), 0o700); err != nil {
		return err
	}
	return atomicfile.Write(store.bootFile(), []byte(current), 0o600)
}
