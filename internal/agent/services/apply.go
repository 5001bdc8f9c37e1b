package services

import (
	"errors"
	"fmt"
	"slices"

	"github.com/ebpf-cni/ebpf-cni/internal/maps"
)

// Table is what the applier writes: the Service maps (*maps.Maps), or a
// recorder in unit tests.
type Table interface {
	PutService(f maps.Frontend, s maps.Service) error
	PutSlot(f maps.Frontend, slot uint16, backend uint32) error
	DeleteSlot(f maps.Frontend, slot uint16) error
	PutBackend(id uint32, b maps.Backend) error
	DeleteBackend(id uint32) error
	PutAffinityMatch(id, backend uint32) error
	DeleteAffinityMatch(id, backend uint32) error
}

// programmed is a frontend as it is in the maps.
type programmed struct {
	owner    string // the Service (namespace/name); "" when restored and not claimed yet
	restored bool   // read back from the maps: rewritten in full once claimed
	id       uint32
	flags    maps.SvcFlags
	timeout  uint32
	backends []uint32 // slot order
}

// Applier keeps the maps equal to the desired frontends, one Service at a
// time, writing only what changed. Backend IDs are shared by every
// frontend using the same address, port and protocol (reference counted);
// frontend IDs are unique. Writes are ordered so a reader of the maps
// never meets a dangling slot or a removed backend after the update:
// backends, then slots, then the frontend (its count), then what is no
// longer used.
type Applier struct {
	t         Table
	frontends map[maps.Frontend]*programmed
	owned     map[string][]maps.Frontend // by Service
	backendID map[maps.Backend]uint32
	backends  map[uint32]maps.Backend
	refs      map[uint32]int
	ids       idPool // frontends
	bids      idPool // backends
	writes    int
}

// NewApplier returns an applier over t, which must be empty or restored.
func NewApplier(t Table) *Applier {
	return &Applier{t: t, frontends: map[maps.Frontend]*programmed{}, owned: map[string][]maps.Frontend{},
		backendID: map[maps.Backend]uint32{}, backends: map[uint32]maps.Backend{}, refs: map[uint32]int{}}
}

// idPool hands out IDs from 1, reusing released ones.
type idPool struct {
	next uint32
	free []uint32
	used map[uint32]bool
}

func (p *idPool) get() uint32 {
	if p.used == nil {
		p.used = map[uint32]bool{}
	}
	for len(p.free) > 0 {
		id := p.free[len(p.free)-1]
		p.free = p.free[:len(p.free)-1]
		if !p.used[id] {
			p.used[id] = true
			return id
		}
	}
	for {
		p.next++
		if !p.used[p.next] {
			p.used[p.next] = true
			return p.next
		}
	}
}

func (p *idPool) take(id uint32) {
	if p.used == nil {
		p.used = map[uint32]bool{}
	}
	p.used[id] = true
}

func (p *idPool) put(id uint32) {
	delete(p.used, id)
	p.free = append(p.free, id)
}

// Restore loads what the maps hold (an agent restart): the next Apply of
// each Service diffs against it, and Prune removes what no Service claims.
func (a *Applier) Restore(entries []maps.ServiceEntry, backends map[uint32]maps.Backend) {
	for id, b := range backends {
		a.backends[id] = b
		a.backendID[b] = id
		a.bids.take(id)
	}
	slots := map[maps.Frontend]map[uint16]uint32{}
	for _, e := range entries {
		if e.Slot == 0 {
			a.frontends[e.Frontend] = &programmed{id: e.Service.ID, flags: e.Service.Flags, timeout: e.Service.AffinityTimeout,
				backends: make([]uint32, e.Service.Count), restored: true}
			a.ids.take(e.Service.ID)
			continue
		}
		if slots[e.Frontend] == nil {
			slots[e.Frontend] = map[uint16]uint32{}
		}
		slots[e.Frontend][e.Slot] = e.Service.ID
	}
	for f, p := range a.frontends {
		ids := p.backends[:0]
		for i := range p.backends {
			if id, ok := slots[f][uint16(i+1)]; ok && id != 0 {
				ids = append(ids, id)
				a.refs[id]++
			}
		}
		p.backends = ids
	}
}

// Apply makes the frontends of Service key exactly want (nil: it is gone).
func (a *Applier) Apply(key string, want []Frontend) error {
	var errs []error
	keep := map[maps.Frontend]bool{}
	for _, f := range want {
		keep[f.Key] = true
		errs = append(errs, a.put(key, f))
	}
	var still []maps.Frontend
	for _, f := range a.owned[key] {
		if keep[f] {
			still = append(still, f)
			continue
		}
		if p := a.frontends[f]; p != nil && p.owner == key {
			errs = append(errs, a.remove(f))
		}
	}
	for _, f := range want {
		if !slices.Contains(still, f.Key) {
			still = append(still, f.Key)
		}
	}
	if len(still) == 0 {
		delete(a.owned, key)
	} else {
		a.owned[key] = still
	}
	return errors.Join(errs...)
}

// Prune removes the restored frontends no Service claimed, and returns how
// many.
func (a *Applier) Prune() (int, error) {
	var errs []error
	n := 0
	for f, p := range a.frontends {
		if p.owner == "" {
			errs = append(errs, a.remove(f))
			n++
		}
	}
	return n, errors.Join(errs...)
}

// Frontends is the number of frontends programmed.
func (a *Applier) Frontends() int { return len(a.frontends) }

// Backends is the number of backends programmed.
func (a *Applier) Backends() int { return len(a.backends) }

// Services is the number of Services with frontends.
func (a *Applier) Services() int { return len(a.owned) }

// Writes is the number of map writes made so far.
func (a *Applier) Writes() int { return a.writes }

func (a *Applier) acquire(b maps.Backend) (uint32, error) {
	id, ok := a.backendID[b]
	if !ok {
		id = a.bids.get()
		if err := a.t.PutBackend(id, b); err != nil {
			a.bids.put(id)
			return 0, err
		}
		a.writes++
		a.backendID[b] = id
		a.backends[id] = b
	}
	a.refs[id]++
	return id, nil
}

func (a *Applier) release(id uint32) error {
	a.refs[id]--
	if a.refs[id] > 0 {
		return nil
	}
	delete(a.refs, id)
	if b, ok := a.backends[id]; ok {
		delete(a.backendID, b)
		delete(a.backends, id)
	}
	a.bids.put(id)
	a.writes++
	return a.t.DeleteBackend(id)
}

// put writes one frontend of Service owner.
func (a *Applier) put(owner string, f Frontend) error {
	p := a.frontends[f.Key]
	if p != nil && p.owner != "" && p.owner != owner {
		return fmt.Errorf("%s: frontend %s already belongs to %s", owner, f.Key, p.owner)
	}
	if len(f.Backends) > 0xffff {
		return fmt.Errorf("%s: frontend %s has %d backends (at most 65535)", owner, f.Key, len(f.Backends))
	}
	var ids []uint32
	var errs []error
	for _, b := range f.Backends {
		id, err := a.acquire(b)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		ids = append(ids, id)
	}
	if err := errors.Join(errs...); err != nil {
		for _, id := range ids {
			a.release(id)
		}
		return err
	}
	fresh := p == nil
	if fresh {
		p = &programmed{id: a.ids.get()}
		a.frontends[f.Key] = p
	}
	p.owner = owner
	old := p.backends
	if !fresh && !p.restored && slices.Equal(old, ids) && p.flags == f.Flags && p.timeout == f.AffinityTimeout {
		for _, id := range ids { // nothing changed: drop the references taken above
			a.release(id)
		}
		return nil
	}
	// Slots 1..n, then the frontend with its new count, then the slots
	// beyond it: a reader sees either count with valid slots.
	for i, id := range ids {
		if i < len(old) && old[i] == id && !p.restored {
			continue
		}
		if err := a.t.PutSlot(f.Key, uint16(i+1), id); err != nil {
			errs = append(errs, err)
		}
		a.writes++
	}
	if f.Flags&maps.SvcAffinity != 0 {
		for _, id := range ids {
			if !slices.Contains(old, id) || p.flags&maps.SvcAffinity == 0 || p.restored {
				errs = append(errs, a.t.PutAffinityMatch(p.id, id))
				a.writes++
			}
		}
	}
	if err := a.t.PutService(f.Key, maps.Service{ID: p.id, Count: uint16(len(ids)), Flags: f.Flags, AffinityTimeout: f.AffinityTimeout}); err != nil {
		errs = append(errs, err)
	}
	a.writes++
	for i := len(ids); i < len(old); i++ {
		errs = append(errs, a.t.DeleteSlot(f.Key, uint16(i+1)))
		a.writes++
	}
	for _, id := range old {
		if (p.flags&maps.SvcAffinity != 0) && (!slices.Contains(ids, id) || f.Flags&maps.SvcAffinity == 0) {
			errs = append(errs, a.t.DeleteAffinityMatch(p.id, id))
			a.writes++
		}
		errs = append(errs, a.release(id))
	}
	p.backends, p.flags, p.timeout, p.restored = ids, f.Flags, f.AffinityTimeout, false
	return errors.Join(errs...)
}

// remove deletes a frontend: the frontend first (no new connection finds
// it), then its slots, affinity matches and backend references.
func (a *Applier) remove(f maps.Frontend) error {
	p := a.frontends[f]
	if p == nil {
		return nil
	}
	errs := []error{a.t.DeleteSlot(f, 0)}
	for i, id := range p.backends {
		errs = append(errs, a.t.DeleteSlot(f, uint16(i+1)))
		if p.flags&maps.SvcAffinity != 0 {
			errs = append(errs, a.t.DeleteAffinityMatch(p.id, id))
		}
		errs = append(errs, a.release(id))
	}
	a.writes += 1 + len(p.backends)
	delete(a.frontends, f)
	a.ids.put(p.id)
	return errors.Join(errs...)
}
