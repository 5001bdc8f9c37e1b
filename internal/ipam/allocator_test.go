package ipam

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"
)

const testTimeout = 5 * time.Second

func mustValidate(t *testing.T, sets ...RangeSet) []RangeSet {
	t.Helper()
	v, err := Validate(sets)
	if err != nil {
		t.Fatalf("Validate: %v", err)
	}
	return v
}

func owner(n int) Owner {
	return Owner{ContainerID: fmt.Sprintf("c%d", n), IfName: "eth0", PodNamespace: "default", PodName: fmt.Sprintf("pod-%d", n)}
}

// allocIPs allocates for owner and returns the addresses as strings.
func allocIPs(t *testing.T, a *Allocator, o Owner) []string {
	t.Helper()
	recs, err := a.Allocate(o, testTimeout)
	if err != nil {
		t.Fatalf("Allocate(%s): %v", o.ContainerID, err)
	}
	var ips []string
	for _, r := range recs {
		ips = append(ips, r.IP.String())
	}
	return ips
}

func storeIPs(t *testing.T, s Store) []string {
	t.Helper()
	recs, err := s.List()
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	ips := []string{}
	for _, r := range recs {
		ips = append(ips, r.IP.String())
	}
	return ips
}

func TestAllocateSequential(t *testing.T) {
	tests := []struct {
		name string
		sets []RangeSet
		want []string // one address per allocation, single set
	}{
		{
			name: "ipv4 skips gateway",
			sets: []RangeSet{{{Subnet: pfx("10.0.0.0/29"), Gateway: addr("10.0.0.1")}}},
			want: []string{"10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"},
		},
		{
			name: "gateway in the middle",
			sets: []RangeSet{{{Subnet: pfx("10.0.0.0/29"), Gateway: addr("10.0.0.3")}}},
			want: []string{"10.0.0.1", "10.0.0.2", "10.0.0.4", "10.0.0.5", "10.0.0.6"},
		},
		{
			name: "explicit pool",
			sets: []RangeSet{{{Subnet: pfx("10.0.0.0/24"), RangeStart: addr("10.0.0.200"), RangeEnd: addr("10.0.0.202")}}},
			want: []string{"10.0.0.200", "10.0.0.201", "10.0.0.202"},
		},
		{
			name: "second range of a set after the first fills",
			sets: []RangeSet{{{Subnet: pfx("10.0.0.0/30")}, {Subnet: pfx("10.0.1.0/30"), Gateway: addr("10.0.1.1")}}},
			want: []string{"10.0.0.1", "10.0.0.2", "10.0.1.2"},
		},
		{
			name: "ipv6",
			sets: []RangeSet{{{Subnet: pfx("fd00::/126")}}},
			want: []string{"fd00::1", "fd00::2", "fd00::3"},
		},
		{
			name: "ipv6 /120 crosses no boundary issues",
			sets: []RangeSet{{{Subnet: pfx("fd00::/120"), RangeStart: addr("fd00::fd")}}},
			want: []string{"fd00::fd", "fd00::fe", "fd00::ff"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			store := NewMemStore()
			a := NewAllocator(store, mustValidate(t, tt.sets...))
			for i, want := range tt.want {
				if got := allocIPs(t, a, owner(i)); len(got) != 1 || got[0] != want {
					t.Fatalf("allocation %d = %v, want [%s]", i, got, want)
				}
			}
			_, err := a.Allocate(owner(len(tt.want)), testTimeout)
			if !errors.Is(err, ErrExhausted) {
				t.Fatalf("allocation past the end: err = %v, want ErrExhausted", err)
			}
			if !strings.HasPrefix(err.Error(), "range set 0 (") {
				t.Errorf("exhaustion error %q does not name the range set", err)
			}
		})
	}
}

func TestAllocateRoundRobin(t *testing.T) {
	store := NewMemStore()
	a := NewAllocator(store, mustValidate(t, RangeSet{{Subnet: pfx("10.0.0.0/29")}})) // .1-.6
	for i, want := range []string{"10.0.0.1", "10.0.0.2", "10.0.0.3"} {
		if got := allocIPs(t, a, owner(i)); got[0] != want {
			t.Fatalf("allocation %d = %v, want %s", i, got, want)
		}
	}
	if _, err := a.Release("c1", "eth0", testTimeout); err != nil { // frees .2
		t.Fatalf("Release: %v", err)
	}
	// The freed .2 is not reused until the pool wraps.
	for i, want := range []string{"10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.0.2"} {
		if got := allocIPs(t, a, owner(10+i)); got[0] != want {
			t.Fatalf("allocation after release %d = %v, want %s", i, got, want)
		}
	}
	if _, err := a.Allocate(owner(20), testTimeout); !errors.Is(err, ErrExhausted) {
		t.Fatalf("err = %v, want ErrExhausted", err)
	}
	// Release at the end of the pool, then wrap from the start.
	if _, err := a.Release("c0", "eth0", testTimeout); err != nil {
		t.Fatalf("Release: %v", err)
	}
	if got := allocIPs(t, a, owner(21)); got[0] != "10.0.0.1" {
		t.Fatalf("allocation after wrap = %v, want 10.0.0.1", got)
	}
}

func TestAllocateLastReservedOutsideSet(t *testing.T) {
	// A LastReserved that no longer falls in the (changed) configuration
	// restarts at the first range.
	store := NewMemStore()
	if ok, err := store.Reserve(Record{IP: addr("192.168.0.9"), ContainerID: "old", IfName: "eth0"}, "0"); !ok || err != nil {
		t.Fatalf("Reserve = %v, %v", ok, err)
	}
	a := NewAllocator(store, mustValidate(t, RangeSet{{Subnet: pfx("10.0.0.0/29")}}))
	if got := allocIPs(t, a, owner(1)); got[0] != "10.0.0.1" {
		t.Fatalf("allocation = %v, want 10.0.0.1", got)
	}
}

func TestAllocateDualStackExhaustionLeavesNothing(t *testing.T) {
	store := NewMemStore()
	sets := mustValidate(t,
		RangeSet{{Subnet: pfx("fd00::/120")}},
		RangeSet{{Subnet: pfx("10.0.0.0/30")}}, // two addresses
	)
	a := NewAllocator(store, sets)
	wantOK := [][]string{{"fd00::1", "10.0.0.1"}, {"fd00::2", "10.0.0.2"}}
	for i, want := range wantOK {
		got := allocIPs(t, a, owner(i))
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("allocation %d = %v, want %v", i, got, want)
		}
	}
	before := storeIPs(t, store)

	recs, err := a.Allocate(owner(2), testTimeout)
	if !errors.Is(err, ErrExhausted) {
		t.Fatalf("Allocate = %v, %v; want ErrExhausted", recs, err)
	}
	if want := "range set 1 (10.0.0.0/30): no free addresses"; err.Error() != want {
		t.Errorf("error = %q, want %q", err, want)
	}
	if recs != nil {
		t.Errorf("records on failure = %v, want nil", recs)
	}
	if after := storeIPs(t, store); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("store after failed allocation = %v, want %v (no partial reservation)", after, before)
	}
	// The failed call did not leave the v6 address behind for c2.
	if rel, err := a.Release("c2", "eth0", testTimeout); err != nil || len(rel) != 0 {
		t.Errorf("Release(c2) = %v, %v; want nothing", rel, err)
	}
}

func TestAllocateIdempotent(t *testing.T) {
	store := NewMemStore()
	a := NewAllocator(store, mustValidate(t,
		RangeSet{{Subnet: pfx("10.0.0.0/24")}},
		RangeSet{{Subnet: pfx("fd00::/120")}},
	))
	o := owner(1)
	first, err := a.Allocate(o, testTimeout)
	if err != nil {
		t.Fatalf("Allocate: %v", err)
	}
	want := []Record{
		{IP: addr("10.0.0.1"), ContainerID: "c1", IfName: "eth0", PodNamespace: "default", PodName: "pod-1"},
		{IP: addr("fd00::1"), ContainerID: "c1", IfName: "eth0", PodNamespace: "default", PodName: "pod-1"},
	}
	if fmt.Sprint(first) != fmt.Sprint(want) {
		t.Fatalf("Allocate = %+v, want %+v", first, want)
	}
	again, err := a.Allocate(o, testTimeout)
	if err != nil {
		t.Fatalf("second Allocate: %v", err)
	}
	if fmt.Sprint(again) != fmt.Sprint(first) {
		t.Errorf("second Allocate = %+v, want %+v", again, first)
	}
	if got := storeIPs(t, store); len(got) != 2 {
		t.Errorf("store holds %v, want 2 reservations", got)
	}
	// Another interface of the same container is another owner.
	other := o
	other.IfName = "net1"
	if got := allocIPs(t, a, other); fmt.Sprint(got) != "[10.0.0.2 fd00::2]" {
		t.Errorf("Allocate for net1 = %v, want [10.0.0.2 fd00::2]", got)
	}
}

func TestAllocateCompletesPartialOwner(t *testing.T) {
	// An owner holding an address in only one set (say a set was added to the
	// configuration) keeps it and gets the missing one.
	store := NewMemStore()
	if ok, err := store.Reserve(Record{IP: addr("10.0.0.7"), ContainerID: "c1", IfName: "eth0"}, "0"); !ok || err != nil {
		t.Fatalf("Reserve = %v, %v", ok, err)
	}
	a := NewAllocator(store, mustValidate(t,
		RangeSet{{Subnet: pfx("10.0.0.0/24")}},
		RangeSet{{Subnet: pfx("fd00::/120")}},
	))
	if got := allocIPs(t, a, owner(1)); fmt.Sprint(got) != "[10.0.0.7 fd00::1]" {
		t.Errorf("Allocate = %v, want [10.0.0.7 fd00::1]", got)
	}
}

func TestAllocateInvalidOwner(t *testing.T) {
	a := NewAllocator(NewMemStore(), mustValidate(t, RangeSet{{Subnet: pfx("10.0.0.0/24")}}))
	for _, o := range []Owner{{IfName: "eth0"}, {ContainerID: "c"}} {
		if _, err := a.Allocate(o, testTimeout); !errors.Is(err, ErrInvalidOwner) {
			t.Errorf("Allocate(%+v) err = %v, want ErrInvalidOwner", o, err)
		}
	}
}

func TestRelease(t *testing.T) {
	store := NewMemStore()
	a := NewAllocator(store, mustValidate(t,
		RangeSet{{Subnet: pfx("10.0.0.0/24")}},
		RangeSet{{Subnet: pfx("fd00::/120")}},
	))
	allocIPs(t, a, owner(1))
	allocIPs(t, a, owner(2))

	rel, err := a.Release("c1", "eth0", testTimeout)
	if err != nil {
		t.Fatalf("Release: %v", err)
	}
	if len(rel) != 2 || rel[0].IP != addr("10.0.0.1") || rel[1].IP != addr("fd00::1") || rel[0].PodName != "pod-1" {
		t.Errorf("Release = %+v, want c1's two records", rel)
	}
	if got := storeIPs(t, store); fmt.Sprint(got) != "[10.0.0.2 fd00::2]" {
		t.Errorf("store after release = %v, want [10.0.0.2 fd00::2]", got)
	}
	for _, c := range []struct{ id, ifName string }{{"c1", "eth0"}, {"c2", "net1"}, {"nobody", "eth0"}} {
		rel, err := a.Release(c.id, c.ifName, testTimeout)
		if err != nil || len(rel) != 0 {
			t.Errorf("Release(%s, %s) = %v, %v; want nothing, nil", c.id, c.ifName, rel, err)
		}
	}
}

func TestAllocatorLockTimeout(t *testing.T) {
	store := NewMemStore()
	a := NewAllocator(store, mustValidate(t, RangeSet{{Subnet: pfx("10.0.0.0/24")}}))
	unlock, err := store.Lock(testTimeout)
	if err != nil {
		t.Fatalf("Lock: %v", err)
	}
	if _, err := a.Allocate(owner(1), 20*time.Millisecond); !errors.Is(err, ErrLockTimeout) {
		t.Errorf("Allocate under a held lock: err = %v, want ErrLockTimeout", err)
	}
	if _, err := a.Release("c1", "eth0", 20*time.Millisecond); !errors.Is(err, ErrLockTimeout) {
		t.Errorf("Release under a held lock: err = %v, want ErrLockTimeout", err)
	}
	unlock()
	if _, err := a.Allocate(owner(1), testTimeout); err != nil {
		t.Errorf("Allocate after unlock: %v", err)
	}
}

func TestFree(t *testing.T) {
	store := NewMemStore()
	a := NewAllocator(store, mustValidate(t,
		RangeSet{{Subnet: pfx("10.0.0.0/29"), Gateway: addr("10.0.0.1")}},    // .2-.6 free
		RangeSet{{Subnet: pfx("fd00::/120")}, {Subnet: pfx("fd00:1::/126")}}, // 255 + 3
		RangeSet{{Subnet: pfx("10.1.0.0/16")}},                               // 65534
	))
	// A reservation outside every set counts nowhere.
	if _, err := store.Reserve(Record{IP: addr("192.168.1.1"), ContainerID: "x", IfName: "eth0"}, "other"); err != nil {
		t.Fatal(err)
	}
	check := func(want []uint64) {
		t.Helper()
		got, err := a.Free()
		if err != nil {
			t.Fatalf("Free: %v", err)
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("Free = %v, want %v", got, want)
		}
	}
	check([]uint64{5, 258, 65534})
	allocIPs(t, a, owner(1))
	allocIPs(t, a, owner(2))
	check([]uint64{3, 256, 65532})
	if _, err := a.Release("c1", "eth0", testTimeout); err != nil {
		t.Fatal(err)
	}
	check([]uint64{4, 257, 65533})
	for i := 3; i <= 6; i++ {
		allocIPs(t, a, owner(i))
	}
	check([]uint64{0, 253, 65529})
}

func TestIPv6LargePools(t *testing.T) {
	for _, p := range []string{"fd00::/64", "fd00::/48", "::/0"} {
		t.Run(p, func(t *testing.T) {
			store := NewMemStore()
			a := NewAllocator(store, mustValidate(t, RangeSet{{Subnet: pfx(p)}}))
			done := make(chan struct{})
			var free []uint64
			var err error
			go func() {
				defer close(done)
				free, err = a.Free()
			}()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				t.Fatal("Free on a huge pool did not return")
			}
			if err != nil || len(free) != 1 || free[0] != FreeCap {
				t.Fatalf("Free = %v, %v; want [%d]", free, err, FreeCap)
			}
			got := allocIPs(t, a, owner(1))
			want := pfx(p).Addr().Next().String()
			if got[0] != want {
				t.Errorf("Allocate = %v, want %s", got, want)
			}
		})
	}
}

func TestFreeNearCap(t *testing.T) {
	// A pool just over the cap, minus a few reservations, is counted exactly
	// before capping.
	store := NewMemStore()
	a := NewAllocator(store, mustValidate(t, RangeSet{{Subnet: pfx("fd00::/108")}})) // 2^20-1 usable
	f, err := a.Free()
	if err != nil || f[0] != FreeCap-1 {
		t.Fatalf("Free = %v, %v; want [%d]", f, err, FreeCap-1)
	}
	allocIPs(t, a, owner(1))
	if f, _ = a.Free(); f[0] != FreeCap-2 {
		t.Fatalf("Free = %v, want [%d]", f, FreeCap-2)
	}
}

func TestAllocateConcurrentMem(t *testing.T) {
	store := NewMemStore()
	sets := mustValidate(t, RangeSet{{Subnet: pfx("10.0.0.0/24")}}, RangeSet{{Subnet: pfx("fd00::/120")}})
	const n = 50
	var wg sync.WaitGroup
	results := make([][]Record, n)
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			// Separate Allocators, as separate plugin invocations would have.
			results[i], errs[i] = NewAllocator(store, sets).Allocate(owner(i), testTimeout)
		})
	}
	wg.Wait()
	seen := make(map[netip.Addr]int)
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("Allocate %d: %v", i, errs[i])
		}
		for _, r := range results[i] {
			if j, dup := seen[r.IP]; dup {
				t.Fatalf("%s handed to both %d and %d", r.IP, j, i)
			}
			seen[r.IP] = i
		}
	}
	if got := len(storeIPs(t, store)); got != 2*n {
		t.Errorf("store holds %d reservations, want %d", got, 2*n)
	}
}
