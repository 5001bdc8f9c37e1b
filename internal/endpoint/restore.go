package endpoint

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/ebpf-cni/ebpf-cni/internal/loader"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
	"github.com/ebpf-cni/ebpf-cni/internal/uplink"
	"github.com/ebpf-cni/ebpf-cni/internal/veth"
)

// Health is what Check found of the live attachments of a node.
type Health struct {
	Live    int      // attachments whose host veth exists
	Missing []string // what is missing, one line per attachment
}

// live is the records of this boot whose host veth exists, by pin root.
func live(stateDir, defaultPinRoot string) (map[string][]*Record, int, error) {
	out := map[string][]*Record{}
	n := 0
	var errs []error
	for _, name := range Networks(stateDir) {
		recs, _, err := NewStore(stateDir, name).List()
		errs = append(errs, err)
		for _, r := range recs {
			if veth.HostIndex(r.HostVeth) != r.HostIndex || r.HostIndex == 0 {
				continue // gone (DEL and GC tear it down) or a name reused
			}
			root := r.PinRoot
			if root == "" {
				root = defaultPinRoot
			}
			out[root] = append(out[root], r)
			n++
		}
	}
	return out, n, errors.Join(errs...)
}

// Check reports, reading only, every live attachment whose datapath is not
// what its record says: no device or endpoint entry, or no program of ours
// on one of its hooks (pins removed by hand, bpffs remounted).
func Check(stateDir, defaultPinRoot string) (Health, error) {
	byRoot, n, err := live(stateDir, defaultPinRoot)
	h := Health{Live: n}
	for root, recs := range byRoot {
		m, merr := maps.Open(root)
		if merr != nil {
			for _, r := range recs {
				h.Missing = append(h.Missing, fmt.Sprintf("%s: datapath maps: %v", r.HostVeth, merr))
			}
			continue
		}
		for _, r := range recs {
			if miss := missing(m, root, r); len(miss) > 0 {
				h.Missing = append(h.Missing, fmt.Sprintf("%s: %v", r.HostVeth, miss))
			}
		}
		m.Close()
	}
	return h, err
}

// missing lists what of r's datapath is absent.
func missing(m *maps.Maps, root string, r *Record) []string {
	var out []string
	podMAC, _ := r.MACs()
	if d, err := m.Device(r.HostIndex); err != nil || !slices.Equal(d.PodMAC, podMAC) {
		out = append(out, "device entry")
	}
	for _, a := range r.Addrs() {
		if ep, err := m.Endpoint(a); err != nil || ep.Ifindex != r.HostIndex {
			out = append(out, "endpoint "+a.String())
		}
	}
	att, err := loader.Attached(root, r.HostIndex, r.HostVeth)
	if err != nil {
		return append(out, "attachments: "+err.Error())
	}
	for _, a := range att {
		if a.Mode == "" {
			out = append(out, a.Hook+" program")
		}
	}
	return out
}

// Restore brings the datapath of every live attachment recorded under
// stateDir back to what its record says: the pinned maps and programs
// (loaded anew if their pins are gone), device and endpoint entries, the
// programs on both hooks (attached once, never twice), the cluster ranges
// and the node devices of the fast path. It returns how many attachments
// needed a repair.
func Restore(stateDir, defaultPinRoot string) (int, error) {
	byRoot, _, err := live(stateDir, defaultPinRoot)
	errs := []error{err}
	repaired := 0
	for root, recs := range byRoot {
		n, err := restoreRoot(root, stateDir, recs)
		repaired += n
		errs = append(errs, err)
	}
	return repaired, errors.Join(errs...)
}

func restoreRoot(root, stateDir string, recs []*Record) (int, error) {
	progs, m, err := maps.Ensure(root)
	if err != nil {
		return 0, err
	}
	defer progs.Close()
	defer m.Close()
	var errs []error
	repaired := 0
	var cluster []netip.Prefix
	for _, r := range recs {
		for _, p := range r.ClusterCIDRs {
			if !slices.Contains(cluster, p) {
				cluster = append(cluster, p)
			}
		}
		if len(missing(m, root, r)) == 0 {
			continue
		}
		repaired++
		errs = append(errs, restoreOne(progs, m, r))
	}
	if len(cluster) > 0 {
		errs = append(errs, m.PutCluster(cluster))
		_, err := uplink.Ensure(progs, m, stateDir, cluster, nil, false)
		errs = append(errs, err)
	}
	return repaired, errors.Join(errs...)
}

func restoreOne(progs *loader.Programs, m *maps.Maps, r *Record) error {
	podMAC, hostMAC := r.MACs()
	dev := maps.Device{PodMAC: podMAC, HostMAC: hostMAC, Shaped: r.Shaped}
	for _, a := range r.Addrs() {
		if a.Is4() {
			dev.IPv4 = a
		} else {
			dev.IPv6 = a
		}
	}
	var errs []error
	if d, err := m.Device(r.HostIndex); err != nil || !slices.Equal(d.PodMAC, podMAC) {
		errs = append(errs, m.PutDevice(r.HostIndex, dev))
	}
	for _, a := range r.Addrs() {
		if ep, err := m.Endpoint(a); err != nil || ep.Ifindex != r.HostIndex {
			errs = append(errs, m.PutEndpoint(maps.Endpoint{IP: a, Ifindex: r.HostIndex, PodMAC: podMAC, HostMAC: hostMAC, Shaped: r.Shaped}))
		}
	}
	if _, err := progs.Attach(r.HostIndex, r.HostVeth, loader.Mode(r.Attach)); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("restore %s (%s/%s): %w", r.HostVeth, r.ContainerID, r.IfName, err)
	}
	return nil
}
