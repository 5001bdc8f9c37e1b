package ipam

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"time"
)

// FreeCap is the most Free reports for one range set. Counting is arithmetic,
// so the cap only keeps huge IPv6 pools from reporting meaningless numbers.
const FreeCap = 1 << 20

// Allocator hands out addresses from validated range sets, keeping them in a
// Store. It holds no state of its own beyond the configuration, so any number
// of Allocators (in any number of processes) may share one Store.
type Allocator struct {
	store Store
	sets  []RangeSet
}

// NewAllocator returns an Allocator for sets, which must have come out of
// Validate. The range set at index i keeps its LastReserved under rangeID
// strconv.Itoa(i).
func NewAllocator(store Store, sets []RangeSet) *Allocator {
	cp := make([]RangeSet, len(sets))
	for i, set := range sets {
		cp[i] = slices.Clone(set)
	}
	return &Allocator{store: store, sets: cp}
}

// Allocate returns one Record per range set, in set order, for owner.
//
// With the store lock held (waiting at most timeout), it first looks for
// reservations owner (containerID and ifName) already holds, so a repeated
// ADD gets the same addresses. For each set still lacking one, it reserves the
// next free address after the set's LastReserved, wrapping around, skipping
// the set's gateways. If any set has no free address, every reservation made
// by this call is released and the error wraps ErrExhausted, e.g.
// "range set 0 (10.0.0.0/30): no free addresses".
func (a *Allocator) Allocate(owner Owner, timeout time.Duration) (recs []Record, retErr error) {
	if owner.ContainerID == "" || owner.IfName == "" {
		return nil, fmt.Errorf("allocate: %w", ErrInvalidOwner)
	}
	unlock, err := a.store.Lock(timeout)
	if err != nil {
		return nil, fmt.Errorf("allocate for %s/%s: %w", owner.ContainerID, owner.IfName, err)
	}
	defer unlock()

	owned, err := a.store.Owned(owner.ContainerID, owner.IfName)
	if err != nil {
		return nil, fmt.Errorf("allocate for %s/%s: %w", owner.ContainerID, owner.IfName, err)
	}
	// No scan of every reservation: Reserve refuses a taken address, and
	// round-robin makes the next one after the last reserved almost always free.
	used := map[netip.Addr]bool{}
	out := make([]Record, len(a.sets))
	have := make([]bool, len(a.sets))
	for _, rec := range owned {
		used[rec.IP] = true
		for i, set := range a.sets {
			if !have[i] && set.Contains(rec.IP) {
				out[i], have[i] = rec, true
				break
			}
		}
	}

	var mine []netip.Addr
	// Runs before unlock, so the undo happens under the lock.
	defer func() {
		if retErr == nil {
			return
		}
		var undo []error
		for _, ip := range mine {
			if err := a.store.Release(ip); err != nil {
				undo = append(undo, fmt.Errorf("undo reservation of %s: %w", ip, err))
			}
		}
		if len(undo) > 0 {
			retErr = errors.Join(append([]error{retErr}, undo...)...)
		}
	}()
	for i, set := range a.sets {
		if have[i] {
			continue
		}
		rec, err := a.reserve(i, set, owner, used)
		if err != nil {
			return nil, err
		}
		mine = append(mine, rec.IP)
		used[rec.IP] = true
		out[i] = rec
	}
	return out, nil
}

// reserve takes the next free address of set i for owner. used holds
// addresses known to be reserved; the store's Reserve has the last word.
func (a *Allocator) reserve(i int, set RangeSet, owner Owner, used map[netip.Addr]bool) (Record, error) {
	id := strconv.Itoa(i)
	last, err := a.store.LastReserved(id)
	if err != nil {
		return Record{}, fmt.Errorf("range set %d (%s): %w", i, set, err)
	}
	gws := set.gateways()
	for ri, ip := range set.after(last) {
		if used[ip] || gws[ip] || set[ri].reserved(ip) {
			continue
		}
		rec := Record{
			IP:           ip,
			ContainerID:  owner.ContainerID,
			IfName:       owner.IfName,
			PodNamespace: owner.PodNamespace,
			PodName:      owner.PodName,
			BootID:       owner.BootID,
		}
		ok, err := a.store.Reserve(rec, id)
		if err != nil {
			return Record{}, fmt.Errorf("range set %d (%s): %w", i, set, err)
		}
		if ok {
			return rec, nil
		}
	}
	return Record{}, fmt.Errorf("range set %d (%s): %w", i, set, ErrExhausted)
}

// Release removes every reservation of (containerID, ifName), with the store
// lock held (waiting at most timeout), and returns what it removed. Releasing
// what is not reserved is not an error.
func (a *Allocator) Release(containerID, ifName string, timeout time.Duration) ([]Record, error) {
	unlock, err := a.store.Lock(timeout)
	if err != nil {
		return nil, fmt.Errorf("release %s/%s: %w", containerID, ifName, err)
	}
	defer unlock()
	recs, err := a.store.ReleaseOwner(containerID, ifName)
	if err != nil {
		return recs, fmt.Errorf("release %s/%s: %w", containerID, ifName, err)
	}
	return recs, nil
}

// Free reports how many addresses are still free in each range set, at most
// FreeCap each. It reads the store without its lock (records appear and
// disappear atomically), so the answer may be a moment stale; it is meant for
// STATUS and metrics, not for deciding an allocation.
func (a *Allocator) Free() ([]uint64, error) {
	all, err := a.store.List()
	if err != nil {
		return nil, fmt.Errorf("count free addresses: %w", err)
	}
	damaged, err := a.store.Damaged()
	if err != nil {
		return nil, fmt.Errorf("count free addresses: %w", err)
	}
	for _, ip := range damaged {
		all = append(all, Record{IP: ip}) // taken until GC or its owner's release
	}
	out := make([]uint64, len(a.sets))
	for i, set := range a.sets {
		var total uint64
		for _, r := range set {
			total = satAdd(total, span(r.RangeStart, r.RangeEnd))
		}
		// Gateways and reservations inside the pool; each address once.
		taken := make(map[netip.Addr]bool)
		for gw := range set.gateways() {
			if set.Contains(gw) {
				taken[gw] = true
			}
		}
		for _, rec := range all {
			if set.Contains(rec.IP) {
				taken[rec.IP] = true
			}
		}
		free := total - min(total, uint64(len(taken)))
		out[i] = min(free, FreeCap)
	}
	return out, nil
}

func satAdd(a, b uint64) uint64 {
	if s := a + b; s >= a {
		return s
	}
	return ^uint64(0)
}

// Records lists every reservation (no lock: records appear and vanish atomically).
func (a *Allocator) Records() ([]Record, error) {
	return a.store.List()
}

// ReleaseIP drops one reservation under the lock (GC of unknown attachments).
func (a *Allocator) ReleaseIP(ip netip.Addr, timeout time.Duration) error {
	unlock, err := a.store.Lock(timeout)
	if err != nil {
		return err
	}
	defer unlock()
	return a.store.Release(ip)
}

// Owned lists the reservations of one attachment without a lock.
func (a *Allocator) Owned(containerID, ifName string) ([]Record, error) {
	return a.store.Owned(containerID, ifName)
}
