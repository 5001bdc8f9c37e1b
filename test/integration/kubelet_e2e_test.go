//go:build e2e

package integration

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/ebpf-cni/ebpf-cni/internal/loader"
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

// kubeletClusterOpts chooses what a single-node kubelet cluster runs
// besides the control plane, the kubelet and ebpf-cni's DaemonSet.
type kubeletClusterOpts struct {
	// kubeProxy is "iptables" or "nftables" to run kube-proxy as a host
	// process and leave Services to it (the agent runs without its
	// services controller), or "" for none: then ebpf-cni's DaemonSet
	// serves Services as deploy/ ships it and the agent reaches the API
	// server directly (the DaemonSet's documented ConfigMap).
	kubeProxy string
	// dns points the kubelet's clusterDNS at kube-system/kube-dns
	// (kubeDNSIP); the caller deploys the server (deployCoreDNS).
	dns bool
	// images are OCI archives imported into containerd before the kubelet
	// starts (pods use IfNotPresent: nothing is pulled).
	images []string
	// edit changes deploy/'s manifest before it is applied.
	edit func(t *testing.T, manifest string) string
}

// The single-node cluster's fixed names and addresses.
const (
	kubeNodeName    = "ebt-node"
	kubeClusterCIDR = "10.244.0.0/16"
	kubeDNSIP       = "10.96.0.10" // inside startCluster's --service-cluster-ip-range
)

// kubeletCluster is startCluster's control plane plus a kubelet on a
// private containerd, the node made Ready by ebpf-cni's DaemonSet.
type kubeletCluster struct {
	*cluster
	ctrd    *containerd
	ds      *node // ebpf-cni as the DaemonSet installs it (production paths)
	kubectl string
}

// startKubeletCluster brings up a single-node cluster: etcd,
// kube-apiserver, kube-controller-manager (allocating podCIDRs),
// kube-scheduler, a kubelet on containerd, optionally kube-proxy; ebpf-cni
// arrives as the DaemonSet of deploy/ from the locally built image and the
// node turns Ready once its init container wrote the conflist (and not
// before: that is checked). Everything stops and goes at the end of t.
func startKubeletCluster(t *testing.T, o kubeletClusterOpts) *kubeletCluster {
	t.Helper()
	switch o.kubeProxy {
	case "", "iptables", "nftables":
	default:
		t.Fatalf("kube-proxy mode %q: want iptables, nftables or none", o.kubeProxy)
	}
	saveSysctls(t)
	kubeletChains(t)
	emptyContainerCgroups(t)
	c := startCluster(t)
	k := &kubeletCluster{cluster: c}
	serviceRangeBlackhole(t)
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
	k.ds = &node{t: t, name: "ebpf-cni", pinRoot: "/sys/fs/bpf/ebpf-cni", stateDir: "/var/lib/ebpf-cni", ipamDir: "/var/lib/ebpf-cni/ipam"}

	// containerd with an empty conf dir: the DaemonSet fills it.
	n := newNode(t, nil)
	n.version = "1.0.0"
	os.MkdirAll(n.confDir, 0o755)
	// Registered before containerd's own cleanup, so it runs after it.
	t.Cleanup(func() {
		if k.ctrd != nil {
			k.noShimLeft(t)
		}
	})
	k.ctrd = startContainerdOpts(t, n, false)
	img := filepath.Join(t.TempDir(), "ebpf-cni-image.tar")
	build := exec.Command("bash", "../../scripts/image.sh")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("scripts/image.sh: %v: %s", err, out)
	}
	os.Rename("../../bin/ebpf-cni-image.tar", img)
	for _, archive := range append([]string{img}, o.images...) {
		if out, err := exec.Command("ctr", "--address", k.ctrd.sock, "-n", "k8s.io", "images", "import", archive).CombinedOutput(); err != nil {
			t.Fatalf("import image %s: %v: %s", archive, err, out)
		}
	}

	c.start(exec.Command(kcm, "--kubeconfig="+c.kcfg, "--allocate-node-cidrs", "--cluster-cidr="+kubeClusterCIDR,
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
`, mnHostIP, k.ctrd.sock)
	if o.dns {
		kcfg += "clusterDNS: [" + kubeDNSIP + "]\nclusterDomain: cluster.local\n"
	}
	os.WriteFile(filepath.Join(kdir, "config.yaml"), []byte(kcfg), 0o644)
	kubeletCmd := exec.Command(kubelet, "--config="+filepath.Join(kdir, "config.yaml"), "--kubeconfig="+c.kcfg,
		"--root-dir="+filepath.Join(kdir, "root"), "--cert-dir="+filepath.Join(kdir, "pki"),
		"--hostname-override="+kubeNodeName, "--node-ip="+mnHostIP, "--v=1")
	c.start(kubeletCmd, "kubelet")
	// The kubelet goes before containerd removes the sandboxes at the end:
	// alive, it would start the pods again, and their shims (with hostPort
	// rules and veths) outlive containerd.
	t.Cleanup(func() {
		kubeletCmd.Process.Kill()
		kubeletCmd.Wait()
	})
	if o.kubeProxy != "" {
		k.startKubeProxy(t, o.kubeProxy)
	}
	k.kubectl = kubeBinary(t, "kubectl")
	t.Cleanup(func() {
		if t.Failed() {
			for _, args := range [][]string{{"get", "pods", "-A", "-o", "wide"}, {"get", "events", "-A"},
				{"-n", "kube-system", "logs", "ds/ebpf-cni", "--all-containers", "--tail=30"}} {
				out, _ := k.run(args...)
				t.Logf("kubectl %v:\n%s", args, tail(out, 3000))
			}
			t.Logf("kubelet log:\n%s", c.log("kubelet"))
			if o.kubeProxy != "" {
				t.Logf("kube-proxy log:\n%s", c.log("kube-proxy"))
			}
		}
	})
	ctx := context.Background()
	waitFor(t, "the node to register", 90*time.Second, func() bool {
		_, err := c.client.CoreV1().Nodes().Get(ctx, kubeNodeName, metav1.GetOptions{})
		return err == nil
	})
	time.Sleep(3 * time.Second)
	if k.ready() {
		t.Fatalf("the node is Ready before any CNI is installed: the test proves nothing")
	}

	// Install ebpf-cni as a user would, with the test's CNI dirs.
	manifest, err := os.ReadFile("../../deploy/ebpf-cni.yaml")
	if err != nil {
		t.Fatal(err)
	}
	m := strings.NewReplacer("path: /opt/cni/bin", "path: "+k.ctrd.binDir, "path: /etc/cni/net.d", "path: "+n.confDir).Replace(string(manifest))
	if o.kubeProxy != "" {
		// Services are kube-proxy's: the agent runs without its services
		// controller, the DaemonSet's documented switch.
		m = agentControllers.ReplaceAllStringFunc(m, func(flag string) string {
			var keep []string
			for _, c := range strings.Split(strings.TrimPrefix(flag, "-controllers="), ",") {
				if c != "services" {
					keep = append(keep, c)
				}
			}
			return "-controllers=" + strings.Join(keep, ",")
		})
	}
	if o.kubeProxy == "" {
		// No kube-proxy here: point the agent at the API server itself, as
		// the DaemonSet documents for kube-proxy-free clusters.
		if _, err := c.client.CoreV1().ConfigMaps("kube-system").Create(ctx, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: "ebpf-cni-kubernetes-service"},
			Data:       map[string]string{"KUBERNETES_SERVICE_HOST": mnHostIP, "KUBERNETES_SERVICE_PORT": fmt.Sprint(mnAPIPort)},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if o.edit != nil {
		m = o.edit(t, m)
	}
	mf := filepath.Join(c.dir, "ebpf-cni.yaml")
	os.WriteFile(mf, []byte(m), 0o644)
	if out, err := k.run("apply", "-f", mf); err != nil {
		t.Fatalf("kubectl apply -f deploy/: %v: %s", err, out)
	}
	waitFor(t, "the node to turn Ready through ebpf-cni", 120*time.Second, k.ready)
	return k
}

// agentControllers is the agent's -controllers flag in deploy/.
var agentControllers = regexp.MustCompile(`-controllers=[a-z,]+`)

// noShimLeft fails the test when a containerd shim of the cluster outlived
// containerd (a pod left running, holding its ports and veth), and ends it.
func (k *kubeletCluster) noShimLeft(t *testing.T) {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || !strings.Contains(string(b), "containerd-shim") || !strings.Contains(string(b), k.ctrd.sock) {
			continue
		}
		pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(p)))
		t.Errorf("containerd shim %d outlived the cluster's containerd; ending it and its containers", pid)
		if kids, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid)); err == nil {
			for _, kid := range strings.Fields(string(kids)) {
				if k, err := strconv.Atoi(kid); err == nil {
					unix.Kill(k, unix.SIGKILL)
				}
			}
		}
		unix.Kill(pid, unix.SIGKILL)
	}
}

// ready tells whether the node's Ready condition is True.
func (k *kubeletCluster) ready() bool {
	node, err := k.client.CoreV1().Nodes().Get(context.Background(), kubeNodeName, metav1.GetOptions{})
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

// run is kubectl against the cluster.
func (k *kubeletCluster) run(args ...string) ([]byte, error) {
	return exec.Command(k.kubectl, append([]string{"--kubeconfig=" + k.kcfg}, args...)...).CombinedOutput()
}

// startKubeProxy runs kube-proxy on the host in mode (iptables or
// nftables) for the node: --cluster-cidr makes pod sources "local", so pod
// -> Service -> pod keeps the pod's address (no --masquerade-all), as
// NetworkPolicy needs; NodePorts only on the node's address. It leaves the
// host's conntrack sysctls alone (max per core 0, timeouts 0) and removes
// its rules at the end.
func (k *kubeletCluster) startKubeProxy(t *testing.T, mode string) {
	t.Helper()
	proxy := kubeBinary(t, "kube-proxy")
	cmd := exec.Command(proxy, "--kubeconfig="+k.kcfg, "--hostname-override="+kubeNodeName,
		"--proxy-mode="+mode, "--cluster-cidr="+kubeClusterCIDR, "--nodeport-addresses="+mnHostIP+"/32",
		"--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0", "--conntrack-tcp-timeout-close-wait=0",
		"--metrics-bind-address=127.0.0.1:10249", "--healthz-bind-address=127.0.0.1:10256", "--v=2")
	k.start(cmd, "kube-proxy")
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if out, err := exec.Command(proxy, "--cleanup", "--proxy-mode="+mode).CombinedOutput(); err != nil {
			t.Errorf("kube-proxy --cleanup: %v: %s", err, tail(out, 2000))
		}
	})
}

// A single-node cluster (startKubeletCluster, without kube-proxy). Two
// Deployments talk pod to pod and host to pod; the DaemonSet's agent
// serves Services (kubeletServices); scaling down and deleting leaves
// nothing.
func TestKubeletCluster(t *testing.T) {
	k := startKubeletCluster(t, kubeletClusterOpts{edit: servicesFromOutside})
	c, ctrd, ds := k.cluster, k.ctrd, k.ds
	ctx := context.Background()

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
	t.Run("Services", func(t *testing.T) { kubeletServices(t, k) })

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

// serviceRangeBlackhole drops, after NAT, whatever the host sends or
// forwards to the Service range: ClusterIPs are virtual, and what kube-proxy
// or ebpf-cni leaves untranslated (a port the Service no longer has) must
// vanish, as in a real network. Here the default route leads to an egress
// interceptor that answers every address on port 80 (an unreachable route
// would not do: the host's own connects to ClusterIPs need a route before
// kube-proxy's OUTPUT DNAT sees them).
func serviceRangeBlackhole(t *testing.T) {
	t.Helper()
	exec.Command("nft", "delete", "table", "inet", "ebt-svc").Run()
	rules := fmt.Sprintf(`table inet ebt-svc {
	chain output { type filter hook output priority filter; ip daddr %[1]s counter drop; }
	chain forward { type filter hook forward priority filter; ip daddr %[1]s counter drop; }
}`, mnServiceCIDR)
	cmd := exec.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft (Service range): %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("nft", "delete", "table", "inet", "ebt-svc").Run() })
}

// kubeletChains removes, at the end, the iptables chains the kubelet always
// creates (KUBE-FIREWALL and the jumps to it, KUBE-IPTABLES-HINT,
// KUBE-KUBELET-CANARY), unless the host had them before.
func kubeletChains(t *testing.T) {
	t.Helper()
	for _, ipt := range []string{"iptables", "ip6tables"} {
		if exec.Command(ipt, "-w", "-t", "filter", "-S", "KUBE-FIREWALL").Run() == nil {
			continue // a real kubelet's, or a leftover this test did not make
		}
		t.Cleanup(func() {
			for _, chain := range []string{"INPUT", "OUTPUT"} {
				for exec.Command(ipt, "-w", "-t", "filter", "-D", chain, "-j", "KUBE-FIREWALL").Run() == nil {
				}
			}
			for _, tc := range [][2]string{{"filter", "KUBE-FIREWALL"}, {"mangle", "KUBE-IPTABLES-HINT"}, {"mangle", "KUBE-KUBELET-CANARY"},
				{"nat", "KUBE-KUBELET-CANARY"}, {"filter", "KUBE-KUBELET-CANARY"}} {
				exec.Command(ipt, "-w", "-t", tc[0], "-F", tc[1]).Run()
				exec.Command(ipt, "-w", "-t", tc[0], "-X", tc[1]).Run()
			}
		})
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

// emptyContainerCgroups removes, at the end, the empty cgroup v2
// directories runc leaves under k8s.io on a hybrid layout (it removes the
// v1 ones only); busy ones (a real containerd's) stay.
func emptyContainerCgroups(t *testing.T) {
	t.Cleanup(func() {
		root, err := loader.CgroupRoot()
		if err != nil {
			return
		}
		dirs, _ := filepath.Glob(filepath.Join(root, podCgroup, "*"))
		for _, d := range dirs {
			if fi, err := os.Stat(d); err == nil && fi.IsDir() {
				unix.Rmdir(d)
			}
		}
	})
}
