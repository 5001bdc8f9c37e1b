//go:build e2e

package integration

import (
	"context"
	"io"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

// Services without kube-proxy on the emulated cluster: each node's agent
// runs the services controller, its socket programs on the node's own
// cgroup (cgroup hooks are per machine, not per network namespace: a
// cgroup per emulated node keeps one node's Services away from the
// others' processes). A ClusterIP whose only backend is on the other node,
// TCP and UDP in fragments, kubernetes.default, a NodePort reached from
// outside (the host on the underlay) with externalTrafficPolicy Cluster
// and Local, and a deleted Service refused at once.
func TestMultiNodeServices(t *testing.T) {
	c := startCluster(t)
	n1, n2 := c.addNode(t, 1), c.addNode(t, 2)
	cg := map[*mnNode]int{}
	for _, n := range []*mnNode{n1, n2} {
		dir, fd := newCgroup(t, "", t.Name()+n.name)
		cg[n] = fd
		n.startAgent(t, "native", "-controllers", "routes,services", "-cgroup-root", dir)
	}
	for _, n := range []*mnNode{n1, n2} {
		waitFor(t, n.name+"'s routes", 30*time.Second, func() bool { return strings.Count(n.routes(), "\n") == 1 })
	}
	p1, p2 := n1.addPod(t, 1), n2.addPod(t, 1)
	serveIn(t, p2, "serve", ":8080")
	serveIn(t, p2, "udp-serve", ":5353", "3000")

	ctx := context.Background()
	svc, err := c.client.CoreV1().Services("default").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeNodePort, Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP},
			{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP},
		}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// No kubelet here: the slice the EndpointSlice controller would write.
	if _, err := c.client.DiscoveryV1().EndpointSlices("default").Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "web-1", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports: []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To(int32(8080)), Protocol: ptr.To(corev1.ProtocolTCP)},
			{Name: ptr.To("dns"), Port: ptr.To(int32(5353)), Protocol: ptr.To(corev1.ProtocolUDP)}},
		Endpoints: []discoveryv1.Endpoint{{Addresses: []string{p2.ip(false).String()}, NodeName: ptr.To(n2.name)}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	vip := svc.Spec.ClusterIP
	waitFor(t, "the ClusterIP to answer from n1's pod", 20*time.Second, func() bool {
		out, err := probeCmd(p1, cg[n1], "dial", vip+":80").CombinedOutput()
		return err == nil && strings.TrimSpace(string(out)) == p1.ip(false).String()
	})
	before := n1.inspect(t)
	out, err := probeCmd(p1, cg[n1], "udp-dial", vip+":53", "2000").CombinedOutput()
	if f := strings.Fields(string(out)); err != nil || len(f) != 3 || f[0] != "3000" || f[1] != p1.ip(false).String() || f[2] != vip+":53" {
		t.Errorf("ClusterIP UDP across nodes, fragments both ways: %v %q", err, out)
	}
	for _, e := range n1.inspect(t).Endpoints {
		for _, b := range before.Endpoints {
			// Both fragments of the datagram on the fast path, none on the host's.
			if e.IP == p1.ip(false) && b.IP == e.IP && (e.Counters.ToNodePackets-b.Counters.ToNodePackets < 2 ||
				e.Counters.ToNodeFallback != b.Counters.ToNodeFallback) {
				t.Errorf("Service traffic to the other node: %d packets on the fast path, %d through the host",
					e.Counters.ToNodePackets-b.Counters.ToNodePackets, e.Counters.ToNodeFallback-b.Counters.ToNodeFallback)
			}
		}
	}
	// The API server's own Service, from a pod: the bootstrap kube-proxy
	// would otherwise provide.
	kube, err := c.client.CoreV1().Services("default").Get(ctx, "kubernetes", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if out, err := probeCmd(p1, cg[n1], "connect", kube.Spec.ClusterIP+":443").CombinedOutput(); err != nil {
		t.Errorf("pod -> kubernetes.default (%s:443): %v %q", kube.Spec.ClusterIP, err, out)
	}

	// NodePort from outside the cluster: the host on the underlay. On n1
	// (backend elsewhere), masqueraded: the backend sees n1's address.
	np := svc.Spec.Ports[0].NodePort
	var nodeport netip.AddrPort
	waitFor(t, "the NodePort on n1 from outside", 20*time.Second, func() bool {
		nodeport = netip.AddrPortFrom(n1.ip, uint16(np))
		out, err := probeCmd(nil, -1, "dial", nodeport.String()).CombinedOutput()
		return err == nil && strings.TrimSpace(string(out)) == n1.ip.String()
	})
	// externalTrafficPolicy Local on n2, the backend's node: the client's
	// own address arrives.
	svc, err = c.client.CoreV1().Services("default").Get(ctx, "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	svc.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	if _, err := c.client.CoreV1().Services("default").Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	host := c.under.net4 + ".254"
	waitFor(t, "the NodePort on n2 to keep the client address", 20*time.Second, func() bool {
		out, err := probeCmd(nil, -1, "dial", netip.AddrPortFrom(n2.ip, uint16(np)).String()).CombinedOutput()
		return err == nil && strings.TrimSpace(string(out)) == host
	})

	resp, err := http.Get("http://" + n1.ip.String() + ":9610/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !regexp.MustCompile(`(?m)^ebpf_cni_agent_services [2-9]`).Match(body) ||
		!regexp.MustCompile(`(?m)^ebpf_cni_datapath_service_connections_total [1-9]`).Match(body) {
		t.Errorf("service metrics missing:\n%s", grepLines(body, "services|service_"))
	}

	// Deleted: refused at once (the address is in the Service range).
	if err := c.client.CoreV1().Services("default").Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the deleted Service to be refused", 10*time.Second, func() bool {
		out, err := probeCmd(p1, cg[n1], "dial", vip+":80").CombinedOutput()
		return err != nil && strings.Contains(string(out), "connection refused")
	})
	if t.Failed() {
		for _, n := range []*mnNode{n1, n2} {
			b, _ := os.ReadFile(filepath.Join(n.dir, "agent.log"))
			t.Logf("%s agent log:\n%s", n.name, tail(b, 4000))
		}
	}
}

func grepLines(b []byte, pattern string) string {
	re := regexp.MustCompile(pattern)
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if re.MatchString(l) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
