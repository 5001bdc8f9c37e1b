//go:build e2e

package integration

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// NetworkPolicy across nodes on the emulated cluster, with the agents'
// policy controllers on a real API server: a pod of namespace "target" on
// n1 admits only namespace "friends" (ingress) and may reach only it
// (egress); pods of "friends" and "strangers" on n2 check it both ways.
// A label change of a namespace takes effect within seconds.
func TestMultiNodePolicy(t *testing.T) {
	c := startCluster(t)
	n1, n2 := c.addNode(t, 1), c.addNode(t, 2)
	for _, n := range []*mnNode{n1, n2} {
		n.startAgent(t, "native", "-controllers", "routes,policy")
	}
	for _, n := range []*mnNode{n1, n2} {
		waitFor(t, n.name+"'s routes", 30*time.Second, func() bool { return strings.Count(n.routes(), "\n") == 1 })
	}
	ctx := context.Background()
	for name, team := range map[string]string{"target": "t", "friends": "a", "strangers": "b"} {
		if _, err := c.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{
			ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"team": team}}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		// No controller-manager here makes the service account pods need.
		if _, err := c.client.CoreV1().ServiceAccounts(name).Create(ctx, &corev1.ServiceAccount{
			ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// The policy first: ADD isolates the target pod until its agent
	// programmed it.
	if _, err := c.client.NetworkingV1().NetworkPolicies("target").Create(ctx, &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "friends-only"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{
				{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": "a"}}}}}},
			Egress: []networkingv1.NetworkPolicyEgressRule{{To: []networkingv1.NetworkPolicyPeer{
				{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": "a"}}}}}},
		},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// Pods: wired by the plugin (CNI_ARGS name them), and their objects in
	// the API (no kubelet here: their status written as a kubelet would).
	podOn := func(n *mnNode, k int, ns, name string) *pod {
		p := n.addPod(t, k, fmt.Sprintf("CNI_ARGS=K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s", ns, name))
		obj, err := c.client.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app": name}},
			Spec:       corev1.PodSpec{NodeName: n.name, Containers: []corev1.Container{{Name: "c", Image: "none"}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		obj.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: p.ip(false).String(), PodIPs: []corev1.PodIP{{IP: p.ip(false).String()}}}
		if _, err := c.client.CoreV1().Pods(ns).UpdateStatus(ctx, obj, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		serveIn(t, p, "serve", ":8080")
		return p
	}
	waitFor(t, "n1's agent to hand the plugin the namespaces with policies", 20*time.Second, func() bool {
		b, _ := os.ReadFile(filepath.Join(n1.net.stateDir, "policy.json"))
		return strings.Contains(string(b), `"target"`)
	})
	target := podOn(n1, 1, "target", "t")
	friend := podOn(n2, 1, "friends", "f")
	stranger := podOn(n2, 2, "strangers", "s")
	reaches := func(from, to *pod) bool {
		return probeCmd(from, -1, "dial", netip.AddrPortFrom(to.ip(false), 8080).String()).Run() == nil
	}
	waitFor(t, "friends -> target across nodes", 20*time.Second, func() bool { return reaches(friend, target) })
	for _, c := range []struct {
		what     string
		from, to *pod
		want     bool
	}{
		{"target -> friends (egress, across nodes)", target, friend, true},
		{"strangers -> target (ingress, across nodes)", stranger, target, false},
		{"target -> strangers (egress, across nodes)", target, stranger, false},
		{"friends -> strangers (neither isolated)", friend, stranger, true},
	} {
		if got := reaches(c.from, c.to); got != c.want {
			t.Errorf("%s: reached %v, want %v", c.what, got, c.want)
		}
	}
	rep := n1.inspect(t)
	found := false
	for _, e := range rep.Endpoints {
		found = found || e.IP == target.ip(false)
		if e.IP == target.ip(false) && (!e.Policy.Ingress || !e.Policy.Egress || e.Policy.Counters.IngressDenied == 0 ||
			e.Policy.Counters.EgressDenied == 0 || e.Policy.Counters.IngressAllowed == 0) {
			t.Errorf("target's policy state on n1: %+v", e.Policy)
		}
	}
	if !found {
		t.Errorf("inspect on n1 has no target pod %s", target.ip(false))
	}
	// The strangers become friends: allowed within seconds.
	ns, err := c.client.CoreV1().Namespaces().Get(ctx, "strangers", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ns.Labels["team"] = "a"
	if _, err := c.client.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	waitFor(t, "the relabelled namespace to be admitted", 10*time.Second, func() bool { return reaches(stranger, target) })
	t.Logf("a namespace label change took effect in %s", time.Since(start).Round(100*time.Millisecond))
}
