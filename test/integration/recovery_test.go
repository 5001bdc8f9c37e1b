package integration

import (
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ebpf-cni/ebpf-cni/internal/endpoint"
	"github.com/ebpf-cni/ebpf-cni/internal/ipam"
	"github.com/ebpf-cni/ebpf-cni/internal/veth"
)

// statusCode runs STATUS and returns the CNI error code (0 on success).
func (n *node) statusCode(t *testing.T) (uint, string) {
	t.Helper()
	out, err := n.call("STATUS", "", nil, n.conf())
	if err == nil {
		return 0, ""
	}
	e := decodeError(t, out)
	return e.Code, e.Msg
}

// spoofedReaches reports whether a UDP datagram from p with a forged source
// address arrives at dst: only without anti-spoofing (programs detached).
// One way only: no reply has to find the forged address.
func spoofedReaches(t *testing.T, from, to *pod) bool {
	t.Helper()
	forged := netip.MustParseAddr("10.250.0.250")
	if out, err := from.run("ip", "addr", "add", forged.String()+"/32", "dev", "eth0"); err != nil {
		t.Fatalf("add forged address: %v: %s", err, out)
	}
	defer from.run("ip", "addr", "del", forged.String()+"/32", "dev", "eth0")
	var ln *net.UDPConn
	if err := inNS(to.path, func() error {
		var err error
		ln, err = net.ListenUDP("udp", &net.UDPAddr{IP: to.ip(false).AsSlice()})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if err := inNS(from.path, func() error {
		c, err := net.DialUDP("udp", &net.UDPAddr{IP: forged.AsSlice()}, ln.LocalAddr().(*net.UDPAddr))
		if err != nil {
			return err
		}
		defer c.Close()
		for i := 0; i < 3; i++ {
			c.Write([]byte("forged"))
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	ln.SetReadDeadline(time.Now().Add(time.Second))
	buf := make([]byte, 16)
	_, src, err := ln.ReadFromUDP(buf)
	return err == nil && src.IP.Equal(forged.AsSlice())
}

// The pin root emptied under running pods (an operator's rm, bpffs
// remounted): their programs detach and anti-spoofing is gone. STATUS
// answers 51 at once, and ebpf-cni-agent's datapath controller restores
// every pod from its record within seconds: maps, entries, programs.
func TestPinsLostAreRepaired(t *testing.T) {
	n := dualNode(t)
	a, b := n.newNS(), n.newNS()
	n.add(a)
	n.add(b)
	if spoofedReaches(t, a, b) {
		t.Fatal("a forged source got through before anything was removed: anti-spoofing is off")
	}
	if code, msg := n.statusCode(t); code != 0 {
		t.Fatalf("STATUS before: %d %s", code, msg)
	}
	if err := os.RemoveAll(n.pinRoot); err != nil {
		t.Fatal(err)
	}
	if !spoofedReaches(t, a, b) {
		t.Fatal("forged source still dropped with the pins gone: the test proves nothing")
	}
	code, msg := n.statusCode(t)
	if code != 51 || !strings.Contains(msg, "lost their datapath") {
		t.Errorf("STATUS with the pins gone = %d %q, want 51 naming the impaired pods", code, msg)
	}
	if p := n.problems(); !strings.Contains(p, "datapath missing: "+a.hostVeth()) || !strings.Contains(p, b.hostVeth()) {
		t.Errorf("inspect does not report the impaired pods: %q", p)
	}

	agent := exec.Command(filepath.Join(binDir, "ebpf-cni-agent"), "-controllers", "datapath", "-state-dir", n.stateDir,
		"-pin-root", n.pinRoot, "-repair-interval", "1s", "-metrics-addr", "")
	var logs strings.Builder
	agent.Stdout, agent.Stderr = &logs, &logs
	if err := agent.Start(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	defer func() { agent.Process.Kill(); agent.Wait() }()
	waitFor(t, "the agent to repair the datapath", 10*time.Second, func() bool {
		c, _ := n.statusCode(t)
		return c == 0
	})
	t.Logf("repaired %s after the agent started", time.Since(start).Round(100*time.Millisecond))
	if spoofedReaches(t, a, b) {
		t.Errorf("anti-spoofing not back after the repair\n%s", logs.String())
	}
	for _, v6 := range []bool{false, true} {
		a.ping(b.ip(v6))
	}
	if r := n.inspect()[a.ip(false)].Counters.RedirectPackets; r == 0 {
		t.Errorf("same-node traffic not redirected after the repair")
	}
	if p := n.problems(); p != "" {
		t.Errorf("inspect still reports problems after the repair: %q", p)
	}
	// `ebpf-cni repair` does the same by hand, and is a no-op now.
	if out, err := exec.Command(filepath.Join(binDir, "ebpf-cni"), "repair", "--pin-root", n.pinRoot, "--state-dir", n.stateDir).CombinedOutput(); err != nil ||
		!strings.Contains(string(out), "0 pod(s) repaired") {
		t.Errorf("ebpf-cni repair on a healthy node: %v %s", err, out)
	}
}

// One damaged file never blocks the node: a garbled reservation of a live
// pod, a garbled endpoint record and a garbled round-robin cursor. ADD,
// STATUS, the owner's DEL and GC keep working; GC reclaims what no live pod
// owns.
func TestDamagedFiles(t *testing.T) {
	n := newNode(t, nil)
	n.writeConflist()
	a, b, c := n.newNS(), n.newNS(), n.newNS()
	n.add(a)
	n.add(b)
	n.add(c)
	ipamDir := filepath.Join(n.ipamDir, n.name)
	aID, bID, cID := a.containerID(), b.containerID(), c.containerID()
	// a's reservation: empty; b's record: garbage; the cursor: garbage.
	os.WriteFile(filepath.Join(ipamDir, a.ip(false).String()), nil, 0o600)
	os.WriteFile(endpoint.NewStore(n.stateDir, n.name).Path(bID, "eth0"), []byte("{garbled"), 0o600)
	os.WriteFile(filepath.Join(ipamDir, "last_reserved_ip.0"), []byte("not an address"), 0o600)

	if code, msg := n.statusCode(t); code != 0 {
		t.Errorf("STATUS with damaged files = %d %s, want ready", code, msg)
	}
	if p := n.problems(); !strings.Contains(p, "damaged reservation: "+filepath.Join(ipamDir, a.ip(false).String())) ||
		!strings.Contains(p, "damaged endpoint record: "+endpoint.NewStore(n.stateDir, n.name).Path(bID, "eth0")) {
		t.Errorf("inspect does not report the damaged files: %q", p)
	}
	d := n.newNS()
	n.add(d) // a garbled cursor does not stop ADD
	n.del(a) // the owner's DEL of a damaged reservation succeeds
	if _, err := os.Stat(filepath.Join(ipamDir, a.ip(false).String())); !os.IsNotExist(err) {
		t.Errorf("a's damaged reservation survived its DEL: %v", err)
	}
	n.assertGone(veth.HostName(aID, "eth0"), aID, a.ips)
	// GC with b and c valid: b's damaged record is not a reason to fail; a
	// stray damaged reservation nobody owns is reclaimed.
	stray := "10.250.0.200"
	os.WriteFile(filepath.Join(ipamDir, stray), []byte("x"), 0o600)
	gc := gcConf(t, n, cID, d.containerID())
	if out, err := n.call("GC", "", nil, gc); err != nil {
		t.Fatalf("GC with damaged files: %v %s", err, out)
	}
	if _, err := os.Stat(filepath.Join(ipamDir, stray)); !os.IsNotExist(err) {
		t.Errorf("GC left the stray damaged reservation: %v", err)
	}
	// b was not in the valid list: GC tore it down by the record's name.
	n.assertGone(veth.HostName(bID, "eth0"), bID, b.ips)
	c.ping(d.ip(false))
}

func gcConf(t *testing.T, n *node, valid ...string) []byte {
	t.Helper()
	var c map[string]any
	json.Unmarshal(n.conf(), &c)
	var list []map[string]string
	for _, v := range valid {
		list = append(list, map[string]string{"containerID": v, "ifname": "eth0"})
	}
	c["cni.dev/valid-attachments"] = list
	b, _ := json.Marshal(c)
	return b
}

// A reboot: the pods, veths and pins are gone, their reservations and
// records are not. The first ADD (or GC) after it reclaims them, and
// nothing recorded in this boot is touched.
func TestRebootReclaims(t *testing.T) {
	n := newNode(t, nil)
	n.writeConflist()
	live := n.newNS()
	n.add(live)
	// Two pods "of the previous boot": their records and reservations are
	// rewritten with another boot ID, and everything in the kernel goes as
	// a reboot would take it.
	var old []*pod
	for i := 0; i < 2; i++ {
		p := n.newNS()
		n.add(p)
		old = append(old, p)
	}
	store := endpoint.NewStore(n.stateDir, n.name)
	ipamDir := filepath.Join(n.ipamDir, n.name)
	for _, p := range old {
		cid := p.containerID()
		rewriteJSON(t, store.Path(cid, "eth0"), "bootID", "previous-boot")
		rewriteJSON(t, filepath.Join(ipamDir, p.ip(false).String()), "bootID", "previous-boot")
		exec.Command("ip", "link", "del", veth.HostName(cid, "eth0")).Run()
		exec.Command("ip", "netns", "del", p.ns).Run()
	}
	os.Remove(filepath.Join(n.stateDir, n.name, "boot_id")) // the marker of this boot's sweep

	fresh := n.newNS()
	n.add(fresh)
	for _, p := range old {
		if _, err := os.Stat(filepath.Join(ipamDir, p.ip(false).String())); !os.IsNotExist(err) {
			t.Errorf("reservation %s of the previous boot survived the first ADD: %v", p.ip(false), err)
		}
		recs, _, _ := store.List()
		for _, r := range recs {
			if r.BootID == "previous-boot" {
				t.Errorf("record %s/%s of the previous boot survived", r.ContainerID, r.IfName)
			}
		}
	}
	// This boot's pod kept everything.
	if _, err := os.Stat(filepath.Join(ipamDir, live.ip(false).String())); err != nil {
		t.Errorf("the live pod's reservation went: %v", err)
	}
	fresh.ping(live.ip(false))
}

func rewriteJSON(t *testing.T, path, key string, value any) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	m[key] = value
	b, _ = json.Marshal(m)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// A runtime retries an ADD while the first is still running: the retry
// waits for the first (one lock per attachment), then fails on the
// existing interface without undoing anything of the first; the pod keeps
// its address, route and entries.
func TestDuplicateADD(t *testing.T) {
	n := newNode(t, nil)
	n.writeConflist()
	p, peer := n.newNS(), n.newNS()
	n.add(peer)
	const cid = "ebt-dup-add"
	var wg sync.WaitGroup
	outs := make([][]byte, 2)
	errs := make([]error, 2)
	for i := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			outs[i], errs[i] = n.call("ADD", cid, p, n.conf())
		}()
	}
	wg.Wait()
	win := 0
	if errs[0] != nil {
		win = 1
	}
	if errs[win] != nil || errs[1-win] == nil {
		t.Fatalf("want one ADD to win and one to fail: %v / %v", errs[0], errs[1])
	}
	if e := decodeError(t, outs[1-win]); !strings.Contains(e.Msg, "CNI_IFNAME") {
		t.Errorf("the loser's error %q does not name the existing interface", e.Msg)
	}
	p.setResult(t, outs[win])
	// The winner is whole: reservation, entries, route, traffic.
	if _, err := os.Stat(filepath.Join(n.ipamDir, n.name, p.ip(false).String())); err != nil {
		t.Errorf("the winner's reservation went with the loser: %v", err)
	}
	if dev := hostRoute(t, p.ip(false)); dev == "" {
		t.Errorf("the winner's host route went with the loser")
	}
	peer.ping(p.ip(false))
	if _, err := n.call("DEL", cid, p, n.conf()); err != nil {
		t.Fatal(err)
	}
	// And a DEL racing an ADD of the same attachment ends consistent:
	// whichever runs last decides, nothing half-made is left.
	q := n.newNS()
	var wg2 sync.WaitGroup
	for _, verb := range []string{"ADD", "DEL"} {
		wg2.Add(1)
		go func() { defer wg2.Done(); n.call(verb, "ebt-dup-race", q, n.conf()) }()
	}
	wg2.Wait()
	if _, err := n.call("DEL", "ebt-dup-race", q, n.conf()); err != nil {
		t.Fatal(err)
	}
	if _, ok := hostLinks(t)[veth.HostName("ebt-dup-race", "eth0")]; ok {
		t.Errorf("veth of the raced attachment left")
	}
	if owned, _ := ipam.NewDiskStore(filepath.Join(n.ipamDir, n.name)).Owned("ebt-dup-race", "eth0"); len(owned) != 0 {
		t.Errorf("reservations of the raced attachment left: %v", owned)
	}
	if rec, _ := endpoint.NewStore(n.stateDir, n.name).Read("ebt-dup-race", "eth0"); rec != nil {
		t.Errorf("record of the raced attachment left")
	}
}

// GC with a partial valid-attachments list races new ADDs: the pods it
// lists keep everything; what it does not know is either left whole (an
// ADD in flight, or done after GC looked) or torn down whole, never half;
// the next GC with the full list leaves exactly the live pods.
func TestGCRacesADD(t *testing.T) {
	n := newNode(t, nil)
	n.writeConflist()
	var listed []*pod
	for i := 0; i < 3; i++ {
		p := n.newNS()
		n.add(p)
		listed = append(listed, p)
	}
	var ids []string
	for _, p := range listed {
		ids = append(ids, p.containerID())
	}
	fresh := make([]*pod, 6)
	for i := range fresh {
		fresh[i] = n.newNS()
	}
	var wg sync.WaitGroup
	for i, p := range fresh {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if out, err := n.call("ADD", fmt.Sprintf("ebt-gcrace-%d", i), p, n.conf()); err == nil {
				p.setResult(t, out)
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		time.Sleep(20 * time.Millisecond)
		if out, err := n.call("GC", "", nil, gcConf(t, n, ids...)); err != nil {
			t.Errorf("GC racing ADDs: %v %s", err, out)
		}
	}()
	wg.Wait()
	for _, p := range listed {
		if _, ok := n.inspect()[p.ip(false)]; !ok {
			t.Errorf("listed pod %s lost its entry", p.ns)
		}
	}
	// Every fresh attachment is whole or gone: a live veth means a
	// reservation, a record and an entry.
	var alive []string
	for i, p := range fresh {
		cid := fmt.Sprintf("ebt-gcrace-%d", i)
		_, hasVeth := hostLinks(t)[veth.HostName(cid, "eth0")]
		rec, _ := endpoint.NewStore(n.stateDir, n.name).Read(cid, "eth0")
		owned, _ := ipam.NewDiskStore(filepath.Join(n.ipamDir, n.name)).Owned(cid, "eth0")
		switch {
		case hasVeth && rec != nil && len(owned) == 1:
			alive = append(alive, cid)
			if _, ok := n.inspect()[owned[0].IP]; !ok {
				t.Errorf("%s kept its veth and address but lost its map entry", cid)
			}
		case !hasVeth && rec == nil && len(owned) == 0:
		default:
			t.Errorf("%s half there: veth %v, record %v, reservations %v", cid, hasVeth, rec != nil, owned)
		}
		_ = p
	}
	t.Logf("%d of %d racing ADDs survived the partial GC", len(alive), len(fresh))
	// The next GC, with the same partial list, takes the survivors whole
	// and leaves exactly the listed pods.
	if out, err := n.call("GC", "", nil, gcConf(t, n, ids...)); err != nil {
		t.Fatalf("second GC: %v %s", err, out)
	}
	recs, _ := ipam.NewDiskStore(filepath.Join(n.ipamDir, n.name)).List()
	if len(recs) != len(ids) {
		t.Errorf("%d reservations after the second GC, want the %d listed pods'", len(recs), len(ids))
	}
	for i := range fresh {
		cid := fmt.Sprintf("ebt-gcrace-%d", i)
		if _, ok := hostLinks(t)[veth.HostName(cid, "eth0")]; ok {
			t.Errorf("%s's veth outlived the second GC", cid)
		}
		if rec, _ := endpoint.NewStore(n.stateDir, n.name).Read(cid, "eth0"); rec != nil {
			t.Errorf("%s's record outlived the second GC", cid)
		}
	}
	for _, p := range listed[1:] {
		listed[0].ping(p.ip(false))
	}
}
