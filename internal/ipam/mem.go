package ipam

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"
)

// MemStore is an in-memory Store for unit tests. Its Lock behaves like
// DiskStore's (exclusive, bounded wait) across goroutines; every method is
// safe for concurrent use on its own.
type MemStore struct {
	sem chan struct{} // holds one token while Lock is held

	mu   sync.Mutex
	recs map[netip.Addr]Record
	last map[string]netip.Addr
}

var _ Store = (*MemStore)(nil)

// NewMemStore returns an empty MemStore.
func NewMemStore() *MemStore {
	return &MemStore{
		sem:  make(chan struct{}, 1),
		recs: make(map[netip.Addr]Record),
		last: make(map[string]netip.Addr),
	}
}

// Lock implements Store.
func (m *MemStore) Lock(timeout time.Duration) (func(), error) {
	select {
	case m.sem <- struct{}{}:
	default:
		if timeout <= 0 {
			return nil, fmt.Errorf("lock memory store: %w", ErrLockTimeout)
		}
		t := time.NewTimer(timeout)
		defer t.Stop()
		select {
		case m.sem <- struct{}{}:
		case <-t.C:
			return nil, fmt.Errorf("lock memory store: waited %s: %w", timeout, ErrLockTimeout)
		}
	}
	var once sync.Once
	return func() { once.Do(func() { <-m.sem }) }, nil
}

// Reserve implements Store.
func (m *MemStore) Reserve(rec Record, rangeID string) (bool, error) {
	if err := checkReserve(rec, rangeID); err != nil {
		return false, fmt.Errorf("reserve: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.recs[rec.IP]; ok {
		return false, nil
	}
	m.recs[rec.IP] = rec
	m.last[rangeID] = rec.IP
	return true, nil
}

// LastReserved implements Store.
func (m *MemStore) LastReserved(rangeID string) (netip.Addr, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.last[rangeID], nil
}

// ReleaseOwner implements Store.
func (m *MemStore) ReleaseOwner(containerID, ifName string) ([]Record, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	removed := []Record{}
	for _, ip := range slices.SortedFunc(maps.Keys(m.recs), netip.Addr.Compare) {
		rec := m.recs[ip]
		if rec.ContainerID == containerID && rec.IfName == ifName {
			delete(m.recs, ip)
			removed = append(removed, rec)
		}
	}
	return removed, nil
}

// List implements Store.
func (m *MemStore) List() ([]Record, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Record, 0, len(m.recs))
	for _, ip := range slices.SortedFunc(maps.Keys(m.recs), netip.Addr.Compare) {
		out = append(out, m.recs[ip])
	}
	return out, nil
}

// Release implements Store.
func (m *MemStore) Release(ip netip.Addr) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.recs, ip)
	return nil
}

// Owned implements Store.
func (m *MemStore) Owned(containerID, ifName string) ([]Record, error) {
	all, _ := m.List()
	out := []Record{}
	for _, rec := range all {
		if rec.ContainerID == containerID && rec.IfName == ifName {
			out = append(out, rec)
		}
	}
	return out, nil
}

// Damaged implements Store: memory does not rot.
func (m *MemStore) Damaged() ([]netip.Addr, error) { return nil, nil }

// Owners implements Store.
func (m *MemStore) Owners() (map[netip.Addr]Owner, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := map[netip.Addr]Owner{}
	for ip, r := range m.recs {
		out[ip] = Owner{ContainerID: r.ContainerID, IfName: r.IfName}
	}
	return out, nil
}

// SweepTemp implements Store: no temp files.
func (m *MemStore) SweepTemp(time.Duration) error { return nil }
