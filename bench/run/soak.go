package main

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/ebpf-cni/ebpf-cni/internal/veth"
)

// soakResult is one soak run: cycles of ADD then DEL through cnitool, many
// at once, with the invariants checked along the way.
type soakResult struct {
	label              string
	cycles, parallel   int
	wall               time.Duration
	addP50, addP99     time.Duration
	delP50, delP99     time.Duration
	failures           int // calls that returned an error
	doubleHolds        int // an ADD handed out an address a live pod held
	leakedReservations int
	leakedRecords      int
	leakedVeths        int
	leakedEntries      int
}

// runSoak runs soakCycles ADD/DEL cycles, soakParallel at once, through
// cnitool. An address handed to a pod must not be held by another live pod
// (a pod is live from its ADD's success until its DEL starts); at the end
// nothing may be left: reservation, record, host veth, map entry.
func runSoak(e *env, rep *report) error {
	state := filepath.Join(e.dir, "soak-state")
	ipamDir := filepath.Join(e.dir, "soak-ipam")
	conf := map[string]any{"type": "ebpf-cni", "mtu": mtu, "pinRoot": pinRoot + "-soak", "stateDir": state,
		"ipam": map[string]any{"ranges": [][]map[string]string{{{"subnet": "10.230.0.0/16"}}}, "dataDir": ipamDir}}
	n, err := e.network("soak", "ebpf-cni", conf)
	if err != nil {
		return err
	}
	defer os.RemoveAll(pinRoot + "-soak")
	var (
		mu    sync.Mutex
		owner = map[netip.Addr]string{} // live pods' addresses
		res   = &soakResult{label: "ebpf-cni", cycles: *soakCycles, parallel: *soakParallel}
		adds  []time.Duration
		dels  []time.Duration
	)
	vethsBefore := 0
	if out, err := exec.Command("ip", "-o", "link", "show").Output(); err == nil {
		vethsBefore = countVeths(string(out))
	}
	start := time.Now()
	err = parallel(*soakCycles, *soakParallel, func(i int) error {
		ns := fmt.Sprintf("%ssoak-%d", prefix, i)
		if err := e.newNS(ns); err != nil {
			return err
		}
		defer exec.Command("ip", "netns", "del", ns).Run()
		p, da, err := e.add(n, ns)
		mu.Lock()
		if err != nil {
			res.failures++
			mu.Unlock()
			e.del(p) // what a runtime does after a failed ADD
			return nil
		}
		adds = append(adds, da)
		if other, held := owner[p.ip]; held {
			res.doubleHolds++
			fmt.Fprintf(os.Stderr, "bench: soak: %s handed to %s while %s holds it\n", p.ip, ns, other)
		}
		owner[p.ip] = ns
		mu.Unlock()

		mu.Lock()
		delete(owner, p.ip) // no longer live once its DEL starts
		mu.Unlock()
		dd, err := e.del(p)
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			res.failures++
			return nil
		}
		dels = append(dels, dd)
		return nil
	})
	res.wall = time.Since(start)
	if err != nil {
		return err
	}
	res.addP50, res.addP99 = pctl(adds, 0.5), pctl(adds, 0.99)
	res.delP50, res.delP99 = pctl(dels, 0.5), pctl(dels, 0.99)
	// Leaks: reservations, records, host veths, map entries.
	if files, err := os.ReadDir(filepath.Join(ipamDir, n.name)); err == nil {
		for _, f := range files {
			if _, err := netip.ParseAddr(f.Name()); err == nil {
				res.leakedReservations++
			}
		}
	}
	if files, err := os.ReadDir(filepath.Join(state, n.name, "endpoints")); err == nil {
		res.leakedRecords = len(files)
	}
	if out, err := exec.Command("ip", "-o", "link", "show").Output(); err == nil {
		res.leakedVeths = countVeths(string(out)) - vethsBefore
	}
	if out, err := exec.Command("bpftool", "-j", "map", "dump", "pinned", pinRoot+"-soak/endpoints_v1").Output(); err == nil {
		res.leakedEntries = countEntries(out)
	}
	fmt.Printf("bench: soak %d cycles, %d at once: %s; ADD p50 %.0f ms p99 %.0f ms; failures %d, double holds %d, leaks %d/%d/%d/%d\n",
		res.cycles, res.parallel, res.wall.Round(time.Second), ms(res.addP50), ms(res.addP99), res.failures, res.doubleHolds,
		res.leakedReservations, res.leakedRecords, res.leakedVeths, res.leakedEntries)
	rep.soak = res
	if res.doubleHolds > 0 || res.failures > 0 || res.leakedReservations+res.leakedRecords+res.leakedVeths+res.leakedEntries > 0 {
		return fmt.Errorf("soak: %d failed calls, %d double holds, leaks: %d reservations, %d records, %d veths, %d map entries",
			res.failures, res.doubleHolds, res.leakedReservations, res.leakedRecords, res.leakedVeths, res.leakedEntries)
	}
	return nil
}

func (r *report) writeSoak(w func(string, ...any)) {
	s := r.soak
	if s == nil {
		return
	}
	w("\n## Soak: ADD/DEL cycles, many at once\n\n")
	w("`make soak` (also run by `make bench`): %d cycles of `cnitool add` then `cnitool del`, %d at once, on one "+
		"node (2 cores), cnitool's own start-up included. An address handed out while another live pod held it "+
		"would count as a double hold; leaks are counted after the last cycle.\n\n", s.cycles, s.parallel)
	w("| plugin | wall | ADD p50 ms | ADD p99 ms | DEL p50 ms | DEL p99 ms | failed calls | double holds | leaked reservations / records / veths / map entries |\n")
	w("|---|---|---|---|---|---|---|---|---|\n")
	w("| %s | %s | %.0f | %.0f | %.0f | %.0f | %d | %d | %d / %d / %d / %d |\n", s.label, s.wall.Round(time.Second),
		ms(s.addP50), ms(s.addP99), ms(s.delP50), ms(s.delP99), s.failures, s.doubleHolds,
		s.leakedReservations, s.leakedRecords, s.leakedVeths, s.leakedEntries)
}

// countVeths counts ebpf-cni's host veths in `ip -o link` output.
func countVeths(out string) int {
	n := 0
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) > 1 {
			name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
			if veth.IsHostVeth(name) {
				n++
			}
		}
	}
	return n
}

// countEntries counts the entries of a `bpftool -j map dump`.
func countEntries(out []byte) int {
	var entries []json.RawMessage
	if json.Unmarshal(out, &entries) != nil {
		return 0
	}
	return len(entries)
}
