package routes

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/ebpf-cni/ebpf-cni/internal/node"
)

// recorder is a Dataplane that keeps the plans it was given.
type recorder struct{ plans []Plan }

func (r *recorder) Apply(p Plan) (int, int, error) {
	r.plans = append(r.plans, p)
	return len(p.Peers), 0, nil
}

func (r *recorder) PodMTU(p Plan) (int, error) {
	if p.Mode == VXLAN {
		return 1450, nil
	}
	return 1500, nil
}

func (r *recorder) last() Plan { return r.plans[len(r.plans)-1] }

func mkNode(name string, ips []string, cidrs ...string) *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: corev1.NodeSpec{PodCIDRs: cidrs}}
	if len(cidrs) > 0 {
		n.Spec.PodCIDR = cidrs[0]
	}
	for _, ip := range ips {
		n.Status.Addresses = append(n.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: ip})
	}
	return n
}

func pfx(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

// start runs a controller for node self over a fake API holding nodes.
func start(t *testing.T, mode Mode, self string, nodes ...*corev1.Node) (*Controller, *recorder, *fake.Clientset, *prometheus.Registry) {
	t.Helper()
	client := fake.NewClientset()
	for _, n := range nodes {
		if _, err := client.CoreV1().Nodes().Create(context.Background(), n, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	factory := informers.NewSharedInformerFactory(client, 0)
	rec := &recorder{}
	reg := prometheus.NewRegistry()
	c, err := New(slog.New(slog.NewTextHandler(io.Discard, nil)), factory, rec,
		Config{NodeName: self, Mode: mode, StateDir: t.TempDir(), Resync: time.Hour}, reg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	factory.Start(ctx.Done())
	factory.WaitForCacheSync(ctx.Done())
	return c, rec, client, reg
}

// Node objects in, routes (peers) and the plugin's node file out.
func TestNodesToRoutes(t *testing.T) {
	nodes := []*corev1.Node{
		mkNode("n1", []string{"10.255.0.1", "fd00:ff::1"}, "10.244.1.0/24", "fd00:10:244:1::/64"),
		mkNode("n2", []string{"10.255.0.2", "fd00:ff::2"}, "10.244.2.0/24", "fd00:10:244:2::/64"),
		mkNode("n3", []string{"10.255.0.3"}, "10.244.3.0/24"),
		mkNode("stale", []string{"10.255.0.9"}, "10.244.1.0/25"), // claims n1's range: ignored
		mkNode("pending", []string{"10.255.0.4"}),                // no podCIDR yet: no route
	}
	c, rec, client, reg := start(t, Native, "n1", nodes...)
	if err := c.Reconcile(); err != nil {
		t.Fatalf("Reconcile: %v", err)
	}
	want := []Peer{
		{Name: "n2", NodeIP: netip.MustParseAddr("10.255.0.2"), PodCIDRs: pfx("10.244.2.0/24")},
		{Name: "n2", NodeIP: netip.MustParseAddr("fd00:ff::2"), PodCIDRs: pfx("fd00:10:244:2::/64")},
		{Name: "n3", NodeIP: netip.MustParseAddr("10.255.0.3"), PodCIDRs: pfx("10.244.3.0/24")},
	}
	p := rec.last()
	if !reflect.DeepEqual(p.Peers, want) {
		t.Errorf("peers = %+v\nwant %+v", p.Peers, want)
	}
	if p.LocalIP != netip.MustParseAddr("10.255.0.1") || !reflect.DeepEqual(p.Local, pfx("10.244.1.0/24", "fd00:10:244:1::/64")) {
		t.Errorf("local = %s %v", p.LocalIP, p.Local)
	}
	info, err := node.Read(c.cfg.StateDir)
	if err != nil {
		t.Fatalf("node file: %v", err)
	}
	if info.Name != "n1" || !reflect.DeepEqual(info.PodCIDRs, pfx("10.244.1.0/24", "fd00:10:244:1::/64")) || info.MTU != 1500 {
		t.Errorf("node file = %+v", info)
	}
	if err := c.Healthy(); err != nil {
		t.Errorf("Healthy after a good reconcile: %v", err)
	}
	if got := testutil.ToFloat64(c.m.peerCIDRs.WithLabelValues("n2", "10.255.0.2", "native")); got != 1 {
		t.Errorf("peer metric of n2 = %v, want 1", got)
	}
	if n, err := testutil.GatherAndCount(reg, "ebpf_cni_agent_syncs_total"); err != nil || n != 1 {
		t.Errorf("syncs metric: %d series, %v", n, err)
	}

	// A node deleted from the API loses its routes at the next reconcile.
	if err := client.CoreV1().Nodes().Delete(context.Background(), "n3", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if err := c.Reconcile(); err != nil {
			t.Fatal(err)
		}
		if len(rec.last().Peers) == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("n3 still routed after its deletion: %+v", rec.last().Peers)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// VXLAN: one peer per node and podCIDR family through any node address;
// IPv6 pod ranges ride the overlay too.
func TestNodesToRoutesVXLAN(t *testing.T) {
	c, rec, _, _ := start(t, VXLAN, "n1",
		mkNode("n1", []string{"10.255.0.1"}, "10.244.1.0/24", "fd00:10:244:1::/64"),
		mkNode("n2", []string{"10.255.0.2"}, "10.244.2.0/24", "fd00:10:244:2::/64"))
	if err := c.Reconcile(); err != nil {
		t.Fatal(err)
	}
	p := rec.last()
	if len(p.Peers) != 2 || p.Peers[0].NodeIP != netip.MustParseAddr("10.255.0.2") || p.Peers[1].NodeIP != netip.MustParseAddr("10.255.0.2") ||
		!reflect.DeepEqual(p.PodCIDRs, pfx("10.244.1.0/24", "fd00:10:244:1::/64")) {
		t.Errorf("plan = %+v", p)
	}
	if !reflect.DeepEqual(p.Peers[1].PodCIDRs, pfx("fd00:10:244:2::/64")) {
		t.Errorf("IPv6 podCIDR of n2 not carried over the IPv4 underlay: %+v", p.Peers)
	}
	if info, err := node.Read(c.cfg.StateDir); err != nil || info.MTU != 1450 {
		t.Errorf("node file = %+v, %v; want MTU 1450", info, err)
	}
}

// A node without podCIDR is unhealthy and writes no node file, but keeps
// its routes to the others; an unknown node applies nothing.
func TestNodesNotReady(t *testing.T) {
	c, rec, _, _ := start(t, Native, "n1",
		mkNode("n1", []string{"10.255.0.1"}),
		mkNode("n2", []string{"10.255.0.2"}, "10.244.2.0/24"))
	err := c.Reconcile()
	if err == nil || !strings.Contains(err.Error(), "no podCIDR") {
		t.Fatalf("Reconcile = %v, want a no-podCIDR error", err)
	}
	if c.Healthy() == nil {
		t.Error("healthy without a podCIDR")
	}
	if len(rec.plans) != 1 || len(rec.last().Peers) != 1 {
		t.Errorf("routes not kept: %+v", rec.plans)
	}
	if _, err := node.Read(c.cfg.StateDir); err == nil {
		t.Error("node file written without a podCIDR")
	}

	c2, rec2, _, _ := start(t, Native, "ghost", mkNode("n2", []string{"10.255.0.2"}, "10.244.2.0/24"))
	if err := c2.Reconcile(); err == nil || !strings.Contains(err.Error(), "not found") {
		t.Errorf("Reconcile for a missing node = %v", err)
	}
	if len(rec2.plans) != 0 {
		t.Errorf("applied a plan for a node the API does not know: %+v", rec2.plans)
	}
}

func TestModeValidated(t *testing.T) {
	_, err := New(slog.Default(), informers.NewSharedInformerFactory(fake.NewClientset(), 0), &recorder{},
		Config{NodeName: "n", Mode: "ipip"}, prometheus.NewRegistry())
	if err == nil || !strings.Contains(err.Error(), "ipip") {
		t.Errorf("New with mode ipip = %v, want an error naming it", err)
	}
}
