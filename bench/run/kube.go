package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// The services section's control plane: etcd (data on tmpfs: the bench
// creates tens of thousands of objects, fsync on this disk would dominate)
// and a real kube-apiserver (token auth, AlwaysAllow, as the e2e test runs
// it), both in the host's network namespace. The apiserver listens on an
// address of its own (on ebb-api, one end of a veth pair: the dummy driver
// may be missing) that each emulated node
// reaches through a management veth: kube-proxy and ebpf-cni-agent run
// inside the nodes.
const (
	apiIP      = "10.253.255.254"
	apiPort    = 16444
	apiToken   = "ebb-bench-token"
	etcdClient = "127.0.0.1:23990"
	etcdPeer   = "127.0.0.1:23991"
	// Not Kubernetes' default 10.96.0.0/12: socket programs attached at the
	// cgroup2 root by an ebpf-cni on this host apply to every process on
	// the machine, the bench's clients included, and refuse connections to
	// addresses of their own Service range they do not serve.
	serviceCIDR = "172.29.0.0/16"
	apiLink     = prefix + "api"
)

// daemon is a long-running process the bench started.
type daemon struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error // from Wait, once done is closed
}

func startDaemon(name, logPath string, cmd *exec.Cmd) (*daemon, error) {
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	d := &daemon{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		d.err = cmd.Wait()
		f.Close()
		close(d.done)
	}()
	return d, nil
}

func (d *daemon) pid() int { return d.cmd.Process.Pid }

func (d *daemon) exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// stop sends sig (after SIGCONT: the bench freezes daemons while it
// measures), then SIGKILL if the process is still there after 10 s.
func (d *daemon) stop(sig syscall.Signal) {
	if d == nil || d.exited() {
		return
	}
	d.cmd.Process.Signal(syscall.SIGCONT)
	d.cmd.Process.Signal(sig)
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
		d.cmd.Process.Kill()
		<-d.done
	}
}

func (d *daemon) freeze(on bool) {
	if d == nil || d.exited() {
		return
	}
	if on {
		d.cmd.Process.Signal(syscall.SIGSTOP)
	} else {
		d.cmd.Process.Signal(syscall.SIGCONT)
	}
}

// tail is the end of the daemon's log, for error messages.
func (d *daemon) tail() string {
	b, _ := os.ReadFile(d.log)
	if i := bytes.Index(b, []byte("\nUsage of ")); i >= 0 { // a flag error: the usage text after it says nothing more
		b = b[:i]
	}
	b = bytes.TrimSpace(b)
	if len(b) > 1500 {
		b = b[len(b)-1500:]
	}
	return string(b)
}

type controlPlane struct {
	dir        string
	etcd, api  *daemon
	client     *kubernetes.Clientset
	kubeconfig string
}

// kubeBin finds a Kubernetes binary built by scripts/kube-build.sh (make
// bench builds the ones this section needs).
func kubeBin(name string) (string, error) {
	dir := *kubeBinDir
	if dir == "" {
		out, err := exec.Command("bash", "scripts/kube-build.sh", "--print-dir").Output()
		if err != nil {
			return "", fmt.Errorf("scripts/kube-build.sh --print-dir: %w", err)
		}
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		dir = lines[len(lines)-1]
	}
	p := filepath.Join(dir, name)
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("%s not built (make bench runs scripts/kube-build.sh kube-apiserver kube-proxy): %w", name, err)
	}
	return p, nil
}

func startControlPlane(e *env) (*controlPlane, error) {
	apiserver, err := kubeBin("kube-apiserver")
	if err != nil {
		return nil, err
	}
	if _, err := exec.LookPath("etcd"); err != nil {
		return nil, fmt.Errorf("etcd not installed (make bench runs scripts/deps.sh --e2e)")
	}
	// etcd's data on tmpfs; the rest in the bench's scratch directory.
	data, err := os.MkdirTemp("/dev/shm", prefix+"etcd-")
	if err != nil {
		return nil, err
	}
	c := &controlPlane{dir: filepath.Join(e.dir, "control-plane")}
	e.onCleanup(func() {
		c.api.stop(syscall.SIGTERM)
		c.etcd.stop(syscall.SIGTERM)
		os.RemoveAll(data)
	})
	if err := os.MkdirAll(c.dir, 0o700); err != nil {
		return nil, err
	}
	if err := runAll([][]string{
		{"ip", "link", "add", apiLink, "type", "veth", "peer", "name", apiLink + "p"},
		{"ip", "addr", "add", apiIP + "/32", "dev", apiLink},
		{"ip", "link", "set", apiLink, "up"},
		{"ip", "link", "set", apiLink + "p", "up"},
	}); err != nil {
		return nil, err
	}
	c.etcd, err = startDaemon("etcd", filepath.Join(c.dir, "etcd.log"), exec.Command("etcd", "--data-dir", filepath.Join(data, "etcd"),
		"--listen-client-urls", "http://"+etcdClient, "--advertise-client-urls", "http://"+etcdClient,
		"--listen-peer-urls", "http://"+etcdPeer, "--initial-advertise-peer-urls", "http://"+etcdPeer,
		"--initial-cluster", "default=http://"+etcdPeer, "--name", "default", "--quota-backend-bytes", strconv.Itoa(4<<30)))
	if err != nil {
		return nil, err
	}

	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return nil, err
	}
	files := map[string][]byte{
		"sa.key":     pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}),
		"sa.pub":     pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}),
		"tokens.csv": []byte(apiToken + `,admin,admin,"system:masters"` + "\n"),
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(c.dir, name), b, 0o600); err != nil {
			return nil, err
		}
	}
	c.api, err = startDaemon("kube-apiserver", filepath.Join(c.dir, "kube-apiserver.log"), exec.Command(apiserver,
		"--etcd-servers=http://"+etcdClient,
		"--bind-address="+apiIP, "--advertise-address="+apiIP, fmt.Sprintf("--secure-port=%d", apiPort),
		"--cert-dir="+filepath.Join(c.dir, "certs"),
		"--token-auth-file="+filepath.Join(c.dir, "tokens.csv"),
		"--authorization-mode=AlwaysAllow",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+filepath.Join(c.dir, "sa.pub"),
		"--service-account-signing-key-file="+filepath.Join(c.dir, "sa.key"),
		"--service-cluster-ip-range="+serviceCIDR,
		"--api-audiences=https://kubernetes.default.svc.cluster.local",
		"--enable-priority-and-fairness=false",
		"--max-requests-inflight=1000", "--max-mutating-requests-inflight=1000",
	))
	if err != nil {
		return nil, err
	}
	host := fmt.Sprintf("https://%s:%d", apiIP, apiPort)
	cfg := &rest.Config{Host: host, BearerToken: apiToken, TLSClientConfig: rest.TLSClientConfig{Insecure: true},
		QPS: -1} // no client-side rate limit: the bench creates objects as fast as the apiserver takes them
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	if c.client, err = kubernetes.NewForConfig(cfg); err != nil {
		return nil, err
	}
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	deadline := time.Now().Add(90 * time.Second)
	for {
		req, _ := http.NewRequest("GET", host+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+apiToken)
		resp, err := hc.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		for _, d := range []*daemon{c.etcd, c.api} {
			if d.exited() {
				return nil, fmt.Errorf("%s exited: %v\n%s", d.name, d.err, d.tail())
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("kube-apiserver not ready after 90 s: %v\n%s", err, c.api.tail())
		}
		time.Sleep(500 * time.Millisecond)
	}
	c.kubeconfig = filepath.Join(c.dir, "kubeconfig")
	kubeconfig := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: ebb, cluster: {server: %q, insecure-skip-tls-verify: true}}]
users: [{name: admin, user: {token: %q}}]
contexts: [{name: ebb, context: {cluster: ebb, user: admin}}]
current-context: ebb
`, host, apiToken)
	return c, os.WriteFile(c.kubeconfig, []byte(kubeconfig), 0o600)
}

// addNode creates the Node object of an emulated node, with its underlay
// address as InternalIP (kube-proxy takes the node's IPs from it).
func (c *controlPlane) addNode(ctx context.Context, name, ip, podCIDR string) error {
	obj, err := c.client.CoreV1().Nodes().Create(ctx, &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec:       corev1.NodeSpec{PodCIDR: podCIDR, PodCIDRs: []string{podCIDR}},
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create node %s: %w", name, err)
	}
	obj.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: ip}, {Type: corev1.NodeHostName, Address: name}}
	obj.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, LastHeartbeatTime: metav1.Now(), LastTransitionTime: metav1.Now()}}
	if _, err := c.client.CoreV1().Nodes().UpdateStatus(ctx, obj, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("node %s status: %w", name, err)
	}
	return nil
}

// mgmtLink connects an emulated node to the apiserver: a veth whose host
// end (ebb-m<tag>) holds 10.253.<k>.1/30 and whose node end (mgmt) holds
// .2, with a host route to the apiserver's address only (no default route:
// untranslated Service traffic must not leave the node).
func mgmtLink(n *xnode, tag string, k int) error {
	host := prefix + "m" + tag
	return runAll([][]string{
		{"ip", "link", "add", host, "type", "veth", "peer", "name", host + "n"},
		{"ip", "link", "set", host + "n", "netns", n.ns, "name", "mgmt"},
		{"ip", "addr", "add", fmt.Sprintf("10.253.%d.1/30", k), "dev", host},
		{"ip", "link", "set", host, "up"},
		{"ip", "-n", n.ns, "addr", "add", fmt.Sprintf("10.253.%d.2/30", k), "dev", "mgmt"},
		{"ip", "-n", n.ns, "link", "set", "mgmt", "up"},
		{"ip", "-n", n.ns, "route", "add", apiIP + "/32", "via", fmt.Sprintf("10.253.%d.1", k)},
	})
}
