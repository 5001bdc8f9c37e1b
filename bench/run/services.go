package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
)

// Services: pod → ClusterIP → pod, through kube-proxy (iptables and
// nftables modes) and through ebpf-cni-agent's BPF Services, next to
// pod → pod direct, with 10, 1,000 and 10,000 Services programmed.
//
// Every setup is an emulated two-node cluster of its own (network
// namespaces joined by a veth underlay, routes between the nodes' pod
// ranges, pods wired by the ebpf-cni plugin with clusterCIDRs, as in the
// cross-node section). All clusters use the same addresses (they never
// see each other), so one set of Services and EndpointSlices in one
// kube-apiserver serves them all: node 1 holds the client pod and a
// backend ("same node"), node 2 the other backend ("other node").
//
// The EndpointSlices are written by the bench, not by a controller: the
// Services have no selector, and each slice (managed-by ebb-bench) lists
// one ready endpoint, the node-1 or node-2 backend. No
// kube-controller-manager runs.
//
// Programming time, the same for every proxy: (1) restart: the proxy on
// node 1 is stopped, the level's Services are created, the proxy starts;
// from its exec to the last-created Service answering through its
// ClusterIP (what the previous level programmed stays, as on a restarted
// node: kube-proxy's rules, the agent's pins); (2) one more Service: from
// the create call (EndpointSlice, then Service) to its ClusterIP answering.
// "Answers" is a new TCP connection from the client pod completing a
// 1-byte exchange (rr -probe, an attempt every 5 ms).
//
// kube-proxy runs in each node's netns (nsenter --net) with a config file
// (notes §9: conntrack sysctls untouched, hostnameOverride = the Node,
// clusterCIDR, nodePortAddresses = the underlay address). The ebpf-cni
// setup runs, in each node's netns and with no kube-proxy in its cluster,
//
//	ebpf-cni-agent -controllers services -kubeconfig K -node-name N
//	    -pin-root P -state-dir S -cgroup-root DIR -metrics-addr ""
//
// P and S being the node's plugin pin root and state dir and DIR a cgroup2
// directory of that node (ebb-svc-ebpf-node<j> under -cgroup-root), in
// which the node's clients start (CLONE_INTO_CGROUP): socket-level load
// balancing applies there. Its readiness is the probe's, as for
// kube-proxy. A setup whose proxy exits or fails is printed, reported and
// left out of the rest of the run; the others go on.

// svcPort is the Services' port and the backends' (rr servers') port.
const (
	svcPort      = 7000
	svcNamespace = prefix + "svc"
	svcManagedBy = "ebb-bench"
)

// svcKinds are the setups, the limit first.
var svcKinds = []struct{ key, label, tag string }{
	{"direct", "pod → pod (direct)", "sd"},
	{"iptables", "kube-proxy iptables", "si"},
	{"nftables", "kube-proxy nftables", "sn"},
	{"ebpf", "ebpf-cni BPF Services", "se"},
}

// svcNodeNames are the Node objects, shared by every cluster (the same
// underlay addresses in each).
var svcNodeNames = [2]string{prefix + "node1", prefix + "node2"}

// svcCluster is one setup: two emulated nodes and their proxies.
type svcCluster struct {
	key, label string
	nodes      [2]*xnode
	pinRoot    [2]string
	stateDir   [2]string
	cgroups    [2]string // cgroup2 directories, one per node
	cgFD       *os.File  // node 1's: clients start in it (socket LB applies there)
	client     string    // client pod's netns, on node 1
	backends   [2]netip.Addr
	proxy      [2]*daemon // kube-proxy or ebpf-cni-agent per node; nil: not running
	logDir     string
	before     map[uint32]bool // node 1's maps pinned by the plugin before the agent ran
	err        error           // why this setup is out of the run
	starts     int
}

func (c *svcCluster) proxied() bool { return c.key != "direct" }

func (c *svcCluster) ok() bool { return c.err == nil }

// svcItem is one Service with its EndpointSlice.
type svcItem struct {
	name    string
	vip     netip.Addr
	backend int // 0: the node-1 backend, 1: node 2's
}

func (it svcItem) addr() netip.AddrPort { return netip.AddrPortFrom(it.vip, svcPort) }

// svcVIP is the ClusterIP of the i-th Service: set by the bench, so a
// probe can wait on it before the Service exists.
func svcVIP(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{172, 29, byte(1 + i/250), byte(1 + i%250)})
}

// svcReport is the section's results.
type svcReport struct {
	foreign  []string // socket programs of others that ran on the clients' connects
	clusters []*svcCluster
	levels   []*svcLevel
	proxyCfg string // kube-proxy's sync settings, printed with the figures
}

type svcLevel struct {
	n        int
	created  int           // objects created for this level
	create   time.Duration // their wall time
	prog     map[string]*svcProg
	rounds   []map[string]svcCell // key: setup key + "/local" or "/remote"
	chainPos string               // iptables: where the measured Services sit in KUBE-SERVICES
}

// svcProg is one proxy's programming time and footprint at one level.
type svcProg struct {
	restart, extra time.Duration
	rssKiB         int64
	rules, elems   int   // kube-proxy: rules (and nft set/map elements) in node 1
	mapBytes       int64 // agent: memlock of the BPF maps it holds or pinned
	maps           int
	longestSync    time.Duration // kube-proxy: its longest IPv4 SyncProxyRules since this start (its log)
	err            string
}

type svcCell struct{ rr, crr rrOut }

type rrOut struct {
	tps, p50, p99 float64
	errors        int
}

func runServices(e *env, rep *report) error {
	var levels []int
	for _, f := range strings.Split(*svcLevels, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 2 || n > 60000 {
			return fmt.Errorf("-svc-levels: %q: want 2..60000", f)
		}
		if len(levels) > 0 && n <= levels[len(levels)-1] {
			return fmt.Errorf("-svc-levels must increase")
		}
		levels = append(levels, n)
	}
	want := map[string]bool{}
	for _, k := range strings.Split(*svcSetups, ",") {
		want[strings.TrimSpace(k)] = true
	}
	if !want["direct"] {
		return fmt.Errorf("-svc-setups must include direct (the limit every ratio is taken against)")
	}
	var kubeProxy string
	if want["iptables"] || want["nftables"] {
		var err error
		if kubeProxy, err = kubeBin("kube-proxy"); err != nil {
			return err
		}
	}
	agent := *agentBin // absolute (main)

	fmt.Println("bench: services: etcd and kube-apiserver")
	cp, err := startControlPlane(e)
	if err != nil {
		return err
	}
	ctx := context.Background()
	if _, err := cp.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: svcNamespace}}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create namespace: %w", err)
	}

	res := &svcReport{proxyCfg: "minSyncPeriod 1 s, syncPeriod 30 s"}
	rep.svc = res
	for ci, k := range svcKinds {
		if !want[k.key] {
			continue
		}
		c, err := svcSetup(e, k.key, k.label, k.tag, ci)
		if err != nil {
			return fmt.Errorf("%s: %w", k.label, err)
		}
		res.clusters = append(res.clusters, c)
	}
	base := res.clusters[0]
	for _, c := range res.clusters[1:] {
		if c.backends != base.backends {
			return fmt.Errorf("%s: backends %v, %s has %v: the clusters must share addresses", c.label, c.backends, base.label, base.backends)
		}
	}
	for j, n := range base.nodes {
		if err := cp.addNode(ctx, svcNodeNames[j], n.under.String(), n.podNet.String()); err != nil {
			return err
		}
	}
	for _, c := range res.clusters {
		if err := c.startServers(e); err != nil {
			return err
		}
		// Pod → pod first: every setup's datapath works before any Service.
		for _, b := range c.backends {
			if _, err := c.rr(netip.AddrPortFrom(b, svcPort), false, 200*time.Millisecond); err != nil {
				return fmt.Errorf("%s: pod → pod %s: %w", c.label, b, err)
			}
		}
	}

	var items []svcItem
	for li, n := range levels {
		lvl := &svcLevel{n: n, prog: map[string]*svcProg{}}
		res.levels = append(res.levels, lvl)
		for _, c := range res.clusters {
			c.stopProxies()
		}
		// Create up to n: the bulk in parallel, the last two one after
		// the other (the node-1 backend's, then node 2's: the last-created
		// Service, which the restart waits for).
		fresh := make([]svcItem, 0, n-len(items))
		for i := len(items); i < n; i++ {
			fresh = append(fresh, svcItem{name: fmt.Sprintf("%s%d", prefix, i), vip: svcVIP(i), backend: i % 2})
		}
		fresh[len(fresh)-2].backend, fresh[len(fresh)-1].backend = 0, 1
		fmt.Printf("bench: services: %d Services: creating %d Services and EndpointSlices\n", n, len(fresh))
		start := time.Now()
		bulk := fresh[:len(fresh)-2]
		if err := parallel(len(bulk), *svcWorkers, func(i int) error { return createItem(ctx, cp.client, bulk[i], base.backends) }); err != nil {
			return err
		}
		for _, it := range fresh[len(fresh)-2:] {
			if err := createItem(ctx, cp.client, it, base.backends); err != nil {
				return err
			}
		}
		lvl.create, lvl.created = time.Since(start), 2*len(fresh)
		items = append(items, fresh...)
		fmt.Printf("bench: services: %d objects in %.1f s\n", lvl.created, lvl.create.Seconds())
		local, remote := items[n-2], items[n-1]

		// Programming, one proxy at a time (the others stopped or frozen).
		var proxied []*svcCluster
		for _, c := range res.clusters {
			if c.proxied() {
				proxied = append(proxied, c)
			}
		}
		for i := range proxied {
			c := proxied[(i+li)%len(proxied)]
			if !c.ok() {
				continue
			}
			p := &svcProg{}
			lvl.prog[c.key] = p
			if err := c.programming(ctx, cp, kubeProxy, agent, n, remote, p); err != nil {
				c.drop(p, err)
				continue
			}
			fmt.Printf("bench: services: %-22s %5d Services: restart → answers %6.2f s, one more Service → answers %6.1f ms\n",
				c.label, n, p.restart.Seconds(), ms(p.extra))
			c.proxy[0].freeze(true)
		}
		// Every node's proxy up, then quiet: the footprint is that of a
		// node that has programmed everything.
		var all []*daemon
		for _, c := range proxied {
			if !c.ok() {
				continue
			}
			if err := c.startProxy(cp, kubeProxy, agent, 1); err != nil {
				c.drop(lvl.prog[c.key], fmt.Errorf("node 2: %w", err))
				continue
			}
			c.proxy[0].freeze(false)
			all = append(all, c.proxy[0], c.proxy[1])
		}
		if !waitIdle(append(all, cp.etcd, cp.api), 5*time.Minute) {
			fmt.Fprintln(os.Stderr, "bench: services: proxies still busy after 5 min; measuring anyway")
		}
		for _, c := range proxied {
			if !c.ok() {
				continue
			}
			p := lvl.prog[c.key]
			if err := c.footprint(p); err != nil {
				c.drop(p, fmt.Errorf("footprint: %w", err))
				continue
			}
			what := fmt.Sprintf("%d rules", p.rules)
			switch c.key {
			case "nftables":
				what += fmt.Sprintf(" + %d set/map elements", p.elems)
			case "ebpf":
				what = fmt.Sprintf("%d Service maps, %.2f MiB memlock", p.maps, float64(p.mapBytes)/(1<<20))
			}
			fmt.Printf("bench: services: %-22s %5d Services: RSS %.1f MiB, %s\n", c.label, n, float64(p.rssKiB)/1024, what)
			if c.key == "iptables" {
				lvl.chainPos = kubeServicesPos(c.nodes[0].ns, local.vip, remote.vip)
			}
		}

		// Datapath, interleaved.
		var live []*svcCluster
		for _, c := range res.clusters {
			if !c.ok() {
				continue
			}
			if c.proxied() { // both measured Services answer through this setup
				for _, it := range []svcItem{local, remote} {
					if _, err := c.rr(it.addr(), false, 200*time.Millisecond); err != nil && c.ok() {
						c.drop(lvl.prog[c.key], fmt.Errorf("%s (%s) does not answer: %w", it.name, it.vip, err))
					}
				}
			}
			if c.ok() {
				live = append(live, c)
			}
		}
		if *hold && li == len(levels)-1 { // the last level programmed, measured by hand
			for _, c := range live {
				fmt.Printf("bench: hold %-22s client netns %s (cgroup %s), backends %s (netns %s-b) and %s (netns %s-b), ClusterIPs %s and %s, rr on :%d\n",
					c.label, c.client, c.cgroups[0], c.backends[0], c.nodes[0].ns, c.backends[1], c.nodes[1].ns, local.vip, remote.vip, svcPort)
			}
			select {}
		}
		res.noteForeign(base.cgroups[0])
		// Every node's conntrack table flushed: a flow of an earlier level
		// (the previous level's Service, same backend) must not meet this
		// level's connections (see flushConntrack).
		for _, c := range live {
			for _, n := range c.nodes {
				if err := flushConntrack(n.ns); err != nil {
					return fmt.Errorf("%s: %w", c.label, err)
				}
			}
		}
		if err := svcMeasure(live, lvl, local, remote); err != nil {
			return err
		}
	}
	for _, c := range res.clusters {
		c.stopProxies()
	}
	return nil
}

// svcSetup builds cluster ci: two nodes, a management link each, the
// plugin, a client and a backend on node 1, a backend on node 2, and a
// cgroup per node.
func svcSetup(e *env, key, label, tag string, ci int) (*svcCluster, error) {
	fmt.Printf("bench: services: setting up %s\n", label)
	n1, n2, err := xnPair(e, tag, 0)
	if err != nil {
		return nil, err
	}
	c := &svcCluster{key: key, label: label, nodes: [2]*xnode{n1, n2}, logDir: filepath.Join(e.dir, "svc-"+key)}
	if err := os.MkdirAll(c.logDir, 0o755); err != nil {
		return nil, err
	}
	if err := staticRoutes(n1, n2); err != nil {
		return nil, err
	}
	for j, n := range c.nodes {
		if err := mgmtLink(n, fmt.Sprintf("%s%d", tag, j+1), 10*(ci+1)+j+1); err != nil {
			return nil, err
		}
		// Untranslated Service traffic fails in the node, never leaves it.
		if err := runAll([][]string{{"ip", "-n", n.ns, "route", "add", "unreachable", serviceCIDR}}); err != nil {
			return nil, err
		}
		if err := e.mountBPF(n); err != nil {
			return nil, err
		}
		c.pinRoot[j] = filepath.Join(n.bpf, "ebpf-cni")
		c.stateDir[j] = filepath.Join(e.dir, n.ns, "state") // as xnNetwork sets it
		net, err := e.xnNetwork("native", n, mtu)
		if err != nil {
			return nil, err
		}
		pods := []string{n.ns + "-b"}
		if j == 0 {
			pods = []string{n.ns + "-c", n.ns + "-b"}
		}
		for _, pod := range pods {
			if err := e.newNS(pod); err != nil {
				return nil, err
			}
			p, _, err := e.add(net, pod)
			if err != nil {
				return nil, err
			}
			exec.Command("ip", "-n", pod, "link", "set", "lo", "up").Run()
			if strings.HasSuffix(pod, "-c") {
				c.client = pod
			} else {
				c.backends[j] = p.ip
			}
		}
		c.cgroups[j] = filepath.Join(*cgroupRoot, fmt.Sprintf("%ssvc-%s-node%d", prefix, key, j+1))
		if err := os.Mkdir(c.cgroups[j], 0o755); err != nil {
			return nil, fmt.Errorf("cgroup: %w", err)
		}
		dir := c.cgroups[j]
		e.onCleanup(func() { removeCgroup(dir) })
	}
	if c.cgFD, err = os.Open(c.cgroups[0]); err != nil {
		return nil, err
	}
	e.onCleanup(func() { c.cgFD.Close() })
	e.onCleanup(c.stopProxies)
	c.before = pinnedMaps(c.pinRoot[0])
	return c, nil
}

// noteForeign records the socket programs others attached above the bench's
// cgroups (the direct setup's cgroup never has any of the bench's own): an
// ebpf-cni agent serving this host attaches at the cgroup2 root, and its
// programs then run on every connect of every setup here.
func (r *svcReport) noteForeign(cgroup string) {
	out, err := exec.Command("bpftool", "-j", "cgroup", "show", cgroup, "effective").Output()
	if err != nil {
		return
	}
	var progs []struct {
		ID   int    `json:"id"`
		Type string `json:"attach_type"`
		Name string `json:"name"`
	}
	if json.Unmarshal(out, &progs) != nil {
		return
	}
	for _, p := range progs {
		d := fmt.Sprintf("%s (%s, id %d)", p.Name, p.Type, p.ID)
		if !slices.Contains(r.foreign, d) {
			r.foreign = append(r.foreign, d)
			fmt.Fprintf(os.Stderr, "bench: services: warning: a program of someone else runs on the clients' sockets: %s\n", d)
		}
	}
}

// flushConntrack empties a node's conntrack table. Why: conntrack keeps
// some flows the client closed with a reset for the established timeout
// (5 days here), and a later connection from the same pod port to another
// Service with the same backend then has the reply tuple of that old flow:
// conntrack gives it another source port, and ebpf-cni (whose nat_guard_v1
// knows the pod's own port) redirects the backend's reply on the node past
// conntrack; the connect times out. Each level measures other Services with
// the same backends, so without the flush the first such port of every
// TCP_CRR run through kube-proxy to the other node stalls for 1 s.
func flushConntrack(name string) error {
	nsh, err := netns.GetFromPath("/var/run/netns/" + name)
	if err != nil {
		return err
	}
	defer nsh.Close()
	h, err := netlink.NewHandleAt(nsh)
	if err != nil {
		return fmt.Errorf("netlink in %s: %w", name, err)
	}
	defer h.Close()
	if err := h.ConntrackTableFlush(netlink.ConntrackTable); err != nil {
		return fmt.Errorf("flush conntrack in %s: %w", name, err)
	}
	return nil
}

// removeCgroup kills what is left in a cgroup of the bench (its own
// clients only) and removes it.
func removeCgroup(dir string) {
	os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0)
	for i := 0; i < 50; i++ {
		if err := os.Remove(dir); err == nil || errors.Is(err, fs.ErrNotExist) {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	fmt.Fprintf(os.Stderr, "bench: could not remove cgroup %s\n", dir)
}

func (c *svcCluster) startServers(e *env) error {
	for j, b := range c.backends {
		pod := c.nodes[j].ns + "-b"
		d, err := startDaemon("rr server", filepath.Join(c.logDir, fmt.Sprintf("rr-%d.log", j+1)),
			inNS(pod, "taskset", "-c", serverCPU, *rrBin, "-listen", netip.AddrPortFrom(b, svcPort).String()))
		if err != nil {
			return err
		}
		e.onCleanup(func() { d.stop(syscall.SIGKILL) })
	}
	return nil
}

// clientCmd runs rr in the client pod, on the client CPU, inside node 1's
// cgroup (where the agent's socket-level load balancing applies).
func (c *svcCluster) clientCmd(args ...string) *exec.Cmd {
	cmd := inNS(c.client, append([]string{"taskset", "-c", clientCPU, *rrBin}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(c.cgFD.Fd())}
	return cmd
}

// rr runs one TCP_RR or TCP_CRR measurement from the client pod.
func (c *svcCluster) rr(to netip.AddrPort, crr bool, d time.Duration) (rrOut, error) {
	args := []string{"-connect", to.String(), "-d", d.String()}
	if crr {
		args = append(args, "-crr", "-cpu", clientCPU)
	}
	out, err := parseRR(c.clientCmd(args...))
	if err != nil {
		return out, fmt.Errorf("%s %s: %w", c.label, strings.Join(args, " "), err)
	}
	return out, nil
}

// probeRun is an rr -probe waiting for a ClusterIP to answer.
type probeRun struct {
	cmd   *exec.Cmd
	lines chan string
	done  chan error
}

func (c *svcCluster) startProbe(to netip.AddrPort) (*probeRun, error) {
	cmd := c.clientCmd("-probe", to.String(), "-timeout", svcTimeout.String())
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &probeRun{cmd: cmd, lines: make(chan string, 4), done: make(chan error, 1)}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
		err := cmd.Wait()
		if err != nil {
			err = fmt.Errorf("probe %s: %w: %s", to, err, strings.TrimSpace(stderr.String()))
		}
		p.done <- err
		close(p.lines)
	}()
	return p, nil
}

// waiting returns once the probe saw the address not answer.
func (p *probeRun) waiting() error {
	select {
	case l, ok := <-p.lines:
		if !ok {
			return <-p.done
		}
		if l != "waiting" {
			p.kill()
			return fmt.Errorf("the Service answered before the change being timed (%s)", l)
		}
		return nil
	case <-time.After(10 * time.Second):
		p.kill()
		return fmt.Errorf("probe did not start")
	}
}

// answer returns when the address first answered; it gives up early when
// the proxy exits.
func (p *probeRun) answer(proxy *daemon) (time.Time, error) {
	var exited <-chan struct{}
	if proxy != nil {
		exited = proxy.done
	}
	select {
	case l, ok := <-p.lines:
		if !ok {
			return time.Time{}, <-p.done
		}
		var a struct {
			UnixNano int64 `json:"unix_ns"`
		}
		if err := json.Unmarshal([]byte(l), &a); err != nil || a.UnixNano == 0 {
			return time.Time{}, fmt.Errorf("probe output %q", l)
		}
		<-p.done
		return time.Unix(0, a.UnixNano), nil
	case <-exited:
		p.kill()
		return time.Time{}, fmt.Errorf("%s exited (%v) before the Service answered:\n%s", proxy.name, proxy.err, proxy.tail())
	}
}

func (p *probeRun) kill() {
	p.cmd.Process.Kill()
}

// programming measures the restart and one-more-Service times of the
// proxy on node 1 at this level.
func (c *svcCluster) programming(ctx context.Context, cp *controlPlane, kubeProxy, agent string, n int, last svcItem, p *svcProg) error {
	probe, err := c.startProbe(last.addr())
	if err != nil {
		return err
	}
	if err := probe.waiting(); err != nil {
		return fmt.Errorf("restart: %w", err)
	}
	t0 := time.Now()
	if err := c.startProxy(cp, kubeProxy, agent, 0); err != nil {
		probe.kill()
		return err
	}
	at, err := probe.answer(c.proxy[0])
	if err != nil {
		return fmt.Errorf("restart with %d Services: %w", n, err)
	}
	p.restart = at.Sub(t0)
	waitIdle([]*daemon{c.proxy[0], cp.etcd, cp.api}, time.Minute)

	c.starts++
	extra := svcItem{name: fmt.Sprintf("%sextra-%s-%d", prefix, c.key, n), vip: netip.AddrFrom4([4]byte{172, 29, 251, byte(c.starts)}), backend: 0}
	if probe, err = c.startProbe(extra.addr()); err != nil {
		return err
	}
	if err := probe.waiting(); err != nil {
		return fmt.Errorf("one more Service: %w", err)
	}
	t0 = time.Now()
	if err := createItem(ctx, cp.client, extra, c.backends); err != nil {
		probe.kill()
		return err
	}
	at, err = probe.answer(c.proxy[0])
	if err != nil {
		return fmt.Errorf("one more Service with %d: %w", n, err)
	}
	p.extra = at.Sub(t0)
	if err := deleteItem(ctx, cp.client, extra); err != nil {
		return err
	}
	waitIdle([]*daemon{c.proxy[0], cp.etcd, cp.api}, time.Minute)
	return nil
}

// startProxy starts kube-proxy or ebpf-cni-agent in node j's netns.
func (c *svcCluster) startProxy(cp *controlPlane, kubeProxy, agent string, j int) error {
	n := c.nodes[j]
	var cmd *exec.Cmd
	name := "kube-proxy"
	switch c.key {
	case "iptables", "nftables":
		cfg := filepath.Join(c.logDir, fmt.Sprintf("kube-proxy-node%d.yaml", j+1))
		if err := os.WriteFile(cfg, []byte(kubeProxyConfig(c.key, svcNodeNames[j], cp.kubeconfig, n.under.String())), 0o644); err != nil {
			return err
		}
		cmd = exec.Command("nsenter", "--net=/var/run/netns/"+n.ns, kubeProxy, "--config", cfg, "--v=2")
	case "ebpf":
		name = "ebpf-cni-agent"
		if _, err := os.Stat(agent); err != nil {
			return fmt.Errorf("ebpf-cni-agent: %w (make bench builds it)", err)
		}
		cmd = exec.Command("nsenter", "--net=/var/run/netns/"+n.ns, agent, "-controllers", "services",
			"-kubeconfig", cp.kubeconfig, "-node-name", svcNodeNames[j], "-pin-root", c.pinRoot[j],
			"-state-dir", c.stateDir[j], "-cgroup-root", c.cgroups[j], "-metrics-addr", "")
	default:
		return fmt.Errorf("%s has no proxy", c.label)
	}
	d, err := startDaemon(name, filepath.Join(c.logDir, fmt.Sprintf("%s-node%d.log", name, j+1)), cmd)
	if err != nil {
		return err
	}
	c.proxy[j] = d
	return nil
}

// drop takes a setup out of the rest of the run, loudly: the others go on.
func (c *svcCluster) drop(p *svcProg, err error) {
	c.err = err
	if p != nil {
		p.err = err.Error()
	}
	fmt.Fprintf(os.Stderr, "bench: services: %s: %v\nbench: services: %s is left out of the rest of the run\n", c.label, err, c.label)
	c.stopProxies()
}

func (c *svcCluster) stopProxies() {
	for j, d := range c.proxy {
		d.stop(syscall.SIGTERM)
		c.proxy[j] = nil
	}
}

// kubeProxyConfig is the node's KubeProxyConfiguration (notes §9): the
// conntrack sysctls are left alone (read-only in a netns), the node is the
// Node object, pods are "local" by the cluster range, NodePorts only on
// the underlay address, health and metrics on the netns's loopback.
func kubeProxyConfig(mode, node, kubeconfig, nodeIP string) string {
	return fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: %s
hostnameOverride: %s
clientConnection: {kubeconfig: %s}
clusterCIDR: %s
detectLocalMode: ClusterCIDR
nodePortAddresses: ["%s/32"]
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s, udpTimeout: 0s, udpStreamTimeout: 0s}
iptables: {localhostNodePorts: false, minSyncPeriod: 1s, syncPeriod: 30s}
nftables: {minSyncPeriod: 1s, syncPeriod: 30s}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
`, mode, node, kubeconfig, xnCluster, nodeIP)
}

func createItem(ctx context.Context, client *kubernetes.Clientset, it svcItem, backends [2]netip.Addr) error {
	node := svcNodeNames[it.backend]
	yes, no := true, false
	portName, port, proto := "", int32(svcPort), corev1.ProtocolTCP
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: it.name, Namespace: svcNamespace, Labels: map[string]string{
			discoveryv1.LabelServiceName: it.name, discoveryv1.LabelManagedBy: svcManagedBy}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{{Addresses: []string{backends[it.backend].String()}, NodeName: &node,
			Conditions: discoveryv1.EndpointConditions{Ready: &yes, Serving: &yes, Terminating: &no}}},
		Ports: []discoveryv1.EndpointPort{{Name: &portName, Port: &port, Protocol: &proto}},
	}
	if _, err := client.DiscoveryV1().EndpointSlices(svcNamespace).Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create EndpointSlice %s: %w", it.name, err)
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: it.name, Namespace: svcNamespace},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeClusterIP, ClusterIP: it.vip.String(), ClusterIPs: []string{it.vip.String()},
			Ports: []corev1.ServicePort{{Port: svcPort, TargetPort: intstr.FromInt32(svcPort), Protocol: corev1.ProtocolTCP}}},
	}
	if _, err := client.CoreV1().Services(svcNamespace).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create Service %s: %w", it.name, err)
	}
	return nil
}

func deleteItem(ctx context.Context, client *kubernetes.Clientset, it svcItem) error {
	if err := client.CoreV1().Services(svcNamespace).Delete(ctx, it.name, metav1.DeleteOptions{}); err != nil {
		return fmt.Errorf("delete Service %s: %w", it.name, err)
	}
	if err := client.DiscoveryV1().EndpointSlices(svcNamespace).Delete(ctx, it.name, metav1.DeleteOptions{}); err != nil {
		return fmt.Errorf("delete EndpointSlice %s: %w", it.name, err)
	}
	return nil
}

// svcRounds measures TCP_RR and TCP_CRR to both backends of every setup,
// interleaved, the order rotating each round.
func svcMeasure(live []*svcCluster, lvl *svcLevel, local, remote svcItem) error {
	if *svcFreeze {
		for _, c := range live {
			for _, d := range c.proxy {
				d.freeze(true)
			}
		}
		defer func() {
			for _, c := range live {
				for _, d := range c.proxy {
					d.freeze(false)
				}
			}
		}()
	}
	targets := func(c *svcCluster) [2]netip.AddrPort {
		if !c.proxied() {
			return [2]netip.AddrPort{netip.AddrPortFrom(c.backends[0], svcPort), netip.AddrPortFrom(c.backends[1], svcPort)}
		}
		return [2]netip.AddrPort{local.addr(), remote.addr()}
	}
	// fail drops a proxied setup (its proxy failed under it); the limit
	// failing stops the section.
	fail := func(c *svcCluster, err error) error {
		if !c.proxied() {
			return fmt.Errorf("%d Services, %s: %w", lvl.n, c.label, err)
		}
		c.drop(lvl.prog[c.key], err)
		return nil
	}
	// One discarded pass: the first measurement of a run comes out low.
	for _, c := range live {
	warm:
		for _, to := range targets(c) {
			for _, crr := range []bool{false, true} {
				if _, err := c.rr(to, crr, 300*time.Millisecond); err != nil {
					if err := fail(c, fmt.Errorf("warm-up: %w", err)); err != nil {
						return err
					}
					break warm
				}
			}
		}
	}
	where := [2]string{"local", "remote"}
	for r := 0; r < *svcRounds; r++ {
		round := map[string]svcCell{}
		for i := range live {
			c := live[(i+r)%len(live)]
			if !c.ok() {
				continue
			}
			for b, to := range targets(c) {
				var cell svcCell
				var err error
				if cell.rr, err = c.rr(to, false, *svcDur); err == nil {
					cell.crr, err = c.rr(to, true, *svcDur)
				}
				if err != nil {
					if err := fail(c, fmt.Errorf("round %d: %w", r+1, err)); err != nil {
						return err
					}
					break
				}
				round[c.key+"/"+where[b]] = cell
				fmt.Printf("bench: services: %5d Services round %d/%d %-22s %-6s rr %7.0f/s p50 %5.1fus  crr %6.0f/s p50 %6.1fus p99 %7.1fus%s\n",
					lvl.n, r+1, *svcRounds, c.label, where[b], cell.rr.tps, cell.rr.p50, cell.crr.tps, cell.crr.p50, cell.crr.p99, errNote(cell.crr.errors))
			}
		}
		lvl.rounds = append(lvl.rounds, round)
	}
	return nil
}

func errNote(n int) string {
	if n == 0 {
		return ""
	}
	return fmt.Sprintf("  (%d failed)", n)
}

// waitIdle waits until the daemons (and their children: iptables-restore,
// nft) used less than 8 % of a CPU over two 1-second windows in a row.
func waitIdle(ds []*daemon, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	cpu := func() int64 {
		var t int64
		for _, d := range ds {
			if d != nil && !d.exited() {
				t += treeCPU(d.pid())
			}
		}
		return t
	}
	prev, quiet := cpu(), 0
	for time.Now().Before(deadline) {
		time.Sleep(time.Second)
		cur := cpu()
		if cur-prev <= 8 { // clock ticks (USER_HZ = 100)
			if quiet++; quiet >= 2 {
				return true
			}
		} else {
			quiet = 0
		}
		prev = cur
	}
	return false
}

// treeCPU is a process's CPU time in clock ticks, its reaped children's
// and its live descendants' included.
func treeCPU(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	var t int64
	for _, i := range []int{11, 12, 13, 14} { // utime stime cutime cstime
		if i < len(f) {
			v, _ := strconv.ParseInt(f[i], 10, 64)
			t += v
		}
	}
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	for _, task := range tasks {
		kids, _ := os.ReadFile(task)
		for _, k := range strings.Fields(string(kids)) {
			if kp, err := strconv.Atoi(k); err == nil {
				t += treeCPU(kp)
			}
		}
	}
	return t
}

// footprint records node 1's proxy RSS and what it programmed: kube-proxy's
// rules, the agent's BPF maps.
func (c *svcCluster) footprint(p *svcProg) error {
	pid := c.proxy[0].pid()
	var err error
	if p.rssKiB, err = rssKiB(pid); err != nil {
		return err
	}
	ns := c.nodes[0].ns
	switch c.key {
	case "iptables":
		for _, tool := range []string{"iptables-save", "ip6tables-save"} {
			out, err := exec.Command("nsenter", "--net=/var/run/netns/"+ns, tool).Output()
			if err != nil {
				return fmt.Errorf("%s: %w", tool, err)
			}
			for _, l := range strings.Split(string(out), "\n") {
				if strings.HasPrefix(l, "-A ") {
					p.rules++
				}
			}
		}
	case "nftables":
		out, err := exec.Command("nsenter", "--net=/var/run/netns/"+ns, "nft", "-j", "list", "ruleset").Output()
		if err != nil {
			return fmt.Errorf("nft list ruleset: %w", err)
		}
		p.rules, p.elems, err = countNft(out, "kube-proxy")
		if err != nil {
			return err
		}
	case "ebpf":
		p.mapBytes, p.maps, err = agentMaps(pid, c.pinRoot[0], c.before)
		if err != nil {
			return err
		}
	}
	if c.key != "ebpf" {
		p.longestSync = longestSync(c.proxy[0].log)
	}
	return nil
}

// longestSync reads kube-proxy's log (--v=2) for its longest IPv4
// SyncProxyRules: the rules' own programming time, without the wait for
// the API and minSyncPeriod.
func longestSync(logPath string) time.Duration {
	b, err := os.ReadFile(logPath)
	if err != nil {
		return 0
	}
	var longest time.Duration
	for _, l := range strings.Split(string(b), "\n") {
		if !strings.Contains(l, `"SyncProxyRules complete"`) || !strings.Contains(l, `ipFamily="IPv4"`) {
			continue
		}
		_, v, ok := strings.Cut(l, `elapsed="`)
		if !ok {
			continue
		}
		v, _, _ = strings.Cut(v, `"`)
		if d, err := time.ParseDuration(v); err == nil && d > longest {
			longest = d
		}
	}
	return longest
}

func rssKiB(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			return strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		}
	}
	return 0, fmt.Errorf("no VmRSS for pid %d", pid)
}

// countNft counts the rules and the set/map elements of the tables named
// table (ip and ip6) in `nft -j list ruleset` output.
func countNft(out []byte, table string) (rules, elems int, err error) {
	var rs struct {
		Nftables []map[string]json.RawMessage `json:"nftables"`
	}
	if err := json.Unmarshal(out, &rs); err != nil {
		return 0, 0, fmt.Errorf("nft -j: %w", err)
	}
	for _, obj := range rs.Nftables {
		for kind, raw := range obj {
			var o struct {
				Table string            `json:"table"`
				Elem  []json.RawMessage `json:"elem"`
			}
			if json.Unmarshal(raw, &o) != nil || o.Table != table {
				continue
			}
			switch kind {
			case "rule":
				rules++
			case "set", "map":
				elems += len(o.Elem)
			}
		}
	}
	return rules, elems, nil
}

// pinnedMaps lists the IDs of the BPF maps pinned under root.
func pinnedMaps(root string) map[uint32]bool {
	ids := map[uint32]bool{}
	for id := range pinnedMapInfo(root) {
		ids[id] = true
	}
	return ids
}

type mapInfo struct {
	name  string
	bytes int64 // bytes_memlock
}

func pinnedMapInfo(root string) map[uint32]mapInfo {
	maps := map[uint32]mapInfo{}
	filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		out, err := exec.Command("bpftool", "-j", "map", "show", "pinned", path).Output()
		if err != nil {
			return nil // a program or a link
		}
		var m struct {
			ID    uint32 `json:"id"`
			Name  string `json:"name"`
			Bytes int64  `json:"bytes_memlock"`
		}
		if json.Unmarshal(out, &m) == nil && m.ID != 0 {
			maps[m.ID] = mapInfo{name: m.Name, bytes: m.Bytes}
		}
		return nil
	})
	return maps
}

// agentMaps is the memlock of the BPF maps of Services: the datapath's
// Service maps pinned under the pin root (named lb_*, created with the
// plugin's other maps at its first ADD, filled by the agent) and any map
// the agent holds open (/proc/<pid>/fdinfo) that the plugin had not pinned
// before the agent started.
func agentMaps(pid int, pinRoot string, before map[uint32]bool) (int64, int, error) {
	maps := map[uint32]int64{}
	for id, m := range pinnedMapInfo(pinRoot) {
		if strings.HasPrefix(m.name, "lb_") || !before[id] {
			maps[id] = m.bytes
		}
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return 0, 0, err
	}
	for _, fd := range fds {
		link, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
		if err != nil || link != "anon_inode:bpf-map" {
			continue
		}
		info, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, fd.Name()))
		if err != nil {
			continue
		}
		var id uint32
		var bytes int64
		for _, l := range strings.Split(string(info), "\n") {
			k, v, _ := strings.Cut(l, ":")
			v = strings.TrimSpace(v)
			switch k {
			case "map_id":
				n, _ := strconv.ParseUint(v, 10, 32)
				id = uint32(n)
			case "memlock":
				bytes, _ = strconv.ParseInt(v, 10, 64)
			}
		}
		if id != 0 && !before[id] {
			maps[id] = bytes
		}
	}
	var total int64
	for _, b := range maps {
		total += b
	}
	return total, len(maps), nil
}

// kubeServicesPos says where the measured Services' rules sit in the
// iptables KUBE-SERVICES chain (matched in order by every new connection).
func kubeServicesPos(ns string, vips ...netip.Addr) string {
	out, err := exec.Command("nsenter", "--net=/var/run/netns/"+ns, "iptables-save", "-t", "nat").Output()
	if err != nil {
		return ""
	}
	var rules []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, "-A KUBE-SERVICES ") {
			rules = append(rules, l)
		}
	}
	var pos []string
	for _, vip := range vips {
		for i, l := range rules {
			if strings.Contains(l, "-d "+vip.String()+"/32") {
				pos = append(pos, strconv.Itoa(i+1))
				break
			}
		}
	}
	return fmt.Sprintf("rules %s of %d", strings.Join(pos, " and "), len(rules))
}

// --- report

func (r *report) writeServices(w func(string, ...any)) {
	s := r.svc
	if s == nil || len(s.levels) == 0 {
		return
	}
	w("\n## Services: pod → ClusterIP → pod\n\n")
	w("Each setup is an emulated two-node cluster (network namespaces, veth underlay, MTU %d, routes between the "+
		"nodes' pod ranges, pods wired by ebpf-cni with clusterCIDRs); node 1 holds the client pod and one backend, "+
		"node 2 the other backend. One kube-apiserver (v1.34, etcd on tmpfs) holds the Services for every setup; "+
		"the EndpointSlices are written by the bench (Services without selector, one ready endpoint each, no "+
		"controller). kube-proxy runs in each node's netns (%s; conntrack sysctls untouched); ebpf-cni-agent "+
		"runs `-controllers services`, its socket-level load balancing scoped to a cgroup per node that the "+
		"clients start in. ", mtu, s.proxyCfg)
	if *svcFreeze {
		w("While TCP_RR/TCP_CRR run, every kube-proxy and agent process is stopped (SIGSTOP): their rules and maps stay, " +
			"their periodic resyncs cannot land in another setup's measurement. ")
	}
	w("Interleaved in %d rounds per level, the order rotating; ratios are medians of per-round ratios **of the "+
		"same round** against direct (pod → pod IP, no Service) and against kube-proxy nftables. TCP_RR: one connection, "+
		"1-byte request and response (bench/rr), %s. TCP_CRR: a new connection per transaction (socket, connect, "+
		"1 byte each way, close with SO_LINGER {1, 0}: no TIME_WAIT), raw syscalls on a locked thread, %s. Clients "+
		"on CPU %s, servers on CPU %s.\n", *svcRounds, *svcDur, *svcDur, clientCPU, serverCPU)
	if len(s.foreign) > 0 {
		w("\n**Programs of others ran on every client connection of every setup** (attached above the bench's cgroups, "+
			"e.g. by an ebpf-cni agent serving this host at the cgroup2 root): %s. They add their cost to every connect, "+
			"the direct setup's included.\n", strings.Join(s.foreign, ", "))
	}
	for _, c := range s.clusters {
		if c.err != nil {
			w("\n**%s: not measured.** %s\n", c.label, oneLine(c.err.Error()))
		}
	}
	for _, lvl := range s.levels {
		if len(lvl.rounds) == 0 {
			continue
		}
		w("\n### %d Services\n\n", lvl.n)
		w("| setup | backend | TCP_RR trans/s | × direct | × nftables | RR p50 µs | TCP_CRR conn/s | × direct | × nftables | CRR p50 µs | CRR p99 µs | CRR failed |\n")
		w("|---|---|---|---|---|---|---|---|---|---|---|---|\n")
		for _, c := range s.clusters {
			for _, where := range []string{"local", "remote"} {
				key := c.key + "/" + where
				if !lvl.has(key) {
					continue
				}
				col := func(f func(svcCell) float64, vs string) (vals, ratios []float64) {
					for _, round := range lvl.rounds {
						cell, ok := round[key]
						if !ok {
							continue
						}
						vals = append(vals, f(cell))
						if b, ok := round[vs+"/"+where]; ok && f(b) > 0 {
							ratios = append(ratios, f(cell)/f(b))
						}
					}
					return vals, ratios
				}
				rr := func(c svcCell) float64 { return c.rr.tps }
				crr := func(c svcCell) float64 { return c.crr.tps }
				rrV, rrD := col(rr, "direct")
				_, rrN := col(rr, "nftables")
				crrV, crrD := col(crr, "direct")
				_, crrN := col(crr, "nftables")
				p50, _ := col(func(c svcCell) float64 { return c.rr.p50 }, "direct")
				cp50, _ := col(func(c svcCell) float64 { return c.crr.p50 }, "direct")
				cp99, _ := col(func(c svcCell) float64 { return c.crr.p99 }, "direct")
				var failed int
				for _, round := range lvl.rounds {
					failed += round[key].crr.errors
				}
				backend := "same node"
				if where == "remote" {
					backend = "other node"
				}
				w("| %s | %s | %.0f | %s | %s | %.1f | %.0f | %s | %s | %.1f | %.1f | %d |\n", c.label, backend,
					median(rrV), ratio(rrD), ratio(rrN), median(p50), median(crrV), ratio(crrD), ratio(crrN), median(cp50), median(cp99), failed)
			}
		}
		if lvl.chainPos != "" {
			w("\nkube-proxy iptables: the two measured Services are %s in node 1's KUBE-SERVICES chain (matched in order by each new connection's first packet).\n", lvl.chainPos)
		}
		w("\nPer round (TCP_RR trans/s \\| TCP_CRR conn/s):\n\n| round |")
		var keys []string
		for _, c := range s.clusters {
			for _, where := range []string{"local", "remote"} {
				if lvl.has(c.key + "/" + where) {
					keys = append(keys, c.key+"/"+where)
					w(" %s, %s |", c.label, map[string]string{"local": "same node", "remote": "other node"}[where])
				}
			}
		}
		w("\n|---|%s\n", strings.Repeat("---|", len(keys)))
		for i, round := range lvl.rounds {
			w("| %d |", i+1)
			for _, k := range keys {
				if cell, ok := round[k]; ok {
					w(" %.0f \\| %.0f |", cell.rr.tps, cell.crr.tps)
				} else {
					w(" - |")
				}
			}
			w("\n")
		}
	}
	w("\n### Programming time and footprint (node 1)\n\n")
	w("Restart: the proxy on node 1 stopped, the level's Services created, the proxy started; from its exec to the "+
		"last-created Service answering through its ClusterIP (a new connection from the client pod completing a 1-byte "+
		"exchange; attempts every 5 ms). The previous level's rules or pins stay, as on a restarted node. One more "+
		"Service: from the create call (EndpointSlice, then Service) to its ClusterIP answering; kube-proxy handles the two "+
		"objects in two syncs, the second held back by its minSyncPeriod (1 s, the default). kube-proxy's longest sync: "+
		"the longest IPv4 `SyncProxyRules` in its log (--v=2) since this start, i.e. writing the rules alone. Footprint once every "+
		"proxy of every node has programmed the level and gone quiet: the process's RSS; kube-proxy's rules (iptables-save "+
		"`-A` lines, IPv4 and IPv6; nftables: rules and set/map elements of its `kube-proxy` tables); the agent's BPF maps "+
		"(memlock of the datapath's Service maps, `lb_*` under the node's pin root, and of any other map the agent holds "+
		"open that the plugin had not pinned before it started). Creating the objects (not part of any "+
		"time): %s.\n\n", createTimes(s.levels))
	w("| setup | Services | restart → answers s | one more Service → answers ms | kube-proxy's longest sync ms | RSS MiB | rules | set/map elements | BPF maps (MiB memlock) |\n")
	w("|---|---|---|---|---|---|---|---|---|\n")
	for _, c := range s.clusters {
		if !c.proxied() {
			continue
		}
		for _, lvl := range s.levels {
			p := lvl.prog[c.key]
			if p == nil {
				continue
			}
			if p.err != "" {
				w("| %s | %d | failed: %s | | | | | | |\n", c.label, lvl.n, oneLine(p.err))
				continue
			}
			rules, elems, maps, sync := "-", "-", "-", "-"
			if p.longestSync > 0 {
				sync = fmt.Sprintf("%.0f", ms(p.longestSync))
			}
			if c.key == "ebpf" {
				maps = fmt.Sprintf("%d (%.2f)", p.maps, float64(p.mapBytes)/(1<<20))
			} else {
				rules = strconv.Itoa(p.rules)
				if c.key == "nftables" {
					elems = strconv.Itoa(p.elems)
				}
			}
			w("| %s | %d | %.2f | %.0f | %s | %.1f | %s | %s | %s |\n", c.label, lvl.n, p.restart.Seconds(), ms(p.extra), sync,
				float64(p.rssKiB)/1024, rules, elems, maps)
		}
	}
}

// has says whether any round measured key.
func (l *svcLevel) has(key string) bool {
	for _, r := range l.rounds {
		if _, ok := r[key]; ok {
			return true
		}
	}
	return false
}

func ratio(v []float64) string {
	if len(v) == 0 {
		return "-"
	}
	return fmt.Sprintf("%.3f", median(v))
}

func oneLine(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 400 {
		s = s[:400] + "…"
	}
	return s
}

func createTimes(levels []*svcLevel) string {
	var parts []string
	for _, l := range levels {
		parts = append(parts, fmt.Sprintf("%d objects for %d Services in %.1f s", l.created, l.n, l.create.Seconds()))
	}
	return strings.Join(parts, ", ") + fmt.Sprintf(" (%d parallel requests)", *svcWorkers)
}
