//go:build e2e

package integration

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/ebpf-cni/ebpf-cni/internal/loader"
)

// kubeletServices checks Services without kube-proxy on the kubelet
// cluster, served by the DaemonSet's agent: a Deployment behind a
// ClusterIP with named target ports, reached from a pod, from the host and
// over UDP; a NodePort from a namespace playing an outside client, with
// externalTrafficPolicy Cluster (masqueraded) and Local (client address
// kept); session affinity; a scale-down after which no connection reaches
// a removed backend; a deleted Service refused at once.
func kubeletServices(t *testing.T, k *kubeletCluster) {
	ctx := context.Background()
	c := k.client
	labels := map[string]string{"app": "echo"}
	probe := "/usr/local/bin/ebpf-cni-agent"
	dep := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: "echo"},
		Spec: appsv1.DeploymentSpec{
			Replicas: ptr.To(int32(3)),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					TerminationGracePeriodSeconds: ptr.To(int64(1)),
					Containers: []corev1.Container{
						{Name: "tcp", Image: "localhost/ebpf-cni:dev", ImagePullPolicy: corev1.PullIfNotPresent,
							Command: []string{probe, "probe", "whoami", ":8080"},
							Ports:   []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}},
						{Name: "udp", Image: "localhost/ebpf-cni:dev", ImagePullPolicy: corev1.PullIfNotPresent,
							Command: []string{probe, "probe", "udp-serve", ":5353", "100"},
							Ports:   []corev1.ContainerPort{{Name: "dns", ContainerPort: 5353, Protocol: corev1.ProtocolUDP}}},
					},
				},
			},
		},
	}
	if _, err := c.AppsV1().Deployments("default").Create(ctx, dep, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// Gone at the end whatever happens (the parent waits for every pod).
	t.Cleanup(func() {
		c.CoreV1().Services("default").Delete(ctx, "echo", metav1.DeleteOptions{})
		c.AppsV1().Deployments("default").Delete(ctx, "echo", metav1.DeleteOptions{})
	})
	svc, err := c.CoreV1().Services("default").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo"},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeNodePort, Selector: labels, Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, TargetPort: intstr.FromString("http")},
			{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP, TargetPort: intstr.FromString("dns")},
		}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vip := netip.MustParseAddr(svc.Spec.ClusterIP)
	ready := func(n int) func() bool {
		return func() bool {
			l, err := c.DiscoveryV1().EndpointSlices("default").List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=echo"})
			if err != nil {
				return false
			}
			got := 0
			for _, s := range l.Items {
				for _, e := range s.Endpoints {
					if e.Conditions.Ready != nil && *e.Conditions.Ready {
						got++
					}
				}
			}
			return got == n
		}
	}
	waitFor(t, "3 ready endpoints", 120*time.Second, ready(3))

	// A client pod: the sandbox of one of the Deployment's pods.
	pods, err := c.CoreV1().Pods("default").List(ctx, metav1.ListOptions{LabelSelector: "app=echo"})
	if err != nil || len(pods.Items) == 0 {
		t.Fatalf("echo pods: %v", err)
	}
	client := k.podNS(t, pods.Items[0])
	// The test's clients, in a pod's network namespace or the host's, join
	// a cgroup under the pods' one, which the socket hooks hold
	// (servicesFromOutside); the outside client stays out of it.
	_, clientCg := newCgroup(t, podCgroup, "clients")
	var outside *pod
	dialFrom := func(p *pod, addr string) (host, seen string, err error) {
		cg := clientCg
		if p != nil && p == outside {
			cg = -1
		}
		out, err := probeCmd(p, cg, "dial", addr).CombinedOutput()
		if err != nil {
			return "", "", fmt.Errorf("%v: %s", err, out)
		}
		f := strings.Fields(string(out))
		if len(f) != 2 {
			return "", "", fmt.Errorf("answer %q", out)
		}
		return f[0], f[1], nil
	}
	clusterIP := netip.AddrPortFrom(vip, 80).String()
	backends := map[string]bool{}
	for range 30 {
		host, seen, err := dialFrom(client, clusterIP)
		if err != nil {
			t.Fatalf("pod -> ClusterIP (named target port): %v", err)
		}
		if seen != pods.Items[0].Status.PodIP {
			t.Errorf("backend saw %s, want the client pod %s (no NAT inside the cluster)", seen, pods.Items[0].Status.PodIP)
		}
		backends[host] = true
	}
	if len(backends) != 3 {
		t.Errorf("30 connections reached backends %v, want all 3", backends)
	}
	if _, _, err := dialFrom(nil, clusterIP); err != nil {
		t.Errorf("host -> ClusterIP: %v", err)
	}
	if out, err := probeCmd(client, clientCg, "udp-dial", netip.AddrPortFrom(vip, 53).String(), "64").CombinedOutput(); err != nil ||
		!strings.HasPrefix(string(out), "100 ") {
		t.Errorf("pod -> ClusterIP over UDP: %v %q", err, out)
	}

	// NodePort from outside: a namespace on the node's bridge, outside the
	// hooked cgroup, reaches the node's address as another machine would:
	// translated on the node device, masqueraded (Cluster), then with the
	// client's address kept (Local).
	outside = outsideClient(t, k.under)
	np := netip.AddrPortFrom(netip.MustParseAddr(mnHostIP), uint16(svc.Spec.Ports[0].NodePort)).String()
	if _, seen, err := dialFrom(outside, np); err != nil || seen != mnHostIP {
		t.Errorf("outside -> NodePort (Cluster): seen %q %v, want the node's address %s (masqueraded)", seen, err, mnHostIP)
	}
	// From a pod, the same NodePort is balanced at connect: no NAT.
	if _, seen, err := dialFrom(client, np); err != nil || seen != pods.Items[0].Status.PodIP {
		t.Errorf("pod -> NodePort: seen %q %v, want the pod %s", seen, err, pods.Items[0].Status.PodIP)
	}
	svc, _ = c.CoreV1().Services("default").Get(ctx, "echo", metav1.GetOptions{})
	svc.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	svc.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
	if _, err := c.CoreV1().Services("default").Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	outsideIP := k.under.net4 + ".200"
	waitFor(t, "the NodePort to keep the client address (Local)", 15*time.Second, func() bool {
		_, seen, err := dialFrom(outside, np)
		return err == nil && seen == outsideIP
	})
	// Session affinity: one backend for one client.
	time.Sleep(2 * time.Second) // the agent's update (affinity) is in place
	first, _, err := dialFrom(client, clusterIP)
	if err != nil {
		t.Fatal(err)
	}
	for range 20 {
		if host, _, err := dialFrom(client, clusterIP); err != nil || host != first {
			t.Fatalf("session affinity: %s after %s (%v)", host, first, err)
		}
	}

	// Scale down to one: once the slice says so, no connection reaches the
	// others.
	scale, err := c.AppsV1().Deployments("default").GetScale(ctx, "echo", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	scale.Spec.Replicas = 1
	if _, err := c.AppsV1().Deployments("default").UpdateScale(ctx, "echo", scale, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "1 ready endpoint", 60*time.Second, ready(1))
	time.Sleep(time.Second) // the agent's reconcile
	left := map[string]bool{}
	for range 10 {
		host, _, err := dialFrom(nil, clusterIP)
		if err != nil {
			t.Fatalf("after scale-down: %v", err)
		}
		left[host] = true
	}
	if len(left) != 1 {
		t.Errorf("after scale-down to 1, connections reached %v", left)
	}

	// Deleted: refused at once.
	if err := c.CoreV1().Services("default").Delete(ctx, "echo", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the deleted Service to be refused", 10*time.Second, func() bool {
		_, _, err := dialFrom(nil, clusterIP)
		return err != nil && strings.Contains(err.Error(), "connection refused")
	})
	c.AppsV1().Deployments("default").Delete(ctx, "echo", metav1.DeleteOptions{})
}

// podNS is the network namespace of a running pod, as a *pod for probeCmd.
func (k *kubeletCluster) podNS(t *testing.T, p corev1.Pod) *pod {
	t.Helper()
	eps := k.ds.inspect()
	e, ok := eps[netip.MustParseAddr(p.Status.PodIP)]
	if !ok {
		t.Fatalf("inspect has no pod %s", p.Status.PodIP)
	}
	netns := k.ctrd.sandboxOf(e.ContainerID).netns
	return &pod{ns: filepath.Base(netns), path: netns}
}

// podCgroup is where containerd's runc puts the pods on this machine's
// hybrid layout, relative to the cgroup v2 root.
const podCgroup = "k8s.io"

// servicesFromOutside edits deploy/ so that a namespace on the node's
// bridge can play a client on another machine. On one machine every
// process, that namespace's included, sits under the cgroup v2 root, where
// the socket hooks attach by default: its connect to a NodePort would be
// balanced on the spot instead of reaching the node. So the agent hooks
// the pods' cgroup (-cgroup-root; the test's host clients join a cgroup
// below it). The NodePort traffic arrives on the bridge, which holds the
// node's address: the agent's services controller attaches there.
func servicesFromOutside(t *testing.T, m string) string {
	root, err := loader.CgroupRoot()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(root, podCgroup), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, r := range [][2]string{
		{`"-controllers=routes,datapath,services,policy"`, `"-controllers=routes,datapath,services,policy", "-cgroup-root=` + podCgroup + `"`},
	} {
		if !strings.Contains(m, r[0]) {
			t.Fatalf("deploy/ebpf-cni.yaml has no %s to edit", r[0])
		}
		m = strings.Replace(m, r[0], r[1], 1)
	}
	return m
}

// outsideClient is a namespace on the cluster's bridge at .200, outside
// the node: it reaches the node's address like another machine would.
func outsideClient(t *testing.T, u *underlay) *pod {
	t.Helper()
	name := "ebt-outside"
	freshNetns(t, name)
	exec.Command("ip", "link", "del", "ebt-out").Run() // a killed run's
	run(t, "ip", "link", "add", "ebt-out", "type", "veth", "peer", "name", "eth0", "netns", name)
	t.Cleanup(func() { exec.Command("ip", "link", "del", "ebt-out").Run() })
	run(t, "ip", "link", "set", "ebt-out", "master", u.bridge, "up")
	run(t, "ip", "-n", name, "addr", "add", u.net4+".200/24", "dev", "eth0")
	run(t, "ip", "-n", name, "link", "set", "eth0", "up")
	run(t, "ip", "-n", name, "link", "set", "lo", "up")
	return &pod{ns: name, path: "/var/run/netns/" + name}
}
