package integration

import (
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/ebpf-cni/ebpf-cni/internal/agent/services"
	"github.com/ebpf-cni/ebpf-cni/internal/loader"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
)

// newCgroup makes a cgroup v2 directory named ebt-<name> for the test's
// processes (below parent, a path relative to the hierarchy's root; "" for
// the root), removed at its end (after they are gone).
func newCgroup(t *testing.T, parent, name string) (dir string, fd int) {
	t.Helper()
	root, err := loader.CgroupRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir = filepath.Join(root, parent, "ebt-"+strings.ToLower(nonAlnum.ReplaceAllString(name, "")))
	os.Remove(dir) // a killed run's, empty by now
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		f.Close()
		// Its processes are gone by now (killed by their own cleanups).
		for range 50 {
			if err := os.Remove(dir); err == nil || os.IsNotExist(err) {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Errorf("test cgroup %s left behind", dir)
	})
	return dir, int(f.Fd())
}

// testCgroup is a cgroup for one test with the socket programs of pinRoot
// attached: the test's clients run in it.
func testCgroup(t *testing.T, pinRoot string) (dir string, fd int) {
	t.Helper()
	dir, fd = newCgroup(t, "", t.Name())
	t.Cleanup(func() { loader.DetachCgroup(pinRoot) })
	progs, err := loader.Open(pinRoot)
	if err != nil {
		t.Fatal(err)
	}
	defer progs.Close()
	if err := progs.AttachCgroup(dir); err != nil {
		t.Fatal(err)
	}
	return dir, fd
}

// probeCmd is `ebpf-cni-agent probe args...` in p's namespace (the host's
// when p is nil), inside the cgroup cg (none when cg < 0).
func probeCmd(p *pod, cg int, args ...string) *exec.Cmd {
	argv := append([]string{filepath.Join(binDir, "ebpf-cni-agent"), "probe"}, args...)
	if p != nil {
		argv = append([]string{"ip", "netns", "exec", p.ns}, argv...)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	if cg >= 0 {
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: cg}
	}
	return cmd
}

// serveIn starts a probe server in p until the test ends.
func serveIn(t *testing.T, p *pod, args ...string) {
	t.Helper()
	cmd := probeCmd(p, -1, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	time.Sleep(200 * time.Millisecond) // listening
	if cmd.ProcessState != nil {
		t.Fatalf("probe %v in %s exited: %s", args, p.ns, out.String())
	}
}

// svcObjects are a Service and its EndpointSlice as the API would hold
// them, for services.Desired.
func svcObjects(name, vip string, ports []corev1.ServicePort, targets map[string]int32, backends ...netip.Addr) (*corev1.Service, []*discoveryv1.EndpointSlice) {
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeClusterIP, ClusterIP: vip, ClusterIPs: []string{vip}, Ports: ports}}
	es := &discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name + "-1",
		Labels: map[string]string{discoveryv1.LabelServiceName: name}}, AddressType: discoveryv1.AddressTypeIPv4}
	for _, p := range ports {
		es.Ports = append(es.Ports, discoveryv1.EndpointPort{Name: ptr.To(p.Name), Port: ptr.To(targets[p.Name]), Protocol: ptr.To(p.Protocol)})
	}
	for _, b := range backends {
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{b.String()}})
	}
	return svc, []*discoveryv1.EndpointSlice{es}
}

// ClusterIPs through the socket programs, with pods wired by the plugin:
// TCP and UDP reach the backends on the pod-to-pod fast path (no host
// path, no NAT), UDP datagrams larger than the MTU go both ways in
// fragments, a refused UDP port behind the Service and a Service without
// endpoints are reported to the client at once.
func TestServicesSocketLB(t *testing.T) {
	n := newNode(t, nil)
	n.writeConflist()
	a, b, c := n.newNS(), n.newNS(), n.newNS()
	n.add(a)
	n.add(b)
	n.add(c)
	_, cg := testCgroup(t, n.pinRoot)
	m, err := maps.Open(n.pinRoot)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	ap := services.NewApplier(m)
	program := func(svc *corev1.Service, eps []*discoveryv1.EndpointSlice) {
		t.Helper()
		want, _ := services.Desired(svc, eps, "")
		if err := ap.Apply(svc.Namespace+"/"+svc.Name, want); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []*pod{b, c} {
		serveIn(t, p, "serve", ":8080")
		serveIn(t, p, "udp-serve", ":5353", "3000")
	}
	program(svcObjects("web", "172.31.100.10",
		[]corev1.ServicePort{{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP}, {Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP}},
		map[string]int32{"http": 8080, "dns": 5353}, b.ip(false), c.ip(false)))
	program(svcObjects("closed", "172.31.100.11", []corev1.ServicePort{{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP}},
		map[string]int32{"dns": 5999}, b.ip(false)))
	program(svcObjects("empty", "172.31.100.12", []corev1.ServicePort{{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP}}, nil))

	before := n.inspect()[a.ip(false)].Counters
	seenBackends := map[string]bool{}
	for i := range 20 {
		out, err := probeCmd(a, cg, "dial", "172.31.100.10:80").CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != a.ip(false).String() {
			t.Fatalf("pod -> ClusterIP, connection %d: %v %q (want the server to see %s)", i, err, out, a.ip(false))
		}
		out, err = probeCmd(a, cg, "udp-dial", "172.31.100.10:53", "2000").CombinedOutput()
		f := strings.Fields(string(out))
		if err != nil || len(f) != 3 || f[0] != "3000" || f[1] != a.ip(false).String() || f[2] != "172.31.100.10:53" {
			t.Fatalf("pod -> ClusterIP UDP, 2000 bytes out, 3000 back (fragments both ways): %v %q", err, out)
		}
		seenBackends[f[1]] = true
	}
	after := n.inspect()[a.ip(false)].Counters
	if after.RedirectPackets-before.RedirectPackets < 20*4 {
		t.Errorf("Service traffic redirected %d packets, want the fast path for all of it", after.RedirectPackets-before.RedirectPackets)
	}
	if after.HostPathPackets != before.HostPathPackets {
		t.Errorf("%d Service packets took the host path", after.HostPathPackets-before.HostPathPackets)
	}
	// Directly, the same sizes both ways.
	if out, err := probeCmd(a, -1, "udp-dial", netip.AddrPortFrom(b.ip(false), 5353).String(), "2000").CombinedOutput(); err != nil ||
		!strings.HasPrefix(string(out), "3000 ") {
		t.Errorf("pod -> pod UDP in fragments: %v %q", err, out)
	}
	start := time.Now()
	if out, err := probeCmd(a, cg, "udp-dial", "172.31.100.11:53", "100").CombinedOutput(); err == nil || !strings.Contains(string(out), "connection refused") {
		t.Errorf("UDP to a ClusterIP whose backend port is closed: %v %q, want connection refused", err, out)
	}
	if out, err := probeCmd(a, cg, "dial", "172.31.100.12:80").CombinedOutput(); err == nil || !strings.Contains(string(out), "connection refused") {
		t.Errorf("TCP to a ClusterIP without endpoints: %v %q, want connection refused", err, out)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("the refusals took %s, want at once", d)
	}
	// The host's processes (in the cgroup) reach the Service too.
	if out, err := probeCmd(nil, cg, "dial", "172.31.100.10:80").CombinedOutput(); err != nil {
		t.Errorf("host -> ClusterIP: %v %q", err, out)
	}
	// Scaled down to c: no connection reaches b afterwards.
	program(svcObjects("web", "172.31.100.10",
		[]corev1.ServicePort{{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP}, {Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP}},
		map[string]int32{"http": 8080, "dns": 5353}, c.ip(false)))
	bBefore := n.inspect()[b.ip(false)].Counters.ToPodPackets
	for range 10 {
		if out, err := probeCmd(a, cg, "dial", "172.31.100.10:80").CombinedOutput(); err != nil {
			t.Fatalf("after scale-down: %v %q", err, out)
		}
	}
	if got := n.inspect()[b.ip(false)].Counters.ToPodPackets; got != bBefore {
		t.Errorf("the removed backend received %d packets after the scale-down", got-bBefore)
	}
	// Deleted: refused at once.
	if err := ap.Apply("default/web", nil); err != nil {
		t.Fatal(err)
	}
	if out, err := probeCmd(a, cg, "dial", "172.31.100.10:80").CombinedOutput(); err == nil {
		t.Errorf("a deleted Service still answers: %q", out)
	}
	sv := n.report().Services
	if sv.Counters.SockTranslated < 40 || sv.Counters.SockRefused < 1 || sv.Frontends != 4 || sv.Backends != 1 {
		t.Errorf("inspect services: %+v, want 4 frontends (the two Services left: their addresses and ports), 1 backend, >= 40 translated, >= 1 refused", sv)
	}
}

// The kube-proxy path (a Service the host DNATs, and its replies through
// the host): UDP datagrams larger than the MTU in both directions, and a
// closed backend port reported to the client through the Service address
// (the ICMP error goes through conntrack, which translates it back).
func TestServiceDNATFragmentsAndErrors(t *testing.T) {
	n := newNode(t, nil)
	n.writeConflist()
	a, b := n.newNS(), n.newNS()
	n.add(a)
	n.add(b)
	serveIn(t, b, "udp-serve", ":5353", "3000")
	table := strings.ReplaceAll(n.name, "-", "_") + "_svc"
	script := fmt.Sprintf("table ip %s {\n chain pre {\n  type nat hook prerouting priority dstnat;\n"+
		"  ip daddr 172.31.96.10 udp dport 53 dnat to %s:5353\n  ip daddr 172.31.96.11 udp dport 53 dnat to %s:5999\n }\n}\n",
		table, b.ip(false), b.ip(false))
	cmd := exec.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("nft", "delete", "table", "ip", table).Run() })
	for i := range 5 {
		out, err := probeCmd(a, -1, "udp-dial", "172.31.96.10:53", "2000").CombinedOutput()
		if f := strings.Fields(string(out)); err != nil || len(f) != 3 || f[0] != "3000" || f[2] != "172.31.96.10:53" {
			t.Fatalf("pod -> DNAT Service UDP in fragments, try %d: %v %q", i, err, out)
		}
	}
	// b has host-delivered flows now; a direct fragmented exchange between
	// the same pods must still arrive whole.
	if out, err := probeCmd(a, -1, "udp-dial", netip.AddrPortFrom(b.ip(false), 5353).String(), "2000").CombinedOutput(); err != nil ||
		!strings.HasPrefix(string(out), "3000 ") {
		t.Errorf("direct pod -> pod UDP in fragments after Service flows: %v %q", err, out)
	}
	if out, err := probeCmd(a, -1, "udp-dial", "172.31.96.11:53", "100").CombinedOutput(); err == nil || !strings.Contains(string(out), "connection refused") {
		t.Errorf("UDP to a DNAT Service whose backend port is closed: %v %q, want connection refused", err, out)
	}
}
