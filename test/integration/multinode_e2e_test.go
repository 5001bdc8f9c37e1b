//go:build e2e

package integration

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/ebpf-cni/ebpf-cni/internal/config"
)

// The emulated cluster: an underlay bridge (the "physical" L2 network, not
// part of any pod path) with the host at 10.255.0.254, where a real
// kube-apiserver (built by scripts/kube-build.sh) and etcd listen; nodes are
// network namespaces on the underlay, each with its own bpffs instance for
// pins, its own state, conflist and ebpf-cni-agent. The plugin runs inside a
// node by entering only its network namespace (nsenter --net): `ip netns
// exec` would remount /sys under it.
const (
	mnHostIP  = "10.255.0.254"
	mnAPIPort = 16443
	mnToken   = "ebt-multinode-token"
	// mnServiceCIDR is the API server's --service-cluster-ip-range.
	mnServiceCIDR = "10.96.0.0/16"
)

type cluster struct {
	t      *testing.T
	under  *underlay
	dir    string
	procs  []*exec.Cmd
	client *kubernetes.Clientset
	kcfg   string
}

type mnNode struct {
	*emuNode
	c       *cluster
	podCIDR string
	agent   *exec.Cmd
}

func kubeBinary(t *testing.T, name string) string {
	t.Helper()
	out, err := exec.Command("bash", "../../scripts/kube-build.sh", name).Output()
	if err != nil {
		t.Fatalf("scripts/kube-build.sh %s: %v", name, err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	return filepath.Join(lines[len(lines)-1], name)
}

func startCluster(t *testing.T) *cluster {
	t.Helper()
	apiserver := kubeBinary(t, "kube-apiserver")
	if _, err := exec.LookPath("etcd"); err != nil {
		t.Fatalf("etcd not installed: run `make e2e` (it installs etcd-server)")
	}
	dir, err := os.MkdirTemp("", "ebt-mn-")
	if err != nil {
		t.Fatal(err)
	}
	c := &cluster{t: t, dir: dir}
	t.Cleanup(c.stop)

	c.under = newUnderlay(t, underlay{bridge: "ebt-mn-br", net4: "10.255.0"})

	etcd := exec.Command("etcd", "--data-dir", filepath.Join(dir, "etcd"),
		"--listen-client-urls", "http://127.0.0.1:23790", "--advertise-client-urls", "http://127.0.0.1:23790",
		"--listen-peer-urls", "http://127.0.0.1:23800", "--initial-advertise-peer-urls", "http://127.0.0.1:23800",
		"--initial-cluster", "default=http://127.0.0.1:23800", "--name", "default")
	c.start(etcd, "etcd")

	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
	os.WriteFile(filepath.Join(dir, "sa.key"), pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}), 0o600)
	os.WriteFile(filepath.Join(dir, "sa.pub"), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}), 0o600)
	os.WriteFile(filepath.Join(dir, "tokens.csv"), []byte(mnToken+`,admin,admin,"system:masters"`+"\n"), 0o600)
	api := exec.Command(apiserver,
		"--etcd-servers=http://127.0.0.1:23790",
		"--bind-address="+mnHostIP, "--advertise-address="+mnHostIP, fmt.Sprintf("--secure-port=%d", mnAPIPort),
		"--cert-dir="+filepath.Join(dir, "certs"),
		"--token-auth-file="+filepath.Join(dir, "tokens.csv"),
		"--authorization-mode=AlwaysAllow",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+filepath.Join(dir, "sa.pub"),
		"--service-account-signing-key-file="+filepath.Join(dir, "sa.key"),
		"--service-cluster-ip-range="+mnServiceCIDR,
		"--api-audiences=https://kubernetes.default.svc.cluster.local",
		"--allow-privileged=true",
		"--enable-priority-and-fairness=false",
		// exec, logs and port-forward reach a kubelet by its node IP: node
		// names do not resolve here.
		"--kubelet-preferred-address-types=InternalIP,Hostname",
	)
	c.start(api, "kube-apiserver")

	cfg := &rest.Config{Host: fmt.Sprintf("https://%s:%d", mnHostIP, mnAPIPort), BearerToken: mnToken,
		TLSClientConfig: rest.TLSClientConfig{Insecure: true}}
	c.client = kubernetes.NewForConfigOrDie(cfg)
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	deadline := time.Now().Add(90 * time.Second)
	for {
		req, _ := http.NewRequest("GET", cfg.Host+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+mnToken)
		resp, err := hc.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("kube-apiserver not ready: %v\n%s", err, c.log("kube-apiserver"))
		}
		time.Sleep(500 * time.Millisecond)
	}
	c.kcfg = filepath.Join(dir, "kubeconfig")
	kubeconfig := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: mn, cluster: {server: %q, insecure-skip-tls-verify: true}}]
users: [{name: admin, user: {token: %q}}]
contexts: [{name: mn, context: {cluster: mn, user: admin}}]
current-context: mn
`, cfg.Host, mnToken)
	os.WriteFile(c.kcfg, []byte(kubeconfig), 0o600)
	return c
}

func (c *cluster) start(cmd *exec.Cmd, name string) {
	logf, _ := os.Create(filepath.Join(c.dir, name+".log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		c.t.Fatalf("start %s: %v", name, err)
	}
	c.procs = append(c.procs, cmd)
}

func (c *cluster) log(name string) string {
	b, _ := os.ReadFile(filepath.Join(c.dir, name+".log"))
	return string(tail(b, 3000))
}

func (c *cluster) stop() {
	for i := len(c.procs) - 1; i >= 0; i-- {
		c.procs[i].Process.Kill()
		c.procs[i].Wait()
	}
	unmountUnder(c.dir) // the kubelet's root dir and pod volumes
	os.RemoveAll(c.dir)
}

// addNode creates node i on the cluster's underlay (10.255.0.i) with a
// Node object (podCIDR 10.244.<i>.0/24) and a conflist that takes the
// subnet from the agent ("usePodCidr").
func (c *cluster) addNode(t *testing.T, i int) *mnNode {
	t.Helper()
	n := &mnNode{c: c, podCIDR: fmt.Sprintf("10.244.%d.0/24", i)}
	n.emuNode = c.under.addNode(t, "mn", i, config.Plugin{
		Options: config.Options{ClusterCIDRs: []string{"10.244.0.0/16"}},
		IPAM:    &config.IPAM{Ranges: [][]config.Range{{{Subnet: config.UsePodCIDR}}}},
	})

	ctx := context.Background()
	obj, err := c.client.CoreV1().Nodes().Create(ctx, &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: n.name},
		Spec:       corev1.NodeSpec{PodCIDR: n.podCIDR, PodCIDRs: []string{n.podCIDR}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create node %s: %v", n.name, err)
	}
	obj.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: n.ip.String()}}
	if _, err := c.client.CoreV1().Nodes().UpdateStatus(ctx, obj, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("node %s status: %v", n.name, err)
	}
	return n
}

func (n *mnNode) startAgent(t *testing.T, mode string, extra ...string) {
	t.Helper()
	n.agent = n.exec(append([]string{filepath.Join(binDir, "ebpf-cni-agent"),
		"-kubeconfig", n.c.kcfg, "-node-name", n.name, "-mode", mode, "-state-dir", n.net.stateDir,
		"-pin-root", n.net.pinRoot, "-metrics-addr", n.ip.String() + ":9610", "-resync", "2s"}, extra...)...)
	logf, _ := os.OpenFile(filepath.Join(n.dir, "agent.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	n.agent.Stdout, n.agent.Stderr = logf, logf
	if err := n.agent.Start(); err != nil {
		t.Fatalf("start agent on %s: %v", n.name, err)
	}
	t.Cleanup(n.stopAgent)
}

func (n *mnNode) stopAgent() {
	if n.agent != nil && n.agent.Process != nil {
		n.agent.Process.Signal(os.Interrupt)
		n.agent.Wait()
		n.agent = nil
	}
}

// routes returns the node's routes of protocol 235 (ebpf-cni-agent's).
func (n *mnNode) routes() string {
	out, _ := exec.Command("ip", "-n", n.ns, "route", "show", "proto", "235").CombinedOutput()
	return string(out)
}

func TestMultiNode(t *testing.T) {
	for _, mode := range []string{"native", "vxlan"} {
		t.Run(mode, func(t *testing.T) { multiNode(t, mode) })
	}
}

func multiNode(t *testing.T, mode string) {
	c := startCluster(t)
	var nodes []*mnNode
	for i := 1; i <= 3; i++ {
		nodes = append(nodes, c.addNode(t, i))
	}
	n1, n2, n3 := nodes[0], nodes[1], nodes[2]

	// Before any agent wrote the node's podCIDR, ADD asks to try again later.
	early := &pod{n: n1.net, ns: n1.ns + "-early", path: "/var/run/netns/" + n1.ns + "-early"}
	freshNetns(t, early.ns)
	if out, err := n1.cnitool("add", early); err == nil || !strings.Contains(string(out), "try again later") && !strings.Contains(err.Error(), "podCIDR") {
		t.Fatalf("ADD before the agent: %v %s, want a try-again-later error naming the podCIDR", err, out)
	}

	for _, n := range nodes {
		n.startAgent(t, mode)
	}
	for _, n := range nodes {
		waitFor(t, n.name+"'s routes", 30*time.Second, func() bool { return strings.Count(n.routes(), "\n") == 2 })
	}
	t.Logf("%s routes on n1 (proto 235):\n%s", mode, n1.routes())
	pods := make([]*pod, 3)
	for i, n := range nodes {
		pods[i] = n.addPod(t, 1)
		if !netip.MustParsePrefix(n.podCIDR).Contains(pods[i].ip(false)) {
			t.Fatalf("pod on %s got %s, outside its podCIDR %s", n.name, pods[i].ip(false), n.podCIDR)
		}
	}
	if mode == "vxlan" {
		if out, _ := pods[0].run("cat", "/sys/class/net/eth0/mtu"); strings.TrimSpace(string(out)) != "1450" {
			t.Errorf("pod MTU in vxlan mode %q, want 1450 (1500 - 50)", out)
		}
		if !strings.Contains(n1.routes(), "dev ebpf-vxlan") {
			t.Errorf("vxlan mode routes do not use the vxlan device:\n%s", n1.routes())
		}
	}
	// Pod to pod across nodes, both ways, without masquerade.
	for _, pair := range [][2]int{{0, 1}, {1, 0}, {0, 2}, {2, 0}, {1, 2}} {
		a, b := pods[pair[0]], pods[pair[1]]
		var seen netip.Addr
		if err := tcpExchange(a.path, b.path, b.ip(false), &seen); err != nil {
			t.Fatalf("%s -> %s: %v\nroutes on %s:\n%s", a.ns, b.ns, err, nodes[pair[0]].name, nodes[pair[0]].routes())
		}
		if seen != a.ip(false) {
			t.Errorf("%s -> %s: server saw %s, want the pod address %s (no masquerade inside the cluster)", a.ns, b.ns, seen, a.ip(false))
		}
	}
	// The same check ci/e2e-kind.sh runs in kind, from ci/checks.sh.
	srv := exec.Command("ip", "netns", "exec", pods[1].ns, filepath.Join(binDir, "ebpf-cni-agent"), "probe", "serve", ":8080")
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { srv.Process.Kill(); srv.Wait() }()
	time.Sleep(300 * time.Millisecond)
	check := exec.Command("bash", "-c", fmt.Sprintf(`. ../../ci/checks.sh && check_pod_to_pod "ip netns exec %s" %s 8080 %s`,
		pods[0].ns, pods[1].ip(false), pods[0].ip(false)))
	check.Env = append(os.Environ(), "PROBE="+filepath.Join(binDir, "ebpf-cni-agent"))
	if out, err := check.CombinedOutput(); err != nil {
		t.Errorf("ci/checks.sh check_pod_to_pod: %v\n%s", err, out)
	}

	// Health and per-node counters.
	resp, err := http.Get("http://" + n1.ip.String() + ":9610/metrics")
	if err != nil {
		t.Fatalf("metrics: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !regexp.MustCompile(`(?m)^ebpf_cni_agent_peer_pod_cidrs\{[^}]*node="n2"`).Match(body) {
		t.Errorf("metrics lack the per-node series:\n%s", body)
	}
	if resp, err := http.Get("http://" + n1.ip.String() + ":9610/healthz"); err != nil || resp.StatusCode != 200 {
		t.Errorf("healthz: %v %v", err, resp)
	}

	// A node deleted from the API loses its routes on the others.
	if err := c.client.CoreV1().Nodes().Delete(context.Background(), n3.name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, n := range []*mnNode{n1, n2} {
		waitFor(t, n.name+" to drop the route to "+n3.podCIDR, 20*time.Second, func() bool {
			return !strings.Contains(n.routes(), strings.TrimSuffix(n3.podCIDR, "/24"))
		})
	}

	// The agent down: ADD and DEL still work; a stale route of ours appears.
	n1.stopAgent()
	run(t, "ip", "-n", n1.ns, "route", "add", "10.244.99.0/24", "via", n2.ip.String(), "proto", "235")
	extra := n1.addPod(t, 2)
	if err := tcpExchange(extra.path, pods[1].path, pods[1].ip(false), nil); err != nil {
		t.Errorf("pod added while the agent was down -> n2: %v", err)
	}
	if _, err := n1.cnitool("del", extra); err != nil {
		t.Errorf("DEL with the agent down: %v", err)
	}
	// Restarted, it converges: the stale route goes, the live ones stay.
	n1.startAgent(t, mode)
	waitFor(t, "the restarted agent to remove the stale route", 20*time.Second, func() bool {
		r := n1.routes()
		return !strings.Contains(r, "10.244.99.0") && strings.Contains(r, "10.244.2.0")
	})
	if err := tcpExchange(pods[0].path, pods[1].path, pods[1].ip(false), nil); err != nil {
		t.Errorf("after the agent restart: %v", err)
	}
}
