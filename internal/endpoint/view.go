package endpoint

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sort"

	"github.com/vishvananda/netlink"

	"github.com/ebpf-cni/ebpf-cni/internal/ipam"
	"github.com/ebpf-cni/ebpf-cni/internal/loader"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
	"github.com/ebpf-cni/ebpf-cni/internal/node"
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
	// Policy is the pod's NetworkPolicy state: isolation and counters,
	// and the policies selecting it (from the agent's hand-off).
	Policy PolicyView `json:"policy"`
}

// PolicyView is a pod's NetworkPolicy state.
type PolicyView struct {
	Ingress   bool             `json:"ingressIsolated"`
	Egress    bool             `json:"egressIsolated"`
	Pending   bool             `json:"pending"`
	Identity  uint32           `json:"identity,omitempty"`
	Selecting []string         `json:"selectedBy,omitempty"`
	Counters  maps.PolicyStats `json:"counters"`
}

// Report is everything `ebpf-cni inspect` shows of a node.
type Report struct {
	Endpoints []View `json:"endpoints"`
	// Devices are the node devices of the cross-node fast path (uplinks,
	// the VXLAN device) with their attachments and counters.
	Devices []DeviceView `json:"devices"`
	// Cluster are the pod ranges that take the fast path between nodes.
	Cluster []netip.Prefix `json:"cluster"`
	// Tunnels are the other nodes' podCIDRs in VXLAN mode.
	Tunnels []TunnelView `json:"tunnels"`
	// Services is the Service datapath's state (ebpf-cni-agent's services
	// controller fills it).
	Services ServicesView `json:"services"`
	// Problems are what needs a person or a repair: pods whose datapath
	// is gone (STATUS answers 51), records and reservations that do not
	// decode (skipped everywhere; GC reclaims them).
	Problems []string `json:"problems"`
}

// ServicesView sums up the Service maps.
type ServicesView struct {
	Frontends int            `json:"frontends"`
	Backends  int            `json:"backends"`
	NATFlows  int            `json:"natEntries"`
	Counters  maps.LBStats   `json:"counters"`
	NodeAddrs []netip.Addr   `json:"nodeAddresses"`
	Ranges    []netip.Prefix `json:"serviceRanges"`
}

// DeviceView is one hook of a node device.
type DeviceView struct {
	loader.NodeAttachment
	Counters maps.NodeStats `json:"counters"`
}

// TunnelView is one entry of tunnel_v1.
type TunnelView struct {
	PodCIDR netip.Prefix `json:"podCIDR"`
	Node    netip.Addr   `json:"node"`
	VTEPMAC string       `json:"vtepMAC"`
}

// Collect joins the pinned maps under pinRoot with the endpoint records
// under stateDir and the built-in IPAM's reservations under ipamDir. It
// reads only; a node without a datapath yet has an empty report.
func Collect(pinRoot, stateDir, ipamDir string) (Report, error) {
	rep := Report{Endpoints: []View{}, Devices: []DeviceView{}, Cluster: []netip.Prefix{}, Tunnels: []TunnelView{}}
	rep.Problems = problems(pinRoot, stateDir, ipamDir)
	m, err := maps.Open(pinRoot)
	if errors.Is(err, loader.ErrNotLoaded) {
		return rep, nil
	}
	if err != nil {
		return rep, err
	}
	defer m.Close()
	views, err := endpointViews(m, pinRoot, stateDir, ipamDir)
	if err != nil {
		return rep, err
	}
	rep.Endpoints = views
	atts, err := loader.NodeAttachments(pinRoot)
	if err != nil {
		return rep, err
	}
	for _, a := range atts {
		dv := DeviceView{NodeAttachment: a}
		if l, err := netlink.LinkByName(a.Device); err == nil {
			dv.Counters, _ = m.NodeStats(l.Attrs().Index)
		}
		rep.Devices = append(rep.Devices, dv)
	}
	if rep.Cluster, err = m.Cluster(); err != nil {
		return rep, err
	}
	if rep.Services, err = servicesView(m); err != nil {
		return rep, err
	}
	tunnels, err := m.Tunnels()
	if err != nil {
		return rep, err
	}
	for p, t := range tunnels {
		rep.Tunnels = append(rep.Tunnels, TunnelView{PodCIDR: p, Node: t.Node, VTEPMAC: t.VTEPMAC.String()})
	}
	sort.Slice(rep.Tunnels, func(i, j int) bool { return rep.Tunnels[i].PodCIDR.Addr().Less(rep.Tunnels[j].PodCIDR.Addr()) })
	return rep, nil
}

func endpointViews(m *maps.Maps, pinRoot, stateDir, ipamDir string) ([]View, error) {
	eps, err := m.Endpoints()
	if err != nil {
		return nil, err
	}
	byIP := map[netip.Addr]*Record{}
	network := map[*Record]string{}
	for _, n := range Networks(stateDir) {
		recs, _, err := NewStore(stateDir, n).List()
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

	pols, _ := m.EPPolicies()
	handOff, _ := node.ReadPolicy(stateDir)
	out := []View{}
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
		if p, ok := pols[ep.Ifindex]; ok {
			v.Policy = PolicyView{Ingress: p.Flags&maps.PolIngress != 0, Egress: p.Flags&maps.PolEgress != 0,
				Pending: p.Flags&maps.PolPending != 0, Identity: p.Identity}
		}
		v.Policy.Selecting = handOff.Selecting[v.PodNamespace+"/"+v.PodName]
		v.Policy.Counters, _ = m.PolicyStats(ep.Ifindex)
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].IP.Less(out[j].IP) })
	return out, nil
}

// problems lists what Check finds missing and every file that does not
// decode, reading only.
func problems(pinRoot, stateDir, ipamDir string) []string {
	out := []string{}
	h, err := Check(stateDir, pinRoot)
	if err != nil {
		out = append(out, fmt.Sprintf("endpoint records: %v", err))
	}
	for _, m := range h.Missing {
		out = append(out, "datapath missing: "+m)
	}
	for _, n := range Networks(stateDir) {
		s := NewStore(stateDir, n)
		_, damaged, _ := s.List()
		for _, a := range damaged {
			out = append(out, "damaged endpoint record: "+s.Path(a.ContainerID, a.IfName))
		}
	}
	dirs, _ := os.ReadDir(ipamDir)
	for _, d := range dirs {
		dir := filepath.Join(ipamDir, d.Name())
		ips, _ := ipam.NewDiskStore(dir).Damaged()
		for _, ip := range ips {
			out = append(out, "damaged reservation: "+filepath.Join(dir, ip.String()))
		}
	}
	return out
}

func servicesView(m *maps.Maps) (ServicesView, error) {
	var v ServicesView
	entries, err := m.ServiceEntries()
	if err != nil {
		return v, err
	}
	for _, e := range entries {
		if e.Slot == 0 {
			v.Frontends++
		}
	}
	backends, err := m.Backends()
	if err != nil {
		return v, err
	}
	v.Backends = len(backends)
	if v.NATFlows, err = m.NATFlows(); err != nil {
		return v, err
	}
	if v.Counters, err = m.LBStats(); err != nil {
		return v, err
	}
	if v.NodeAddrs, err = m.NodeAddrs(); err != nil {
		return v, err
	}
	v.Ranges, err = m.ServiceCIDRs()
	return v, err
}
