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

	"golang.org/x/sys/unix"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/ebpf-cni/ebpf-cni/internal/veth"
)

// kubeletSysctls are host settings the kubelet rewrites at start; the test
// puts them back.
var kubeletSysctls = []string{"vm.overcommit_memory", "vm.panic_on_oom", "kernel.panic", "kernel.panic_on_oops",
	"kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes"}

func saveSysctls(t *testing.T) {
	saved := map[string]string{}
	for _, k := range kubeletSysctls {
		if out, err := exec.Command("sysctl", "-n", k).Output(); err == nil {
			saved[k] = strings.TrimSpace(string(out))
		}
	}
	t.Cleanup(func() {
		for k, v := range saved {
			exec.Command("sysctl", "-qw", k+"="+v).Run()
		}
	})
}

// A single-node cluster: etcd, kube-apiserver, kube-controller-manager
// (allocating podCIDRs), kube-scheduler and a kubelet on containerd. ebpf-cni
// arrives as the DaemonSet of deploy/ from the locally built image; the node
// turns Ready once its init container wrote the conflist. Two Deployments
// talk pod to pod and host to pod; scaling down and deleting leaves nothing.
func TestKubeletCluster(t *testing.T) {
	saveSysctls(t)
	c := startCluster(t)
	kcm := kubeBinary(t, "kube-controller-manager")
	sched := kubeBinary(t, "kube-scheduler")
	kubelet := kubeBinary(t, "kubelet")

	// The DaemonSet installs with the production defaults (pin root, state
	// and IPAM dirs): refuse to run over a real install, remove ours after.
	for _, p := range []string{"/sys/fs/bpf/ebpf-cni", "/var/lib/ebpf-cni"} {
		if _, err := os.Stat(p); err == nil {
			t.Fatalf("%s exists: this host has a real ebpf-cni install; the kubelet e2e would use it", p)
		}
	}
	t.Cleanup(func() { os.RemoveAll("/sys/fs/bpf/ebpf-cni"); os.RemoveAll("/var/lib/ebpf-cni") })
	sharedBPFFS(t)
	ds := &node{t: t, name: "ebpf-cni", pinRoot: "/sys/fs/bpf/ebpf-cni", stateDir: "/var/lib/ebpf-cni", ipamDir: "/var/lib/ebpf-cni/ipam"}

	// containerd with an empty conf dir: the DaemonSet fills it.
	n := newNode(t, nil)
	n.version = "1.0.0"
	os.MkdirAll(n.confDir, 0o755)
	ctrd := startContainerdOpts(t, n, false)
	img := filepath.Join(t.TempDir(), "ebpf-cni-image.tar")
	build := exec.Command("bash", "../../scripts/image.sh")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("scripts/image.sh: %v: %s", err, out)
	}
	os.Rename("../../bin/ebpf-cni-image.tar", img)
	if out, err := exec.Command("ctr", "--address", ctrd.sock, "-n", "k8s.io", "images", "import", img).CombinedOutput(); err != nil {
		t.Fatalf("import image: %v: %s", err, out)
	}

	c.start(exec.Command(kcm, "--kubeconfig="+c.kcfg, "--allocate-node-cidrs", "--cluster-cidr=10.244.0.0/16",
		"--node-cidr-mask-size=24", "--service-account-private-key-file="+filepath.Join(c.dir, "sa.key"),
		"--root-ca-file="+filepath.Join(c.dir, "certs", "apiserver.crt"),
		"--use-service-account-credentials=false", "--controllers=*,-serviceaccount-token", "--leader-elect=false",
		"--bind-address=127.0.0.1", "--secure-port=0"), "kube-controller-manager")
	c.start(exec.Command(sched, "--kubeconfig="+c.kcfg, "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0"), "kube-scheduler")

	kdir := filepath.Join(c.dir, "kubelet")
	os.MkdirAll(kdir, 0o755)
	kcfg := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: %s
port: 10250
readOnlyPort: 0
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
containerRuntimeEndpoint: unix://%s
makeIPTablesUtilChains: false
localStorageCapacityIsolation: false
protectKernelDefaults: false
serializeImagePulls: false
resolvConf: /etc/resolv.conf
evictionHard: {}
`, mnHostIP, ctrd.sock)
	os.WriteFile(filepath.Join(kdir, "config.yaml"), []byte(kcfg), 0o644)
	c.start(exec.Command(kubelet, "--config="+filepath.Join(kdir, "config.yaml"), "--kubeconfig="+c.kcfg,
		"--root-dir="+filepath.Join(kdir, "root"), "--cert-dir="+filepath.Join(kdir, "pki"),
		"--hostname-override=ebt-node", "--node-ip="+mnHostIP, "--v=1"), "kubelet")
	kubectl := kubeBinary(t, "kubectl")
	t.Cleanup(func() {
		if t.Failed() {
			for _, args := range [][]string{{"get", "pods", "-A", "-o", "wide"}, {"get", "events", "-A"},
				{"-n", "kube-system", "logs", "ds/ebpf-cni", "--all-containers", "--tail=30"}} {
				out, _ := exec.Command(kubectl, append([]string{"--kubeconfig=" + c.kcfg}, args...)...).CombinedOutput()
				t.Logf("kubectl %v:\n%s", args, tail(out, 3000))
			}
			t.Logf("kubelet log:\n%s", c.log("kubelet"))
		}
	})
	ctx := context.Background()
	waitFor(t, "the node to register", 90*time.Second, func() bool {
		_, err := c.client.CoreV1().Nodes().Get(ctx, "ebt-node", metav1.GetOptions{})
		return err == nil
	})
	ready := func() bool {
		node, err := c.client.CoreV1().Nodes().Get(ctx, "ebt-node", metav1.GetOptions{})
		if err != nil {
			return false
		}
		for _, cond := range node.Status.Conditions {
			if cond.Type == corev1.NodeReady {
				return cond.Status == corev1.ConditionTrue
			}
		}
		return false
	}
	time.Sleep(3 * time.Second)
	if ready() {
		t.Fatalf("the node is Ready before any CNI is installed: the test proves nothing")
	}

	// Install ebpf-cni as a user would, with the test's CNI dirs.
	manifest, err := os.ReadFile("../../deploy/ebpf-cni.yaml")
	if err != nil {
		t.Fatal(err)
	}
	m := strings.NewReplacer("path: /opt/cni/bin", "path: "+ctrd.binDir, "path: /etc/cni/net.d", "path: "+n.confDir).Replace(string(manifest))
	// No kube-proxy here: point the agent at the API server itself, as the
	// DaemonSet documents for kube-proxy-free clusters.
	if _, err := c.client.CoreV1().ConfigMaps("kube-system").Create(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: "ebpf-cni-kubernetes-service"},
		Data:       map[string]string{"KUBERNETES_SERVICE_HOST": mnHostIP, "KUBERNETES_SERVICE_PORT": fmt.Sprint(mnAPIPort)},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	mf := filepath.Join(c.dir, "ebpf-cni.yaml")
	os.WriteFile(mf, []byte(m), 0o644)
	if out, err := exec.Command(kubectl, "--kubeconfig="+c.kcfg, "apply", "-f", mf).CombinedOutput(); err != nil {
		t.Fatalf("kubectl apply -f deploy/: %v: %s", err, out)
	}
	waitFor(t, "the node to turn Ready through ebpf-cni", 120*time.Second, ready)

	// Two Deployments of probe servers.
	for _, d := range []struct {
		name     string
		replicas int32
	}{{"web", 3}, {"api", 2}} {
		dep := &appsv1.Deployment{
			ObjectMeta: metav1.ObjectMeta{Name: d.name},
			Spec: appsv1.DeploymentSpec{
				Replicas: ptr.To(d.replicas),
				Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": d.name}},
				Template: corev1.PodTemplateSpec{
					ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"app": d.name}},
					Spec: corev1.PodSpec{Containers: []corev1.Container{{
						Name: "probe", Image: "localhost/ebpf-cni:dev", ImagePullPolicy: corev1.PullIfNotPresent,
						Command: []string{"/usr/local/bin/ebpf-cni-agent", "probe", "serve", ":8080"},
					}}},
				},
			},
		}
		if _, err := c.client.AppsV1().Deployments("default").Create(ctx, dep, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	var podIPs []netip.Addr
	waitFor(t, "5 running pods with addresses", 120*time.Second, func() bool {
		pods, err := c.client.CoreV1().Pods("default").List(ctx, metav1.ListOptions{})
		if err != nil {
			return false
		}
		podIPs = nil
		for _, p := range pods.Items {
			if p.Status.Phase == corev1.PodRunning && p.Status.PodIP != "" {
				podIPs = append(podIPs, netip.MustParseAddr(p.Status.PodIP))
			}
		}
		return len(podIPs) == 5
	})
	eps := ds.inspect()
	for _, ip := range podIPs {
		if !netip.MustParsePrefix("10.244.0.0/16").Contains(ip) {
			t.Errorf("pod address %s outside the cluster CIDR", ip)
		}
		if e, ok := eps[ip]; !ok || e.PodNamespace != "default" || e.PodName == "" {
			t.Errorf("inspect has no pod name for %s: %+v", ip, e)
		}
		// host -> pod
		out, err := exec.Command(filepath.Join(binDir, "ebpf-cni-agent"), "probe", "dial", netip.AddrPortFrom(ip, 8080).String()).CombinedOutput()
		if err != nil {
			t.Errorf("host -> pod %s: %v %s", ip, err, out)
		}
	}
	// pod -> pod, from inside the first pod's sandbox netns, through the BPF path.
	netns := ctrd.sandboxOf(eps[podIPs[0]].ContainerID).netns
	for _, ip := range podIPs[1:] {
		out, err := exec.Command("ip", "netns", "exec", filepath.Base(netns), filepath.Join(binDir, "ebpf-cni-agent"),
			"probe", "dial", netip.AddrPortFrom(ip, 8080).String()).CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != podIPs[0].String() {
			t.Errorf("pod %s -> pod %s: %v (server saw %q)", podIPs[0], ip, err, out)
		}
	}
	if r := ds.inspect()[podIPs[0]].Counters.RedirectPackets; r == 0 {
		t.Errorf("pod-to-pod traffic did not take the BPF redirect")
	}

	// Scale down and delete: DEL leaves nothing.
	scale, _ := c.client.AppsV1().Deployments("default").GetScale(ctx, "web", metav1.GetOptions{})
	scale.Spec.Replicas = 1
	c.client.AppsV1().Deployments("default").UpdateScale(ctx, "web", scale, metav1.UpdateOptions{})
	for _, d := range []string{"web", "api"} {
		c.client.AppsV1().Deployments("default").Delete(ctx, d, metav1.DeleteOptions{PropagationPolicy: ptr.To(metav1.DeletePropagationForeground)})
	}
	waitFor(t, "every pod gone", 120*time.Second, func() bool {
		pods, _ := c.client.CoreV1().Pods("default").List(ctx, metav1.ListOptions{})
		return pods != nil && len(pods.Items) == 0
	})
	waitFor(t, "every endpoint released", 60*time.Second, func() bool { return len(ds.inspect()) == 0 })
	for ip, e := range eps {
		ds.assertGone(veth.HostName(e.ContainerID, "eth0"), e.ContainerID, []netip.Addr{ip})
	}
}

// sharedBPFFS prepares the node as systemd does at boot: bpffs mounted at
// /sys/fs/bpf as a shared mount, which the DaemonSet's mount propagation
// needs (this machine has no systemd: its mounts are private).
func sharedBPFFS(t *testing.T) {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs("/sys/fs/bpf", &st); err != nil {
		t.Fatal(err)
	}
	if st.Type != unix.BPF_FS_MAGIC {
		run(t, "mount", "-t", "bpf", "bpffs", "/sys/fs/bpf")
		t.Cleanup(func() { exec.Command("umount", "/sys/fs/bpf").Run() })
	}
	run(t, "mount", "--make-shared", "/sys/fs/bpf")
}
