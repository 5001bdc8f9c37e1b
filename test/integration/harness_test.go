// Package integration drives the built ebpf-cni binary the way runtimes do
// (cnitool, or a direct exec with CNI_* variables) in real network
// namespaces, with real veths, TCX/tc attachments, pinned maps and packets.
//
// Every namespace is named ebt-<test>-<n>, every pin root is
// /sys/fs/bpf/ebt-<test>, every network ebt-<test>; t.Cleanup removes them
// even when a test fails. Needs root.
package integration

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ebpf-cni/ebpf-cni/internal/config"
	"github.com/ebpf-cni/ebpf-cni/internal/nat"
)

var (
	binDir  string // holds the freshly built ebpf-cni
	cnitool string
	cniPath string // binDir, then the reference plugins
)

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		// Not a pass: nothing was tested. Run as root (make test-integration).
		fmt.Fprintln(os.Stderr, "FAIL: the integration tests need root (netns, veth, BPF); nothing ran")
		os.Exit(1)
	}
	dir, err := os.MkdirTemp("", "ebt-bin-")
	if err != nil {
		panic(err)
	}
	binDir = dir
	for _, bin := range []string{"ebpf-cni", "ebpf-cni-agent"} {
		// Built as `make build` ships it: static and stripped.
		build := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", filepath.Join(binDir, bin), "../../cmd/"+bin)
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "build", bin+":", err)
			os.Exit(1)
		}
	}
	cnitool, err = exec.LookPath("cnitool")
	if err != nil {
		gobin := filepath.Join(os.Getenv("HOME"), "go", "bin", "cnitool")
		if _, statErr := os.Stat(gobin); statErr != nil {
			fmt.Fprintln(os.Stderr, "cnitool not found: run `make test` (it installs it) or go install github.com/containernetworking/cni/cnitool@v1.3.0")
			os.Exit(1)
		}
		cnitool = gobin
	}
	cniPath = binDir + ":/usr/lib/cni"
	code := m.Run()
	os.RemoveAll(binDir)
	os.Exit(code)
}

// node is one test's private ebpf-cni setup: its own network name, pin
// root, state and IPAM directories, and conflist.
type node struct {
	t        *testing.T
	name     string // network name, netns prefix
	pinRoot  string
	stateDir string
	ipamDir  string
	confDir  string
	version  string
	cniPath  string        // where cnitool finds plugins
	plugin   config.Plugin // the ebpf-cni plugin's config
	netns    int
}

var nonAlnum = regexp.MustCompile(`[^a-z0-9]+`)

func newNode(t *testing.T, ipamConf map[string]any) *node {
	t.Helper()
	// ebt-<6 letters of the test><3 hex of its full name>: unique per
	// (sub)test and short enough for "<name>-o" to be an interface name.
	short := nonAlnum.ReplaceAllString(strings.ToLower(strings.TrimPrefix(t.Name(), "Test")), "")
	if len(short) > 6 {
		short = short[:6]
	}
	sum := sha256.Sum256([]byte(t.Name()))
	short += hex.EncodeToString(sum[:])[:3]
	tmp := t.TempDir()
	n := &node{
		t:        t,
		name:     "ebt-" + short,
		pinRoot:  "/sys/fs/bpf/ebt-" + short,
		stateDir: filepath.Join(tmp, "state"),
		ipamDir:  filepath.Join(tmp, "ipam"),
		confDir:  filepath.Join(tmp, "net.d"),
		version:  "1.1.0",
		cniPath:  cniPath,
	}
	if ipamConf == nil {
		ipamConf = map[string]any{"ranges": [][]map[string]string{{{"subnet": "10.250.0.0/24"}}}}
	}
	if _, ok := ipamConf["dataDir"]; !ok {
		ipamConf["dataDir"] = n.ipamDir
	}
	n.plugin = config.Plugin{
		Type:    config.PluginType,
		Options: config.Options{PinRoot: n.pinRoot, StateDir: n.stateDir, LogFile: filepath.Join(tmp, "ebpf-cni.log")},
		IPAM:    ipamConf,
	}
	t.Cleanup(n.cleanup)
	return n
}

func (n *node) cleanup() {
	out, _ := exec.Command("ip", "netns", "list").Output()
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], n.name+"-") {
			exec.Command("ip", "netns", "del", f[0]).Run()
		}
	}
	os.RemoveAll(n.pinRoot)
	nat.Remove(n.name)
	if n.t.Failed() {
		if b, err := os.ReadFile(n.plugin.LogFile); err == nil {
			n.t.Logf("plugin log (last 4 KiB):\n%s", tail(b, 4096))
		}
	}
}

func tail(b []byte, max int) []byte {
	if len(b) > max {
		return b[len(b)-max:]
	}
	return b
}

// conf is the network config the plugin receives on stdin.
func (n *node) conf() []byte {
	var c map[string]any
	b, err := json.Marshal(n.plugin)
	if err == nil {
		err = json.Unmarshal(b, &c)
	}
	if err != nil {
		n.t.Fatal(err)
	}
	c["cniVersion"], c["name"] = n.version, n.name
	b, err = json.Marshal(c)
	if err != nil {
		n.t.Fatal(err)
	}
	return b
}

// writeConflist writes the node's conflist (extra plugins appended).
func (n *node) writeConflist(extra ...map[string]any) {
	n.t.Helper()
	plugins := []any{n.plugin}
	for _, e := range extra {
		plugins = append(plugins, e)
	}
	b, err := json.MarshalIndent(map[string]any{"cniVersion": n.version, "name": n.name, "plugins": plugins}, "", "  ")
	if err != nil {
		n.t.Fatal(err)
	}
	if err := os.MkdirAll(n.confDir, 0o755); err != nil {
		n.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(n.confDir, "10-"+n.name+".conflist"), b, 0o644); err != nil {
		n.t.Fatal(err)
	}
}

// newNS creates a namespace named <network>-<n>.
func (n *node) newNS() *pod {
	n.t.Helper()
	n.netns++
	name := fmt.Sprintf("%s-%d", n.name, n.netns)
	exec.Command("ip", "netns", "del", name).Run() // a killed run's
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		n.t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	return &pod{n: n, ns: name, path: "/var/run/netns/" + name}
}

// pod is one network namespace and what ADD gave it.
type pod struct {
	n      *node
	ns     string
	path   string
	result map[string]any
	ips    []netip.Addr
}

// cnitool runs `cnitool verb network netns` with the node's conflist.
func (n *node) cnitool(verb string, p *pod, cniArgs string) ([]byte, error) {
	if cniArgs != "" {
		return n.cnitoolEnv(verb, p, "CNI_ARGS="+cniArgs)
	}
	return n.cnitoolEnv(verb, p)
}

// cnitoolEnv is cnitool with extra environment (CNI_ARGS, CAP_ARGS).
func (n *node) cnitoolEnv(verb string, p *pod, env ...string) ([]byte, error) {
	cmd := exec.Command(cnitool, verb, n.name, p.path)
	cmd.Env = append(append(os.Environ(), "CNI_PATH="+n.cniPath, "NETCONFPATH="+n.confDir), env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("cnitool %s %s: %w: %s%s", verb, p.ns, err, out, stderr.Bytes())
	}
	return out, nil
}

// add wires p with cnitool and remembers its result.
func (n *node) add(p *pod) {
	n.t.Helper()
	out, err := n.cnitool("add", p, "")
	if err != nil {
		n.t.Fatal(err)
	}
	p.setResult(n.t, out)
}

func (p *pod) setResult(t *testing.T, out []byte) {
	t.Helper()
	if err := json.Unmarshal(out, &p.result); err != nil {
		t.Fatalf("result of %s is not JSON: %v: %s", p.ns, err, out)
	}
	ips, _ := p.result["ips"].([]any)
	p.ips = nil
	for _, ip := range ips {
		pfx := netip.MustParsePrefix(ip.(map[string]any)["address"].(string))
		p.ips = append(p.ips, pfx.Addr())
	}
	if len(p.ips) == 0 {
		t.Fatalf("result of %s has no ips: %s", p.ns, out)
	}
}

func (n *node) del(p *pod) {
	n.t.Helper()
	if _, err := n.cnitool("del", p, ""); err != nil {
		n.t.Fatal(err)
	}
}

// ip4 / ip6 return the pod's address of a family.
func (p *pod) ip(v6 bool) netip.Addr {
	for _, a := range p.ips {
		if a.Is6() == v6 {
			return a
		}
	}
	p.n.t.Fatalf("%s has no IPv%d address (%v)", p.ns, map[bool]int{false: 4, true: 6}[v6], p.ips)
	return netip.Addr{}
}

// run executes a command inside the pod's namespace.
func (p *pod) run(args ...string) ([]byte, error) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", p.ns}, args...)...)
	return cmd.CombinedOutput()
}

// ping asserts that dst answers from inside p.
func (p *pod) ping(dst netip.Addr) {
	p.n.t.Helper()
	if out, err := p.run("ping", "-c", "2", "-i", "0.2", "-W", "2", dst.String()); err != nil {
		p.n.t.Fatalf("ping %s from %s: %v\n%s", dst, p.ns, err, out)
	}
}

// tcp opens a listener in dst's namespace and exchanges a message from
// src's namespace; the sockets are created inside the namespaces and used
// from outside (no goroutine ever runs in a netns).
func tcp(t *testing.T, src, dst *pod, addr netip.Addr) {
	t.Helper()
	if err := tcpExchange(src.path, dst.path, addr, nil); err != nil {
		t.Fatalf("tcp %s -> %s (%s): %v", src.ns, dst.ns, addr, err)
	}
}

// tcpExchange connects from netns src to a listener in netns dst on addr and
// checks an echo; seen (when not nil) receives the source address the
// server saw.
func tcpExchange(src, dst string, addr netip.Addr, seen *netip.Addr) error {
	return tcpVia(src, dst, netip.AddrPortFrom(addr, 0), netip.AddrPort{}, seen)
}

// tcpVia listens on listen in dst and dials dial (the listener's own address
// when zero) from src, so a NATed address can be dialled.
func tcpVia(src, dst string, listen, dial netip.AddrPort, seen *netip.Addr) error {
	var ln net.Listener
	err := inNS(dst, func() error {
		var err error
		ln, err = net.Listen("tcp", listen.String())
		return err
	})
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	defer ln.Close()
	if !dial.IsValid() {
		dial = ln.Addr().(*net.TCPAddr).AddrPort()
	}
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		if seen != nil {
			*seen = c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		_, err = io.Copy(c, io.LimitReader(c, 5))
		done <- err
	}()
	var c net.Conn
	err = inNS(src, func() error {
		var err error
		c, err = net.DialTimeout("tcp", dial.String(), 3*time.Second)
		return err
	})
	if err != nil {
		return fmt.Errorf("dial %s: %w", dial, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("hello")); err != nil {
		return err
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil {
		return fmt.Errorf("read echo: %w", err)
	}
	if string(buf) != "hello" {
		return fmt.Errorf("echo %q", buf)
	}
	return <-done
}

// inNS runs fn on a thread switched into the namespace at path ("" = host).
func inNS(path string, fn func() error) error {
	if path == "" {
		return fn()
	}
	target, err := ns.GetNS(path)
	if err != nil {
		return err
	}
	defer target.Close()
	return target.Do(func(ns.NetNS) error { return fn() })
}

// call execs the binary directly, as a runtime does, and returns stdout.
func (n *node) call(verb, containerID string, p *pod, stdin []byte, extraEnv ...string) ([]byte, error) {
	cmd := exec.Command(filepath.Join(binDir, "ebpf-cni"))
	cmd.Env = append([]string{
		"CNI_COMMAND=" + verb, "CNI_CONTAINERID=" + containerID, "CNI_IFNAME=eth0",
		"CNI_PATH=" + cniPath, "PATH=" + os.Getenv("PATH"),
	}, extraEnv...)
	if p != nil {
		cmd.Env = append(cmd.Env, "CNI_NETNS="+p.path)
	}
	cmd.Stdin = bytes.NewReader(stdin)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%s %s: %w (stdout %s, stderr %s)", verb, containerID, err, out, stderr.Bytes())
	}
	return out, nil
}

// cniError decodes the error object a failed call printed.
type cniError struct {
	CNIVersion string `json:"cniVersion"`
	Code       uint   `json:"code"`
	Msg        string `json:"msg"`
	Details    string `json:"details"`
}

func decodeError(t *testing.T, out []byte) cniError {
	t.Helper()
	var e cniError
	if err := json.Unmarshal(out, &e); err != nil || e.Code == 0 {
		t.Fatalf("stdout is not a CNI error object: %v: %q", err, out)
	}
	return e
}

// hostLinks returns the names of ebpf-cni host veths in the host namespace.
func hostLinks(t *testing.T) map[string]int {
	t.Helper()
	links, err := netlinksafe.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int{}
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Name, "ebpf") {
			out[l.Attrs().Name] = l.Attrs().Index
		}
	}
	return out
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// unmountUnder lazily unmounts every mount below dir, deepest first.
func unmountUnder(dir string) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return
	}
	var mounts []string
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], dir) {
			mounts = append(mounts, f[4])
		}
	}
	for i := len(mounts) - 1; i >= 0; i-- {
		exec.Command("umount", "-l", mounts[i]).Run()
	}
}

// waitFor polls ok until it holds or timeout passes.
func waitFor(t *testing.T, what string, timeout time.Duration, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// freshNetns creates the test's network namespace name, removed at the end
// of t. One of that name left by a run killed before its cleanup goes
// first: the names carry the tests' prefix, they are ours.
func freshNetns(t *testing.T, name string) {
	t.Helper()
	exec.Command("ip", "netns", "del", name).Run()
	run(t, "ip", "netns", "add", name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
}
