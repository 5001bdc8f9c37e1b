package integration

import (
	"encoding/json"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"

	"github.com/ebpf-cni/ebpf-cni/internal/endpoint"
)

func (n *node) inspect() map[netip.Addr]endpoint.View {
	n.t.Helper()
	out, err := exec.Command(filepath.Join(binDir, "ebpf-cni"), "inspect", "--json",
		"--pin-root", n.pinRoot, "--state-dir", n.stateDir, "--ipam-dir", n.ipamDir).Output()
	if err != nil {
		n.t.Fatalf("ebpf-cni inspect: %v: %s", err, out)
	}
	m := map[netip.Addr]endpoint.View{}
	for _, v := range decodeInspect(n.t, out).Endpoints {
		m[v.IP] = v
	}
	return m
}

// report is `ebpf-cni inspect --json` of the node.
func (n *node) report() inspected {
	n.t.Helper()
	out, err := exec.Command(filepath.Join(binDir, "ebpf-cni"), "inspect", "--json",
		"--pin-root", n.pinRoot, "--state-dir", n.stateDir, "--ipam-dir", n.ipamDir).Output()
	if err != nil {
		n.t.Fatalf("ebpf-cni inspect: %v: %s", err, out)
	}
	return decodeInspect(n.t, out)
}

// problems is the problems list of `ebpf-cni inspect --json`, one string.
func (n *node) problems() string {
	n.t.Helper()
	return strings.Join(n.report().Problems, "\n")
}

// inspected is `ebpf-cni inspect --json`.
type inspected = endpoint.Report

func decodeInspect(t *testing.T, out []byte) inspected {
	t.Helper()
	var rep inspected
	if err := json.Unmarshal(out, &rep); err != nil {
		t.Fatalf("inspect --json: %v: %s", err, out)
	}
	return rep
}

// bpftoolEndpoints dumps the pinned endpoints map with bpftool and returns
// the addresses in it, read through the BTF field names.
func (n *node) bpftoolEndpoints() map[netip.Addr]bool {
	n.t.Helper()
	path := filepath.Join(n.pinRoot, "endpoints_v1")
	if _, err := os.Stat(path); os.IsNotExist(err) {
		return nil
	}
	out, err := exec.Command("bpftool", "-j", "map", "dump", "pinned", path).Output()
	if err != nil {
		n.t.Fatalf("bpftool map dump pinned %s: %v: %s", path, err, out)
	}
	// With -j, bpftool prints the BTF-decoded entry under "formatted".
	var entries []struct {
		Formatted struct {
			Key struct {
				Family uint8   `json:"family"`
				Addr   []uint8 `json:"addr"`
			} `json:"key"`
			Value struct {
				Ifindex uint32 `json:"ifindex"`
			} `json:"value"`
		} `json:"formatted"`
	}
	if err := json.Unmarshal(out, &entries); err != nil {
		n.t.Fatalf("bpftool output has no BTF field names? %v: %s", err, out)
	}
	m := map[netip.Addr]bool{}
	for _, e := range entries {
		k := e.Formatted.Key
		switch {
		case len(k.Addr) != 16 || e.Formatted.Value.Ifindex == 0:
			n.t.Fatalf("bpftool entry without BTF fields: %s", out)
		case k.Family == 4:
			m[netip.AddrFrom4([4]byte(k.Addr[:4]))] = true
		default:
			m[netip.AddrFrom16([16]byte(k.Addr))] = true
		}
	}
	return m
}

// hostRoute reports whether the host has a route to exactly a (/32, /128).
func hostRoute(t *testing.T, a netip.Addr) string {
	t.Helper()
	fam := netlink.FAMILY_V4
	if a.Is6() {
		fam = netlink.FAMILY_V6
	}
	routes, err := netlinksafe.RouteList(nil, fam)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range routes {
		if r.Dst == nil {
			continue
		}
		ones, _ := r.Dst.Mask.Size()
		if ra, ok := netip.AddrFromSlice(r.Dst.IP); ok && ra.Unmap() == a && ones == a.BitLen() {
			l, _ := netlink.LinkByIndex(r.LinkIndex)
			if l != nil {
				return l.Attrs().Name
			}
			return "?"
		}
	}
	return ""
}

// assertGone checks that nothing of an attachment is left: host veth, host
// routes, map entries (inspect and bpftool), link pins, reservations and
// the endpoint record.
func (n *node) assertGone(hostVeth, containerID string, ips []netip.Addr) {
	n.t.Helper()
	if containerID == "" || hostVeth == "" || len(ips) == 0 {
		n.t.Fatalf("assertGone needs the container ID, host veth and addresses (got %q, %q, %v)", containerID, hostVeth, ips)
	}
	if _, ok := hostLinks(n.t)[hostVeth]; ok {
		n.t.Errorf("host veth %s still exists", hostVeth)
	}
	eps := n.bpftoolEndpoints()
	for _, a := range ips {
		if dev := hostRoute(n.t, a); dev != "" {
			n.t.Errorf("host route to %s via %s still exists", a, dev)
		}
		if eps[a] {
			n.t.Errorf("endpoints map still has %s", a)
		}
		if _, err := os.Stat(filepath.Join(n.ipamDir, n.name, a.String())); err == nil {
			n.t.Errorf("IPAM reservation of %s still exists", a)
		}
	}
	pins, _ := filepath.Glob(filepath.Join(n.pinRoot, "links", hostVeth+"-*"))
	if len(pins) > 0 {
		n.t.Errorf("link pins left: %v", pins)
	}
	states, _ := filepath.Glob(filepath.Join(n.stateDir, n.name, "endpoints", containerID+":*"))
	if len(states) > 0 {
		n.t.Errorf("endpoint records left: %v", states)
	}
}

// hostVethOf returns the host interface name from an ADD result.
func (p *pod) hostVeth() string {
	ifs, _ := p.result["interfaces"].([]any)
	for _, i := range ifs {
		m := i.(map[string]any)
		if _, ok := m["sandbox"]; !ok {
			return m["name"].(string)
		}
	}
	p.n.t.Fatalf("result of %s has no host interface", p.ns)
	return ""
}

// containerID is what cnitool passes for this namespace (cnitool- + hash),
// found through the endpoint record that names the netns.
func (p *pod) containerID() string {
	p.n.t.Helper()
	recs, _, err := endpoint.NewStore(p.n.stateDir, p.n.name).List()
	if err != nil {
		p.n.t.Fatal(err)
	}
	for _, r := range recs {
		if r.NetNS == p.path {
			return r.ContainerID
		}
	}
	return ""
}
