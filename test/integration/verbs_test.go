package integration

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ebpf-cni/ebpf-cni/internal/loader"
	"github.com/ebpf-cni/ebpf-cni/internal/veth"
)

func TestParallelAdds(t *testing.T) {
	const pods = 50
	n := newNode(t, nil)
	n.writeConflist()
	ps := make([]*pod, pods)
	for i := range ps {
		ps[i] = n.newNS()
	}
	var wg sync.WaitGroup
	errs := make([]error, pods)
	outs := make([][]byte, pods)
	for i, p := range ps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			outs[i], errs[i] = n.cnitool("add", p, fmt.Sprintf("K8S_POD_NAMESPACE=par;K8S_POD_NAME=pod-%d", i))
		}()
	}
	wg.Wait()
	seen := map[netip.Addr]*pod{}
	for i, p := range ps {
		if errs[i] != nil {
			t.Fatalf("parallel ADD %d: %v", i, errs[i])
		}
		p.setResult(t, outs[i])
		if other, dup := seen[p.ip(false)]; dup {
			t.Fatalf("%s and %s both got %s", p.ns, other.ns, p.ip(false))
		}
		seen[p.ip(false)] = p
	}
	// Every pod answers, from the first pod (BPF path) and from the host.
	targets := make([]string, 0, pods)
	for _, p := range ps[1:] {
		targets = append(targets, p.ip(false).String())
	}
	script := "for ip in " + strings.Join(targets, " ") + "; do ping -c1 -W2 $ip >/dev/null || echo unreachable $ip; done"
	if out, err := ps[0].run("sh", "-c", script); err != nil || len(out) > 0 {
		t.Fatalf("pods unreachable from %s: %v %s", ps[0].ns, err, out)
	}
	eps := n.inspect()
	if len(eps) != pods {
		t.Fatalf("inspect shows %d endpoints, want %d", len(eps), pods)
	}
	for i, p := range ps {
		if e := eps[p.ip(false)]; e.PodNamespace != "par" || e.PodName != fmt.Sprintf("pod-%d", i) {
			t.Errorf("inspect of %s: pod %s/%s, want par/pod-%d", p.ip(false), e.PodNamespace, e.PodName, i)
		}
	}
	// pod0's echo requests and each pod's reply were redirected in BPF.
	if got := eps[ps[0].ip(false)].Counters.RedirectPackets; got < pods-1 {
		t.Errorf("pod0 redirected %d packets, want >= %d", got, pods-1)
	}
	for _, p := range ps[1:] {
		if got := eps[p.ip(false)].Counters.RedirectPackets; got < 1 {
			t.Errorf("%s redirected %d replies, want >= 1", p.ns, got)
		}
	}
	cids := make([]string, pods)
	for i, p := range ps {
		cids[i] = p.containerID()
	}
	for i, p := range ps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = n.cnitool("del", p, "")
		}()
	}
	wg.Wait()
	for i, p := range ps {
		if errs[i] != nil {
			t.Errorf("parallel DEL %d: %v", i, errs[i])
		}
		n.assertGone(p.hostVeth(), cids[i], p.ips)
	}
	if left := n.bpftoolEndpoints(); len(left) != 0 {
		t.Errorf("endpoints left after DEL of every pod: %v", left)
	}
}

func TestEveryCNIVersion(t *testing.T) {
	for _, v := range []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		t.Run(v, func(t *testing.T) {
			n := newNode(t, nil)
			n.version = v
			n.writeConflist()
			a, b := n.newNS(), n.newNS()
			n.add(a)
			n.add(b)
			if got := a.result["cniVersion"]; got != v {
				t.Errorf("result cniVersion %v, want %s", got, v)
			}
			a.ping(b.ip(false))
			if v != "0.3.0" && v != "0.3.1" {
				if _, err := n.cnitool("check", a, ""); err != nil {
					t.Errorf("CHECK: %v", err)
				}
			}
			cid := a.containerID()
			n.del(a)
			n.del(b)
			n.assertGone(a.hostVeth(), cid, a.ips)
		})
	}
}

func TestDelegatedHostLocal(t *testing.T) {
	dataDir := filepath.Join(t.TempDir(), "host-local")
	n := newNode(t, map[string]any{
		"type":    "host-local",
		"ranges":  [][]map[string]string{{{"subnet": "10.251.0.0/24"}}},
		"dataDir": dataDir,
	})
	n.version = "1.0.0" // Debian's host-local speaks up to 1.0.0
	n.writeConflist()
	a, b := n.newNS(), n.newNS()
	n.add(a)
	n.add(b)
	a.ping(b.ip(false))
	tcp(t, b, a, a.ip(false))
	if _, err := os.Stat(filepath.Join(dataDir, n.name, a.ip(false).String())); err != nil {
		t.Fatalf("host-local holds no reservation for %s: %v", a.ip(false), err)
	}
	if _, err := n.cnitool("check", a, ""); err != nil {
		t.Errorf("CHECK through host-local: %v", err)
	}
	cids := []string{a.containerID(), b.containerID()}
	n.del(a)
	n.del(b)
	for i, p := range []*pod{a, b} {
		if _, err := os.Stat(filepath.Join(dataDir, n.name, p.ip(false).String())); err == nil {
			t.Errorf("host-local reservation of %s left after DEL", p.ip(false))
		}
		n.assertGone(p.hostVeth(), cids[i], p.ips)
	}
}

// A delegated IPAM ADD that succeeded is released when a later step fails.
func TestDelegatedReleasedOnFailure(t *testing.T) {
	dataDir := filepath.Join(t.TempDir(), "host-local")
	n := newNode(t, map[string]any{
		"type":    "host-local",
		"ranges":  [][]map[string]string{{{"subnet": "10.251.1.0/24"}}},
		"dataDir": dataDir,
	})
	n.plugin.Attach = "tcx"
	n.version = "1.0.0"
	p := n.newNS()
	// Make veth creation fail after IPAM: occupy the host veth's name.
	hv := veth.HostName("fail-1", "eth0")
	if out, err := exec.Command("ip", "link", "add", hv, "type", "veth", "peer", "name", n.name+"-p").CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "link", "del", hv).Run() })
	out, err := n.call("ADD", "fail-1", p, n.conf())
	if err == nil {
		t.Fatalf("ADD with its host veth name taken succeeded: %s", out)
	}
	e := decodeError(t, out)
	if !strings.Contains(e.Msg, hv) {
		t.Errorf("error %q does not name the host veth", e.Msg)
	}
	files, _ := os.ReadDir(filepath.Join(dataDir, n.name))
	for _, f := range files {
		if _, err := netip.ParseAddr(f.Name()); err == nil {
			t.Errorf("host-local kept reservation %s after the failed ADD", f.Name())
		}
	}
}

func TestIPv6AndDualStack(t *testing.T) {
	cases := map[string][][]map[string]string{
		"ipv6": {{{"subnet": "fd00:250::/120"}}},
		"dual": {{{"subnet": "10.252.0.0/24"}}, {{"subnet": "fd00:252::/120"}}},
	}
	for name, ranges := range cases {
		t.Run(name, func(t *testing.T) {
			n := newNode(t, map[string]any{"ranges": ranges})
			n.writeConflist()
			var fwds []*forwardCounter
			for i, set := range ranges {
				fwds = append(fwds, newForwardCounter(t, n, fmt.Sprint(i), set[0]["subnet"]))
			}
			a, b := n.newNS(), n.newNS()
			n.add(a)
			n.add(b)
			if len(a.ips) != len(ranges) {
				t.Fatalf("got %v, want one address per range set", a.ips)
			}
			a.ping(b.ip(true))
			b.ping(a.ip(true))
			tcp(t, a, b, b.ip(true))
			if name == "dual" {
				a.ping(b.ip(false))
				tcp(t, b, a, a.ip(false))
			}
			if err := tcpExchange("", b.path, b.ip(true), nil); err != nil {
				t.Errorf("host -> pod over IPv6: %v", err)
			}
			for i, fwd := range fwds {
				if got := fwd.packets(); got != 0 {
					t.Errorf("%d pod packets from %s crossed FORWARD", got, ranges[i][0]["subnet"])
				}
			}
			if r := n.inspect()[a.ip(true)].Counters.RedirectPackets; r < 2 {
				t.Errorf("IPv6 redirect counter %d", r)
			}
			if _, err := n.cnitool("check", a, ""); err != nil {
				t.Errorf("CHECK: %v", err)
			}
			cidA, cidB := a.containerID(), b.containerID()
			n.del(a)
			n.del(b)
			n.assertGone(a.hostVeth(), cidA, a.ips)
			n.assertGone(b.hostVeth(), cidB, b.ips)
		})
	}
}

func TestLegacyTCAttach(t *testing.T) {
	n := newNode(t, nil)
	n.plugin.Attach = "tc"
	n.writeConflist()
	a, b := n.newNS(), n.newNS()
	n.add(a)
	n.add(b)
	a.ping(b.ip(false))
	e := n.inspect()[a.ip(false)]
	if len(e.Attachments) != 2 || e.Attachments[0].Mode != "tc" || e.Attachments[1].Mode != "tc" {
		t.Fatalf("attachments %+v, want legacy tc on both hooks", e.Attachments)
	}
	if e.Counters.RedirectPackets == 0 {
		t.Errorf("no redirect through the tc-attached program")
	}
	out, err := exec.Command("tc", "filter", "show", "dev", a.hostVeth(), "ingress").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "ebpf-cni:ingress") || !strings.Contains(string(out), "direct-action") {
		t.Errorf("tc filter show: %v\n%s", err, out)
	}
	if _, err := n.cnitool("check", a, ""); err != nil {
		t.Errorf("CHECK with tc attachment: %v", err)
	}
	// A filter that is not ours survives our DEL of the attachment programs.
	hv := a.hostVeth()
	foreign := foreignProgram(t)
	if err := netlink.FilterAdd(&netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{LinkIndex: hostLinks(t)[hv], Parent: netlink.HANDLE_MIN_INGRESS,
			Handle: netlink.MakeHandle(0, 1), Protocol: unix.ETH_P_ALL, Priority: 1},
		Fd: foreign.FD(), Name: "foreign", DirectAction: true,
	}); err != nil {
		t.Fatalf("add foreign filter: %v", err)
	}
	if err := loader.Detach(n.pinRoot, hostLinks(t)[hv], hv); err != nil {
		t.Fatal(err)
	}
	out, _ = exec.Command("tc", "filter", "show", "dev", hv, "ingress").CombinedOutput()
	if !strings.Contains(string(out), "foreign") || strings.Contains(string(out), "ebpf-cni") {
		t.Errorf("after detaching ours, filters are:\n%s\nwant the foreign one kept and ours gone", out)
	}
	cid := a.containerID()
	n.del(a)
	n.del(b)
	n.assertGone(hv, cid, a.ips)
}

func TestGC(t *testing.T) {
	n := newNode(t, nil)
	keep, drop1, drop2 := n.newNS(), n.newNS(), n.newNS()
	for i, p := range []*pod{keep, drop1, drop2} {
		out, err := n.call("ADD", fmt.Sprintf("gc-%d", i), p, n.conf())
		if err != nil {
			t.Fatal(err)
		}
		p.setResult(t, out)
	}
	// drop2's namespace is already gone, as after a node crash.
	exec.Command("ip", "netns", "del", drop2.ns).Run()
	gc := map[string]any{}
	json.Unmarshal(n.conf(), &gc)
	gc["cni.dev/valid-attachments"] = []map[string]string{{"containerID": "gc-0", "ifname": "eth0"}}
	stdin, _ := json.Marshal(gc)
	if out, err := n.call("GC", "", nil, stdin); err != nil || len(out) != 0 {
		t.Fatalf("GC: %v, stdout %q (want none)", err, out)
	}
	n.assertGone(drop1.hostVeth(), "gc-1", drop1.ips)
	n.assertGone(drop2.hostVeth(), "gc-2", drop2.ips)
	if _, ok := hostLinks(t)[keep.hostVeth()]; !ok {
		t.Fatalf("GC removed the host veth of a valid attachment")
	}
	if _, ok := n.inspect()[keep.ip(false)]; !ok {
		t.Fatalf("GC removed the endpoint of a valid attachment")
	}
	if _, err := os.Stat(filepath.Join(n.ipamDir, n.name, keep.ip(false).String())); err != nil {
		t.Fatalf("GC released the address of a valid attachment: %v", err)
	}
	if _, err := n.call("CHECK", "gc-0", keep, withPrev(t, n.conf(), keep.result)); err != nil {
		t.Errorf("CHECK of the kept pod after GC: %v", err)
	}
	if _, err := n.call("DEL", "gc-0", keep, n.conf()); err != nil {
		t.Fatal(err)
	}
	n.assertGone(keep.hostVeth(), "gc-0", keep.ips)
}

// withPrev adds prevResult to a config.
func withPrev(t *testing.T, conf []byte, prev map[string]any) []byte {
	t.Helper()
	m := map[string]any{}
	json.Unmarshal(conf, &m)
	m["prevResult"] = prev
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestStatus(t *testing.T) {
	n := newNode(t, map[string]any{"ranges": [][]map[string]string{{{"subnet": "10.253.0.0/30"}}}})
	if out, err := n.call("STATUS", "", nil, n.conf()); err != nil {
		t.Fatalf("STATUS on a fresh node: %v %s", err, out)
	}
	// A /30 has two addresses: fill them, then ADD and STATUS must refuse.
	a, b, c := n.newNS(), n.newNS(), n.newNS()
	for i, p := range []*pod{a, b} {
		out, err := n.call("ADD", fmt.Sprintf("st-%d", i), p, n.conf())
		if err != nil {
			t.Fatal(err)
		}
		p.setResult(t, out)
	}
	out, err := n.call("STATUS", "", nil, n.conf())
	if err == nil {
		t.Fatalf("STATUS with no free address succeeded")
	}
	if e := decodeError(t, out); e.Code != 50 || !strings.Contains(e.Msg, "no free address") {
		t.Errorf("STATUS error %+v, want code 50 naming the exhausted range", e)
	}
	out, err = n.call("ADD", "st-2", c, n.conf())
	if err == nil {
		t.Fatalf("ADD on an exhausted range succeeded: %s", out)
	}
	if e := decodeError(t, out); e.Code != 100 || !strings.Contains(e.Msg, "no free addresses") {
		t.Errorf("exhausted ADD error %+v, want code 100", e)
	}
	if _, ok := hostLinks(t)[veth.HostName("st-2", "eth0")]; ok {
		t.Errorf("failed ADD left its host veth")
	}
	if out, _ := c.run("ip", "-o", "link"); strings.Contains(string(out), "eth0") {
		t.Errorf("failed ADD left eth0 in the pod")
	}
	// An incompatible pin makes STATUS refuse with 50 and name the map.
	for i, p := range []*pod{a, b} {
		n.call("DEL", fmt.Sprintf("st-%d", i), p, n.conf())
	}
	os.RemoveAll(n.pinRoot)
	if err := os.MkdirAll(n.pinRoot, 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("bpftool", "map", "create", filepath.Join(n.pinRoot, "endpoints_v1"),
		"type", "hash", "key", "4", "value", "4", "entries", "16", "name", "endpoints_v1").CombinedOutput(); err != nil {
		t.Fatalf("bpftool map create: %v: %s", err, out)
	}
	out, err = n.call("STATUS", "", nil, n.conf())
	if err == nil {
		t.Fatalf("STATUS with an incompatible pinned map succeeded")
	}
	if e := decodeError(t, out); e.Code != 50 || !strings.Contains(e.Msg, "endpoints_v1") {
		t.Errorf("STATUS error %+v, want 50 naming endpoints_v1", e)
	}
}

// foreignProgram is a tc program that is not ours: it only says "next".
func foreignProgram(t *testing.T) *ebpf.Program {
	t.Helper()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: "foreign", Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()},
	})
	if err != nil {
		t.Fatalf("load foreign program: %v", err)
	}
	t.Cleanup(func() { prog.Close() })
	return prog
}

func TestForeignTCXProgramKept(t *testing.T) {
	n := newNode(t, nil)
	n.writeConflist()
	a := n.newNS()
	n.add(a)
	hv := a.hostVeth()
	idx := hostLinks(t)[hv]
	l, err := link.AttachTCX(link.TCXOptions{Interface: idx, Program: foreignProgram(t), Attach: ebpf.AttachTCXIngress, Anchor: link.Head()})
	if err != nil {
		t.Fatalf("attach foreign tcx program: %v", err)
	}
	defer l.Close()
	count := func() int {
		res, err := link.QueryPrograms(link.QueryOptions{Target: idx, Attach: ebpf.AttachTCXIngress})
		if err != nil {
			t.Fatal(err)
		}
		return len(res.Programs)
	}
	if got := count(); got != 2 {
		t.Fatalf("%d programs on tcx ingress, want ours and the foreign one", got)
	}
	if _, err := n.cnitool("check", a, ""); err != nil {
		t.Errorf("CHECK with a foreign program ahead of ours: %v", err)
	}
	if err := loader.Detach(n.pinRoot, idx, hv); err != nil {
		t.Fatal(err)
	}
	if got := count(); got != 1 {
		t.Fatalf("%d programs on tcx ingress after detaching ours, want the foreign one left", got)
	}
	if _, err := n.cnitool("check", a, ""); err == nil || !strings.Contains(err.Error(), "no ebpf-cni program on "+hv+" ingress") {
		t.Errorf("CHECK after our programs were detached: %v, want the missing attachment named", err)
	}
	n.del(a)
}
