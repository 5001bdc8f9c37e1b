package policy

import (
	"errors"
	"net/netip"

	"github.com/ebpf-cni/ebpf-cni/internal/maps"
)

// Table is what the applier writes: the policy maps (*maps.Maps), or a
// recorder in unit tests.
type Table interface {
	PutPeer(p netip.Prefix, v maps.Peer) error
	DeletePeer(p netip.Prefix) error
	PutRule(r maps.Rule, rule uint32) error
	DeleteRule(r maps.Rule) error
	PutEPPolicy(ifindex int, p maps.EPPolicy) error
	DeleteEPPolicy(ifindex int) error
}

// Applier keeps the maps equal to the last State applied, writing only the
// differences, in an order that never opens more than either state
// allows: new sets before the pods that use them, then peers, then pods,
// then what no one uses any more.
type Applier struct {
	t      Table
	peers  map[netip.Prefix]maps.Peer
	sets   map[uint32][]maps.Rule
	eps    map[int]maps.EPPolicy
	seen   map[int]bool // local pods met before (a new one may hold the plugin's pending entry)
	writes int
}

// NewApplier returns an applier over t; Restore tells it what t holds.
func NewApplier(t Table) *Applier {
	return &Applier{t: t, peers: map[netip.Prefix]maps.Peer{}, sets: map[uint32][]maps.Rule{}, eps: map[int]maps.EPPolicy{},
		seen: map[int]bool{}}
}

// Restore loads what the maps hold (an agent restart): the first Apply
// diffs against it.
func (a *Applier) Restore(peers map[netip.Prefix]maps.Peer, rules []maps.Rule, eps map[int]maps.EPPolicy) {
	for k, v := range peers {
		a.peers[k] = v
	}
	for _, r := range rules {
		a.sets[r.Set] = append(a.sets[r.Set], r)
	}
	for k, v := range eps {
		a.eps[k] = v
	}
}

// Writes is the number of map writes made so far.
func (a *Applier) Writes() int { return a.writes }

// Apply makes the maps st. local lists this node's pods (host veth
// ifindexes): an entry of another ifindex (a pod the plugin is adding,
// pending) is left alone; a local pod met for the first time loses the
// pending entry ADD gave it unless st isolates it.
func (a *Applier) Apply(st State, local []int) error {
	managed := map[int]bool{}
	for _, idx := range local {
		managed[idx] = true
	}
	var errs []error
	for id, rules := range st.Sets {
		if _, ok := a.sets[id]; ok {
			continue // sets never change
		}
		for _, r := range rules {
			errs = append(errs, a.t.PutRule(r, 0))
			a.writes++
		}
		a.sets[id] = rules
	}
	for p, v := range st.Peers {
		if old, ok := a.peers[p]; ok && old == v {
			continue
		}
		errs = append(errs, a.t.PutPeer(p, v))
		a.peers[p] = v
		a.writes++
	}
	for idx, v := range st.Endpoints {
		if old, ok := a.eps[idx]; ok && old == v {
			continue
		}
		errs = append(errs, a.t.PutEPPolicy(idx, v))
		a.eps[idx] = v
		a.writes++
	}
	for idx := range managed {
		_, want := st.Endpoints[idx]
		_, have := a.eps[idx]
		if !want && (have || !a.seen[idx]) {
			errs = append(errs, a.t.DeleteEPPolicy(idx))
			delete(a.eps, idx)
			a.writes++
		}
		a.seen[idx] = true
	}
	for idx := range a.seen {
		if !managed[idx] {
			delete(a.seen, idx) // gone: an ifindex may come back for a new pod
		}
	}
	for idx := range a.eps {
		if _, ok := st.Endpoints[idx]; !ok && !managed[idx] {
			delete(a.eps, idx) // its pod is gone; DEL removed the entry
		}
	}
	for p := range a.peers {
		if _, ok := st.Peers[p]; !ok {
			errs = append(errs, a.t.DeletePeer(p))
			delete(a.peers, p)
			a.writes++
		}
	}
	used := map[uint32]bool{}
	for _, e := range a.eps {
		used[e.SetIn], used[e.SetOut] = true, true
	}
	for id, rules := range a.sets {
		if _, ok := st.Sets[id]; ok || used[id] {
			continue
		}
		for _, r := range rules {
			errs = append(errs, a.t.DeleteRule(r))
			a.writes++
		}
		delete(a.sets, id)
	}
	return errors.Join(errs...)
}
