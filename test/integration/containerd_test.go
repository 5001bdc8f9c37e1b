package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/ebpf-cni/ebpf-cni/internal/veth"
)

// pauseImage is built locally (test/e2e/pause packed by tools/ociimage): no
// registry is reachable.
const pauseImage = "localhost/ebpf-cni/pause:e2e"

// containerd is a private containerd (own root, state and socket) whose CRI
// plugin uses ebpf-cni from the node's conflist, driven through CRI.
type containerd struct {
	t      *testing.T
	dir    string
	binDir string // its CNI bin dir
	sock   string
	cmd    *exec.Cmd
	conn   *grpc.ClientConn
	client runtimeapi.RuntimeServiceClient
}

func startContainerd(t *testing.T, n *node) *containerd {
	t.Helper()
	return startContainerdOpts(t, n, true)
}

// startContainerdOpts starts containerd; without withPlugin its CNI bin dir
// holds only the reference plugins and waits for an installer (DaemonSet).
func startContainerdOpts(t *testing.T, n *node, withPlugin bool) *containerd {
	t.Helper()
	for _, bin := range []string{"containerd", "ctr", "runc"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("%s not installed: run `make e2e` (it installs containerd and runc)", bin)
		}
	}
	dir, err := os.MkdirTemp("", "ebt-ctrd-")
	if err != nil {
		t.Fatal(err)
	}
	c := &containerd{t: t, dir: dir, sock: filepath.Join(dir, "containerd.sock")}
	t.Cleanup(c.stop)

	// The CNI bin dir: ebpf-cni and the loopback plugin containerd calls first.
	bin := filepath.Join(dir, "bin")
	c.binDir = bin
	os.MkdirAll(bin, 0o755)
	if withPlugin {
		if err := os.Symlink(filepath.Join(binDir, "ebpf-cni"), filepath.Join(bin, "ebpf-cni")); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []string{"loopback", "portmap"} {
		if err := os.Symlink("/usr/lib/cni/"+p, filepath.Join(bin, p)); err != nil {
			t.Fatal(err)
		}
	}
	image := buildPauseImage(t, dir)

	config := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = %q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %q
    conf_dir = %q
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), c.sock, pauseImage, bin, n.confDir)
	cfg := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfg, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "containerd.log"))
	if err != nil {
		t.Fatal(err)
	}
	c.cmd = exec.Command("containerd", "--config", cfg)
	c.cmd.Stdout, c.cmd.Stderr = logf, logf
	if err := c.cmd.Start(); err != nil {
		t.Fatalf("start containerd: %v", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(c.sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd did not start; log:\n%s", c.log())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if out, err := exec.Command("ctr", "--address", c.sock, "-n", "k8s.io", "images", "import", image).CombinedOutput(); err != nil {
		t.Fatalf("ctr images import: %v: %s", err, out)
	}
	c.conn, err = grpc.NewClient("unix://"+c.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	c.client = runtimeapi.NewRuntimeServiceClient(c.conn)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		st, err := c.client.Status(ctx, &runtimeapi.StatusRequest{})
		if err == nil && (networkReady(st) || !withPlugin) {
			return c
		}
		if ctx.Err() != nil {
			t.Fatalf("CRI not ready: %v %v; log:\n%s", err, st, c.log())
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func networkReady(st *runtimeapi.StatusResponse) bool {
	for _, c := range st.GetStatus().GetConditions() {
		if c.Type == runtimeapi.NetworkReady {
			return c.Status
		}
	}
	return false
}

// buildPauseImage builds the static pause binary and packs it as an OCI
// image archive.
func buildPauseImage(t *testing.T, dir string) string {
	t.Helper()
	pause := filepath.Join(dir, "pause")
	build := exec.Command("go", "build", "-o", pause, "../e2e/pause")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build pause: %v: %s", err, out)
	}
	image := filepath.Join(dir, "pause.tar")
	pack := exec.Command("go", "run", "../../tools/ociimage", "-o", image, "-name", pauseImage, "-entrypoint", "/pause", "-file", "/pause="+pause)
	if out, err := pack.CombinedOutput(); err != nil {
		t.Fatalf("pack pause image: %v: %s", err, out)
	}
	return image
}

func (c *containerd) log() string {
	b, _ := os.ReadFile(filepath.Join(c.dir, "containerd.log"))
	return string(tail(b, 4096))
}

func (c *containerd) stop() {
	if c.conn != nil {
		// Remove whatever sandboxes a failed test left, so DEL runs.
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if list, err := c.client.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{}); err == nil {
			for _, s := range list.Items {
				c.client.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: s.Id})
				c.client.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: s.Id})
			}
		}
		cancel()
		c.conn.Close()
	}
	if c.cmd != nil && c.cmd.Process != nil {
		c.cmd.Process.Signal(os.Interrupt)
		done := make(chan error, 1)
		go func() { done <- c.cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			c.cmd.Process.Kill()
			<-done
		}
	}
	unmountUnder(c.dir) // containerd leaves its shm and rootfs mounts behind
	if c.t.Failed() {
		c.t.Logf("containerd log (tail):\n%s", c.log())
	}
	os.RemoveAll(c.dir)
}

// sandbox is a pod sandbox run through CRI.
type sandbox struct {
	id    string
	netns string
	ip    netip.Addr
}

func (c *containerd) runSandbox(ns, name string) *sandbox {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	logDir := filepath.Join(c.dir, "logs", name)
	os.MkdirAll(logDir, 0o755)
	resp, err := c.client.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: name, Namespace: ns, Uid: "uid-" + name, Attempt: 0},
		Hostname:     name,
		LogDirectory: logDir,
		Linux:        &runtimeapi.LinuxPodSandboxConfig{},
	}})
	if err != nil {
		c.t.Fatalf("RunPodSandbox %s/%s: %v\n%s", ns, name, err, c.log())
	}
	sb := c.sandboxOf(resp.PodSandboxId)
	return sb
}

// sandboxOf reads a sandbox's address and network namespace through CRI.
func (c *containerd) sandboxOf(id string) *sandbox {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := c.client.PodSandboxStatus(ctx, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: id, Verbose: true})
	if err != nil {
		c.t.Fatal(err)
	}
	sb := &sandbox{id: id}
	if sb.ip, err = netip.ParseAddr(st.Status.GetNetwork().GetIp()); err != nil {
		c.t.Fatalf("sandbox %s has no IP: %v", id, err)
	}
	var info struct {
		RuntimeSpec struct {
			Linux struct {
				Namespaces []struct {
					Type string `json:"type"`
					Path string `json:"path"`
				} `json:"namespaces"`
			} `json:"linux"`
		} `json:"runtimeSpec"`
	}
	if err := json.Unmarshal([]byte(st.Info["info"]), &info); err != nil {
		c.t.Fatalf("verbose sandbox info: %v", err)
	}
	for _, n := range info.RuntimeSpec.Linux.Namespaces {
		if n.Type == "network" {
			sb.netns = n.Path
		}
	}
	if sb.netns == "" {
		c.t.Fatalf("no network namespace in the sandbox's runtime spec")
	}
	return sb
}

func (c *containerd) stopAndRemove(sb *sandbox) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := c.client.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: sb.id}); err != nil {
		c.t.Fatalf("StopPodSandbox: %v", err)
	}
	if _, err := c.client.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: sb.id}); err != nil {
		c.t.Fatalf("RemovePodSandbox: %v", err)
	}
}

// callsOf counts the plugin log's entries of a command for a container.
func (n *node) callsOf(command, containerID string) int {
	b, _ := os.ReadFile(n.plugin.LogFile)
	count := 0
	for _, line := range strings.Split(string(b), "\n") {
		var e struct {
			Command string            `json:"command"`
			Env     map[string]string `json:"env"`
		}
		if json.Unmarshal([]byte(line), &e) == nil && e.Command == command && e.Env["CNI_CONTAINERID"] == containerID {
			count++
		}
	}
	return count
}

// containerd 1.6's CRI drives ebpf-cni unchanged: sandboxes get addresses,
// talk through the BPF redirect, carry their Kubernetes names, and leave
// nothing behind once stopped and removed (containerd DELs twice).
func TestContainerdCRI(t *testing.T) {
	n := newNode(t, nil)
	n.version = "1.0.0" // containerd 1.6 refuses 1.1.0 results
	n.writeConflist()
	fwd := newForwardCounter(t, n, "", "10.250.0.0/24")
	c := startContainerd(t, n)

	a := c.runSandbox("e2e", "web-1")
	b := c.runSandbox("e2e", "web-2")
	t.Logf("sandboxes %s (%s, %s) and %s (%s, %s)", a.id[:12], a.ip, a.netns, b.id[:12], b.ip, b.netns)
	if err := tcpExchange(a.netns, b.netns, b.ip, nil); err != nil {
		t.Errorf("sandbox a -> b: %v", err)
	}
	if err := tcpExchange(b.netns, a.netns, a.ip, nil); err != nil {
		t.Errorf("sandbox b -> a: %v", err)
	}
	if err := tcpExchange("", a.netns, a.ip, nil); err != nil {
		t.Errorf("host -> sandbox: %v", err)
	}
	eps := n.inspect()
	for _, s := range []struct {
		sb   *sandbox
		name string
	}{{a, "web-1"}, {b, "web-2"}} {
		e := eps[s.sb.ip]
		if e.PodNamespace != "e2e" || e.PodName != s.name || e.ContainerID != s.sb.id {
			t.Errorf("inspect of %s: %s/%s container %s, want e2e/%s %s", s.sb.ip, e.PodNamespace, e.PodName, e.ContainerID, s.name, s.sb.id)
		}
		if e.Counters.RedirectPackets == 0 {
			t.Errorf("%s: no packet took the BPF redirect", s.name)
		}
	}
	if got := fwd.packets(); got != 0 {
		t.Errorf("%d sandbox packets crossed the host FORWARD hook", got)
	}
	for _, sb := range []*sandbox{a, b} {
		c.stopAndRemove(sb)
		n.assertGone(veth.HostName(sb.id, "eth0"), sb.id, []netip.Addr{sb.ip})
		if got := n.callsOf("DEL", sb.id); got < 2 {
			t.Errorf("containerd sent %d DELs for %s, expected stop and remove to both DEL", got, sb.id[:12])
		}
	}
}

// The chained conflist (ebpf-cni -> portmap -> bandwidth -> tuning, the
// v1.9.0 reference plugins) under containerd's CRI: a sandbox with a
// hostPort and bandwidth annotations; the hostPort reaches it, its traffic
// takes the shaped host path, tuning ran, and stop/remove clean every plugin.
func TestContainerdChain(t *testing.T) {
	n := newNode(t, nil)
	n.version = "1.0.0"
	n.plugin.Capabilities = map[string]bool{"bandwidth": true}
	n.writeConflist(
		map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}},
		map[string]any{"type": "bandwidth", "capabilities": map[string]bool{"bandwidth": true}},
		map[string]any{"type": "tuning", "sysctl": map[string]string{"net.core.somaxconn": "512"}},
	)
	out := outside(t, n, "203.0.113.1/24", "203.0.113.2/24")
	c := startContainerdOpts(t, n, true)
	for _, p := range []string{"portmap", "bandwidth", "tuning"} {
		os.Remove(filepath.Join(c.binDir, p))
		if err := os.Symlink(filepath.Join(refPlugins, p), filepath.Join(c.binDir, p)); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	resp, err := c.client.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: "shaped", Namespace: "e2e", Uid: "uid-shaped"},
		Hostname:     "shaped",
		LogDirectory: filepath.Join(c.dir, "logs"),
		PortMappings: []*runtimeapi.PortMapping{{Protocol: runtimeapi.Protocol_TCP, ContainerPort: 8080, HostPort: 18082}},
		Annotations:  map[string]string{"kubernetes.io/ingress-bandwidth": "100M", "kubernetes.io/egress-bandwidth": "100M"},
		Linux:        &runtimeapi.LinuxPodSandboxConfig{},
	}})
	if err != nil {
		t.Fatalf("RunPodSandbox: %v\n%s", err, c.log())
	}
	sb := c.sandboxOf(resp.PodSandboxId)
	podPort := netip.AddrPortFrom(sb.ip, 8080)
	if err := tcpVia(out.path, sb.netns, podPort, netip.MustParseAddrPort("203.0.113.1:18082"), nil); err != nil {
		t.Errorf("outside -> hostPort under containerd: %v", err)
	}
	if got, _ := exec.Command("ip", "netns", "exec", filepath.Base(sb.netns), "cat", "/proc/sys/net/core/somaxconn").Output(); strings.TrimSpace(string(got)) != "512" {
		t.Errorf("tuning did not run: somaxconn %q", got)
	}
	if len(ifbDevices(t)) == 0 {
		t.Errorf("bandwidth did not shape the sandbox (no ifb device)")
	}
	if e := n.inspect()[sb.ip]; !e.Shaped {
		t.Errorf("the rate-limited sandbox is not marked shaped in the maps (capability not passed?)")
	}
	c.stopAndRemove(sb)
	n.assertGone(veth.HostName(sb.id, "eth0"), sb.id, []netip.Addr{sb.ip})
	if left := ifbDevices(t); len(left) > 0 {
		t.Errorf("bandwidth's ifb left after remove: %v", left)
	}
	if rules, _ := exec.Command("iptables-save", "-t", "nat").Output(); strings.Contains(string(rules), sb.id[:12]) {
		t.Errorf("portmap rules of the sandbox left after remove")
	}
}
