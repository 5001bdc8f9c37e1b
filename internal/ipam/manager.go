package ipam

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/ebpf-cni/ebpf-cni/internal/flock"
)

// Manager is where an attachment's addresses come from: the built-in
// allocator (Builtin) or an IPAM plugin the config names (Delegate). The
// config picks one; the CNI verbs never branch on which.
type Manager interface {
	// Name is the ipam type, as endpoint records and inspect show it.
	Name() string
	// Add reserves the attachment's addresses (one per family at most).
	Add(o Owner) (Lease, error)
	// Del releases every address of the attachment; nothing held is success.
	Del(o Owner) error
	// Check reports addresses of the attachment that are not held for it.
	Check(o Owner, addrs []netip.Addr) error
	// Held lists the addresses known to be held for the attachment (the
	// built-in IPAM's reservations; nothing for a delegated plugin).
	Held(containerID, ifName string) []netip.Addr
	// Leftovers lists attachments holding addresses that keep does not
	// want, so GC can tear down whatever else they left on the node.
	Leftovers(keep func(containerID, ifName string) bool) ([]Owner, error)
	// GC releases every address not held for a kept attachment.
	GC(keep func(containerID, ifName string) bool) error
	// Status reports whether an ADD can get addresses now.
	Status() error
	// Reclaim releases reservations made in another boot than current.
	Reclaim(current string) error
}

// Lease is what IPAM gave an attachment.
type Lease struct {
	IPs    []netip.Prefix // address with its subnet's mask
	Routes []netip.Prefix // destinations the pod routes via its gateway
	// Held: the owner held every address before this Add (a retried ADD);
	// a failing ADD must not release them.
	Held bool
}

// Addrs returns the leased addresses without their masks.
func (l Lease) Addrs() []netip.Addr {
	out := make([]netip.Addr, len(l.IPs))
	for i, p := range l.IPs {
		out[i] = p.Addr()
	}
	return out
}

// Builtin is the built-in IPAM on a Store (DiskStore on a node).
type Builtin struct {
	store  Store
	alloc  *Allocator
	routes []netip.Prefix
	// unavailable, when set, is why no address can be handed out now (the
	// node's podCIDR is not known yet); releases still work.
	unavailable error
}

// BuiltinName is the built-in IPAM's type.
const BuiltinName = "ebpf-cni"

var _ Manager = (*Builtin)(nil)

// NewBuiltin serves addresses from sets (validated) with routes, or refuses
// to hand out any with unavailable while still releasing by owner.
func NewBuiltin(store Store, sets []RangeSet, routes []netip.Prefix, unavailable error) *Builtin {
	return &Builtin{store: store, alloc: NewAllocator(store, sets), routes: routes, unavailable: unavailable}
}

// Sets returns the validated range sets.
func (b *Builtin) Sets() []RangeSet { return b.alloc.sets }

// Routes returns the configured pod routes (without the defaults Add adds).
func (b *Builtin) Routes() []netip.Prefix { return b.routes }

// Name implements Manager.
func (b *Builtin) Name() string { return BuiltinName }

// Add implements Manager.
func (b *Builtin) Add(o Owner) (Lease, error) {
	if b.unavailable != nil {
		return Lease{}, b.unavailable
	}
	held := len(b.Held(o.ContainerID, o.IfName)) == len(b.alloc.sets)
	recs, err := b.alloc.Allocate(o, flock.DefaultWait)
	if err != nil {
		return Lease{}, fmt.Errorf("allocate address: %w", err)
	}
	l := Lease{Held: held}
	for i, r := range recs {
		for _, rg := range b.alloc.sets[i] {
			if rg.Subnet.Contains(r.IP) {
				l.IPs = append(l.IPs, netip.PrefixFrom(r.IP, rg.Subnet.Bits()))
				break
			}
		}
	}
	l.Routes = WithDefaults(l.IPs, b.routes)
	return l, nil
}

// Del implements Manager.
func (b *Builtin) Del(o Owner) error {
	if _, err := b.alloc.Release(o.ContainerID, o.IfName, flock.DefaultWait); err != nil {
		return fmt.Errorf("release addresses: %w", err)
	}
	return nil
}

// Check implements Manager.
func (b *Builtin) Check(o Owner, addrs []netip.Addr) error {
	held := b.Held(o.ContainerID, o.IfName)
	var drift []error
	for _, a := range addrs {
		if !slices.Contains(held, a) {
			drift = append(drift, fmt.Errorf("ipam: %s is not reserved for %s/%s", a, o.ContainerID, o.IfName))
		}
	}
	return errors.Join(drift...)
}

// Held implements Manager through the owner index (no scan of every record).
func (b *Builtin) Held(containerID, ifName string) []netip.Addr {
	recs, err := b.alloc.Owned(containerID, ifName)
	if err != nil {
		return nil
	}
	out := make([]netip.Addr, len(recs))
	for i, r := range recs {
		out[i] = r.IP
	}
	return out
}

// Leftovers implements Manager: the owners of reservations keep does not
// want, from the records and from the owner indexes (which also name the
// owners of damaged records and of IPs whose record a crash never linked).
func (b *Builtin) Leftovers(keep func(containerID, ifName string) bool) ([]Owner, error) {
	recs, err := b.alloc.Records()
	if err != nil {
		return nil, err
	}
	owners, err := b.store.Owners()
	if err != nil {
		return nil, err
	}
	var out []Owner
	seen := map[[2]string]bool{}
	add := func(o Owner) {
		k := [2]string{o.ContainerID, o.IfName}
		if keep(o.ContainerID, o.IfName) || seen[k] {
			return
		}
		seen[k] = true
		out = append(out, o)
	}
	for _, r := range recs {
		add(Owner{ContainerID: r.ContainerID, IfName: r.IfName, PodNamespace: r.PodNamespace, PodName: r.PodName})
	}
	for _, o := range owners {
		add(o)
	}
	return out, nil
}

// GC implements Manager. Each record is released on its own, so one whose
// owner index was lost goes too; a damaged record goes unless an owner
// index of a kept attachment names it; crash leftovers (temp files) go.
func (b *Builtin) GC(keep func(containerID, ifName string) bool) error {
	recs, err := b.alloc.Records()
	if err != nil {
		return err
	}
	var errs []error
	for _, r := range recs {
		if !keep(r.ContainerID, r.IfName) {
			errs = append(errs, b.alloc.ReleaseIP(r.IP, flock.DefaultWait))
		}
	}
	damaged, err := b.store.Damaged()
	errs = append(errs, err)
	owners, err := b.store.Owners()
	errs = append(errs, err)
	for _, ip := range damaged {
		if o, ok := owners[ip]; ok && keep(o.ContainerID, o.IfName) {
			continue
		}
		errs = append(errs, b.alloc.ReleaseIP(ip, flock.DefaultWait))
	}
	// Temp files are written under the store lock: holding it, none is in
	// flight, so every one left is a killed call's.
	if unlock, err := b.store.Lock(flock.DefaultWait); err == nil {
		errs = append(errs, b.store.SweepTemp(0))
		unlock()
	} else {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Reclaim implements Manager: reservations recording another boot.
func (b *Builtin) Reclaim(current string) error {
	recs, err := b.alloc.Records()
	if err != nil {
		return err
	}
	var errs []error
	for _, r := range recs {
		if r.BootID != "" && r.BootID != current {
			errs = append(errs, b.alloc.ReleaseIP(r.IP, flock.DefaultWait))
		}
	}
	return errors.Join(errs...)
}

// Status implements Manager: every range set has a free address.
func (b *Builtin) Status() error {
	if b.unavailable != nil {
		return b.unavailable
	}
	free, err := b.alloc.Free()
	if err != nil {
		return err
	}
	for i, n := range free {
		if n == 0 {
			return fmt.Errorf("range set %d (%s): %w", i, b.alloc.sets[i], ErrExhausted)
		}
	}
	return nil
}

// Delegate is an IPAM plugin found in CNI_PATH, called through the CNI
// library with the network config the plugin was given.
type Delegate struct {
	typ   string
	stdin []byte
}

var _ Manager = (*Delegate)(nil)

// NewDelegate delegates to the plugin typ with the config stdin.
func NewDelegate(typ string, stdin []byte) *Delegate { return &Delegate{typ: typ, stdin: stdin} }

// Name implements Manager.
func (d *Delegate) Name() string { return d.typ }

// Add implements Manager: one address per family is kept (the pod has one
// interface); a result without any is released again.
func (d *Delegate) Add(o Owner) (Lease, error) {
	r, err := invoke.DelegateAdd(context.Background(), d.typ, d.stdin, nil)
	if err != nil {
		return Lease{}, fmt.Errorf("ipam plugin %s: %w", d.typ, err)
	}
	res, err := current.NewResultFromResult(r)
	if err != nil {
		return Lease{}, errors.Join(fmt.Errorf("convert result of ipam plugin %s: %w", d.typ, err), d.Del(o))
	}
	var l Lease
	fams := map[bool]bool{}
	for _, ipc := range res.IPs {
		p, ok := PrefixOf(ipc.Address)
		if !ok || fams[p.Addr().Is4()] {
			continue
		}
		fams[p.Addr().Is4()] = true
		l.IPs = append(l.IPs, p)
	}
	if len(l.IPs) == 0 {
		return Lease{}, errors.Join(fmt.Errorf("ipam plugin %s returned no address", d.typ), d.Del(o))
	}
	var routes []netip.Prefix
	for _, rt := range res.Routes {
		if p, ok := PrefixOf(rt.Dst); ok {
			routes = append(routes, p.Masked())
		}
	}
	l.Routes = WithDefaults(l.IPs, routes)
	return l, nil
}

// Del implements Manager. It names the attachment explicitly, so GC can
// release attachments other than the one in its environment.
func (d *Delegate) Del(o Owner) error {
	args := &invoke.Args{
		Command: "DEL", ContainerID: o.ContainerID, IfName: o.IfName,
		Path: os.Getenv("CNI_PATH"),
	}
	if os.Getenv("CNI_CONTAINERID") == o.ContainerID && os.Getenv("CNI_IFNAME") == o.IfName {
		args.NetNS, args.PluginArgsStr = os.Getenv("CNI_NETNS"), os.Getenv("CNI_ARGS")
	}
	path, err := invoke.FindInPath(d.typ, filepath.SplitList(args.Path))
	if err == nil {
		err = invoke.ExecPluginWithoutResult(context.Background(), path, d.stdin, args, nil)
	}
	if err != nil {
		return fmt.Errorf("ipam plugin %s DEL: %w", d.typ, err)
	}
	return nil
}

// Check implements Manager.
func (d *Delegate) Check(Owner, []netip.Addr) error {
	if err := invoke.DelegateCheck(context.Background(), d.typ, d.stdin, nil); err != nil {
		return fmt.Errorf("ipam plugin %s CHECK: %w", d.typ, err)
	}
	return nil
}

// Held implements Manager: a delegated plugin's reservations are its own.
func (d *Delegate) Held(string, string) []netip.Addr { return nil }

// Leftovers implements Manager: the plugin's GC finds its own.
func (d *Delegate) Leftovers(func(string, string) bool) ([]Owner, error) { return nil, nil }

// Reclaim implements Manager: a delegated plugin keeps its own state.
func (d *Delegate) Reclaim(string) error { return nil }

// GC implements Manager by forwarding the GC call (with its
// valid-attachments list) to the plugin.
func (d *Delegate) GC(func(string, string) bool) error {
	if err := invoke.DelegateGC(context.Background(), d.typ, d.stdin, nil); err != nil {
		return fmt.Errorf("ipam plugin %s GC: %w", d.typ, err)
	}
	return nil
}

// Status implements Manager. A plugin's own 50/51 answer is kept (as a
// *types.Error) so STATUS can pass it on.
func (d *Delegate) Status() error {
	err := invoke.DelegateStatus(context.Background(), d.typ, d.stdin, nil)
	if err == nil {
		return nil
	}
	var ce *types.Error
	if errors.As(err, &ce) && (ce.Code == 50 || ce.Code == 51) {
		return types.NewError(ce.Code, "ipam plugin "+d.typ+": "+ce.Msg, ce.Details)
	}
	return fmt.Errorf("ipam plugin %s: %w", d.typ, err)
}

// WithDefaults adds a default route for each family of ips that has none.
func WithDefaults(ips, routes []netip.Prefix) []netip.Prefix {
	has := map[bool]bool{}
	for _, r := range routes {
		has[r.Addr().Is4()] = true
	}
	out := append([]netip.Prefix(nil), routes...)
	for _, ip := range ips {
		is4 := ip.Addr().Is4()
		if has[is4] {
			continue
		}
		has[is4] = true
		if is4 {
			out = append(out, netip.PrefixFrom(netip.IPv4Unspecified(), 0))
		} else {
			out = append(out, netip.PrefixFrom(netip.IPv6Unspecified(), 0))
		}
	}
	return out
}

// PrefixOf converts a CNI result's address (IPv4 in 4 or 16 bytes, with a
// 32- or 128-bit mask, or none) to a prefix.
func PrefixOf(n net.IPNet) (netip.Prefix, bool) {
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	a = a.Unmap()
	ones, bits := n.Mask.Size()
	if bits == 0 {
		ones = a.BitLen()
	}
	if a.Is4() && bits == 128 {
		if ones < 96 {
			return netip.Prefix{}, false // an IPv6 mask shorter than ::ffff:0:0/96
		}
		ones -= 96
	}
	return netip.PrefixFrom(a, ones), true
}
