package integration

import (
	"encoding/json"

	"net/netip"
	"os"
	"os/exec"
	"slices"

	"strings"
	"testing"
	"time"

	"github.com/ebpf-cni/ebpf-cni/internal/veth"
)

// rateMbit is the limit the bandwidth plugin puts on the shaped pod.
const rateMbit = 100

// refPlugins are the reference plugins built from the Go module proxy by
// scripts/deps.sh (Debian ships 1.1.1, whose portmap and bandwidth CHECK are
// broken: see TestChainPortmapBandwidthTuning/debian).
const refPlugins = "/usr/local/lib/ebpf-cni/cni-plugins"

// A conflist ebpf-cni -> portmap -> bandwidth -> tuning, as a runtime with
// hostPort and bandwidth annotations drives it (capabilities via CAP_ARGS),
// with the current reference plugins and with Debian's.
func TestChainPortmapBandwidthTuning(t *testing.T) {
	t.Run("v1.9.0", func(t *testing.T) { chain(t, refPlugins, "1.1.0", true) })
	t.Run("debian", func(t *testing.T) { chain(t, "/usr/lib/cni", "1.0.0", false) })
}

// chain runs the chained conflist with the reference plugins in dir. With
// strictCheck false, the CHECK failure of Debian's 1.1.1 portmap is tolerated
// by its exact message: it looks for the same DNAT rules in iptables and
// ip6tables.
func chain(t *testing.T, dir, version string, strictCheck bool) {
	if _, err := os.Stat(dir + "/portmap"); err != nil {
		t.Fatalf("reference plugins missing in %s (make test installs them): %v", dir, err)
	}
	n := newNode(t, map[string]any{"ranges": [][]map[string]string{{{"subnet": "10.250.0.0/24"}}, {{"subnet": "fd00:250::/120"}}}})
	n.version = version
	n.cniPath = binDir + ":" + dir
	n.plugin.Capabilities = map[string]bool{"bandwidth": true}
	n.writeConflist(
		map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}},
		map[string]any{"type": "bandwidth", "capabilities": map[string]bool{"bandwidth": true}},
		map[string]any{"type": "tuning", "sysctl": map[string]string{"net.core.somaxconn": "512"}},
	)
	out := outside(t, n, "203.0.113.1/24", "203.0.113.2/24")
	shaped, plain := n.newNS(), n.newNS()
	bw := map[string]uint64{
		"ingressRate": rateMbit * 1e6, "ingressBurst": 1e6,
		"egressRate": rateMbit * 1e6, "egressBurst": 1e6,
	}
	capArgs, _ := json.Marshal(map[string]any{
		"portMappings": []map[string]any{{"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}},
		"bandwidth":    bw,
	})
	res, err := n.cnitoolEnv("add", shaped, "CAP_ARGS="+string(capArgs))
	if err != nil {
		t.Fatal(err)
	}
	shaped.setResult(t, res)
	n.add(plain)
	cidShaped, cidPlain := shaped.containerID(), plain.containerID()

	// tuning ran in the pod.
	if got, _ := shaped.run("cat", "/proc/sys/net/core/somaxconn"); strings.TrimSpace(string(got)) != "512" {
		t.Errorf("somaxconn in the pod = %q, want 512 (tuning)", got)
	}
	// hostPort from beyond the node and from another pod (hairpin via the host).
	hostPort := netip.MustParseAddrPort("203.0.113.1:18080")
	podPort := netip.AddrPortFrom(shaped.ip(false), 8080)
	if err := tcpVia(out.path, shaped.path, podPort, hostPort, nil); err != nil {
		t.Errorf("outside -> hostPort: %v", err)
	}
	if err := tcpVia(plain.path, shaped.path, podPort, hostPort, nil); err != nil {
		t.Errorf("pod -> hostPort of a pod on the same node: %v", err)
	}
	// CHECK through the whole chain. For a pod without limits, bandwidth's
	// CHECK dereferences a nil config (1.1.1 and 1.9.0 alike): only that
	// panic is tolerated, after ebpf-cni, portmap and tuning passed.
	if _, err := n.cnitool("check", plain, ""); err != nil && !strings.Contains(err.Error(), "bandwidth/main.go") {
		t.Errorf("CHECK through the chain (no port mappings, no limit): %v", err)
	}
	if _, err := n.cnitoolEnv("check", shaped, "CAP_ARGS="+string(capArgs)); err != nil &&
		(strictCheck || !strings.Contains(err.Error(), "could not check ipv6 dnat")) {
		t.Errorf("CHECK through the chain: %v", err)
	}

	// The limit holds pod to pod on the same node, both ways.
	for _, dir := range []struct {
		name     string
		from, to *pod
	}{{"into the shaped pod", plain, shaped}, {"out of the shaped pod", shaped, plain}} {
		got := iperfMbit(t, dir.from, dir.to)
		if got < rateMbit*0.9 || got > rateMbit*1.1 {
			t.Errorf("pod-to-pod %s: %.1f Mbit/s, want %d ±10%%", dir.name, got, rateMbit)
		} else {
			t.Logf("pod-to-pod %s: %.1f Mbit/s (limit %d)", dir.name, got, rateMbit)
		}
	}
	if hp := n.inspect()[shaped.ip(false)].Counters.HostPathPackets; hp == 0 {
		t.Errorf("shaped pod's traffic never took the host path")
	}
	// Unshaped pods keep the fast path.
	if got := iperfMbit(t, plain, plain2(t, n)); got < rateMbit*5 {
		t.Errorf("unshaped pod-to-pod only %.1f Mbit/s: the limit leaked to other pods", got)
	}

	ifbs := ifbDevices(t)
	if len(ifbs) == 0 {
		t.Errorf("no ifb device: the bandwidth plugin shaped nothing")
	}
	if _, err := n.cnitoolEnv("del", shaped, "CAP_ARGS="+string(capArgs)); err != nil {
		t.Fatal(err)
	}
	n.del(plain)
	n.assertGone(veth.HostName(cidShaped, "eth0"), cidShaped, shaped.ips)
	n.assertGone(veth.HostName(cidPlain, "eth0"), cidPlain, plain.ips)
	left := ifbDevices(t)
	for _, name := range ifbs {
		if slices.Contains(left, name) {
			t.Errorf("bandwidth's ifb device %s left after DEL", name)
		}
	}
	if rules, _ := exec.Command("iptables-save", "-t", "nat").Output(); strings.Contains(string(rules), cidShaped) {
		t.Errorf("portmap rules of %s left after DEL", cidShaped)
	}
}

// plain2 is a second unshaped pod on the node.
func plain2(t *testing.T, n *node) *pod {
	p := n.newNS()
	n.add(p)
	t.Cleanup(func() { n.cnitool("del", p, "") })
	return p
}

// iperfMbit runs iperf3 from one pod to another for 3 s and returns the
// received rate.
func iperfMbit(t *testing.T, from, to *pod) float64 {
	t.Helper()
	srv := exec.Command("ip", "netns", "exec", to.ns, "iperf3", "-s", "-1", "-B", to.ip(false).String(), "-p", "5299")
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer srv.Process.Kill()
	var outb []byte
	var err error
	for i := 0; i < 20; i++ {
		time.Sleep(100 * time.Millisecond)
		outb, err = from.run("iperf3", "-c", to.ip(false).String(), "-p", "5299", "-t", "3", "-J")
		if err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("iperf3 %s -> %s: %v\n%s", from.ns, to.ns, err, outb)
	}
	srv.Wait()
	var res struct {
		End struct {
			SumReceived struct {
				BPS float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(outb, &res); err != nil {
		t.Fatalf("iperf3 output: %v", err)
	}
	return res.End.SumReceived.BPS / 1e6
}

func ifbDevices(t *testing.T) []string {
	out, _ := exec.Command("ip", "-o", "link", "show", "type", "ifb").Output()
	var names []string
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 1 && strings.HasPrefix(f[1], "bwp") {
			names = append(names, strings.TrimSuffix(f[1], ":"))
		}
	}
	return names
}
