package integration

import (
	"encoding/json"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/ebpf-cni/ebpf-cni/internal/veth"
)

// snapshot is every trace an attachment could leave on the node (host
// veths are checked by name: other ebpf-cni users may come and go).
type snapshot struct {
	pins    []string
	states  []string
	records []string
	nft     string
}

func (n *node) snapshot() snapshot {
	n.t.Helper()
	var s snapshot
	filepath.Walk(n.pinRoot, func(p string, _ os.FileInfo, err error) error {
		if err == nil {
			s.pins = append(s.pins, p)
		}
		return nil
	})
	s.states, _ = filepath.Glob(filepath.Join(n.stateDir, n.name, "endpoints", "*"))
	s.records, _ = filepath.Glob(filepath.Join(n.ipamDir, n.name, "[0-9a-f]*"))
	out, _ := exec.Command("nft", "list", "table", "inet", "ebpf-cni").CombinedOutput()
	if strings.Contains(string(out), n.name+" ") {
		s.nft = string(out)
	}
	return s
}

func (n *node) assertUnchanged(before snapshot, what string, containerIDs ...string) {
	n.t.Helper()
	after := n.snapshot()
	links := hostLinks(n.t)
	for _, cid := range containerIDs {
		if name := veth.HostName(cid, "eth0"); links[name] != 0 {
			n.t.Errorf("%s: host veth %s of %s exists", what, name, cid)
		}
	}
	if len(after.pins) != len(before.pins) {
		n.t.Errorf("%s: pins %v -> %v", what, before.pins, after.pins)
	}
	if len(after.states) != len(before.states) || len(after.records) != len(before.records) {
		n.t.Errorf("%s: records %v/%v -> %v/%v", what, before.states, before.records, after.states, after.records)
	}
	if after.nft != before.nft {
		n.t.Errorf("%s: masquerade rules changed:\n%s", what, after.nft)
	}
}

func TestBadConfigRefused(t *testing.T) {
	n := newNode(t, nil)
	p := n.newNS()
	base := map[string]any{}
	json.Unmarshal(n.conf(), &base)
	with := func(key string, val any) []byte {
		c := map[string]any{}
		for k, v := range base {
			c[k] = v
		}
		if strings.HasPrefix(key, "ipam.") {
			ipam := map[string]any{"dataDir": n.ipamDir, "ranges": [][]map[string]string{{{"subnet": "10.254.0.0/24"}}}}
			ipam[strings.TrimPrefix(key, "ipam.")] = val
			c["ipam"] = ipam
		} else if val == nil {
			delete(c, key)
		} else {
			c[key] = val
		}
		b, _ := json.Marshal(c)
		return b
	}
	cases := []struct {
		name  string
		stdin []byte
		code  uint
		field string
	}{
		{"not json", []byte("{nope"), 6, "network config"},
		{"ipam not an object", with("ipam", "host-local"), 6, "ipam"},
		// The skel library answers version mismatches with the spec's code 1.
		{"no cniVersion", with("cniVersion", nil), 1, "incompatible CNI versions"},
		{"old cniVersion", with("cniVersion", "0.2.0"), 1, "incompatible CNI versions"},
		{"no name", with("name", nil), 7, "name"},
		{"name with slash", with("name", "a/b"), 7, "name"},
		{"mtu too small", with("mtu", 20), 7, "mtu"},
		{"relative pinRoot", with("pinRoot", "bpf/x"), 7, "pinRoot"},
		{"bad attach", with("attach", "xdp"), 7, "attach"},
		{"no ranges", with("ipam.ranges", nil), 7, "ipam.ranges"},
		{"bad subnet", with("ipam.ranges", [][]map[string]string{{{"subnet": "10.0.0.0/33"}}}), 7, "ipam.ranges[0][0].subnet"},
		{"start outside", with("ipam.ranges", [][]map[string]string{{{"subnet": "10.0.0.0/24", "rangeStart": "10.0.1.5"}}}), 7, "ipam.ranges[0][0].rangeStart"},
		{"bad route", with("ipam.routes", []map[string]string{{"dst": "default"}}), 7, "ipam.routes[0].dst"},
		{"relative dataDir", with("ipam.dataDir", "ipam"), 7, "ipam.dataDir"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := n.snapshot()
			out, err := n.call("ADD", "bad-1", p, tc.stdin)
			if err == nil {
				t.Fatalf("ADD succeeded: %s", out)
			}
			e := decodeError(t, out)
			if e.Code != tc.code || !strings.Contains(e.Msg, tc.field) {
				t.Errorf("error %+v, want code %d naming %q", e, tc.code, tc.field)
			}
			n.assertUnchanged(before, "refused ADD", "bad-1")
			if _, err := os.Stat(n.pinRoot); err == nil {
				t.Errorf("refused ADD created the pin root %s", n.pinRoot)
			}
			if out, _ := p.run("ip", "-o", "link"); strings.Contains(string(out), "eth0") {
				t.Errorf("refused ADD created eth0 in the pod")
			}
		})
	}
}

func TestBadEnvironmentRefused(t *testing.T) {
	n := newNode(t, nil)
	p := n.newNS()
	good := n.newNS()
	if _, err := n.call("ADD", "env-ok", good, n.conf()); err != nil {
		t.Fatal(err)
	}
	before := n.snapshot()

	// A netns that does not exist: 8, naming CNI_NETNS.
	missing := &pod{n: n, ns: "gone", path: "/var/run/netns/" + n.name + "-missing"}
	out, err := n.call("ADD", "env-1", missing, n.conf())
	if err == nil {
		t.Fatal("ADD into a missing netns succeeded")
	}
	if e := decodeError(t, out); e.Code != 8 || !strings.Contains(e.Msg, "CNI_NETNS") {
		t.Errorf("missing netns: %+v, want code 8 naming CNI_NETNS", e)
	}
	n.assertUnchanged(before, "ADD into a missing netns", "env-1")

	// CNI_IFNAME already in the pod: 4, and the existing attachment is untouched.
	out, err = n.call("ADD", "env-ok", good, n.conf())
	if err == nil {
		t.Fatal("second ADD with the same ifname succeeded")
	}
	if e := decodeError(t, out); e.Code != 4 || !strings.Contains(e.Msg, "CNI_IFNAME") {
		t.Errorf("existing ifname: %+v, want code 4 naming CNI_IFNAME", e)
	}
	n.assertUnchanged(before, "ADD with an existing ifname")
	if _, err := n.call("CHECK", "env-ok", good, withPrev(t, n.conf(), mustResult(t, n, good))); err != nil {
		t.Errorf("the first attachment broke: %v", err)
	}

	// Malformed CNI_ARGS: 4, naming CNI_ARGS.
	out, err = n.call("ADD", "env-2", p, n.conf(), "CNI_ARGS=K8S_POD_NAME")
	if err == nil {
		t.Fatal("ADD with malformed CNI_ARGS succeeded")
	}
	if e := decodeError(t, out); e.Code != 4 || !strings.Contains(e.Msg, "CNI_ARGS") {
		t.Errorf("malformed CNI_ARGS: %+v", e)
	}
	// Missing CNI_CONTAINERID: 4 (the skel library checks it).
	out, err = n.call("ADD", "", p, n.conf())
	if err == nil {
		t.Fatal("ADD without CNI_CONTAINERID succeeded")
	}
	if e := decodeError(t, out); e.Code != 4 || !strings.Contains(e.Msg, "CNI_CONTAINERID") {
		t.Errorf("missing CNI_CONTAINERID: %+v", e)
	}
	n.assertUnchanged(before, "ADD with bad environment", "env-2")

	// CHECK of an unknown container: 3.
	out, err = n.call("CHECK", "never-added", p, withPrev(t, n.conf(), mustResult(t, n, good)))
	if err == nil {
		t.Fatal("CHECK of an unknown container succeeded")
	}
	if e := decodeError(t, out); e.Code != 3 {
		t.Errorf("CHECK unknown container: %+v, want code 3", e)
	}
	// CHECK without prevResult: 7 naming prevResult.
	out, _ = n.call("CHECK", "env-ok", good, n.conf())
	if e := decodeError(t, out); e.Code != 7 || !strings.Contains(e.Msg, "prevResult") {
		t.Errorf("CHECK without prevResult: %+v", e)
	}
	// DEL of something never added succeeds.
	if _, err := n.call("DEL", "never-added", p, n.conf()); err != nil {
		t.Errorf("DEL of a container never added: %v", err)
	}
	if _, err := n.call("DEL", "env-ok", good, n.conf()); err != nil {
		t.Fatal(err)
	}
}

// mustResult rebuilds the ADD result of a pod added by n.call through a
// repeated read: the endpoint record has what CHECK compares.
func mustResult(t *testing.T, n *node, p *pod) map[string]any {
	t.Helper()
	b, err := os.ReadFile(n.plugin.LogFile)
	if err != nil {
		t.Fatal(err)
	}
	var last map[string]any
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		var e struct {
			Command string            `json:"command"`
			Env     map[string]string `json:"env"`
			Result  map[string]any    `json:"result"`
		}
		if json.Unmarshal([]byte(line), &e) == nil && e.Command == "ADD" && e.Result != nil && e.Env["CNI_NETNS"] == p.path {
			last = e.Result
		}
	}
	if last == nil {
		t.Fatalf("no ADD result for %s in the plugin log", p.ns)
	}
	return last
}

// The pin root must be on bpffs. Outside /sys/fs/bpf nothing is mounted
// for the user: ADD fails with 11 (try again later) and leaves nothing.
func TestPinRootNotOnBPFFS(t *testing.T) {
	n := newNode(t, nil)
	n.pinRoot = filepath.Join(t.TempDir(), "not-bpffs")
	n.plugin.PinRoot = n.pinRoot
	p := n.newNS()
	before := n.snapshot()
	out, err := n.call("ADD", "nobpffs", p, n.conf())
	if err == nil {
		t.Fatalf("ADD with the pin root on a plain filesystem succeeded: %s", out)
	}
	e := decodeError(t, out)
	if e.Code != 11 || !strings.Contains(e.Msg, "bpffs") || !strings.Contains(e.Details, "try again later") {
		t.Errorf("error %+v, want 11 naming bpffs and saying try again later", e)
	}
	n.assertUnchanged(before, "ADD without bpffs", "nobpffs")
	out, err = n.call("STATUS", "", nil, n.conf())
	if e := decodeError(t, out); err == nil || e.Code != 50 {
		t.Errorf("STATUS without bpffs: %v %+v, want 50", err, e)
	}
}

// On a node where /sys/fs/bpf is not mounted (a fresh machine, some kind
// nodes), ADD mounts bpffs there and goes on. Run in a private mount
// namespace so the host's bpffs is not touched.
func TestMountsMissingBPFFS(t *testing.T) {
	n := newNode(t, nil)
	n.pinRoot = "/sys/fs/bpf/ebt-mount"
	n.plugin.PinRoot = n.pinRoot
	p := n.newNS()
	confFile := filepath.Join(t.TempDir(), "conf.json")
	if err := os.WriteFile(confFile, n.conf(), 0o600); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(binDir, "ebpf-cni")
	script := `set -e
umount -l /sys/fs/bpf 2>/dev/null || true
if mount | grep -q ' /sys/fs/bpf type bpf'; then echo "still mounted"; exit 1; fi
CNI_COMMAND=ADD ` + bin + ` < ` + confFile + `
mount | grep ' /sys/fs/bpf type bpf' >&2
ls /sys/fs/bpf/ebt-mount/endpoints_v1 >&2
CNI_COMMAND=DEL ` + bin + ` < ` + confFile + `
`
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c", script)
	cmd.Env = append(os.Environ(), "CNI_CONTAINERID=mount-1", "CNI_IFNAME=eth0", "CNI_NETNS="+p.path, "CNI_PATH="+cniPath)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("ADD/DEL with /sys/fs/bpf unmounted: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), `"cniVersion"`) || !strings.Contains(string(out), "/sys/fs/bpf type bpf") {
		t.Errorf("expected a result and a bpffs mount, got:\n%s", out)
	}
	ip := regexp.MustCompile(`"address": "([0-9.]+)/32"`).FindSubmatch(out)
	if ip == nil {
		t.Fatalf("no address in the ADD result:\n%s", out)
	}
	n.assertGone(veth.HostName("mount-1", "eth0"), "mount-1", []netip.Addr{netip.MustParseAddr(string(ip[1]))})
}
