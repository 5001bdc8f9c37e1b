package integration

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/ebpf-cni/ebpf-cni/internal/endpoint"
)

// forwardCounter counts packets from src crossing the host's FORWARD hook.
type forwardCounter struct {
	t     *testing.T
	table string
	netns string // "" for the host's
}

func newForwardCounter(t *testing.T, n *node, tag, src string) *forwardCounter {
	t.Helper()
	fam := "ip"
	if strings.Contains(src, ":") {
		fam = "ip6"
	}
	table := strings.ReplaceAll(n.name, "-", "_") + "_fwd" + tag
	script := fmt.Sprintf("table inet %s {\n chain forward {\n  type filter hook forward priority -300;\n  %s saddr %s counter\n }\n}\n", table, fam, src)
	cmd := exec.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft add counter: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("nft", "delete", "table", "inet", table).Run() })
	return &forwardCounter{t: t, table: table}
}

func (f *forwardCounter) packets() int {
	f.t.Helper()
	cmd := exec.Command("nft", "-j", "list", "table", "inet", f.table)
	if f.netns != "" {
		cmd = exec.Command("ip", "netns", "exec", f.netns, "nft", "-j", "list", "table", "inet", f.table)
	}
	out, err := cmd.Output()
	if err != nil {
		f.t.Fatalf("nft list: %v", err)
	}
	var doc struct {
		Nftables []map[string]json.RawMessage `json:"nftables"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		f.t.Fatal(err)
	}
	for _, obj := range doc.Nftables {
		raw, ok := obj["rule"]
		if !ok {
			continue
		}
		var rule struct {
			Expr []map[string]json.RawMessage `json:"expr"`
		}
		json.Unmarshal(raw, &rule)
		for _, e := range rule.Expr {
			if c, ok := e["counter"]; ok {
				var cnt struct{ Packets int }
				json.Unmarshal(c, &cnt)
				return cnt.Packets
			}
		}
	}
	f.t.Fatalf("no counter in table %s: %s", f.table, out)
	return 0
}

// outside is a namespace beyond the node (reached through the host's
// routing), with a TCP server that reports the source address it sees.
func outside(t *testing.T, n *node, hostSide, outSide string) *pod {
	t.Helper()
	p := n.newNS()
	name := n.name + "-o"
	target, err := ns.GetNS(p.path)
	if err != nil {
		t.Fatal(err)
	}
	defer target.Close()
	v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(target.Fd()))}
	if err := netlink.LinkAdd(v); err != nil {
		t.Fatalf("add veth %s: %v", name, err)
	}
	t.Cleanup(func() { netlink.LinkDel(v) })
	hp := netip.MustParsePrefix(hostSide)
	netlink.AddrAdd(v, &netlink.Addr{IPNet: ipNet(hp)})
	netlink.LinkSetUp(v)
	for _, args := range [][]string{
		{"ip", "addr", "add", outSide, "dev", "eth0"},
		{"ip", "link", "set", "eth0", "up"},
		{"ip", "link", "set", "lo", "up"},
		{"ip", "route", "add", "default", "via", hp.Addr().String()},
	} {
		if out, err := p.run(args...); err != nil {
			t.Fatalf("%v: %v: %s", args, err, out)
		}
	}
	p.ips = []netip.Addr{netip.MustParsePrefix(outSide).Addr()}
	return p
}

func TestTwoPodsSameNode(t *testing.T) {
	n := newNode(t, nil)
	n.plugin.MTU = 1400
	n.writeConflist()
	fwd := newForwardCounter(t, n, "", "10.250.0.0/24")
	// 203.0.113.1 is the host's own address on the link to "outside".
	out := outside(t, n, "203.0.113.1/24", "203.0.113.2/24")
	hostIP := netip.MustParseAddr("203.0.113.1")
	a, b := n.newNS(), n.newNS()
	n.add(a)
	n.add(b)

	a.ping(b.ip(false))
	b.ping(a.ip(false))
	tcp(t, a, b, b.ip(false))
	tcp(t, b, a, a.ip(false))
	a.ping(hostIP)
	if err := tcpExchange("", a.path, a.ip(false), nil); err != nil {
		t.Fatalf("host -> pod tcp: %v", err)
	}

	eps := n.inspect()
	ea, eb := eps[a.ip(false)], eps[b.ip(false)]
	if ea.Counters.RedirectPackets < 4 || eb.Counters.RedirectPackets < 4 {
		t.Errorf("redirect counters %d/%d: same-node traffic did not take bpf_redirect_peer", ea.Counters.RedirectPackets, eb.Counters.RedirectPackets)
	}
	if got := fwd.packets(); got != 0 {
		t.Errorf("%d pod packets crossed the host FORWARD hook; same-node traffic must not", got)
	}
	for _, e := range []endpoint.View{ea, eb} {
		if len(e.Attachments) != 2 || e.Attachments[0].Mode != "tcx" || e.Attachments[1].Mode != "tcx" {
			t.Errorf("%s attachments = %+v, want tcx on ingress and egress", e.IP, e.Attachments)
		}
	}
	for _, p := range []*pod{a, b} {
		hv := p.hostVeth()
		l, err := netlink.LinkByName(hv)
		if err != nil {
			t.Fatal(err)
		}
		if l.Attrs().MasterIndex != 0 {
			t.Errorf("host veth %s has a master (ifindex %d): no bridge allowed", hv, l.Attrs().MasterIndex)
		}
		if l.Attrs().MTU != 1400 {
			t.Errorf("host veth MTU %d, want 1400", l.Attrs().MTU)
		}
		if out, _ := p.run("cat", "/sys/class/net/eth0/mtu"); strings.TrimSpace(string(out)) != "1400" {
			t.Errorf("pod MTU %q, want 1400", out)
		}
		if dev := hostRoute(t, p.ip(false)); dev != hv {
			t.Errorf("host route to %s via %q, want %s", p.ip(false), dev, hv)
		}
	}
	if bt := n.bpftoolEndpoints(); !bt[a.ip(false)] || !bt[b.ip(false)] {
		t.Errorf("bpftool dump of endpoints_v1 = %v, want both pods", bt)
	}

	// The FORWARD counter can move: traffic to beyond the node crosses it.
	var seen netip.Addr
	if err := tcpExchange(a.path, out.path, out.ips[0], &seen); err != nil {
		t.Fatalf("pod -> outside: %v", err)
	}
	if fwd.packets() == 0 {
		t.Errorf("FORWARD counter did not move for pod -> outside traffic: the counter proves nothing")
	}
	if seen != netip.MustParseAddr("203.0.113.1") {
		t.Errorf("outside saw source %s, want the node's 203.0.113.1 (masquerade)", seen)
	}

	// CHECK passes, then catches a removed route.
	if _, err := n.cnitool("check", a, ""); err != nil {
		t.Fatalf("CHECK on a healthy pod: %v", err)
	}
	if msg, err := a.run("ip", "route", "del", "default"); err != nil {
		t.Fatalf("%v: %s", err, msg)
	}
	_, err := n.cnitool("check", a, "")
	if err == nil || !strings.Contains(err.Error(), "route 0.0.0.0/0 via 169.254.1.1 is missing") {
		t.Fatalf("CHECK after removing the default route: %v, want the missing route named", err)
	}

	// DEL twice; DEL after the netns is gone.
	cidA, cidB := a.containerID(), b.containerID()
	hvA, hvB := a.hostVeth(), b.hostVeth()
	n.del(a)
	n.del(a)
	n.assertGone(hvA, cidA, a.ips)
	if msg, err := exec.Command("ip", "netns", "del", b.ns).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, msg)
	}
	n.del(b)
	n.assertGone(hvB, cidB, b.ips)
	if rules, _ := exec.Command("nft", "list", "table", "inet", "ebpf-cni").Output(); strings.Contains(string(rules), n.name+" ") {
		t.Errorf("masquerade rule of %s left after the last DEL:\n%s", n.name, rules)
	}
}

// A Service on the node: the host DNATs 172.31.96.10:80 to pod b:8080, as
// kube-proxy does. Pod a reaches it through the host; b's replies must go
// back through the host too (conntrack undoes the DNAT), not by redirect,
// or a would see answers from b's own address and reset the connection.
func TestServiceDNATToLocalPod(t *testing.T) {
	n := newNode(t, nil)
	n.writeConflist()
	a, b := n.newNS(), n.newNS()
	n.add(a)
	n.add(b)
	vip := netip.MustParseAddrPort("172.31.96.10:80")
	target := netip.AddrPortFrom(b.ip(false), 8080)
	table := strings.ReplaceAll(n.name, "-", "_") + "_svc"
	script := fmt.Sprintf("table ip %s {\n chain pre {\n  type nat hook prerouting priority dstnat;\n  ip daddr %s tcp dport %d dnat to %s\n }\n}\n",
		table, vip.Addr(), vip.Port(), target)
	cmd := exec.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("nft", "delete", "table", "ip", table).Run() })

	for i := 0; i < 3; i++ {
		if err := tcpVia(a.path, b.path, target, vip, nil); err != nil {
			t.Fatalf("pod -> Service -> local pod, connection %d: %v", i, err)
		}
	}
	if hp := n.inspect()[b.ip(false)].Counters.HostPathPackets; hp == 0 {
		t.Errorf("no reply of the Service flow took the host path (host_path_packets 0)")
	}
	// A direct connection between the same pods stays on the fast path.
	before := n.inspect()[a.ip(false)].Counters.RedirectPackets
	if err := tcpVia(a.path, b.path, target, netip.AddrPort{}, nil); err != nil {
		t.Fatalf("direct connection after the Service ones: %v", err)
	}
	if after := n.inspect()[a.ip(false)].Counters.RedirectPackets; after < before+3 {
		t.Errorf("direct connection redirected %d packets, want >= 3", after-before)
	}
	n.del(a)
	n.del(b)
}
