package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

const (
	prefix  = "ebb-"
	pinRoot = "/sys/fs/bpf/ebb-bench"
	bridge  = "ebb-br0"
)

// env is the bench's scratch space and the registry of what it created.
type env struct {
	dir     string
	cniPath string
	cnitool string

	mu     sync.Mutex
	pods   map[string]*benchPod // by netns name
	mounts []string             // bpffs instances of emulated nodes, unmounted at cleanup
	undo   []func()             // run first at cleanup, last registered first (processes, cgroups)
}

// onCleanup registers f to run at cleanup (also on SIGINT), before the
// namespaces and links go.
func (e *env) onCleanup(f func()) {
	e.mu.Lock()
	e.undo = append(e.undo, f)
	e.mu.Unlock()
}

type benchPod struct {
	net  *network
	ns   string
	ip   netip.Addr
	done bool
}

// network is one plugin configuration under test.
type network struct {
	name    string // ebb-<x>
	label   string
	confDir string
	conf    map[string]any // the plugin entry
	version string
	nodeNS  string // the emulated node (netns) the plugin runs in; "" = this host
}

func newEnv() (*env, error) {
	dir, err := os.MkdirTemp("", "ebb-")
	if err != nil {
		return nil, err
	}
	bin := filepath.Join(dir, "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return nil, err
	}
	data, err := os.ReadFile(*plugin)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(bin, "ebpf-cni"), data, 0o755); err != nil {
		return nil, err
	}
	tool, err := exec.LookPath("cnitool")
	if err != nil {
		tool = filepath.Join(os.Getenv("HOME"), "go", "bin", "cnitool")
		if _, err := os.Stat(tool); err != nil {
			return nil, fmt.Errorf("cnitool not found (make bench installs it)")
		}
	}
	return &env{dir: dir, cniPath: bin + ":/usr/lib/cni", cnitool: tool, pods: map[string]*benchPod{}}, nil
}

// netConf builds a network whose single plugin is conf.
func (e *env) network(short, label string, conf map[string]any) (*network, error) {
	n := &network{name: prefix + short, label: label, confDir: filepath.Join(e.dir, "net.d", short), conf: conf, version: "1.0.0"}
	if conf["type"] == "ebpf-cni" {
		n.version = "1.1.0"
	}
	if err := os.MkdirAll(n.confDir, 0o755); err != nil {
		return nil, err
	}
	list := map[string]any{"cniVersion": n.version, "name": n.name, "plugins": []any{conf}}
	b, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		return nil, err
	}
	return n, os.WriteFile(filepath.Join(n.confDir, "10-"+n.name+".conflist"), b, 0o644)
}

// stdin is the single-plugin network config a runtime would send.
func (n *network) stdin() []byte {
	c := map[string]any{"cniVersion": n.version, "name": n.name}
	for k, v := range n.conf {
		c[k] = v
	}
	b, _ := json.Marshal(c)
	return b
}

func (e *env) newNS(name string) error {
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return fmt.Errorf("ip netns add %s: %v: %s", name, err, out)
	}
	return nil
}

// add runs cnitool add and returns the pod's first address and the time
// cnitool took.
func (e *env) add(n *network, ns string) (*benchPod, time.Duration, error) {
	return e.addAs(n, ns, "", "")
}

// addAs is add naming the Kubernetes pod (CNI_ARGS) when podNS is set.
func (e *env) addAs(n *network, ns, podNS, podName string) (*benchPod, time.Duration, error) {
	p := &benchPod{net: n, ns: ns}
	e.mu.Lock()
	e.pods[ns] = p
	e.mu.Unlock()
	var env []string
	if podNS != "" {
		env = append(env, fmt.Sprintf("CNI_ARGS=K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s", podNS, podName))
	}
	out, d, err := e.cnitoolRun("add", n, ns, env...)
	if err != nil {
		return p, d, err
	}
	var res struct {
		IPs []struct {
			Address string `json:"address"`
		} `json:"ips"`
	}
	if err := json.Unmarshal(out, &res); err != nil || len(res.IPs) == 0 {
		return p, d, fmt.Errorf("result of %s: %v: %s", ns, err, out)
	}
	pfx, err := netip.ParsePrefix(res.IPs[0].Address)
	if err != nil {
		return p, d, err
	}
	p.ip = pfx.Addr()
	return p, d, nil
}

func (e *env) del(p *benchPod) (time.Duration, error) {
	_, d, err := e.cnitoolRun("del", p.net, p.ns)
	if err == nil {
		e.mu.Lock()
		p.done = true
		e.mu.Unlock()
	}
	return d, err
}

func (e *env) cnitoolRun(verb string, n *network, ns string, env ...string) ([]byte, time.Duration, error) {
	cmd := exec.Command(e.cnitool, verb, n.name, "/var/run/netns/"+ns)
	if n.nodeNS != "" {
		// The plugin runs inside the emulated node: only its network
		// namespace is entered (`ip netns exec` would remount /sys).
		cmd = exec.Command("nsenter", "--net=/var/run/netns/"+n.nodeNS, e.cnitool, verb, n.name, "/var/run/netns/"+ns)
	}
	cmd.Env = append(append(os.Environ(), "CNI_PATH="+e.cniPath, "NETCONFPATH="+n.confDir), env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	out, err := cmd.Output()
	d := time.Since(start)
	if err != nil {
		return out, d, fmt.Errorf("cnitool %s %s %s: %v: %s%s", verb, n.name, ns, err, out, stderr.Bytes())
	}
	return out, d, nil
}

// direct runs the plugin binary like a runtime does and returns its max RSS
// in KiB (the plugin process itself, not delegated IPAM children). It goes
// through GNU time: a child exec'd straight from this Go process inherits
// this process's RSS high-water mark (vfork shares the address space), so
// its own rusage would report ours.
func (e *env) direct(bin, verb, cid, ns string, stdin []byte) (int64, error) {
	cmd := exec.Command("/usr/bin/time", "-f", "maxrss %M", bin)
	cmd.Env = []string{"CNI_COMMAND=" + verb, "CNI_CONTAINERID=" + cid, "CNI_IFNAME=eth0",
		"CNI_NETNS=/var/run/netns/" + ns, "CNI_PATH=" + e.cniPath, "PATH=" + os.Getenv("PATH")}
	cmd.Stdin = bytes.NewReader(stdin)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return 0, fmt.Errorf("%s %s: %v: %s%s", filepath.Base(bin), verb, err, out, stderr.Bytes())
	}
	var kib int64
	for _, line := range strings.Split(stderr.String(), "\n") {
		if v, ok := strings.CutPrefix(line, "maxrss "); ok {
			kib, err = strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		}
	}
	if kib == 0 || err != nil {
		return 0, fmt.Errorf("no max RSS from /usr/bin/time: %v: %s", err, stderr.Bytes())
	}
	return kib, nil
}

// run executes a command inside a namespace.
func inNS(ns string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...)
}

// cleanup DELs every pod still attached and removes every ebb-* thing.
func (e *env) cleanup() {
	e.mu.Lock()
	undo := e.undo
	e.undo = nil
	e.mu.Unlock()
	for i := len(undo) - 1; i >= 0; i-- {
		undo[i]()
	}
	e.mu.Lock()
	pods := make([]*benchPod, 0, len(e.pods))
	for _, p := range e.pods {
		if !p.done && p.net != nil {
			pods = append(pods, p)
		}
	}
	e.mu.Unlock()
	parallel(len(pods), 4, func(i int) error {
		e.del(pods[i])
		return nil
	})
	out, _ := exec.Command("ip", "netns", "list").Output()
	var names []string
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], prefix) {
			names = append(names, f[0])
		}
	}
	parallel(len(names), 4, func(i int) error {
		return exec.Command("ip", "netns", "del", names[i]).Run()
	})
	links, _ := exec.Command("ip", "-o", "link", "show").Output()
	for _, line := range strings.Split(string(links), "\n") {
		// "12: ebb-br0: <...>" or "13: ebb-va@if12: <...>"
		if f := strings.Fields(line); len(f) > 1 && strings.HasPrefix(f[1], prefix) {
			exec.Command("ip", "link", "del", strings.SplitN(strings.TrimSuffix(f[1], ":"), "@", 2)[0]).Run()
		}
	}
	os.RemoveAll(pinRoot)
	e.mu.Lock()
	for _, m := range e.mounts {
		exec.Command("umount", "-l", m).Run()
	}
	e.mounts = nil
	e.mu.Unlock()
	os.RemoveAll(e.dir)
	e.mu.Lock()
	e.pods = map[string]*benchPod{}
	e.mu.Unlock()
}

// parallel runs fn(0..n-1) on workers goroutines and returns the first error.
func parallel(n, workers int, fn func(int) error) error {
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
		next  = make(chan int)
	)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				if err := fn(i); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
				}
			}
		}()
	}
	for i := 0; i < n; i++ {
		next <- i
	}
	close(next)
	wg.Wait()
	return first
}
