package main

import (
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/ebpf-cni/ebpf-cni/internal/config"
	"github.com/ebpf-cni/ebpf-cni/internal/endpoint"
	"github.com/ebpf-cni/ebpf-cni/internal/loader"
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
	case "uninstall":
		if err := uninstall(argv[1:], stdout, stderr); err != nil {
			fmt.Fprintln(stderr, "ebpf-cni uninstall:", err)
			return 1
		}
		return 0
	case "repair", "upgrade":
		if err := repair(argv[0], argv[1:], stdout, stderr); err != nil {
			fmt.Fprintf(stderr, "ebpf-cni %s: %v\n", argv[0], err)
			return 1
		}
		return 0
	case "monitor":
		if err := monitor(argv[1:], stdout, stderr); err != nil {
			fmt.Fprintln(stderr, "ebpf-cni monitor:", err)
			return 1
		}
		return 0
	case "version", "--version":
		fmt.Fprintf(stdout, "ebpf-cni (datapath %s) CNI %v\n", loader.Tag(), config.SupportedVersions.SupportedVersions())
		return 0
	default:
		fmt.Fprintf(stderr, "usage: ebpf-cni inspect [--json] [--pin-root DIR] [--state-dir DIR] [--ipam-dir DIR]\n"+
			"       ebpf-cni uninstall [--pin-root DIR] [--state-dir DIR]\n"+
			"       ebpf-cni repair|upgrade [--pin-root DIR] [--state-dir DIR]\n"+
			"       ebpf-cni monitor [--json] [-n COUNT] [--timeout D] [--pin-root DIR] [--state-dir DIR]\n"+
			"       ebpf-cni version\n(run by a container runtime, CNI_COMMAND selects the CNI verb)\n")
		return 2
	}
}

func inspect(argv []string, stdout, stderr io.Writer) error {
	fs, pinRoot, stateDir := nodeFlags("inspect", stderr)
	asJSON := fs.Bool("json", false, "print JSON")
	ipamDir := fs.String("ipam-dir", config.DefaultDataDir, "data directory of the built-in IPAM")
	if err := fs.Parse(argv); err != nil {
		return err
	}
	rep, err := endpoint.Collect(*pinRoot, *stateDir, *ipamDir)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IP\tPOD MAC\tHOST VETH\tATTACH\tNETWORK\tCONTAINER\tPOD\tFROM POD pkts/bytes\tTO POD pkts/bytes\tREDIRECTED\tTO/FROM NODES pkts\tDROPS mac/ip/bad")
	for _, v := range rep.Endpoints {
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
		fmt.Fprintf(tw, "%s\t%s\t%s(%d)\t%s\t%s\t%s\t%s\t%d/%d\t%d/%d\t%d\t%d/%d\t%d/%d/%d\n",
			v.IP, v.PodMAC, v.HostVeth, v.HostIfindex, mode, dash(v.Network), short(v.ContainerID), pod,
			c.FromPodPackets, c.FromPodBytes, c.ToPodPackets, c.ToPodBytes, c.RedirectPackets,
			c.ToNodePackets, c.FromNodePackets, c.DropSpoofedMac, c.DropSpoofedIp, c.DropMalformed)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if slices.ContainsFunc(rep.Endpoints, func(v endpoint.View) bool { return v.Policy.Ingress || v.Policy.Egress || v.Policy.Pending }) {
		fmt.Fprintln(stdout)
		fmt.Fprintln(tw, "IP\tPOD\tISOLATED\tINGRESS allowed/denied\tEGRESS allowed/denied\tSELECTED BY")
		for _, v := range rep.Endpoints {
			p := v.Policy
			iso := map[bool]string{true: "ingress", false: ""}[p.Ingress]
			if p.Egress {
				iso = strings.TrimPrefix(iso+",egress", ",")
			}
			if p.Pending {
				iso = "pending"
			}
			c := p.Counters
			fmt.Fprintf(tw, "%s\t%s/%s\t%s\t%d/%d\t%d/%d\t%s\n", v.IP, dash(v.PodNamespace), dash(v.PodName), dash(iso),
				c.IngressAllowed, c.IngressDenied, c.EgressAllowed, c.EgressDenied, dash(strings.Join(p.Selecting, ",")))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	if len(rep.Devices) > 0 {
		fmt.Fprintln(stdout)
		fmt.Fprintln(tw, "NODE DEVICE\tHOOK\tATTACH\tREDIRECTED IN pkts/bytes\tENCAPSULATED pkts/bytes\tDROPS no tunnel")
		for _, d := range rep.Devices {
			c := d.Counters
			fmt.Fprintf(tw, "%s\t%s\t%s:%d\t%d/%d\t%d/%d\t%d\n", d.Device, d.Hook, dash(string(d.Mode)), d.ProgramID,
				c.RedirectPackets, c.RedirectBytes, c.EncapPackets, c.EncapBytes, c.DropNoTunnel)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	if len(rep.Cluster) > 0 {
		fmt.Fprintf(stdout, "\ncluster pod ranges (fast path between nodes): %v\n", rep.Cluster)
	}
	for _, t := range rep.Tunnels {
		fmt.Fprintf(stdout, "tunnel %s -> node %s (VTEP %s)\n", t.PodCIDR, t.Node, t.VTEPMAC)
	}
	if sv := rep.Services; sv.Frontends > 0 {
		c := sv.Counters
		fmt.Fprintf(stdout, "\nservices: %d frontends, %d backends, %d NodePort flow entries; node addresses %v, ranges %v\n",
			sv.Frontends, sv.Backends, sv.NATFlows, sv.NodeAddrs, sv.Ranges)
		fmt.Fprintf(stdout, "  sockets: %d translated, %d refused; from outside: %d flows, %d packets, %d dropped (Local), %d without a port\n",
			c.SockTranslated, c.SockRefused, c.NodeportNew, c.NodeportPackets, c.NodeportDropped, c.NodeportNoPort)
	}
	if len(rep.Problems) > 0 {
		fmt.Fprintln(stdout)
	}
	for _, p := range rep.Problems {
		fmt.Fprintln(stdout, "PROBLEM:", p)
	}
	return nil
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
