package maps_test

import (
	"net/netip"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ebpf-cni/ebpf-cni/internal/agent/policy"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
)

func policyPod(ns, name string, ip netip.Addr, app string, port int32) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"app": app}},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "c", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: port}}}}},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIPs: []corev1.PodIP{{IP: ip.String()}}},
	}
}

// The policy programs on crafted frames, with maps the agent's compiler
// filled from NetworkPolicy objects: allowed and denied flows, a named
// port, replies of an allowed connection, what the host delivers, a
// pending pod, and the counters and drop events.
func TestPolicyVerdicts(t *testing.T) {
	objs, m := load(t) // the test pod podIP on ifindex 1, peerIP behind 42
	withCluster(t, m)
	must(t, m.PutDevice(42, maps.Device{PodMAC: peerPod, HostMAC: peerHost, IPv4: peerIP}))
	must(t, m.PutEndpoint(maps.Endpoint{IP: podIP, Ifindex: testIfindex, PodMAC: podMAC, HostMAC: hostMAC}))
	node := netip.MustParseAddr("192.168.0.10")
	named := intstr.FromString("http")
	tcp := corev1.ProtocolTCP
	st, errs := policy.NewCompiler().Compile(policy.Input{
		Pods: []*corev1.Pod{policyPod("x", "web", podIP, "web", 8080), policyPod("x", "db", peerIP, "db", 9090),
			policyPod("y", "far", remotePod, "web", 8080)},
		Namespaces: []*corev1.Namespace{{ObjectMeta: metav1.ObjectMeta{Name: "x"}}, {ObjectMeta: metav1.ObjectMeta{Name: "y"}}},
		Policies: []*networkingv1.NetworkPolicy{
			// db: from web pods of x, on the port they call "http".
			{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "db"}, Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "db"}},
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{
					From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}}}},
					Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &named}}}}}},
			// web: nothing comes in.
			{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "web"}, Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}}},
		},
		Locals: []policy.Local{{Namespace: "x", Name: "web", Ifindex: testIfindex, IPs: []netip.Addr{podIP}},
			{Namespace: "x", Name: "db", Ifindex: 42, IPs: []netip.Addr{peerIP}}},
		NodeAddrs: []netip.Addr{node},
	})
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	must(t, policy.NewApplier(m).Apply(st, []int{testIfindex, 42}))
	events, err := m.Events()
	must(t, err)
	defer events.Close()

	const syn, synack = 0x02, 0x12
	const anyButShot = 0xffff // a verdict that lets it go, whichever
	cases := []struct {
		name  string
		prog  string
		frame []byte
		want  uint32
	}{
		{"web -> db on db's named port http (9090): allowed", "from_pod", tcpFrame(hostMAC, podMAC, podIP, peerIP, 40000, 9090, syn), actRedirect},
		{"web -> db on 8080 (web's http, not db's): denied", "from_pod", tcpFrame(hostMAC, podMAC, podIP, peerIP, 40001, 8080, syn), actShot},
		{"the allowed flow's next segment", "from_pod", tcpFrame(hostMAC, podMAC, podIP, peerIP, 40000, 9090, 0x10), actRedirect},
		{"a pod of another node -> web: denied", "from_node", tcpFrame(lo, peerHost, remotePod, podIP, 50000, 80, syn), actShot},
		{"web -> that pod (egress is open): tracked", "from_pod", tcpFrame(hostMAC, podMAC, podIP, remotePod, 40002, 80, syn), anyButShot},
		{"its reply: allowed, web's ingress isolation or not", "from_node", tcpFrame(lo, peerHost, remotePod, podIP, 80, 40002, synack), actRedirect},
		// (to_pod's judgement of what the host delivers is tested with real
		// packets in test/integration: a test run's packet always carries a
		// socket, which to_pod takes for one of the host's.)
	}
	for _, c := range cases {
		var got uint32
		switch c.prog {
		case "from_pod":
			got, _ = run(t, objs.FromPod, c.frame)
		case "from_node":
			got, _ = run(t, objs.FromNode, c.frame)
		case "to_pod":
			got, _ = run(t, objs.ToPod, c.frame)
		}
		if got != c.want && (c.want != anyButShot || got == actShot) {
			t.Errorf("%s: verdict %d, want %d", c.name, int32(got), int32(c.want))
		}
	}
	db, err := m.PolicyStats(42)
	must(t, err)
	web, err := m.PolicyStats(testIfindex)
	must(t, err)
	if db.IngressAllowed != 1 || db.IngressDenied != 1 || web.IngressDenied != 1 || web.EgressAllowed != 2 {
		t.Errorf("counters: db %+v, web %+v; want db 1 allowed 1 denied, web 1 ingress denied, 2 egress allowed", db, web)
	}
	// Why: the drop events, in order.
	want := []struct {
		dir uint8
		src string
	}{{maps.Ingress, podIP.String() + ":40001"}, {maps.Ingress, remotePod.String() + ":50000"}}
	for i, w := range want {
		events.SetDeadline(time.Now().Add(time.Second))
		ev, err := events.Read()
		if err != nil {
			t.Fatalf("event %d: %v", i, err)
		}
		if ev.Dir != w.dir || ev.Src.String() != w.src || ev.Pending {
			t.Errorf("event %d: %+v, want ingress from %s for policy", i, ev, w.src)
		}
	}

	// A pod not programmed yet (pending): its node only.
	must(t, m.PutEPPolicy(testIfindex, maps.EPPolicy{Flags: maps.PolPending}))
	if got, _ := run(t, objs.FromPod, tcpFrame(hostMAC, podMAC, podIP, node, 40004, 10250, syn)); got == actShot {
		t.Errorf("pending pod, to its node: dropped")
	}
	if got, _ := run(t, objs.FromPod, tcpFrame(hostMAC, podMAC, podIP, peerIP, 40003, 9090, syn)); got != actShot {
		t.Errorf("pending pod, to a peer: verdict %d, want dropped", int32(got))
	}
	events.SetDeadline(time.Now().Add(time.Second))
	if ev, err := events.Read(); err != nil || !ev.Pending || ev.Dir != maps.Egress {
		t.Errorf("pending drop event: %+v %v", ev, err)
	}
}
