package integration

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"

	"github.com/ebpf-cni/ebpf-cni/internal/agent/routes"
	"github.com/ebpf-cni/ebpf-cni/internal/config"
)

// Two emulated nodes, dual-stack pods, the cross-node fast path in native
// routing (static routes, as an operator would add them) and in VXLAN mode
// (the agent's own route code, run in each node): traffic both ways, no
// FORWARD chain on either node, TTL as a router's, PMTU errors reaching the
// pod, masquerade to outside the cluster, a foreign program on the uplink
// left running, uninstall.
func TestCrossNode(t *testing.T) {
	for i, mode := range []string{"native", "vxlan"} {
		t.Run(mode, func(t *testing.T) { crossNode(t, mode, i) })
	}
}

const (
	xnCluster4 = "10.252.0.0/16"
	xnCluster6 = "fd00:252::/48"
	// xnPathMTU is the MTU between the nodes' pods: pods run at 1500, so
	// the fast path meets packets it must hand to the host for an ICMP.
	xnPathMTU = 1400
)

func crossNode(t *testing.T, mode string, i int) {
	tag := "xn" + mode[:1]
	u := newUnderlay(t, underlay{bridge: "ebt-" + tag + "-br", net4: fmt.Sprintf("10.253.%d", i), net6: fmt.Sprintf("fd00:253:%d::", i)})
	var nodes []*emuNode
	for j := 1; j <= 2; j++ {
		nodes = append(nodes, u.addNode(t, tag, j, config.Plugin{
			Options: config.Options{MTU: 1500, ClusterCIDRs: []string{xnCluster4, xnCluster6}},
			IPAM: &config.IPAM{Ranges: [][]config.Range{
				{{Subnet: fmt.Sprintf("10.252.%d.0/24", j)}}, {{Subnet: fmt.Sprintf("fd00:252:0:%d::/64", j)}},
			}},
		}))
	}
	n1, n2 := nodes[0], nodes[1]
	podNet := func(n *emuNode, v6 bool) netip.Prefix {
		j := n.name[1:]
		if v6 {
			return netip.MustParsePrefix("fd00:252:0:" + j + "::/64")
		}
		return netip.MustParsePrefix("10.252." + j + ".0/24")
	}
	uplinkDev := "eth0"
	var resync func() // what ebpf-cni-agent's reconcile does in VXLAN mode
	switch mode {
	case "native":
		// The underlay's MTU is the path's: the pods' 1500 exceeds it.
		for _, n := range nodes {
			run(t, "ip", "-n", n.ns, "link", "set", "eth0", "mtu", fmt.Sprint(xnPathMTU))
		}
		for _, p := range [][2]*emuNode{{n1, n2}, {n2, n1}} {
			run(t, "ip", "-n", p[0].ns, "route", "add", podNet(p[1], false).String(), "via", p[1].ip.String())
			run(t, "ip", "-n", p[0].ns, "-6", "route", "add", podNet(p[1], true).String(), "via", p[1].ip6.String())
		}
	case "vxlan":
		uplinkDev = routes.Device
		for _, n := range nodes {
			run(t, "ip", "-n", n.ns, "link", "set", "eth0", "mtu", fmt.Sprint(xnPathMTU+routes.Overhead))
		}
		resync = func() {
			for _, p := range [][2]*emuNode{{n1, n2}, {n2, n1}} {
				me, peer := p[0], p[1]
				r := &routes.Router{Mode: routes.VXLAN, LocalIP: me.ip, Local: []netip.Prefix{podNet(me, false), podNet(me, true)}, PinRoot: me.net.pinRoot}
				peers := []routes.Peer{{Name: peer.name, NodeIP: peer.ip, PodCIDRs: []netip.Prefix{podNet(peer, false), podNet(peer, true)}}}
				if err := inNS("/run/netns/"+me.ns, func() error { _, _, err := r.Sync(peers); return err }); err != nil {
					t.Fatalf("vxlan on %s: %v", me.name, err)
				}
			}
		}
		resync()
	}
	// A program of someone else on n2's uplink, at the head: it keeps
	// running (it sees every packet before ours) and is never detached.
	foreign := attachForeign(t, n2, uplinkDev)

	p1, p2 := n1.addPod(t, 1), n2.addPod(t, 1)
	fwd := map[*emuNode][]*forwardCounter{}
	for _, n := range nodes {
		for _, p := range []*pod{p1, p2} {
			for _, v6 := range []bool{false, true} {
				fwd[n] = append(fwd[n], newForwardCounterIn(t, n.ns, fmt.Sprintf("%s%s%v", n.name, p.ns[len(p.ns)-4:], v6), p.ip(v6).String()))
			}
		}
	}

	// PMTU first, while the pods know no path MTU: a DF packet larger than
	// the path is handed to the host, whose forwarding answers with
	// fragmentation needed / packet too big, IPv4 and IPv6; the pod then
	// knows the path MTU.
	for _, v6 := range []bool{false, true} {
		size, flag := "1472", "-4"
		if v6 {
			size, flag = "1452", "-6"
		}
		out, _ := p1.run("ping", flag, "-M", "do", "-s", size, "-c", "2", "-i", "0.3", "-W", "1", p2.ip(v6).String())
		want := fmt.Sprintf("Frag needed and DF set (mtu = %d)", xnPathMTU)
		if v6 {
			want = fmt.Sprintf("Packet too big: mtu=%d", xnPathMTU)
		}
		if !strings.Contains(string(out), want) {
			t.Errorf("ping -M do -s %s %s: no %q (fragmentation needed / packet too big) in\n%s", size, p2.ip(v6), want, out)
		}
	}

	for _, v6 := range []bool{false, true} {
		for _, pair := range [][2]*pod{{p1, p2}, {p2, p1}} {
			a, b := pair[0], pair[1]
			var seen netip.Addr
			if err := tcpExchange(a.path, b.path, b.ip(v6), &seen); err != nil {
				t.Fatalf("tcp %s -> %s (%s): %v", a.ns, b.ns, b.ip(v6), err)
			}
			if seen != a.ip(v6) {
				t.Errorf("%s -> %s: server saw %s, want the pod address %s (no masquerade inside the cluster)", a.ns, b.ns, seen, a.ip(v6))
			}
			out, err := a.run("ping", "-c", "3", "-i", "0.2", "-W", "2", b.ip(v6).String())
			if err != nil {
				t.Fatalf("ping %s -> %s: %v\n%s", a.ns, b.ip(v6), err, out)
			}
			// 64 at the sender, one routed hop on each node.
			if !strings.Contains(string(out), "ttl=62") {
				t.Errorf("ping %s -> %s: no ttl=62 (hop limit) in\n%s", a.ns, b.ip(v6), out)
			}
			// Bulk transfer both ways: GSO super-packets larger than the
			// path MTU go through PMTU discovery and then the fast path.
			if err := bulkTCP(a.path, b.path, b.ip(v6), 4<<20); err != nil {
				t.Fatalf("bulk %s -> %s (%s): %v", a.ns, b.ns, b.ip(v6), err)
			}
		}
	}
	for n, cs := range fwd {
		for _, c := range cs {
			if got := c.packets(); got != 0 {
				t.Errorf("%s: %d pod packets crossed the FORWARD chain (%s), want 0", n.name, got, c.table)
			}
		}
	}
	r1, r2 := n1.inspect(t), n2.inspect(t)
	for _, c := range []struct {
		rep inspected
		p   *pod
	}{{r1, p1}, {r2, p2}} {
		for _, e := range c.rep.Endpoints {
			if e.IP == c.p.ip(false) && (e.Counters.ToNodePackets == 0 || e.Counters.FromNodePackets == 0) {
				t.Errorf("%s counters: to other nodes %d, from other nodes %d: the fast path was not taken",
					c.p.ns, e.Counters.ToNodePackets, e.Counters.FromNodePackets)
			}
		}
		var redirected uint64
		for _, d := range c.rep.Devices {
			if d.Device == uplinkDev {
				redirected += d.Counters.RedirectPackets
			}
		}
		if redirected == 0 {
			t.Errorf("%s: no packet redirected in from %s: %+v", c.p.ns, uplinkDev, c.rep.Devices)
		}
	}
	if mode == "vxlan" {
		var encap uint64
		for _, d := range r1.Devices {
			encap += d.Counters.EncapPackets
		}
		if encap == 0 || len(r1.Tunnels) != 2 {
			t.Errorf("n1 VXLAN: %d packets encapsulated, tunnels %+v", encap, r1.Tunnels)
		}
	}
	if got := foreign.count(t); got == 0 {
		t.Errorf("the foreign program on n2's %s saw no packet", uplinkDev)
	}

	// A Service on n1 (kube-proxy's DNAT) whose backend is p2 on n2: p2's
	// replies arrive at n1's uplink for p1 and must go through n1's
	// conntrack to be un-DNATed, not be redirected into p1; a direct
	// connection afterwards takes the fast path again.
	vip := netip.MustParseAddrPort("172.31.97.7:80")
	target := netip.AddrPortFrom(p2.ip(false), 8080)
	script := fmt.Sprintf("table ip ebt_svc {\n chain pre {\n  type nat hook prerouting priority dstnat;\n  ip daddr %s tcp dport %d dnat to %s\n }\n}\n",
		vip.Addr(), vip.Port(), target)
	nftIn := exec.Command("ip", "netns", "exec", n1.ns, "nft", "-f", "-")
	nftIn.Stdin = strings.NewReader(script)
	if out, err := nftIn.CombinedOutput(); err != nil {
		t.Fatalf("nft in %s: %v: %s", n1.ns, err, out)
	}
	for k := 0; k < 3; k++ {
		if err := tcpVia(p1.path, p2.path, target, vip, nil); err != nil {
			t.Fatalf("pod -> Service on its node -> pod on the other node, connection %d: %v", k, err)
		}
	}
	if err := tcpVia(p1.path, p2.path, target, netip.AddrPort{}, nil); err != nil {
		t.Fatalf("direct connection after the Service ones: %v", err)
	}
	// Conntrack moves the pod's port: a second Service with the same
	// backend, dialled from the source port the first one just used (its
	// entry still there), gets another source port on the wire; the
	// backend's replies to that port must still go through n1's conntrack.
	script2 := fmt.Sprintf("table ip ebt_svc {\n chain pre {\n  ip daddr 172.31.97.8 tcp dport 80 dnat to %s\n }\n}\n", target)
	nftIn2 := exec.Command("ip", "netns", "exec", n1.ns, "nft", "-f", "-")
	nftIn2.Stdin = strings.NewReader(script2)
	if out, err := nftIn2.CombinedOutput(); err != nil {
		t.Fatalf("nft in %s: %v: %s", n1.ns, err, out)
	}
	for _, vip := range []string{"172.31.97.7:80", "172.31.97.8:80"} {
		if err := echoFromPort(p1.path, p2.path, target, netip.MustParseAddrPort(vip), 40404); err != nil {
			t.Fatalf("from port 40404 to %s (same backend as the previous one): %v", vip, err)
		}
	}

	// Leaving the cluster ranges: the host path, masqueraded to the node's
	// address (the host on the underlay stands for the outside).
	var seen netip.Addr
	if err := tcpVia(p1.path, "", netip.AddrPortFrom(netip.MustParseAddr(u.net4+".254"), 0), netip.AddrPort{}, &seen); err != nil {
		t.Fatalf("pod -> outside: %v", err)
	}
	if seen != n1.ip {
		t.Errorf("outside saw %s, want %s (masqueraded to the node)", seen, n1.ip)
	}

	// Uninstall removes our node programs and leaves the foreign one; the
	// pods fall back to the host path (in VXLAN mode once the agent's next
	// reconcile attached the overlay programs again: the metadata device
	// cannot send without them).
	for _, n := range nodes {
		if out, err := n.exec(filepath.Join(binDir, "ebpf-cni"), "uninstall", "--pin-root", n.net.pinRoot, "--state-dir", n.net.stateDir).CombinedOutput(); err != nil {
			t.Fatalf("uninstall on %s: %v: %s", n.name, err, out)
		}
		if devs := n.inspect(t).Devices; len(devs) != 0 {
			t.Errorf("%s: node attachments left after uninstall: %+v", n.name, devs)
		}
	}
	if !foreign.attached(t) {
		t.Errorf("uninstall detached the foreign program on n2's %s", uplinkDev)
	}
	if mode == "vxlan" {
		resync()
	}
	before := foreign.count(t)
	if err := tcpExchange(p1.path, p2.path, p2.ip(false), nil); err != nil {
		t.Fatalf("after uninstall (host path): %v", err)
	}
	if foreign.count(t) == before {
		t.Errorf("the foreign program stopped counting after uninstall")
	}
}

// foreignProg is someone else's TCX program on a node device: it counts
// packets in an array map and passes them on.
type foreignProg struct {
	l      link.Link
	counts *ebpf.Map
	node   *emuNode
	dev    string
}

func attachForeign(t *testing.T, n *emuNode, dev string) *foreignProg {
	t.Helper()
	counts, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { counts.Close() })
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{
			asm.StoreImm(asm.RFP, -4, 0, asm.Word),
			asm.LoadMapPtr(asm.R1, counts.FD()),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, -4),
			asm.FnMapLookupElem.Call(),
			asm.JEq.Imm(asm.R0, 0, "out"),
			asm.Mov.Imm(asm.R1, 1),
			asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
			asm.Mov.Imm(asm.R0, -1).WithSymbol("out"), // TCX_NEXT
			asm.Return(),
		},
	})
	if err != nil {
		t.Fatalf("load foreign program: %v", err)
	}
	defer prog.Close()
	f := &foreignProg{counts: counts, node: n, dev: dev}
	err = inNS("/run/netns/"+n.ns, func() error {
		ifc, err := net.InterfaceByName(dev)
		if err != nil {
			return err
		}
		f.l, err = link.AttachTCX(link.TCXOptions{Interface: ifc.Index, Program: prog, Attach: ebpf.AttachTCXIngress, Anchor: link.Head()})
		return err
	})
	if err != nil {
		t.Fatalf("attach foreign program to %s %s: %v", n.name, dev, err)
	}
	t.Cleanup(func() { f.l.Close() })
	return f
}

func (f *foreignProg) count(t *testing.T) uint64 {
	t.Helper()
	var v uint64
	if err := f.counts.Lookup(uint32(0), &v); err != nil {
		t.Fatal(err)
	}
	return v
}

// attached reports whether the foreign link is still on the device's hook.
func (f *foreignProg) attached(t *testing.T) bool {
	t.Helper()
	info, err := f.l.Info()
	if err != nil {
		t.Fatal(err)
	}
	var found bool
	err = inNS("/run/netns/"+f.node.ns, func() error {
		ifc, err := net.InterfaceByName(f.dev)
		if err != nil {
			return err
		}
		res, err := link.QueryPrograms(link.QueryOptions{Target: ifc.Index, Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return err
		}
		for _, p := range res.Programs {
			if id, ok := p.LinkID(); ok && id == info.ID {
				found = true
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return found
}

// bulkTCP sends size bytes from netns src to a listener in netns dst and
// back, checking every byte arrived.
func bulkTCP(src, dst string, addr netip.Addr, size int) error {
	var ln net.Listener
	if err := inNS(dst, func() error {
		var err error
		ln, err = net.Listen("tcp", netip.AddrPortFrom(addr, 0).String())
		return err
	}); err != nil {
		return err
	}
	defer ln.Close()
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		_, err = io.CopyN(c, c, int64(size)) // echo it all back
		done <- err
	}()
	var c net.Conn
	if err := inNS(src, func() error {
		var err error
		c, err = net.DialTimeout("tcp", ln.Addr().String(), 3*time.Second)
		return err
	}); err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	payload := make([]byte, size)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	werr := make(chan error, 1)
	go func() { _, err := c.Write(payload); werr <- err }()
	got := make([]byte, size)
	if _, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("read echo: %w", err)
	}
	if err := <-werr; err != nil {
		return err
	}
	for i := range got {
		if got[i] != payload[i] {
			return fmt.Errorf("byte %d differs", i)
		}
	}
	return <-done
}

// newForwardCounterIn is newForwardCounter inside a node's namespace.
func newForwardCounterIn(t *testing.T, netns, tag, src string) *forwardCounter {
	t.Helper()
	fam := "ip"
	if strings.Contains(src, ":") {
		fam = "ip6"
	}
	table := "ebt_fwd_" + strings.ReplaceAll(tag, "-", "_")
	script := fmt.Sprintf("table inet %s {\n chain forward {\n  type filter hook forward priority -300;\n  %s saddr %s counter\n }\n}\n", table, fam, src)
	cmd := exec.Command("ip", "netns", "exec", netns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft add counter in %s: %v: %s", netns, err, out)
	}
	return &forwardCounter{t: t, table: table, netns: netns}
}

// echoFromPort is tcpVia from a fixed source port, closed with a reset (so
// the port is free again at once while conntrack still holds the flow).
func echoFromPort(src, dst string, listen, dial netip.AddrPort, port int) error {
	var ln net.Listener
	if err := inNS(dst, func() error {
		var err error
		ln, err = net.Listen("tcp", listen.String())
		return err
	}); err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			io.Copy(c, io.LimitReader(c, 5))
			c.Close()
		}
	}()
	var c net.Conn
	if err := inNS(src, func() error {
		var err error
		d := net.Dialer{Timeout: 3 * time.Second, LocalAddr: &net.TCPAddr{Port: port}}
		c, err = d.Dial("tcp", dial.String())
		return err
	}); err != nil {
		return fmt.Errorf("dial %s: %w", dial, err)
	}
	defer func() {
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	}()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("hello")); err != nil {
		return err
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil {
		return fmt.Errorf("read echo: %w", err)
	}
	return nil
}
