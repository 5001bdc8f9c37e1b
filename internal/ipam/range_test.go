package ipam

import (
	"errors"
	"math"
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }
func addr(s string) netip.Addr  { return netip.MustParseAddr(s) }

func TestValidateDefaults(t *testing.T) {
	tests := []struct {
		name string
		in   []RangeSet
		want []RangeSet
	}{
		{
			name: "ipv4 defaults",
			in:   []RangeSet{{{Subnet: pfx("10.0.0.0/24")}}},
			want: []RangeSet{{{Subnet: pfx("10.0.0.0/24"), RangeStart: addr("10.0.0.1"), RangeEnd: addr("10.0.0.254")}}},
		},
		{
			name: "ipv4 /30",
			in:   []RangeSet{{{Subnet: pfx("10.0.0.0/30")}}},
			want: []RangeSet{{{Subnet: pfx("10.0.0.0/30"), RangeStart: addr("10.0.0.1"), RangeEnd: addr("10.0.0.2")}}},
		},
		{
			name: "ipv6 defaults use the last address",
			in:   []RangeSet{{{Subnet: pfx("fd00::/120")}}},
			want: []RangeSet{{{Subnet: pfx("fd00::/120"), RangeStart: addr("fd00::1"), RangeEnd: addr("fd00::ff")}}},
		},
		{
			name: "ipv6 /64",
			in:   []RangeSet{{{Subnet: pfx("fd00:1:2:3::/64")}}},
			want: []RangeSet{{{Subnet: pfx("fd00:1:2:3::/64"), RangeStart: addr("fd00:1:2:3::1"), RangeEnd: addr("fd00:1:2:3:ffff:ffff:ffff:ffff")}}},
		},
		{
			name: "explicit values kept, gateway not defaulted",
			in: []RangeSet{{{
				Subnet: pfx("10.1.0.0/16"), RangeStart: addr("10.1.2.10"), RangeEnd: addr("10.1.2.20"), Gateway: addr("10.1.0.1"),
			}}},
			want: []RangeSet{{{
				Subnet: pfx("10.1.0.0/16"), RangeStart: addr("10.1.2.10"), RangeEnd: addr("10.1.2.20"), Gateway: addr("10.1.0.1"),
			}}},
		},
		{
			name: "only start given",
			in:   []RangeSet{{{Subnet: pfx("10.0.0.0/29"), RangeStart: addr("10.0.0.4")}}},
			want: []RangeSet{{{Subnet: pfx("10.0.0.0/29"), RangeStart: addr("10.0.0.4"), RangeEnd: addr("10.0.0.6")}}},
		},
		{
			name: "start equals end",
			in:   []RangeSet{{{Subnet: pfx("10.0.0.0/29"), RangeStart: addr("10.0.0.3"), RangeEnd: addr("10.0.0.3")}}},
			want: []RangeSet{{{Subnet: pfx("10.0.0.0/29"), RangeStart: addr("10.0.0.3"), RangeEnd: addr("10.0.0.3")}}},
		},
		{
			name: "dual stack, two ranges in one set, disjoint pools of one subnet",
			in: []RangeSet{
				{{Subnet: pfx("10.0.0.0/24"), RangeEnd: addr("10.0.0.99")}, {Subnet: pfx("10.0.0.0/24"), RangeStart: addr("10.0.0.100")}},
				{{Subnet: pfx("fd00::/120")}},
			},
			want: []RangeSet{
				{
					{Subnet: pfx("10.0.0.0/24"), RangeStart: addr("10.0.0.1"), RangeEnd: addr("10.0.0.99")},
					{Subnet: pfx("10.0.0.0/24"), RangeStart: addr("10.0.0.100"), RangeEnd: addr("10.0.0.254")},
				},
				{{Subnet: pfx("fd00::/120"), RangeStart: addr("fd00::1"), RangeEnd: addr("fd00::ff")}},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			inCopy := make([]RangeSet, len(tt.in))
			for i := range tt.in {
				inCopy[i] = append(RangeSet(nil), tt.in[i]...)
			}
			got, err := Validate(tt.in)
			if err != nil {
				t.Fatalf("Validate: %v", err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("Validate = %+v, want %+v", got, tt.want)
			}
			if !reflect.DeepEqual(tt.in, inCopy) {
				t.Errorf("Validate modified its input: %+v", tt.in)
			}
		})
	}
}

func TestValidateErrors(t *testing.T) {
	tests := []struct {
		name      string
		in        []RangeSet
		wantField string
		wantMsg   string
	}{
		{"no range sets", nil, "ipam.ranges", "at least one"},
		{"empty set", []RangeSet{{{Subnet: pfx("10.0.0.0/24")}}, {}}, "ipam.ranges[1]", "empty"},
		{"missing subnet", []RangeSet{{{}}}, "ipam.ranges[0][0].subnet", "required"},
		{"non-canonical subnet", []RangeSet{{{Subnet: pfx("10.0.0.5/24")}}}, "ipam.ranges[0][0].subnet", "host bits set"},
		{"non-canonical ipv6 subnet", []RangeSet{{{Subnet: pfx("fd00::1/64")}}}, "ipam.ranges[0][0].subnet", "host bits set"},
		{"ipv4-mapped subnet", []RangeSet{{{Subnet: pfx("::ffff:10.0.0.0/120")}}}, "ipam.ranges[0][0].subnet", "ipv4-mapped"},
		{"ipv4 /31 too small", []RangeSet{{{Subnet: pfx("10.0.0.0/31")}}}, "ipam.ranges[0][0].subnet", "too small"},
		{"ipv4 /32 too small", []RangeSet{{{Subnet: pfx("10.0.0.1/32")}}}, "ipam.ranges[0][0].subnet", "too small"},
		{"ipv6 /127 too small", []RangeSet{{{Subnet: pfx("fd00::/127")}}}, "ipam.ranges[0][0].subnet", "too small"},
		{
			"start outside subnet",
			[]RangeSet{{{Subnet: pfx("10.0.0.0/24"), RangeStart: addr("10.0.1.5")}}},
			"ipam.ranges[0][0].rangeStart", "not in subnet",
		},
		{
			"start of other family",
			[]RangeSet{{{Subnet: pfx("10.0.0.0/24"), RangeStart: addr("fd00::5")}}},
			"ipam.ranges[0][0].rangeStart", "not in subnet",
		},
		{
			"start is the network address",
			[]RangeSet{{{Subnet: pfx("10.0.0.0/24"), RangeStart: addr("10.0.0.0")}}},
			"ipam.ranges[0][0].rangeStart", "not a usable address",
		},
		{
			"end outside subnet",
			[]RangeSet{{{Subnet: pfx("fd00::/120"), RangeEnd: addr("fd00::1:0")}}},
			"ipam.ranges[0][0].rangeEnd", "not in subnet",
		},
		{
			"end is the broadcast address",
			[]RangeSet{{{Subnet: pfx("10.0.0.0/24"), RangeEnd: addr("10.0.0.255")}}},
			"ipam.ranges[0][0].rangeEnd", "not a usable address",
		},
		{
			"start after end",
			[]RangeSet{{{Subnet: pfx("10.0.0.0/24"), RangeStart: addr("10.0.0.20"), RangeEnd: addr("10.0.0.10")}}},
			"ipam.ranges[0][0].rangeEnd", "before rangeStart",
		},
		{
			"start after default end",
			[]RangeSet{{{Subnet: pfx("10.0.0.0/24")}}, {{Subnet: pfx("10.0.1.0/24"), RangeEnd: addr("10.0.1.1"), RangeStart: addr("10.0.1.2")}}},
			"ipam.ranges[1][0].rangeEnd", "before rangeStart",
		},
		{
			"gateway outside subnet",
			[]RangeSet{{{Subnet: pfx("10.0.0.0/24"), Gateway: addr("10.0.1.1")}}},
			"ipam.ranges[0][0].gateway", "not in subnet",
		},
		{
			"mixed families in one set",
			[]RangeSet{{{Subnet: pfx("10.0.0.0/24")}, {Subnet: pfx("fd00::/120")}}},
			"ipam.ranges[0][1].subnet", "one address family",
		},
		{
			"overlapping ranges in one set",
			[]RangeSet{{{Subnet: pfx("10.0.0.0/24")}, {Subnet: pfx("10.0.0.0/25")}}},
			"ipam.ranges[0][1]", "overlaps ipam.ranges[0][0]",
		},
		{
			"overlapping pools of one subnet",
			[]RangeSet{{
				{Subnet: pfx("10.0.0.0/24"), RangeEnd: addr("10.0.0.100")},
				{Subnet: pfx("10.0.0.0/24"), RangeStart: addr("10.0.0.100")},
			}},
			"ipam.ranges[0][1]", "overlaps ipam.ranges[0][0]",
		},
		{
			"overlapping ranges across sets",
			[]RangeSet{{{Subnet: pfx("10.0.0.0/16")}}, {{Subnet: pfx("fd00::/64")}}, {{Subnet: pfx("10.0.3.0/24")}}},
			"ipam.ranges[2][0]", "overlaps ipam.ranges[0][0]",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Validate(tt.in)
			if err == nil {
				t.Fatalf("Validate = %+v, want an error", got)
			}
			var fe *FieldError
			if !errors.As(err, &fe) {
				t.Fatalf("Validate error %v (%T) is not a *FieldError", err, err)
			}
			if fe.Field != tt.wantField {
				t.Errorf("field = %q, want %q (error: %v)", fe.Field, tt.wantField, err)
			}
			if !strings.HasPrefix(err.Error(), tt.wantField+": ") {
				t.Errorf("error %q does not start with the field", err)
			}
			if !strings.Contains(err.Error(), tt.wantMsg) {
				t.Errorf("error %q does not mention %q", err, tt.wantMsg)
			}
		})
	}
}

func TestFieldErrorUnwrap(t *testing.T) {
	inner := errors.New("boom")
	err := error(&FieldError{Field: "ipam.ranges", Err: inner})
	if !errors.Is(err, inner) {
		t.Errorf("errors.Is(%v, inner) = false", err)
	}
	if got, want := err.Error(), "ipam.ranges: boom"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}

func TestSpan(t *testing.T) {
	tests := []struct {
		start, end string
		want       uint64
	}{
		{"10.0.0.1", "10.0.0.1", 1},
		{"10.0.0.1", "10.0.0.254", 254},
		{"10.0.0.255", "10.0.1.0", 2},
		{"fd00::1", "fd00::ff", 255},
		{"fd00::ffff:ffff:ffff:ffff", "fd00:0:0:1::", 2},
		{"fd00::", "fd00::ffff:ffff:ffff:fffe", math.MaxUint64},
		{"fd00::", "fd00::ffff:ffff:ffff:ffff", math.MaxUint64},
		{"fd00::1", "fd00::1:0:0:0:0", math.MaxUint64},
	}
	for _, tt := range tests {
		if got := span(addr(tt.start), addr(tt.end)); got != tt.want {
			t.Errorf("span(%s, %s) = %d, want %d", tt.start, tt.end, got, tt.want)
		}
	}
}

func TestLastAddr(t *testing.T) {
	tests := map[string]string{
		"10.0.0.0/24":  "10.0.0.255",
		"10.0.0.0/30":  "10.0.0.3",
		"0.0.0.0/0":    "255.255.255.255",
		"fd00::/120":   "fd00::ff",
		"fd00::/64":    "fd00::ffff:ffff:ffff:ffff",
		"10.0.0.64/26": "10.0.0.127",
	}
	for p, want := range tests {
		if got := lastAddr(pfx(p)); got != addr(want) {
			t.Errorf("lastAddr(%s) = %s, want %s", p, got, want)
		}
	}
}
