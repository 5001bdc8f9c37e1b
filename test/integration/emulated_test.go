package integration

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/ebpf-cni/ebpf-cni/internal/config"
)

// An emulated cluster: nodes are network namespaces on an underlay bridge
// (the "physical" L2 network, in the root namespace), each with its own
// bpffs instance for pins, its own state, IPAM data and conflist. The plugin
// runs inside a node by entering only its network namespace (nsenter
// --net): `ip netns exec` would remount /sys under it.

// underlay is the bridge joining the emulated nodes.
type underlay struct {
	bridge string
	net4   string // "10.255.0": node i is .i, the host .254
	net6   string // "fd00:255::": node i is ::i; empty for IPv4 only
}

// newUnderlay creates the bridge, with the host on it at .254 (and ::fe).
func newUnderlay(t *testing.T, u underlay) *underlay {
	t.Helper()
	// A run killed before its cleanup leaves the bridge (and the nodes'
	// namespaces, see addNode) behind: the names are ours, take them back.
	exec.Command("ip", "link", "del", u.bridge).Run()
	run(t, "ip", "link", "add", u.bridge, "type", "bridge")
	t.Cleanup(func() { exec.Command("ip", "link", "del", u.bridge).Run() })
	run(t, "ip", "addr", "add", u.net4+".254/24", "dev", u.bridge)
	if u.net6 != "" {
		run(t, "ip", "addr", "add", u.net6+"fe/64", "dev", u.bridge, "nodad")
	}
	run(t, "ip", "link", "set", u.bridge, "up")
	return &u
}

// emuNode is one emulated node.
type emuNode struct {
	name    string // n1, n2, ...
	ns      string // its network namespace
	dir     string // its state, IPAM data, conflist, bpffs mount and logs
	ip, ip6 netip.Addr
	net     *node // the ebpf-cni network as configured on this node
}

// addNode creates node i on u: namespace, veth to the bridge (eth0 inside),
// forwarding on, a bpffs instance, and an ebpf-cni conflist whose plugin
// entry plugin fills (pin root, state, IPAM data dir and log file are set
// here). tag keeps the names of concurrent clusters apart.
func (u *underlay) addNode(t *testing.T, tag string, i int, plugin config.Plugin) *emuNode {
	t.Helper()
	n := &emuNode{name: fmt.Sprintf("n%d", i), ns: fmt.Sprintf("ebt-%s-n%d", tag, i),
		dir: filepath.Join("/run", "ebt-"+tag, fmt.Sprintf("n%d", i)),
		ip:  netip.MustParseAddr(fmt.Sprintf("%s.%d", u.net4, i))}
	freshNetns(t, n.ns)
	up := fmt.Sprintf("ebt-%s-u%d", tag, i)
	run(t, "ip", "link", "add", up, "type", "veth", "peer", "name", "ebt-x", "netns", n.ns)
	run(t, "ip", "link", "set", up, "master", u.bridge, "up")
	run(t, "ip", "-n", n.ns, "link", "set", "ebt-x", "name", "eth0")
	run(t, "ip", "-n", n.ns, "addr", "add", n.ip.String()+"/24", "dev", "eth0")
	if u.net6 != "" {
		n.ip6 = netip.MustParseAddr(fmt.Sprintf("%s%x", u.net6, i))
		run(t, "ip", "-n", n.ns, "addr", "add", n.ip6.String()+"/64", "dev", "eth0", "nodad")
	}
	run(t, "ip", "-n", n.ns, "link", "set", "eth0", "up")
	run(t, "ip", "-n", n.ns, "link", "set", "lo", "up")
	run(t, "ip", "netns", "exec", n.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	bpf := filepath.Join(n.dir, "bpf")
	os.MkdirAll(bpf, 0o700)
	run(t, "mount", "-t", "bpf", "bpffs", bpf)
	t.Cleanup(func() {
		exec.Command("umount", "-l", bpf).Run()
		os.RemoveAll(n.dir)
		os.Remove(filepath.Dir(n.dir)) // the cluster's dir, once its last node is gone
	})

	n.net = &node{
		t: t, name: "ebt-" + tag, pinRoot: filepath.Join(bpf, "ebpf-cni"), stateDir: filepath.Join(n.dir, "state"),
		ipamDir: filepath.Join(n.dir, "ipam"), confDir: filepath.Join(n.dir, "net.d"), version: "1.1.0", cniPath: cniPath,
	}
	plugin.Type = config.PluginType
	plugin.PinRoot, plugin.StateDir, plugin.LogFile = n.net.pinRoot, n.net.stateDir, filepath.Join(n.dir, "ebpf-cni.log")
	if ipam, ok := plugin.IPAM.(*config.IPAM); ok {
		cp := *ipam
		cp.DataDir = n.net.ipamDir
		plugin.IPAM = &cp
	}
	n.net.plugin = plugin
	n.net.writeConflist()
	t.Cleanup(func() {
		if t.Failed() {
			if b, err := os.ReadFile(plugin.LogFile); err == nil {
				t.Logf("%s plugin log (last 3 KiB):\n%s", n.name, tail(b, 3000))
			}
		}
	})
	return n
}

// exec runs a command inside the node's network namespace only.
func (n *emuNode) exec(args ...string) *exec.Cmd {
	return exec.Command("nsenter", append([]string{"--net=/run/netns/" + n.ns}, args...)...)
}

// cnitool runs inside the node's network namespace only (env: more
// variables, such as CNI_ARGS).
func (n *emuNode) cnitool(verb string, p *pod, env ...string) ([]byte, error) {
	cmd := n.exec(cnitool, verb, n.net.name, p.path)
	cmd.Env = append(append(os.Environ(), "CNI_PATH="+cniPath, "NETCONFPATH="+n.net.confDir), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("cnitool %s on %s: %w: %s", verb, n.name, err, out)
	}
	return out, nil
}

// addPod wires pod k of the node; DEL and the namespace's removal are
// registered for the end of the test. env is passed to cnitool (CNI_ARGS
// naming the Kubernetes pod).
func (n *emuNode) addPod(t *testing.T, k int, env ...string) *pod {
	t.Helper()
	name := fmt.Sprintf("%s-p%d", n.ns, k)
	freshNetns(t, name)
	p := &pod{n: n.net, ns: name, path: "/var/run/netns/" + name}
	t.Cleanup(func() { n.cnitool("del", p, env...) }) // before the namespace goes
	out, err := n.cnitool("add", p, env...)
	if err != nil {
		t.Fatal(err)
	}
	p.setResult(t, out)
	return p
}

// inspect is `ebpf-cni inspect` of the node.
func (n *emuNode) inspect(t *testing.T) inspected {
	t.Helper()
	out, err := n.exec(filepath.Join(binDir, "ebpf-cni"), "inspect", "--json",
		"--pin-root", n.net.pinRoot, "--state-dir", n.net.stateDir, "--ipam-dir", n.net.ipamDir).Output()
	if err != nil {
		t.Fatalf("inspect on %s: %v: %s", n.name, err, out)
	}
	return decodeInspect(t, out)
}

func run(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%v: %v: %s", args, err, out)
	}
}
