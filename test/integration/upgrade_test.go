package integration

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// buildNext builds a second plugin from a copy of this module whose
// datapath changed a map's layout: endpoint_stats gained a field, so its
// map is renamed ep_stats_v2 -> ep_stats_v3 (as the layout rule wants). It
// needs clang, as `make generate` does.
func buildNext(t *testing.T) string {
	t.Helper()
	if _, err := exec.LookPath("clang"); err != nil {
		t.Fatalf("clang is needed to build the second datapath (make test installs it): %v", err)
	}
	src, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, p := range []string{"go.mod", "go.sum", "bpf", "tools", "cmd", "internal"} {
		if out, err := exec.Command("cp", "-r", filepath.Join(src, p), dir).CombinedOutput(); err != nil {
			t.Fatalf("copy %s: %v: %s", p, err, out)
		}
	}
	rewrite := func(path string, edit func(string) string) {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(edit(string(b))), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	rewrite(filepath.Join(dir, "bpf", "datapath.h"), func(s string) string {
		s = strings.ReplaceAll(s, "ep_stats_v2", "ep_stats_v3")
		return strings.Replace(s, "\t__u64 to_node_fallback;", "\t__u64 to_node_fallback;\n\t__u64 upgrade_probe; /* new in the next build */", 1)
	})
	rewrite(filepath.Join(dir, "bpf", "datapath.c"), func(s string) string { return strings.ReplaceAll(s, "ep_stats_v2", "ep_stats_v3") })
	filepath.WalkDir(filepath.Join(dir, "internal"), func(p string, d os.DirEntry, err error) error {
		if err == nil && strings.HasSuffix(p, ".go") {
			rewrite(p, func(s string) string {
				return strings.NewReplacer("EpStatsV2", "EpStatsV3", "ep_stats_v2", "ep_stats_v3").Replace(s)
			})
		}
		return nil
	})
	gen := exec.Command("go", "generate", ".")
	gen.Dir = filepath.Join(dir, "tools")
	if out, err := gen.CombinedOutput(); err != nil {
		t.Fatalf("generate the next datapath: %v: %s", err, out)
	}
	bin := filepath.Join(dir, "ebpf-cni-next")
	build := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, "./cmd/ebpf-cni")
	build.Dir, build.Env = dir, append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the next plugin: %v: %s", err, out)
	}
	return bin
}

// A new build reaches running pods: its first ADD moves every attachment
// (TCX links updated in place, tc filters replaced) onto its programs,
// migrates the renamed counters map, and unpins the old programs and map;
// a ping flood between two pods across it loses nothing. The old build
// then refuses to run over the newer pins and says what to do.
func TestUpgradeReachesRunningPods(t *testing.T) {
	next := buildNext(t)
	n := newNode(t, nil)
	n.writeConflist()
	a, b := n.newNS(), n.newNS()
	n.add(a)
	n.add(b)
	// A legacy-tc pod on the same node (same pin root, its own network).
	ntc := newNode(t, map[string]any{"ranges": [][]map[string]string{{{"subnet": "10.250.9.0/24"}}}})
	ntc.name = n.name + "t" // its own network and namespaces
	ntc.pinRoot, ntc.plugin.PinRoot, ntc.plugin.Attach = n.pinRoot, n.pinRoot, "tc"
	ntc.writeConflist()
	c := ntc.newNS()
	ntc.add(c)
	a.ping(b.ip(false))
	a.ping(c.ip(false))
	before := n.inspect()[a.ip(false)].Counters.FromPodPackets
	oldTag := filepath.Base(only(t, filepath.Join(n.pinRoot, "progs", "*")))
	oldProgs := map[string]uint32{}
	for ip, e := range n.inspect() {
		oldProgs[ip.String()] = uint32(e.Attachments[0].ProgramID)
	}

	// The flood runs while the next build's first ADD takes over.
	flood := exec.Command("ip", "netns", "exec", a.ns, "ping", "-q", "-i", "0.001", "-c", "4000", "-W", "1", b.ip(false).String())
	var out bytes.Buffer
	flood.Stdout, flood.Stderr = &out, &out
	if err := flood.Start(); err != nil {
		t.Fatal(err)
	}
	d := n.newNS()
	if res, err := n.callWith(next, "ADD", "ebt-upgrade-d", d, n.conf()); err != nil {
		t.Fatalf("ADD with the next build: %v", err)
	} else {
		d.setResult(t, res)
	}
	if err := flood.Wait(); err != nil {
		t.Fatalf("ping flood: %v\n%s", err, out.String())
	}
	m := regexp.MustCompile(`(\d+) packets transmitted, (\d+) received`).FindStringSubmatch(out.String())
	if m == nil || m[1] != m[2] {
		t.Fatalf("packets lost across the upgrade: %s", out.String())
	}
	t.Logf("across the upgrade: %s packets sent, %s received", m[1], m[2])

	// The node runs the next build only.
	if _, err := os.Stat(filepath.Join(n.pinRoot, "progs", oldTag)); !os.IsNotExist(err) {
		t.Errorf("the old programs' pins are still there: %v", err)
	}
	if _, err := os.Stat(filepath.Join(n.pinRoot, "ep_stats_v2")); !os.IsNotExist(err) {
		t.Errorf("ep_stats_v2 still pinned after its migration: %v", err)
	}
	if _, err := os.Stat(filepath.Join(n.pinRoot, "ep_stats_v3")); err != nil {
		t.Errorf("no ep_stats_v3: %v", err)
	}
	views := inspectWith(t, next, n)
	for ip, old := range oldProgs {
		for _, v := range views.Endpoints {
			if v.IP.String() == ip && (len(v.Attachments) != 2 || uint32(v.Attachments[0].ProgramID) == old || v.Attachments[0].Mode == "") {
				t.Errorf("%s still runs its old program %d (or none): %+v", ip, old, v.Attachments)
			}
			if v.IP == a.ip(false) && v.Counters.FromPodPackets < before {
				t.Errorf("counters of %s not migrated: %d packets from the pod, %d before", ip, v.Counters.FromPodPackets, before)
			}
		}
	}
	// Every pod keeps talking, the old build's pods and the new one.
	a.ping(c.ip(false))
	d.ping(a.ip(false))
	// `ebpf-cni upgrade` again (the DaemonSet's install step) is harmless.
	if out, err := exec.Command(next, "upgrade", "--pin-root", n.pinRoot, "--state-dir", n.stateDir).CombinedOutput(); err != nil {
		t.Errorf("ebpf-cni upgrade: %v: %s", err, out)
	}
	a.ping(b.ip(false))

	// A downgrade refuses loudly, naming the newer map and what to do.
	e := n.newNS()
	res, err := n.call("ADD", "ebt-upgrade-e", e, n.conf())
	if err == nil {
		t.Fatalf("the old build ran over the newer pins: %s", res)
	}
	if ce := decodeError(t, res); !strings.Contains(ce.Msg, "ep_stats_v3") || !strings.Contains(ce.Msg, "newer") || !strings.Contains(ce.Msg, "uninstall") {
		t.Errorf("downgrade error %q does not name the newer map and what to do", ce.Msg)
	}
	// DEL of an old-build pod with the next build.
	if _, err := n.callWith(next, "DEL", "ebt-upgrade-d", d, n.conf()); err != nil {
		t.Errorf("DEL with the next build: %v", err)
	}
}

func only(t *testing.T, glob string) string {
	t.Helper()
	m, _ := filepath.Glob(glob)
	if len(m) != 1 {
		t.Fatalf("%s matches %v, want one", glob, m)
	}
	return m[0]
}

// callWith is call with another plugin binary.
func (n *node) callWith(bin, verb, containerID string, p *pod, stdin []byte, extraEnv ...string) ([]byte, error) {
	saved := binDir
	dir := n.t.TempDir()
	if err := os.Symlink(bin, filepath.Join(dir, "ebpf-cni")); err != nil {
		return nil, err
	}
	binDir = dir
	defer func() { binDir = saved }()
	return n.call(verb, containerID, p, stdin, extraEnv...)
}

func inspectWith(t *testing.T, bin string, n *node) inspected {
	t.Helper()
	out, err := exec.Command(bin, "inspect", "--json", "--pin-root", n.pinRoot, "--state-dir", n.stateDir, "--ipam-dir", n.ipamDir).Output()
	if err != nil {
		t.Fatalf("inspect: %v: %s", err, out)
	}
	return decodeInspect(t, out)
}
