package endpoint

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"sort"

	"github.com/ebpf-cni/ebpf-cni/internal/ipam"
	"github.com/ebpf-cni/ebpf-cni/internal/loader"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
	"github.com/ebpf-cni/ebpf-cni/internal/veth"
)

// View is one pod address as `ebpf-cni inspect` shows it: the map entry,
// joined with its record and reservation, its attachments and counters.
type View struct {
	IP           netip.Addr          `json:"ip"`
	PodMAC       string              `json:"podMAC"`
	HostVeth     string              `json:"hostVeth"`
	HostIfindex  int                 `json:"hostIfindex"`
	HostMAC      string              `json:"hostMAC"`
	Shaped       bool                `json:"shaped"` // rate-limited: reached through the host's qdiscs
	Network      string              `json:"network,omitempty"`
	ContainerID  string              `json:"containerID,omitempty"`
	IfName       string              `json:"ifname,omitempty"`
	PodNamespace string              `json:"podNamespace,omitempty"`
	PodName      string              `json:"podName,omitempty"`
	Attachments  []loader.Attachment `json:"attachments"`
	Counters     maps.Stats          `json:"counters"`
}

// Collect joins the endpoints map under pinRoot with the endpoint records
// under stateDir and the built-in IPAM's reservations under ipamDir. It
// reads only; a node without a datapath yet has no views.
func Collect(pinRoot, stateDir, ipamDir string) ([]View, error) {
	m, err := maps.Open(pinRoot)
	if errors.Is(err, loader.ErrNotLoaded) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer m.Close()
	eps, err := m.Endpoints()
	if err != nil {
		return nil, err
	}
	byIP := map[netip.Addr]*Record{}
	network := map[*Record]string{}
	for _, n := range Networks(stateDir) {
		recs, err := NewStore(stateDir, n).List()
		if err != nil {
			continue
		}
		for _, r := range recs {
			network[r] = n
			for _, a := range r.Addrs() {
				byIP[a] = r
			}
		}
	}
	reservations := map[netip.Addr]ipam.Record{}
	dirs, _ := os.ReadDir(ipamDir)
	for _, d := range dirs {
		recs, _ := ipam.NewDiskStore(filepath.Join(ipamDir, d.Name())).List()
		for _, r := range recs {
			reservations[r.IP] = r
		}
	}

	var out []View
	for _, ep := range eps {
		v := View{
			IP: ep.IP, PodMAC: ep.PodMAC.String(), HostMAC: ep.HostMAC.String(), HostIfindex: ep.Ifindex, Shaped: ep.Shaped,
		}
		if r := byIP[ep.IP]; r != nil {
			v.HostVeth, v.Network, v.ContainerID, v.IfName = r.HostVeth, network[r], r.ContainerID, r.IfName
			v.PodNamespace, v.PodName = r.PodNamespace, r.PodName
		}
		if r, ok := reservations[ep.IP]; ok {
			if v.ContainerID == "" {
				v.ContainerID, v.IfName = r.ContainerID, r.IfName
			}
			if v.PodName == "" {
				v.PodNamespace, v.PodName = r.PodNamespace, r.PodName
			}
		}
		if v.HostVeth == "" && v.ContainerID != "" {
			v.HostVeth = veth.HostName(v.ContainerID, v.IfName)
		}
		v.Attachments, _ = loader.Attached(pinRoot, ep.Ifindex, v.HostVeth)
		v.Counters, _ = m.Stats(ep.Ifindex)
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].IP.Less(out[j].IP) })
	return out, nil
}
