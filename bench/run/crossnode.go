package main

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ebpf-cni/ebpf-cni/internal/agent/routes"
)

// An emulated cluster of two nodes per setup: each node is a network
// namespace, the two joined by a veth pair (the underlay, MTU 1500, no
// bridge); pods are namespaces wired by the plugin running inside their
// node. Every setup gets its own pair of nodes, so routes, uplink programs
// and tunnel devices never mix. Each node masquerades traffic from its pods
// to outside the cluster range (ebpf-cni's own rule; an equivalent nft rule
// for ptp, whose ipMasq would also masquerade pod-to-pod traffic across
// nodes), so every setup has conntrack and a NAT table in its nodes.

// xnode is one emulated node.
type xnode struct {
	ns     string     // its network namespace
	under  netip.Addr // underlay address
	podNet netip.Prefix
	bpf    string // bpffs instance (ebpf-cni setups)
}

// xsetup is one cross-node configuration under test.
type xsetup struct {
	setup
	kind   string // n2n, native, vxlan, ptp, kvxlan
	n1, n2 *xnode
}

const (
	xnCluster = "10.240.0.0/12"
	xnVNI     = "42"
)

// xnPair creates the two nodes of setup i and their underlay.
func xnPair(e *env, tag string, i int) (*xnode, *xnode, error) {
	mk := func(j int) (*xnode, error) {
		n := &xnode{
			ns:     fmt.Sprintf("%sx%s%d", prefix, tag, j),
			under:  netip.MustParseAddr(fmt.Sprintf("10.254.%d.%d", i, j)),
			podNet: netip.MustParsePrefix(fmt.Sprintf("10.%d.%d.0/24", 240+i, j)),
		}
		if err := e.newNS(n.ns); err != nil {
			return nil, err
		}
		return n, nil
	}
	n1, err := mk(1)
	if err != nil {
		return nil, nil, err
	}
	n2, err := mk(2)
	if err != nil {
		return nil, nil, err
	}
	u1, u2 := fmt.Sprintf("%su%s1", prefix, tag), fmt.Sprintf("%su%s2", prefix, tag)
	cmds := [][]string{
		{"ip", "link", "add", u1, "mtu", strconv.Itoa(mtu), "type", "veth", "peer", "name", u2, "mtu", strconv.Itoa(mtu)},
		{"ip", "link", "set", u1, "netns", n1.ns, "name", "eth0"},
		{"ip", "link", "set", u2, "netns", n2.ns, "name", "eth0"},
	}
	for _, n := range []*xnode{n1, n2} {
		cmds = append(cmds,
			[]string{"ip", "-n", n.ns, "addr", "add", n.under.String() + "/24", "dev", "eth0"},
			[]string{"ip", "-n", n.ns, "link", "set", "eth0", "up"},
			[]string{"ip", "-n", n.ns, "link", "set", "lo", "up"},
			[]string{"ip", "netns", "exec", n.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"},
		)
	}
	if err := runAll(cmds); err != nil {
		return nil, nil, err
	}
	return n1, n2, nil
}

func runAll(cmds [][]string) error {
	for _, args := range cmds {
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			return fmt.Errorf("%v: %v: %s", args, err, out)
		}
	}
	return nil
}

// staticRoutes routes each node's pod range via the other's underlay address.
func staticRoutes(n1, n2 *xnode) error {
	return runAll([][]string{
		{"ip", "-n", n1.ns, "route", "add", n2.podNet.String(), "via", n2.under.String()},
		{"ip", "-n", n2.ns, "route", "add", n1.podNet.String(), "via", n1.under.String()},
	})
}

// kernelVXLAN is the flannel-style reference: a VXLAN device per node with
// static FDB and neighbour entries, each peer's pod range routed through it.
func kernelVXLAN(n1, n2 *xnode) error {
	mac := func(n *xnode) string {
		a := n.under.As4()
		return fmt.Sprintf("0e:42:%02x:%02x:%02x:%02x", a[0], a[1], a[2], a[3])
	}
	vtep := func(n *xnode) string { return n.podNet.Addr().String() }
	var cmds [][]string
	for _, p := range [][2]*xnode{{n1, n2}, {n2, n1}} {
		me, peer := p[0], p[1]
		cmds = append(cmds,
			[]string{"ip", "-n", me.ns, "link", "add", "vx", "address", mac(me), "mtu", strconv.Itoa(mtu - 50), "type", "vxlan",
				"id", xnVNI, "dstport", "4789", "local", me.under.String(), "dev", "eth0", "nolearning"},
			[]string{"ip", "-n", me.ns, "addr", "add", vtep(me) + "/32", "dev", "vx"},
			[]string{"ip", "-n", me.ns, "link", "set", "vx", "up"},
			[]string{"ip", "-n", me.ns, "neigh", "add", vtep(peer), "lladdr", mac(peer), "dev", "vx", "nud", "permanent"},
			[]string{"bridge", "-n", me.ns, "fdb", "append", mac(peer), "dev", "vx", "dst", peer.under.String()},
			[]string{"ip", "-n", me.ns, "route", "add", peer.podNet.String(), "via", vtep(peer), "dev", "vx", "onlink"},
		)
	}
	return runAll(cmds)
}

// agentVXLAN does in each node what ebpf-cni-agent does in VXLAN mode for
// a peer: the metadata-mode VXLAN device, on-link routes to the peer's pod
// range, the tunnel map entry and the overlay programs (the agent's own
// code, run inside the node's namespace).
func agentVXLAN(e *env, n1, n2 *xnode) error {
	for _, p := range [][2]*xnode{{n1, n2}, {n2, n1}} {
		me, peer := p[0], p[1]
		if err := e.mountBPF(me); err != nil {
			return err
		}
		r := &routes.Router{Mode: routes.VXLAN, LocalIP: me.under, Local: []netip.Prefix{me.podNet}, PinRoot: filepath.Join(me.bpf, "ebpf-cni")}
		peers := []routes.Peer{{Name: peer.ns, NodeIP: peer.under, PodCIDRs: []netip.Prefix{peer.podNet}}}
		err := inNetNS(me.ns, func() error {
			_, _, err := r.Sync(peers)
			return err
		})
		if err != nil {
			return fmt.Errorf("vxlan in %s: %w", me.ns, err)
		}
	}
	return nil
}

// inNetNS runs fn on a thread switched into the named network namespace.
func inNetNS(name string, fn func() error) error {
	target, err := ns.GetNS("/var/run/netns/" + name)
	if err != nil {
		return err
	}
	defer target.Close()
	return target.Do(func(ns.NetNS) error { return fn() })
}

// masquerade adds what ptp's nodes need to match ebpf-cni's own rule: pods
// reaching outside the cluster range are masqueraded, pods among
// themselves are not.
func masquerade(n *xnode) error {
	rules := fmt.Sprintf("table ip ebb-masq {\n chain post {\n  type nat hook postrouting priority srcnat\n  ip saddr %s ip daddr != %s masquerade\n }\n}\n",
		n.podNet, xnCluster)
	cmd := exec.Command("ip", "netns", "exec", n.ns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft in %s: %v: %s", n.ns, err, out)
	}
	return nil
}

// mountBPF gives an ebpf-cni node its own bpffs (pins are per node).
func (e *env) mountBPF(n *xnode) error {
	n.bpf = filepath.Join(e.dir, n.ns, "bpf")
	if err := os.MkdirAll(n.bpf, 0o700); err != nil {
		return err
	}
	if out, err := exec.Command("mount", "-t", "bpf", "bpffs", n.bpf).CombinedOutput(); err != nil {
		return fmt.Errorf("mount bpffs: %v: %s", err, out)
	}
	e.mu.Lock()
	e.mounts = append(e.mounts, n.bpf)
	e.mu.Unlock()
	return nil
}

// xnNetwork is the plugin config of one node of a setup.
func (e *env) xnNetwork(kind string, n *xnode, podMTU int) (*network, error) {
	short := strings.TrimPrefix(n.ns, prefix)
	var conf map[string]any
	switch kind {
	case "native", "vxlan", "hostpath":
		conf = map[string]any{"type": "ebpf-cni", "mtu": podMTU, "pinRoot": filepath.Join(n.bpf, "ebpf-cni"),
			"stateDir": filepath.Join(e.dir, n.ns, "state"), "clusterCIDRs": []string{xnCluster},
			"ipam": map[string]any{"ranges": [][]map[string]string{{{"subnet": n.podNet.String()}}}, "dataDir": filepath.Join(e.dir, n.ns, "ipam")}}
		if kind == "hostpath" {
			// Before the fast path: no cluster ranges, so from_pod leaves
			// other nodes' pods to the host's forwarding; the masquerade
			// rule is the one ptp's setup gets (masquerade(n)).
			delete(conf, "clusterCIDRs")
			conf["masquerade"] = false
		}
	default: // ptp
		conf = map[string]any{"type": "ptp", "mtu": podMTU, "ipMasq": false,
			"ipam": map[string]any{"type": "host-local", "ranges": [][]map[string]string{{{"subnet": n.podNet.String()}}},
				"routes": []map[string]string{{"dst": "0.0.0.0/0"}}, "dataDir": filepath.Join(e.dir, n.ns, "host-local")}}
	}
	net, err := e.network(short, kind, conf)
	if err != nil {
		return nil, err
	}
	net.nodeNS = n.ns
	return net, nil
}

// xnSetup builds one cross-node setup with a pod on each node.
func xnSetup(e *env, kind, label string, i int) (*xsetup, error) {
	tag := string(rune('a' + i))
	n1, n2, err := xnPair(e, tag, i)
	if err != nil {
		return nil, err
	}
	s := &xsetup{setup: setup{key: "x-" + kind, label: label}, kind: kind, n1: n1, n2: n2}
	if kind == "n2n" {
		// The limit: the nodes themselves, with the NAT table (and so the
		// conntrack) every node of the other setups has.
		for _, n := range []*xnode{n1, n2} {
			if err := masquerade(n); err != nil {
				return nil, err
			}
		}
		s.a, s.b, s.bIP = n1.ns, n2.ns, n2.under
		return s, nil
	}
	podMTU := mtu
	switch kind {
	case "native", "ptp", "hostpath":
		err = staticRoutes(n1, n2)
	case "vxlan":
		podMTU = mtu - 50
		err = agentVXLAN(e, n1, n2)
	case "kvxlan":
		podMTU = mtu - 50
		err = kernelVXLAN(n1, n2)
	}
	if err != nil {
		return nil, err
	}
	for j, n := range []*xnode{n1, n2} {
		if kind == "native" || kind == "hostpath" {
			if err := e.mountBPF(n); err != nil {
				return nil, err
			}
		}
		if kind != "native" && kind != "vxlan" {
			if err := masquerade(n); err != nil {
				return nil, err
			}
		}
		pk := kind
		if kind == "kvxlan" {
			pk = "ptp"
		}
		net, err := e.xnNetwork(pk, n, podMTU)
		if err != nil {
			return nil, err
		}
		pod := fmt.Sprintf("%s-p%d", n.ns, j+1)
		if err := e.newNS(pod); err != nil {
			return nil, err
		}
		p, _, err := e.add(net, pod)
		if err != nil {
			return nil, err
		}
		exec.Command("ip", "-n", pod, "link", "set", "lo", "up").Run()
		if j == 0 {
			s.a = pod
		} else {
			s.b, s.bIP = pod, p.ip
		}
	}
	return s, nil
}

// xnKinds are the cross-node setups, limit first.
var xnKinds = []struct{ kind, label string }{
	{"n2n", "node to node (underlay)"},
	{"native", "ebpf-cni native"},
	{"hostpath", "ebpf-cni via the host stack (before the fast path)"},
	{"vxlan", "ebpf-cni VXLAN"},
	{"ptp", "ptp + host-local, static routes"},
	{"kvxlan", "kernel VXLAN (flannel-style) + ptp"},
}

func runCrossNode(e *env, rep *report) error {
	fmt.Println("bench: cross-node setups")
	want := map[string]bool{}
	for _, k := range strings.Split(*xnOnly, ",") {
		want[strings.TrimSpace(k)] = true
	}
	var setups []*xsetup
	for i, k := range xnKinds {
		if !want[k.kind] {
			continue
		}
		s, err := xnSetup(e, k.kind, k.label, i+1)
		if err != nil {
			return fmt.Errorf("%s: %w", k.label, err)
		}
		setups = append(setups, s)
	}
	if len(setups) == 0 || setups[0].kind != "n2n" {
		return fmt.Errorf("-crossnode must include n2n (the limit every ratio is taken against)")
	}
	for _, s := range setups {
		stop, err := startServers(&s.setup)
		if err != nil {
			return err
		}
		defer stop()
		e.onCleanup(stop) // a -hold ended by SIGINT never returns here
	}
	time.Sleep(500 * time.Millisecond)
	for _, s := range setups {
		if _, err := inNS(s.a, "taskset", "-c", clientCPU, *rrBin, "-connect", netip.AddrPortFrom(s.bIP, 7000).String(), "-d", "1s").Output(); err != nil {
			return fmt.Errorf("warm-up %s: %w", s.label, err)
		}
	}
	if *hold {
		// For profiling by hand: the setups stay up until SIGINT.
		for _, s := range setups {
			fmt.Printf("bench: hold %-36s client netns %s, server %s in netns %s (rr :7000, iperf3 :5201)\n", s.label, s.a, s.bIP, s.b)
		}
		select {}
	}
	rep.xsetups = setups
	rep.xrounds = make([]map[string]metrics, *rounds)
	for r := 0; r < *rounds; r++ {
		rep.xrounds[r] = map[string]metrics{}
		for i := range setups {
			s := setups[(i+r)%len(setups)]
			m, err := measureSetup(&s.setup)
			if err != nil {
				return fmt.Errorf("round %d, %s: %w", r+1, s.label, err)
			}
			if m.pps, err = udpPPS(&s.setup); err != nil {
				return fmt.Errorf("round %d, %s: %w", r+1, s.label, err)
			}
			rep.xrounds[r][s.key] = m
			fmt.Printf("bench: round %d/%d %-36s rr %8.0f/s  iperf3 %5.2f / %5.2f Gbit/s  udp %7.0f pps\n",
				r+1, *rounds, s.label, m.tps, m.gbps1, m.gbps4, m.pps)
		}
	}
	return nil
}

// startServers starts a TCP_RR and an iperf3 server in the setup's b.
func startServers(s *setup) (func(), error) {
	srv := inNS(s.b, "taskset", "-c", serverCPU, *rrBin, "-listen", netip.AddrPortFrom(s.bIP, 7000).String())
	if err := srv.Start(); err != nil {
		return nil, err
	}
	ip := inNS(s.b, "iperf3", "-s", "-A", serverCPU, "-B", s.bIP.String(), "-p", "5201")
	if err := ip.Start(); err != nil {
		srv.Process.Kill()
		return nil, err
	}
	var once sync.Once
	return func() { once.Do(func() { srv.Process.Kill(); ip.Process.Kill(); srv.Wait(); ip.Wait() }) }, nil
}

// udpPPS is the rate of 64-byte UDP datagrams the server received, with
// the sender unthrottled.
func udpPPS(s *setup) (float64, error) {
	secs := strconv.Itoa(int(measure.Seconds()))
	out, err := inNS(s.a, "iperf3", "-A", clientCPU, "-c", s.bIP.String(), "-p", "5201", "-u", "-b", "0", "-l", "64", "-t", secs, "-J").Output()
	if err != nil {
		return 0, fmt.Errorf("iperf3 -u: %w: %s", err, out)
	}
	var res struct {
		End struct {
			Sum struct {
				Seconds float64 `json:"seconds"`
				Packets float64 `json:"packets"`
				Lost    float64 `json:"lost_packets"`
			} `json:"sum"`
		} `json:"end"`
	}
	if err := json.Unmarshal(out, &res); err != nil || res.End.Sum.Seconds == 0 {
		return 0, fmt.Errorf("iperf3 -u output: %v", err)
	}
	return (res.End.Sum.Packets - res.End.Sum.Lost) / res.End.Sum.Seconds, nil
}

// xcolumn is report.column for the cross-node rounds, against node to node.
func (r *report) xcolumn(key string, f func(metrics) float64) (vals, ratios []float64) {
	for _, round := range r.xrounds {
		v := f(round[key])
		vals = append(vals, v)
		if base := f(round["x-n2n"]); base > 0 {
			ratios = append(ratios, v/base)
		}
	}
	return vals, ratios
}

func (r *report) writeCrossNode(w func(string, ...any)) {
	if len(r.xrounds) == 0 {
		return
	}
	w("\n## Datapath: two pods on two nodes\n\n")
	w("Two emulated nodes per setup (network namespaces joined by a veth underlay, MTU %d, no bridge); one pod on "+
		"each; every node masquerades traffic leaving the cluster range (so every setup has conntrack and a NAT "+
		"table). Interleaved in %d rounds, the order rotating; each ratio is the median of per-round ratios to node "+
		"to node **of the same round**. TCP_RR as above, iperf3 TCP 1 and 4 streams (%s), UDP: 64-byte datagrams, sender "+
		"unthrottled, received datagrams/s. Clients on CPU 0, servers on CPU 1. VXLAN setups run pods at MTU %d.\n\n",
		mtu, len(r.xrounds), *congestion, mtu-50)
	w("| setup | TCP_RR trans/s | × node | RR p50 µs | iperf3 1 stream Gbit/s | × node | iperf3 4 streams Gbit/s | × node | UDP 64 B kpps | × node |\n")
	w("|---|---|---|---|---|---|---|---|---|---|\n")
	for _, s := range r.xsetups {
		tps, tpsR := r.xcolumn(s.key, func(m metrics) float64 { return m.tps })
		p50, _ := r.xcolumn(s.key, func(m metrics) float64 { return m.p50 })
		g1, g1R := r.xcolumn(s.key, func(m metrics) float64 { return m.gbps1 })
		g4, g4R := r.xcolumn(s.key, func(m metrics) float64 { return m.gbps4 })
		pps, ppsR := r.xcolumn(s.key, func(m metrics) float64 { return m.pps })
		w("| %s | %.0f | %.3f | %.1f | %.2f | %.3f | %.2f | %.3f | %.0f | %.3f |\n", s.label,
			median(tps), median(tpsR), median(p50), median(g1), median(g1R), median(g4), median(g4R), median(pps)/1000, median(ppsR))
	}
	w("\nPer round (TCP_RR trans/s | iperf3 1 stream Gbit/s):\n\n| round |")
	for _, s := range r.xsetups {
		w(" %s |", s.label)
	}
	w("\n|---|%s\n", strings.Repeat("---|", len(r.xsetups)))
	for i, round := range r.xrounds {
		w("| %d |", i+1)
		for _, s := range r.xsetups {
			w(" %.0f \\| %.2f |", round[s.key].tps, round[s.key].gbps1)
		}
		w("\n")
	}
	// Ratios between setups of the same round, where the issue sets targets.
	pair := func(a, b string, f func(metrics) float64) float64 {
		var rs []float64
		for _, round := range r.xrounds {
			if x, y := f(round[a]), f(round[b]); y > 0 && x > 0 {
				rs = append(rs, x/y)
			}
		}
		return median(rs)
	}
	tps := func(m metrics) float64 { return m.tps }
	g1 := func(m metrics) float64 { return m.gbps1 }
	w("\n| comparison (median of per-round ratios) | TCP_RR | 1 stream |\n|---|---|---|\n")
	for _, c := range [][3]string{
		{"ebpf-cni native ÷ ptp", "x-native", "x-ptp"},
		{"ebpf-cni VXLAN ÷ kernel VXLAN", "x-vxlan", "x-kvxlan"},
	} {
		if v := pair(c[1], c[2], tps); v > 0 {
			w("| %s | %.3f | %.3f |\n", c[0], v, pair(c[1], c[2], g1))
		}
	}
}
