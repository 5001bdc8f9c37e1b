package integration

import (
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/nftables"

	"github.com/ebpf-cni/ebpf-cni/internal/flock"
	"github.com/ebpf-cni/ebpf-cni/internal/killpoint"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
	"github.com/ebpf-cni/ebpf-cni/internal/nat"
	"github.com/ebpf-cni/ebpf-cni/internal/veth"
)

// The steps a crash test stops ADD and DEL at (killpoint.At in the code),
// in the order a call passes them.
var (
	addSteps = []string{"ipam-temp-written", "ipam-owner-indexed", "ipam-linked", "add-ipam", "add-veth",
		"device-entry", "add-device", "add-attached", "add-endpoints", "add-record", "add-nat"}
	delSteps = []string{"del-unmapped", "del-veth-gone", "del-detached", "ipam-records-removed", "del-released",
		"del-record-removed"}
)

// buildKillable builds the plugin with its kill points compiled in.
func buildKillable(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "ebpf-cni")
	build := exec.Command("go", "build", "-tags", "killpoints", "-o", bin, "../../cmd/ebpf-cni")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build with kill points: %v: %s", err, out)
	}
	return bin
}

// SIGKILL at any step of ADD or DEL leaves nothing DEL cannot remove: after
// the killed call, DEL, DEL again, a new ADD (and its DEL) and GC leave a
// clean node: no veth, route, neighbour, map entry, link pin, reservation,
// record, temp file, lock file or masquerade rule, and no lock held.
func TestKilledAtEveryStep(t *testing.T) {
	bin := buildKillable(t)
	n := dualNode(t)
	// A pod that lives through it all: nothing of it may be touched.
	keep := n.newNS()
	n.add(keep)
	keepID := keep.containerID()
	run := func(verb, step, cid string, p *pod) ([]byte, error) {
		env := []string{killpoint.Env + "=" + step}
		return n.callWith(bin, verb, cid, p, n.conf(), env...)
	}
	for _, step := range append(append([]string{}, addSteps...), delSteps...) {
		t.Run(step, func(t *testing.T) {
			p := n.newNS()
			cid := "ebt-kill-" + step
			if strings.HasPrefix(step, "del-") || step == "ipam-records-removed" {
				if _, err := run("ADD", "", cid, p); err != nil {
					t.Fatalf("ADD: %v", err)
				}
				if out, err := run("DEL", step, cid, p); err == nil || !killed(err) {
					t.Fatalf("DEL was not killed at %s: %v %s", step, err, out)
				}
			} else if out, err := run("ADD", step, cid, p); err == nil || !killed(err) {
				t.Fatalf("ADD was not killed at %s: %v %s", step, err, out)
			}
			for i := 0; i < 2; i++ {
				if out, err := run("DEL", "", cid, p); err != nil {
					t.Fatalf("DEL %d after the kill at %s: %v %s", i+1, step, err, out)
				}
			}
			// DEL alone cleans up; only the killed call's temp file waits for GC.
			n.assertClean(t, cid, keepID, true)
			// The same attachment again, then gone for good.
			if out, err := run("ADD", "", cid, p); err != nil {
				t.Fatalf("ADD after the kill at %s: %v %s", step, err, out)
			}
			if out, err := run("DEL", "", cid, p); err != nil {
				t.Fatalf("DEL of the new ADD: %v %s", err, out)
			}
			var gcConf map[string]any
			json.Unmarshal(n.conf(), &gcConf)
			gcConf["cni.dev/valid-attachments"] = []map[string]string{{"containerID": keepID, "ifname": "eth0"}}
			gcJSON, _ := json.Marshal(gcConf)
			if out, err := n.callWith(bin, "GC", "", nil, gcJSON); err != nil {
				t.Fatalf("GC: %v %s", err, out)
			}
			n.assertClean(t, cid, keepID, false)
		})
	}
	other := n.newNS()
	n.add(other)
	other.ping(keep.ip(false)) // untouched through it all
	if e, ok := n.inspect()[keep.ip(false)]; !ok || e.ContainerID != keepID {
		t.Errorf("the pod that lived through the crashes lost its entry: %+v", e)
	}
}

func killed(err error) bool {
	var ee *exec.ExitError
	return errors.As(err, &ee) && ee.ExitCode() == -1 // terminated by a signal
}

// assertClean checks that nothing of the attachment cid is left on the node
// and that only keepID's state remains.
func (n *node) assertClean(t *testing.T, cid, keepID string, tempOK bool) {
	t.Helper()
	host := veth.HostName(cid, "eth0")
	if _, ok := hostLinks(t)[host]; ok {
		t.Errorf("host veth %s left", host)
	}
	keepHost := veth.HostName(keepID, "eth0")
	m, err := maps.Open(n.pinRoot)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	eps, _ := m.Endpoints()
	for _, e := range eps {
		if e.Ifindex != hostLinks(t)[keepHost] {
			t.Errorf("endpoint entry left: %s -> %d", e.IP, e.Ifindex)
		}
		if dev := hostRoute(t, e.IP); dev != "" && dev != keepHost {
			t.Errorf("host route left: %s via %s", e.IP, dev)
		}
	}
	devs, _ := m.Devices()
	for idx := range devs {
		if idx != hostLinks(t)[keepHost] {
			t.Errorf("device entry left for ifindex %d", idx)
		}
	}
	if out, err := exec.Command("bpftool", "-j", "map", "dump", "pinned", filepath.Join(n.pinRoot, "ep_stats_v2")).Output(); err != nil {
		t.Errorf("bpftool: %v", err)
	} else {
		var entries []json.RawMessage
		json.Unmarshal(out, &entries)
		if len(entries) != 1 {
			t.Errorf("%d counters entries, want the kept pod's 1", len(entries))
		}
	}
	pins, _ := filepath.Glob(filepath.Join(n.pinRoot, "links", "*"))
	for _, p := range pins {
		if !strings.HasPrefix(filepath.Base(p), keepHost) {
			t.Errorf("link pin left: %s", p)
		}
	}
	ipamDir := filepath.Join(n.ipamDir, n.name)
	files, _ := os.ReadDir(ipamDir)
	for _, f := range files {
		if ip, err := netip.ParseAddr(f.Name()); err == nil {
			if b, _ := os.ReadFile(filepath.Join(ipamDir, f.Name())); !strings.Contains(string(b), keepID) {
				t.Errorf("reservation left: %s", ip)
			}
		}
		if strings.HasPrefix(f.Name(), ".tmp-") && !tempOK {
			t.Errorf("temp file left in the IPAM store: %s", f.Name())
		}
	}
	owners, _ := os.ReadDir(filepath.Join(ipamDir, "owners"))
	if len(owners) != 1 {
		t.Errorf("owner indexes: %d, want 1 (the kept pod's)", len(owners))
	}
	recDir := filepath.Join(n.stateDir, n.name, "endpoints")
	recs, _ := os.ReadDir(recDir)
	for _, r := range recs {
		if !strings.HasPrefix(r.Name(), keepID+":") && !(tempOK && strings.HasPrefix(r.Name(), ".tmp-")) {
			t.Errorf("record or temp file left: %s", r.Name())
		}
	}
	locks, _ := filepath.Glob(filepath.Join(n.stateDir, n.name, "locks", cid+"*"))
	if len(locks) > 0 {
		t.Errorf("lock file left: %v", locks)
	}
	// Every node lock is free.
	for _, l := range []string{filepath.Join(ipamDir, "lock"), filepath.Join(n.stateDir, n.name, "lock"), n.pinRoot} {
		unlock, err := flock.Acquire(l, 0)
		if err != nil {
			t.Errorf("lock %s still held: %v", l, err)
			continue
		}
		unlock()
	}
	// The network's masquerade rule stays only while the kept pod does.
	c, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	rules, _ := c.GetRules(&nftables.Table{Name: nat.Table, Family: nftables.TableFamilyINet}, &nftables.Chain{Name: "postrouting"})
	mine := 0
	for _, r := range rules {
		if strings.Contains(string(r.UserData), "ebpf-cni "+n.name+" ") {
			mine++
		}
	}
	if mine != 2 { // the kept pod's IPv4 and IPv6 prefixes
		t.Errorf("%d masquerade rules of the network, want the kept pod's 2", mine)
	}
}
