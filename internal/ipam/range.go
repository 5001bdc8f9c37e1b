package ipam

import (
	"encoding/binary"
	"errors"
	"fmt"
	"iter"
	"math"
	"net/netip"
	"strings"
)

// Range mirrors host-local's range. Subnet is required; a zero RangeStart,
// RangeEnd or Gateway means unset. The JSON tags follow host-local's names so
// a NetConf can decode straight into it.
type Range struct {
	Subnet     netip.Prefix `json:"subnet"`
	RangeStart netip.Addr   `json:"rangeStart,omitzero"`
	RangeEnd   netip.Addr   `json:"rangeEnd,omitzero"`
	Gateway    netip.Addr   `json:"gateway,omitzero"`
}

// RangeSet is one allocation: an address is taken from the first range in the
// set that has a free one. All ranges in a set have the same family.
type RangeSet []Range

// FieldError is a configuration error tied to one field of the network
// configuration, e.g. "ipam.ranges[0][1].rangeStart".
type FieldError struct {
	Field string
	Err   error
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Err.Error() }

func (e *FieldError) Unwrap() error { return e.Err }

// Longest prefixes that still leave room to allocate, as host-local has it.
const (
	maxBits4 = 30
	maxBits6 = 126
)

// Validate normalises and checks a list of range sets (host-local's "ranges"
// field) and returns the normalised copy; the input is not modified.
//
// A subnet must be given in canonical form (no host bits) and must be at most
// /30 for IPv4 or /126 for IPv6. RangeStart and RangeEnd default to the first
// and last usable address of the subnet (network+1; broadcast-1 for IPv4, the
// last address for IPv6); when given they must be usable addresses of the
// subnet, and RangeStart <= RangeEnd. Gateway, when given, must lie in the
// subnet; it is never defaulted. All ranges of a set share one family, and no
// two ranges (in the same set or not) may overlap.
//
// Every error is a *FieldError naming the offending field.
func Validate(sets []RangeSet) ([]RangeSet, error) {
	if len(sets) == 0 {
		return nil, &FieldError{Field: "ipam.ranges", Err: errors.New("at least one range set is required")}
	}
	out := make([]RangeSet, len(sets))
	for i, set := range sets {
		if len(set) == 0 {
			return nil, &FieldError{Field: fmt.Sprintf("ipam.ranges[%d]", i), Err: errors.New("range set is empty")}
		}
		out[i] = make(RangeSet, len(set))
		for j, r := range set {
			field := rangeField(i, j)
			nr, err := normalise(r, field)
			if err != nil {
				return nil, err
			}
			if j > 0 && nr.Subnet.Addr().Is4() != out[i][0].Subnet.Addr().Is4() {
				return nil, &FieldError{Field: field + ".subnet", Err: fmt.Errorf(
					"%s is %s but %s.subnet is %s: a range set holds one address family",
					nr.Subnet, family(nr.Subnet.Addr()), rangeField(i, 0), family(out[i][0].Subnet.Addr()))}
			}
			out[i][j] = nr
		}
	}

	type placed struct {
		field string
		r     Range
	}
	var seen []placed
	for i, set := range out {
		for j, r := range set {
			field := rangeField(i, j)
			for _, p := range seen {
				if overlaps(p.r, r) {
					return nil, &FieldError{Field: field, Err: fmt.Errorf(
						"%s overlaps %s (%s)", r.span(), p.field, p.r.span())}
				}
			}
			seen = append(seen, placed{field: field, r: r})
		}
	}
	return out, nil
}

func rangeField(i, j int) string { return fmt.Sprintf("ipam.ranges[%d][%d]", i, j) }

func family(a netip.Addr) string {
	if a.Is4() {
		return "ipv4"
	}
	return "ipv6"
}

// normalise checks one range and fills in RangeStart and RangeEnd.
func normalise(r Range, field string) (Range, error) {
	fail := func(name string, format string, args ...any) (Range, error) {
		return Range{}, &FieldError{Field: field + "." + name, Err: fmt.Errorf(format, args...)}
	}
	p := r.Subnet
	switch {
	case !p.IsValid():
		return fail("subnet", "subnet is required")
	case p.Addr().Is4In6():
		return fail("subnet", "%s is an ipv4-mapped ipv6 subnet: write it as ipv4", p)
	case p != p.Masked():
		return fail("subnet", "%s has host bits set: the network address for /%d is %s", p, p.Bits(), p.Masked())
	}
	longest := maxBits6
	if p.Addr().Is4() {
		longest = maxBits4
	}
	if p.Bits() > longest {
		return fail("subnet", "%s is too small to allocate from: %s subnets must be /%d or larger",
			p, family(p.Addr()), longest)
	}

	first, last := usable(p)
	checkPool := func(name string, a netip.Addr) error {
		if !p.Contains(a) {
			return &FieldError{Field: field + "." + name, Err: fmt.Errorf("%s is not in subnet %s", a, p)}
		}
		if a.Less(first) || last.Less(a) {
			return &FieldError{Field: field + "." + name, Err: fmt.Errorf(
				"%s is not a usable address of subnet %s (usable: %s-%s)", a, p, first, last)}
		}
		return nil
	}

	out := Range{Subnet: p, RangeStart: first, RangeEnd: last, Gateway: r.Gateway}
	if r.RangeStart.IsValid() {
		if err := checkPool("rangeStart", r.RangeStart); err != nil {
			return Range{}, err
		}
		out.RangeStart = r.RangeStart
	}
	if r.RangeEnd.IsValid() {
		if err := checkPool("rangeEnd", r.RangeEnd); err != nil {
			return Range{}, err
		}
		out.RangeEnd = r.RangeEnd
	}
	if out.RangeEnd.Less(out.RangeStart) {
		return fail("rangeEnd", "%s is before rangeStart %s", out.RangeEnd, out.RangeStart)
	}
	if r.Gateway.IsValid() && !p.Contains(r.Gateway) {
		return fail("gateway", "%s is not in subnet %s", r.Gateway, p)
	}
	return out, nil
}

// usable returns the first and last address of p that may be handed out:
// network+1, and broadcast-1 for IPv4 or the last address for IPv6.
func usable(p netip.Prefix) (first, last netip.Addr) {
	first = p.Addr().Next()
	last = lastAddr(p)
	if last.Is4() {
		last = last.Prev()
	}
	return first, last
}

// lastAddr returns the highest address of p (the broadcast address for IPv4).
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// contains reports whether a lies in the range's pool [RangeStart, RangeEnd].
func (r Range) contains(a netip.Addr) bool {
	return a.IsValid() && a.BitLen() == r.RangeStart.BitLen() &&
		r.RangeStart.Compare(a) <= 0 && a.Compare(r.RangeEnd) <= 0
}

// reserved reports whether a is the network address or IPv4 broadcast address
// of the range's subnet.
func (r Range) reserved(a netip.Addr) bool {
	if a == r.Subnet.Masked().Addr() {
		return true
	}
	return a.Is4() && a == lastAddr(r.Subnet)
}

func (r Range) span() string { return r.RangeStart.String() + "-" + r.RangeEnd.String() }

func overlaps(a, b Range) bool {
	if a.RangeStart.BitLen() != b.RangeStart.BitLen() {
		return false
	}
	return a.RangeStart.Compare(b.RangeEnd) <= 0 && b.RangeStart.Compare(a.RangeEnd) <= 0
}

// Contains reports whether ip lies in the pool of one of the set's ranges.
func (s RangeSet) Contains(ip netip.Addr) bool {
	for _, r := range s {
		if r.contains(ip) {
			return true
		}
	}
	return false
}

// String lists the set's subnets, e.g. "10.0.0.0/24,10.0.1.0/24".
func (s RangeSet) String() string {
	var parts []string
	for _, r := range s {
		str := r.Subnet.String()
		if len(parts) == 0 || parts[len(parts)-1] != str {
			parts = append(parts, str)
		}
	}
	return strings.Join(parts, ",")
}

// gateways returns the set of gateways configured on any range of the set.
func (s RangeSet) gateways() map[netip.Addr]bool {
	gws := make(map[netip.Addr]bool)
	for _, r := range s {
		if r.Gateway.IsValid() {
			gws[r.Gateway] = true
		}
	}
	return gws
}

// after yields every pool address of the set exactly once, starting just after
// last and wrapping around: host-local's round-robin order. When last is not in
// the set, it starts at the first range's RangeStart.
func (s RangeSet) after(last netip.Addr) iter.Seq2[int, netip.Addr] {
	return func(yield func(int, netip.Addr) bool) {
		if len(s) == 0 {
			return
		}
		ri, ip := 0, s[0].RangeStart
		for k, r := range s {
			if !r.contains(last) {
				continue
			}
			if last == r.RangeEnd {
				ri = (k + 1) % len(s)
				ip = s[ri].RangeStart
			} else {
				ri, ip = k, last.Next()
			}
			break
		}
		r0, ip0 := ri, ip
		for {
			if !yield(ri, ip) {
				return
			}
			if ip == s[ri].RangeEnd || !ip.IsValid() {
				ri = (ri + 1) % len(s)
				ip = s[ri].RangeStart
			} else {
				ip = ip.Next()
			}
			if ri == r0 && ip == ip0 {
				return
			}
		}
	}
}

// span returns the number of addresses in [start, end], saturating at
// math.MaxUint64. It assumes start <= end and one family.
func span(start, end netip.Addr) uint64 {
	a, b := start.As16(), end.As16()
	ahi, alo := binary.BigEndian.Uint64(a[:8]), binary.BigEndian.Uint64(a[8:])
	bhi, blo := binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:])
	lo := blo - alo
	borrow := uint64(0)
	if blo < alo {
		borrow = 1
	}
	hi := bhi - ahi - borrow
	if hi != 0 || lo == math.MaxUint64 {
		return math.MaxUint64
	}
	return lo + 1
}
