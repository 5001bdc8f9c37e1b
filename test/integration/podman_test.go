package integration

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ebpf-cni/ebpf-cni/internal/veth"
)

// podmanEnv runs podman 4.3 with the CNI backend on a private storage and
// the node's conflist dir (another caller: VERSION before every call,
// CNI_ARGS with K8S_POD_NAME only).
type podmanEnv struct {
	t    *testing.T
	dir  string
	conf string
}

func newPodman(t *testing.T, n *node) *podmanEnv {
	t.Helper()
	if _, err := exec.LookPath("podman"); err != nil {
		t.Fatalf("podman not installed: run `make e2e` (it installs it)")
	}
	dir, err := os.MkdirTemp("", "ebt-podman-")
	if err != nil {
		t.Fatal(err)
	}
	p := &podmanEnv{t: t, dir: dir, conf: filepath.Join(dir, "containers.conf")}
	bin := filepath.Join(dir, "bin")
	os.MkdirAll(bin, 0o755)
	os.Symlink(filepath.Join(binDir, "ebpf-cni"), filepath.Join(bin, "ebpf-cni"))
	conf := fmt.Sprintf(`[network]
network_backend = "cni"
cni_plugin_dirs = [%q]
network_config_dir = %q
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
`, bin, n.confDir)
	if err := os.WriteFile(p.conf, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.cleanup)
	image := buildPauseImage(t, dir)
	if out, err := p.run("load", "-i", image); err != nil {
		t.Fatalf("podman load: %v: %s", err, out)
	}
	return p
}

func (p *podmanEnv) run(args ...string) ([]byte, error) {
	cmd := exec.Command("podman", append([]string{
		"--root", filepath.Join(p.dir, "root"), "--runroot", filepath.Join(p.dir, "run"), "--storage-driver", "vfs",
	}, args...)...)
	cmd.Env = append(os.Environ(), "CONTAINERS_CONF="+p.conf)
	return cmd.CombinedOutput()
}

func (p *podmanEnv) cleanup() {
	p.run("rm", "-a", "-f", "-t", "0")
	if out, err := exec.Command("sh", "-c", "grep "+p.dir+" /proc/self/mountinfo | awk '{print $5}' | sort -r").Output(); err == nil {
		for _, m := range strings.Fields(string(out)) {
			exec.Command("umount", "-l", m).Run()
		}
	}
	os.RemoveAll(p.dir)
}

type podmanContainer struct {
	id, name, netns string
	ip              netip.Addr
}

func (p *podmanEnv) start(name, network string) *podmanContainer {
	p.t.Helper()
	// podman raises RLIMIT_NOFILE and RLIMIT_NPROC by default, which a
	// confined host (this CI sandbox) refuses: ask for modest limits, below
	// the current ones (lowering a limit is always allowed).
	var args []string
	for _, l := range []struct {
		name string
		res  int
	}{{"nofile", unix.RLIMIT_NOFILE}, {"nproc", unix.RLIMIT_NPROC}} {
		var rl unix.Rlimit
		if err := unix.Getrlimit(l.res, &rl); err == nil {
			v := min(rl.Cur, 1024)
			args = append(args, "--ulimit", fmt.Sprintf("%s=%d:%d", l.name, v, v))
		}
	}
	out, err := p.run(append(append([]string{"run", "-d"}, args...), "--name", name, "--network", network, pauseImage)...)
	if err != nil {
		p.t.Fatalf("podman run: %v: %s", err, out)
	}
	c := &podmanContainer{name: name, id: strings.TrimSpace(string(out))}
	out, err = p.run("inspect", name)
	if err != nil {
		p.t.Fatalf("podman inspect: %v: %s", err, out)
	}
	var info []struct {
		NetworkSettings struct {
			SandboxKey string
			Networks   map[string]struct{ IPAddress string }
		}
	}
	if err := json.Unmarshal(out, &info); err != nil || len(info) != 1 {
		p.t.Fatalf("podman inspect output: %v: %s", err, out)
	}
	c.netns = info[0].NetworkSettings.SandboxKey
	if c.ip, err = netip.ParseAddr(info[0].NetworkSettings.Networks[network].IPAddress); err != nil {
		p.t.Fatalf("container %s has no address on %s: %s", name, network, out)
	}
	return c
}

func TestPodmanCNI(t *testing.T) {
	n := newNode(t, nil)
	n.version = "1.0.0" // podman 4.3 refuses 1.1.0 results
	n.writeConflist()
	pm := newPodman(t, n)
	a := pm.start(n.name+"-a", n.name)
	b := pm.start(n.name+"-b", n.name)
	if err := tcpExchange(a.netns, b.netns, b.ip, nil); err != nil {
		t.Errorf("container a -> b: %v", err)
	}
	if err := tcpExchange("", a.netns, a.ip, nil); err != nil {
		t.Errorf("host -> container: %v", err)
	}
	e := n.inspect()[a.ip]
	if e.PodName != a.name || e.Counters.RedirectPackets == 0 {
		t.Errorf("inspect of %s: pod name %q, %d redirected; want %q and > 0", a.ip, e.PodName, e.Counters.RedirectPackets, a.name)
	}
	for _, c := range []*podmanContainer{a, b} {
		if out, err := pm.run("rm", "-f", "-t", "0", c.name); err != nil {
			t.Fatalf("podman rm: %v: %s", err, out)
		}
		n.assertGone(veth.HostName(c.id, "eth0"), c.id, []netip.Addr{c.ip})
	}
}
