package ipam

import (
	"net"
	"net/netip"
	"reflect"
	"testing"
)

func TestPrefixOf(t *testing.T) {
	v4in16 := net.ParseIP("10.1.2.3") // net.ParseIP returns the 16-byte form
	if len(v4in16) != net.IPv6len {
		t.Fatalf("net.ParseIP gave %d bytes, want 16", len(v4in16))
	}
	tests := []struct {
		name string
		in   net.IPNet
		want string
	}{
		{"v4, 4 bytes, /24", net.IPNet{IP: net.IP{10, 1, 2, 3}, Mask: net.CIDRMask(24, 32)}, "10.1.2.3/24"},
		{"v4 in 16, 32-bit mask", net.IPNet{IP: v4in16, Mask: net.CIDRMask(24, 32)}, "10.1.2.3/24"},
		{"v4 in 16, 32-bit /32", net.IPNet{IP: v4in16, Mask: net.CIDRMask(32, 32)}, "10.1.2.3/32"},
		{"v4 in 16, 128-bit mask", net.IPNet{IP: v4in16, Mask: net.CIDRMask(120, 128)}, "10.1.2.3/24"},
		{"v4 in 16, 128-bit /128", net.IPNet{IP: v4in16, Mask: net.CIDRMask(128, 128)}, "10.1.2.3/32"},
		{"v4 in 16, 128-bit /96", net.IPNet{IP: v4in16, Mask: net.CIDRMask(96, 128)}, "10.1.2.3/0"},
		{"v4, 4 bytes, no mask", net.IPNet{IP: net.IP{10, 1, 2, 3}}, "10.1.2.3/32"},
		{"v6 /64", net.IPNet{IP: net.ParseIP("fd00::7"), Mask: net.CIDRMask(64, 128)}, "fd00::7/64"},
		{"v6 /128", net.IPNet{IP: net.ParseIP("fd00::7"), Mask: net.CIDRMask(128, 128)}, "fd00::7/128"},
		{"v6 default", net.IPNet{IP: net.ParseIP("::"), Mask: net.CIDRMask(0, 128)}, "::/0"},
		{"v6 no mask", net.IPNet{IP: net.ParseIP("fd00::7")}, "fd00::7/128"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := PrefixOf(tt.in)
			if !ok {
				t.Fatalf("PrefixOf(%v) not ok", tt.in)
			}
			if !got.IsValid() || got.String() != tt.want {
				t.Errorf("PrefixOf(%v) = %v, want %s", tt.in, got, tt.want)
			}
		})
	}
	for _, bad := range []net.IPNet{{}, {IP: net.IP{1, 2, 3}, Mask: net.CIDRMask(8, 32)}} {
		if p, ok := PrefixOf(bad); ok {
			t.Errorf("PrefixOf(%#v) = %v, true; want false", bad, p)
		}
	}
}

func TestWithDefaults(t *testing.T) {
	pp := func(ss ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, s := range ss {
			out = append(out, netip.MustParsePrefix(s))
		}
		return out
	}
	tests := []struct {
		name        string
		ips, routes []netip.Prefix
		want        []netip.Prefix
	}{
		{"no routes, dual stack", pp("10.0.0.5/24", "fd00::5/64"), nil, pp("0.0.0.0/0", "::/0")},
		{"no routes, v4 only", pp("10.0.0.5/24"), nil, pp("0.0.0.0/0")},
		{"no routes, v6 only", pp("fd00::5/64"), nil, pp("::/0")},
		{"v4 route given", pp("10.0.0.5/24", "fd00::5/64"), pp("10.96.0.0/12"), pp("10.96.0.0/12", "::/0")},
		{"v6 route given", pp("10.0.0.5/24", "fd00::5/64"), pp("fd00:96::/112"), pp("fd00:96::/112", "0.0.0.0/0")},
		{"both given", pp("10.0.0.5/24", "fd00::5/64"), pp("::/0", "10.0.0.0/8"), pp("::/0", "10.0.0.0/8")},
		{"route of a family without address is kept", pp("10.0.0.5/24"), pp("fd00::/8"), pp("fd00::/8", "0.0.0.0/0")},
		{"two v4 addresses add one default", pp("10.0.0.5/24", "10.1.0.5/24"), nil, pp("0.0.0.0/0")},
		{"nothing", nil, nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var routes []netip.Prefix
			if tt.routes != nil {
				routes = append(make([]netip.Prefix, 0, len(tt.routes)+4), tt.routes...)
			}
			got := WithDefaults(tt.ips, routes)
			if len(got) != len(tt.want) || (len(got) > 0 && !reflect.DeepEqual(got, tt.want)) {
				t.Errorf("WithDefaults(%v, %v) = %v, want %v", tt.ips, tt.routes, got, tt.want)
			}
			// The caller's slice must not be written through, even with spare capacity.
			if tt.routes != nil && !reflect.DeepEqual(routes[:cap(routes)][len(tt.routes):], make([]netip.Prefix, cap(routes)-len(tt.routes))) {
				t.Errorf("WithDefaults wrote into the caller's routes: %v", routes[:cap(routes)])
			}
		})
	}
}

// A plugin that runs after another (prevResult present) extends its result:
// earlier interfaces and IPs stay, ours are appended with the right index.
