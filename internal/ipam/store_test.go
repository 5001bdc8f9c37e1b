package ipam

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// stores runs a test against every Store implementation.
func stores(t *testing.T, test func(t *testing.T, newStore func() Store)) {
	t.Run("mem", func(t *testing.T) {
		// One MemStore stands for one directory; every "instance" shares it.
		m := NewMemStore()
		test(t, func() Store { return m })
	})
	t.Run("disk", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "ipam", "net")
		test(t, func() Store {
			// Each call opens the same directory anew, like another process.
			s := NewDiskStore(dir)
			return s
		})
	})
}

func rec(ip, cid, ifName string) Record {
	return Record{IP: addr(ip), ContainerID: cid, IfName: ifName, PodNamespace: "ns", PodName: "p-" + cid}
}

func TestStoreReserveListRelease(t *testing.T) {
	stores(t, func(t *testing.T, newStore func() Store) {
		s := newStore()
		if last, err := s.LastReserved("0"); err != nil || last.IsValid() {
			t.Fatalf("LastReserved on empty store = %v, %v; want zero", last, err)
		}
		for _, r := range []struct {
			rec     Record
			rangeID string
			want    bool
		}{
			{rec("10.0.0.9", "a", "eth0"), "0", true},
			{rec("fd00::2", "a", "eth0"), "1", true},
			{rec("10.0.0.2", "b", "eth0"), "0", true},
			{rec("10.0.0.9", "c", "eth0"), "0", false}, // taken
			{rec("10.0.0.10", "a", "net1"), "0", true},
		} {
			ok, err := s.Reserve(r.rec, r.rangeID)
			if err != nil || ok != r.want {
				t.Fatalf("Reserve(%s) = %v, %v; want %v", r.rec.IP, ok, err, r.want)
			}
		}
		// A second instance sees the same state.
		s = newStore()
		for id, want := range map[string]string{"0": "10.0.0.10", "1": "fd00::2"} {
			if last, err := s.LastReserved(id); err != nil || last != addr(want) {
				t.Errorf("LastReserved(%s) = %v, %v; want %s", id, last, err, want)
			}
		}
		list, err := s.List()
		if err != nil {
			t.Fatalf("List: %v", err)
		}
		want := []Record{rec("10.0.0.2", "b", "eth0"), rec("10.0.0.9", "a", "eth0"), rec("10.0.0.10", "a", "net1"), rec("fd00::2", "a", "eth0")}
		if !slices.Equal(list, want) {
			t.Errorf("List = %+v, want %+v", list, want)
		}

		removed, err := s.ReleaseOwner("a", "eth0")
		if err != nil {
			t.Fatalf("ReleaseOwner: %v", err)
		}
		if want := []Record{rec("10.0.0.9", "a", "eth0"), rec("fd00::2", "a", "eth0")}; !slices.Equal(removed, want) {
			t.Errorf("ReleaseOwner = %+v, want %+v", removed, want)
		}
		if removed, err := s.ReleaseOwner("a", "eth0"); err != nil || removed == nil || len(removed) != 0 {
			t.Errorf("second ReleaseOwner = %#v, %v; want empty slice, nil", removed, err)
		}
		if err := s.Release(addr("10.0.0.2")); err != nil {
			t.Errorf("Release: %v", err)
		}
		if err := s.Release(addr("10.0.0.2")); err != nil {
			t.Errorf("Release of a free ip: %v", err)
		}
		if got := storeIPs(t, s); fmt.Sprint(got) != "[10.0.0.10]" {
			t.Errorf("List after releases = %v, want [10.0.0.10]", got)
		}
		// A released address can be reserved again.
		if ok, err := s.Reserve(rec("10.0.0.9", "d", "eth0"), "0"); !ok || err != nil {
			t.Errorf("Reserve of a released ip = %v, %v", ok, err)
		}
	})
}

func TestStoreRejectsBadInput(t *testing.T) {
	stores(t, func(t *testing.T, newStore func() Store) {
		s := newStore()
		for _, c := range []struct {
			rec     Record
			rangeID string
		}{
			{Record{ContainerID: "a", IfName: "eth0"}, "0"},
			{rec("fe80::1%eth0", "a", "eth0"), "0"},
			{rec("10.0.0.1", "a", "eth0"), ""},
			{rec("10.0.0.1", "a", "eth0"), "../x"},
			{rec("10.0.0.1", "a", "eth0"), ".."},
		} {
			if ok, err := s.Reserve(c.rec, c.rangeID); ok || !errors.Is(err, ErrInvalidRecord) {
				t.Errorf("Reserve(%v, %q) = %v, %v; want ErrInvalidRecord", c.rec.IP, c.rangeID, ok, err)
			}
		}
		if got := storeIPs(t, s); len(got) != 0 {
			t.Errorf("List = %v, want nothing", got)
		}
	})
}

func TestStoreLockTimeout(t *testing.T) {
	stores(t, func(t *testing.T, newStore func() Store) {
		holder, other := newStore(), newStore()
		unlock, err := holder.Lock(time.Second)
		if err != nil {
			t.Fatalf("Lock: %v", err)
		}
		for _, timeout := range []time.Duration{0, 30 * time.Millisecond} {
			start := time.Now()
			u, err := other.Lock(timeout)
			if !errors.Is(err, ErrLockTimeout) {
				if u != nil {
					u()
				}
				t.Fatalf("Lock(%s) while held: err = %v, want ErrLockTimeout", timeout, err)
			}
			if waited := time.Since(start); waited < timeout {
				t.Errorf("Lock(%s) gave up after %s", timeout, waited)
			}
		}
		// The same instance conflicts with itself too.
		if _, err := holder.Lock(10 * time.Millisecond); !errors.Is(err, ErrLockTimeout) {
			t.Errorf("second Lock on the holder: err = %v, want ErrLockTimeout", err)
		}

		// A waiter gets the lock once the holder lets go.
		got := make(chan error, 1)
		go func() {
			u, err := other.Lock(5 * time.Second)
			if err == nil {
				u()
			}
			got <- err
		}()
		time.Sleep(20 * time.Millisecond)
		unlock()
		unlock() // harmless
		if err := <-got; err != nil {
			t.Errorf("waiting Lock after unlock: %v", err)
		}
		u, err := holder.Lock(0)
		if err != nil {
			t.Fatalf("Lock after everyone let go: %v", err)
		}
		u()
	})
}

func TestStoreLockExcludes(t *testing.T) {
	// Holders never overlap: a read-modify-write under the lock loses no update.
	stores(t, func(t *testing.T, newStore func() Store) {
		const n = 20
		var inside, peak int
		var mu sync.Mutex
		var wg sync.WaitGroup
		for range n {
			s := newStore()
			wg.Go(func() {
				unlock, err := s.Lock(10 * time.Second)
				if err != nil {
					t.Errorf("Lock: %v", err)
					return
				}
				defer unlock()
				mu.Lock()
				inside++
				peak = max(peak, inside)
				mu.Unlock()
				time.Sleep(time.Millisecond)
				mu.Lock()
				inside--
				mu.Unlock()
			})
		}
		wg.Wait()
		if peak != 1 {
			t.Errorf("%d holders at once, want 1", peak)
		}
	})
}

func TestDiskStoreFiles(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "net")
	s := NewDiskStore(dir)
	// Opening and reading a store changes nothing on the node (STATUS reads it).
	if list, err := s.List(); err != nil || len(list) != 0 {
		t.Fatalf("List of a new store = %v, %v; want empty", list, err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("store dir exists before the first write: %v", err)
	}
	r := Record{IP: addr("fd00::a"), ContainerID: "abc", IfName: "eth0", PodNamespace: "kube-system", PodName: "dns"}
	if ok, err := s.Reserve(r, "1"); !ok || err != nil {
		t.Fatalf("Reserve = %v, %v", ok, err)
	}
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("store dir: %v, %v; want mode 0700", fi, err)
	}

	data, err := os.ReadFile(filepath.Join(dir, "fd00::a"))
	if err != nil {
		t.Fatalf("record file: %v", err)
	}
	var fields map[string]string
	if err := json.Unmarshal(data, &fields); err != nil {
		t.Fatalf("record file is not JSON: %v: %q", err, data)
	}
	wantFields := map[string]string{"ip": "fd00::a", "containerID": "abc", "ifName": "eth0", "podNamespace": "kube-system", "podName": "dns"}
	if fmt.Sprint(fields) != fmt.Sprint(wantFields) {
		t.Errorf("record file = %v, want %v", fields, wantFields)
	}
	if fi, err := os.Stat(filepath.Join(dir, "fd00::a")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("record file: %v, %v; want mode 0600", fi, err)
	}
	last, err := os.ReadFile(filepath.Join(dir, "last_reserved_ip.1"))
	if err != nil || strings.TrimSpace(string(last)) != "fd00::a" {
		t.Errorf("last_reserved_ip.1 = %q, %v; want fd00::a", last, err)
	}

	// A reservation leaves exactly its record and bookkeeping; temp files are gone.
	unlock, err := s.Lock(time.Second)
	if err != nil {
		t.Fatalf("Lock: %v", err)
	}
	unlock()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if want := []string{"fd00::a", "last_reserved_ip.1", "lock", "owners"}; !slices.Equal(names, want) {
		t.Errorf("dir holds %v, want %v", names, want)
	}
}

func TestDiskStoreListIgnoresStrayFiles(t *testing.T) {
	dir := t.TempDir()
	s := NewDiskStore(dir)
	if ok, err := s.Reserve(rec("10.0.0.5", "a", "eth0"), "0"); !ok || err != nil {
		t.Fatalf("Reserve = %v, %v", ok, err)
	}
	unlock, err := s.Lock(time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	stray := map[string]string{
		".tmp-123456":        `{"ip":"10.0.0.6","contai`, // crash mid-write
		".tmp-999":           `{"ip":"10.0.0.7","containerID":"x","ifName":"eth0"}`,
		"last_reserved_ip.7": "10.0.0.8\n",
		"10.000.0.9":         `garbage`, // not canonical: not ours
		"README":             "hello",
	}
	for name, content := range stray {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "10.0.0.11"), 0o700); err != nil {
		t.Fatal(err)
	}
	list, err := s.List()
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	if want := []Record{rec("10.0.0.5", "a", "eth0")}; !slices.Equal(list, want) {
		t.Errorf("List = %+v, want %+v", list, want)
	}
}

// One damaged file never blocks the node: listing skips it (Damaged names
// it), its owner's release removes it, a garbled round-robin cursor starts
// over, free counting treats it as taken, and GC reclaims one no kept
// attachment owns.
func TestDiskStoreDamagedFiles(t *testing.T) {
	dir := t.TempDir()
	s := NewDiskStore(dir)
	sets := mustValidate(t, RangeSet{{Subnet: pfx("10.0.0.0/29")}})
	a := NewAllocator(s, sets)
	recs, err := a.Allocate(Owner{ContainerID: "live", IfName: "eth0"}, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	mine := recs[0].IP
	// The live owner's record gets garbled; two stray files no index names.
	for name, content := range map[string]string{
		mine.String(): "",
		"10.0.0.4":    "{not json",
		"10.0.0.5":    `{"ip":"10.0.0.3","containerID":"a","ifName":"eth0"}`, // names another IP
	} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "last_reserved_ip.0"), []byte("nope"), 0o600); err != nil {
		t.Fatal(err)
	}
	if list, err := s.List(); err != nil || len(list) != 0 {
		t.Errorf("List = %v, %v; want no readable record and no error", list, err)
	}
	damaged, err := s.Damaged()
	if err != nil || len(damaged) != 3 {
		t.Errorf("Damaged = %v, %v; want the three files", damaged, err)
	}
	if last, err := s.LastReserved("0"); err != nil || last.IsValid() {
		t.Errorf("LastReserved with a garbled file = %v, %v; want a fresh start", last, err)
	}
	free, err := a.Free()
	if err != nil || free[0] != 6-3 {
		t.Errorf("Free = %v, %v; want 3 (6 usable, 3 damaged taken)", free, err)
	}
	// Another ADD still gets an address.
	if _, err := a.Allocate(Owner{ContainerID: "next", IfName: "eth0"}, time.Second); err != nil {
		t.Errorf("Allocate with damaged files around: %v", err)
	}
	// GC keeps the damaged record a kept owner's index names and reclaims the rest.
	b := NewBuiltin(s, sets, nil, nil)
	if err := b.GC(func(cid, _ string) bool { return cid == "live" || cid == "next" }); err != nil {
		t.Fatalf("GC: %v", err)
	}
	if damaged, _ := s.Damaged(); len(damaged) != 1 || damaged[0] != mine {
		t.Errorf("after GC damaged = %v, want only the live owner's %s", damaged, mine)
	}
	// The owner's DEL releases its damaged record.
	if err := b.Del(Owner{ContainerID: "live", IfName: "eth0"}); err != nil {
		t.Fatalf("DEL of the owner of a damaged record: %v", err)
	}
	if damaged, _ := s.Damaged(); len(damaged) != 0 {
		t.Errorf("after the owner's DEL damaged = %v, want none", damaged)
	}
}

func TestDiskStoreConcurrentAllocate(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ipam", "net")
	sets := mustValidate(t, RangeSet{{Subnet: pfx("10.0.0.0/24"), Gateway: addr("10.0.0.1")}}, RangeSet{{Subnet: pfx("fd00::/120")}})
	const n = 20
	var wg sync.WaitGroup
	results := make([][]Record, n)
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			// Own DiskStore and Allocator per goroutine: own open of the lock
			// file, so flock conflicts as between processes.
			s := NewDiskStore(dir)
			results[i], errs[i] = NewAllocator(s, sets).Allocate(owner(i), 10*time.Second)
		})
	}
	wg.Wait()
	seen := make(map[netip.Addr]int)
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("goroutine %d: %v", i, errs[i])
		}
		if len(results[i]) != 2 {
			t.Fatalf("goroutine %d got %v, want two records", i, results[i])
		}
		for _, r := range results[i] {
			if r.IP == addr("10.0.0.1") {
				t.Errorf("goroutine %d got the gateway", i)
			}
			if j, dup := seen[r.IP]; dup {
				t.Fatalf("%s handed to both %d and %d", r.IP, j, i)
			}
			seen[r.IP] = i
		}
	}
	s := NewDiskStore(dir)
	list, err := s.List()
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	if len(list) != 2*n {
		t.Errorf("store holds %d records, want %d", len(list), 2*n)
	}
	for _, r := range list {
		if i, ok := seen[r.IP]; !ok || r.ContainerID != owner(i).ContainerID {
			t.Errorf("stored %+v does not match what was handed out", r)
		}
	}
	// Sequential allocation under contention still packs the pool: .2-.21.
	if list[0].IP != addr("10.0.0.2") || list[n-1].IP != addr("10.0.0.21") {
		t.Errorf("ipv4 records span %s-%s, want 10.0.0.2-10.0.0.21", list[0].IP, list[n-1].IP)
	}
}

func TestDiskStoreAllocateIPv6(t *testing.T) {
	s := NewDiskStore(t.TempDir())
	a := NewAllocator(s, mustValidate(t, RangeSet{{Subnet: pfx("fd00::/120"), Gateway: addr("fd00::1")}}))
	for i, want := range []string{"fd00::2", "fd00::3"} {
		if got := allocIPs(t, a, owner(i)); got[0] != want {
			t.Errorf("allocation %d = %v, want %s", i, got, want)
		}
	}
	if _, err := a.Release("c0", "eth0", time.Second); err != nil {
		t.Fatal(err)
	}
	if got := allocIPs(t, a, owner(2)); got[0] != "fd00::4" {
		t.Errorf("allocation after release = %v, want fd00::4", got)
	}
	if f, err := a.Free(); err != nil || f[0] != 254-2 {
		t.Errorf("Free = %v, %v; want [252]", f, err)
	}
}

// The owner index lets Allocate and ReleaseOwner work without reading every
// record; GC's Release keeps it in step.
func TestDiskStoreOwnerIndex(t *testing.T) {
	dir := t.TempDir()
	s := NewDiskStore(dir)
	a, b := netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("fd00::2")
	for _, ip := range []netip.Addr{a, b} {
		if ok, err := s.Reserve(Record{IP: ip, ContainerID: "c1", IfName: "eth0"}, "0"); !ok || err != nil {
			t.Fatalf("Reserve %s: %v %v", ip, ok, err)
		}
	}
	if ok, err := s.Reserve(Record{IP: netip.MustParseAddr("10.0.0.3"), ContainerID: "c2", IfName: "eth0"}, "0"); !ok || err != nil {
		t.Fatal(ok, err)
	}
	owned, err := s.Owned("c1", "eth0")
	if err != nil || len(owned) != 2 || owned[0].IP != a || owned[1].IP != b {
		t.Fatalf("Owned(c1) = %v, %v; want %s and %s", owned, err, a, b)
	}
	// A second store instance (another process) sees the same index.
	s2 := NewDiskStore(dir)
	if err := s2.Release(a); err != nil {
		t.Fatal(err)
	}
	owned, _ = s.Owned("c1", "eth0")
	if len(owned) != 1 || owned[0].IP != b {
		t.Fatalf("after Release(%s), Owned(c1) = %v", a, owned)
	}
	removed, err := s.ReleaseOwner("c1", "eth0")
	if err != nil || len(removed) != 1 || removed[0].IP != b {
		t.Fatalf("ReleaseOwner(c1) = %v, %v", removed, err)
	}
	if left, _ := os.ReadDir(filepath.Join(dir, "owners")); len(left) != 1 {
		t.Errorf("owners/ holds %d files, want only c2's", len(left))
	}
	if owned, _ := s.Owned("c2", "eth0"); len(owned) != 1 {
		t.Errorf("c2 lost its reservation: %v", owned)
	}
}
