package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"text/tabwriter"

	"github.com/ebpf-cni/ebpf-cni/internal/ipam"
	"github.com/ebpf-cni/ebpf-cni/internal/loader"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
	"github.com/ebpf-cni/ebpf-cni/internal/veth"
)

// runCLI serves the binary's own commands (run without CNI_COMMAND).
func runCLI(argv []string, stdout, stderr io.Writer) int {
	switch argv[0] {
	case "inspect":
		if err := inspect(argv[1:], stdout, stderr); err != nil {
			fmt.Fprintln(stderr, "ebpf-cni inspect:", err)
			return 1
		}
		return 0
	case "version", "--version":
		fmt.Fprintf(stdout, "ebpf-cni (datapath %s) CNI %v\n", loader.Tag, supportedVersions.SupportedVersions())
		return 0
	default:
		fmt.Fprintf(stderr, "usage: ebpf-cni inspect [--json] [--pin-root DIR] [--state-dir DIR] [--ipam-dir DIR]\n"+
			"       ebpf-cni version\n(run by a container runtime, CNI_COMMAND selects the CNI verb)\n")
		return 2
	}
}

// endpointView is one row of `ebpf-cni inspect`.
type endpointView struct {
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

func inspect(argv []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("inspect", flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print JSON")
	pinRoot := fs.String("pin-root", defaultPinRoot, "pin root of the datapath")
	stateDir := fs.String("state-dir", defaultStateDir, "state directory")
	ipamDir := fs.String("ipam-dir", defaultDataDir, "data directory of the built-in IPAM")
	if err := fs.Parse(argv); err != nil {
		return err
	}
	views, err := collect(*pinRoot, *stateDir, *ipamDir)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if views == nil {
			views = []endpointView{}
		}
		return enc.Encode(views)
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IP\tPOD MAC\tHOST VETH\tATTACH\tNETWORK\tCONTAINER\tPOD\tFROM POD pkts/bytes\tTO POD pkts/bytes\tREDIRECTED\tDROPS mac/ip/bad")
	for _, v := range views {
		mode := "-"
		if len(v.Attachments) > 0 && v.Attachments[0].Mode != "" {
			mode = string(v.Attachments[0].Mode)
			for _, a := range v.Attachments {
				mode += fmt.Sprintf(" %s:%d", a.Hook, a.ProgramID)
			}
		}
		pod := v.PodNamespace + "/" + v.PodName
		if v.PodName == "" {
			pod = "-"
		}
		c := v.Counters
		fmt.Fprintf(tw, "%s\t%s\t%s(%d)\t%s\t%s\t%s\t%s\t%d/%d\t%d/%d\t%d\t%d/%d/%d\n",
			v.IP, v.PodMAC, v.HostVeth, v.HostIfindex, mode, dash(v.Network), short(v.ContainerID), pod,
			c.FromPodPackets, c.FromPodBytes, c.ToPodPackets, c.ToPodBytes, c.RedirectPackets,
			c.DropSpoofedMac, c.DropSpoofedIp, c.DropMalformed)
	}
	return tw.Flush()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func short(id string) string {
	if len(id) > 16 {
		return id[:16]
	}
	return dash(id)
}

// collect joins the endpoints map with the endpoint records and the
// built-in IPAM's reservations.
func collect(pinRoot, stateDir, ipamDir string) ([]endpointView, error) {
	m, err := maps.Open(pinRoot)
	if errors.Is(err, loader.ErrNotLoaded) {
		return nil, nil // nothing loaded on this node yet
	}
	if err != nil {
		return nil, err
	}
	defer m.Close()
	eps, err := m.Endpoints()
	if err != nil {
		return nil, err
	}
	byIP := map[netip.Addr]*endpointState{}
	network := map[*endpointState]string{}
	nets, _ := os.ReadDir(stateDir)
	for _, n := range nets {
		states, err := listStates(stateDir, n.Name())
		if err != nil {
			continue
		}
		for _, st := range states {
			network[st] = n.Name()
			for _, a := range st.addrs() {
				byIP[a] = st
			}
		}
	}
	records := map[netip.Addr]ipam.Record{}
	dirs, _ := os.ReadDir(ipamDir)
	for _, d := range dirs {
		store, err := ipam.NewDiskStore(filepath.Join(ipamDir, d.Name()))
		if err != nil {
			continue
		}
		recs, _ := store.List()
		for _, r := range recs {
			records[r.IP] = r
		}
	}

	var out []endpointView
	for _, ep := range eps {
		v := endpointView{
			IP: ep.IP, PodMAC: ep.PodMAC.String(), HostMAC: ep.HostMAC.String(), HostIfindex: ep.Ifindex, Shaped: ep.Shaped,
		}
		if st := byIP[ep.IP]; st != nil {
			v.HostVeth, v.Network, v.ContainerID, v.IfName = st.HostVeth, network[st], st.ContainerID, st.IfName
			v.PodNamespace, v.PodName = st.PodNamespace, st.PodName
		}
		if r, ok := records[ep.IP]; ok {
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
