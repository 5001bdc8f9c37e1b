package main

import (
	"encoding/json"
	"net"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/ebpf-cni/ebpf-cni/internal/veth"
)

// jsonResult is the wire shape of a result, loose enough for every version.
type jsonResult struct {
	CNIVersion string `json:"cniVersion"`
	Interfaces []struct {
		Name    string  `json:"name"`
		Mac     string  `json:"mac"`
		Sandbox *string `json:"sandbox"`
	} `json:"interfaces"`
	IPs []struct {
		Version   *string `json:"version"`
		Interface *int    `json:"interface"`
		Address   string  `json:"address"`
		Gateway   string  `json:"gateway"`
	} `json:"ips"`
	Routes []struct {
		Dst string `json:"dst"`
		GW  string `json:"gw"`
	} `json:"routes"`
	DNS struct {
		Nameservers []string `json:"nameservers"`
	} `json:"dns"`
}

func TestBuildResult(t *testing.T) {
	host := veth.Link{Name: "ebpf0123456789a", Index: 42, MAC: net.HardwareAddr{0x0a, 0xeb, 1, 2, 3, 4}}
	pod := veth.Link{Name: "eth0", Index: 2, MAC: net.HardwareAddr{0x0a, 0x58, 1, 2, 3, 4}, Sandbox: "/run/netns/cni-1234"}
	addrs := []netip.Addr{netip.MustParseAddr("10.244.1.7"), netip.MustParseAddr("fd00:10:244:1::7")}
	routes := []netip.Prefix{
		netip.MustParsePrefix("10.96.0.0/12"),
		netip.MustParsePrefix("0.0.0.0/0"),
		netip.MustParsePrefix("::/0"),
	}
	wantIPs := []struct{ version, address, gateway string }{
		{"4", "10.244.1.7/32", "169.254.1.1"},
		{"6", "fd00:10:244:1::7/128", "fe80::1"},
	}
	wantRoutes := []struct{ dst, gw string }{
		{"10.96.0.0/12", "169.254.1.1"},
		{"0.0.0.0/0", "169.254.1.1"},
		{"::/0", "fe80::1"},
	}

	for _, v := range []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		t.Run(v, func(t *testing.T) {
			conf := &NetConf{NetConf: types.NetConf{
				CNIVersion: v,
				Name:       "pods",
				DNS:        types.DNS{Nameservers: []string{"10.96.0.10"}},
			}}
			res, err := buildResult(conf, host, pod, 1450, addrs, routes)
			if err != nil {
				t.Fatalf("buildResult: %v", err)
			}
			if res.Version() != v {
				t.Errorf("Version() = %q, want %q", res.Version(), v)
			}
			data, err := json.Marshal(res)
			if err != nil {
				t.Fatalf("marshal: %v", err)
			}
			var got jsonResult
			if err := json.Unmarshal(data, &got); err != nil {
				t.Fatalf("unmarshal %s: %v", data, err)
			}
			if got.CNIVersion != v {
				t.Errorf("JSON cniVersion = %q, want %q", got.CNIVersion, v)
			}

			if len(got.Interfaces) != 2 {
				t.Fatalf("interfaces = %d, want 2: %s", len(got.Interfaces), data)
			}
			h, p := got.Interfaces[0], got.Interfaces[1]
			if h.Name != host.Name || h.Mac != host.MAC.String() || h.Sandbox != nil {
				t.Errorf("host interface = {%q %q sandbox %v}, want {%q %q no sandbox}", h.Name, h.Mac, h.Sandbox, host.Name, host.MAC)
			}
			if p.Name != pod.Name || p.Mac != pod.MAC.String() || p.Sandbox == nil || *p.Sandbox != pod.Sandbox {
				t.Errorf("pod interface = {%q %q sandbox %v}, want {%q %q %q}", p.Name, p.Mac, p.Sandbox, pod.Name, pod.MAC, pod.Sandbox)
			}

			if len(got.IPs) != len(wantIPs) {
				t.Fatalf("ips = %d, want %d: %s", len(got.IPs), len(wantIPs), data)
			}
			for i, w := range wantIPs {
				g := got.IPs[i]
				if g.Address != w.address || g.Gateway != w.gateway {
					t.Errorf("ips[%d] = %s via %s, want %s via %s", i, g.Address, g.Gateway, w.address, w.gateway)
				}
				if g.Interface == nil || *g.Interface != 1 {
					t.Errorf("ips[%d].interface = %v, want 1 (the pod interface)", i, g.Interface)
				}
				// 0.3.x and 0.4.0 results carry the family; 1.0.0 dropped it.
				if strings.HasPrefix(v, "0.") {
					if g.Version == nil || *g.Version != w.version {
						t.Errorf("ips[%d].version = %v, want %q", i, g.Version, w.version)
					}
				} else if g.Version != nil {
					t.Errorf("ips[%d].version = %q, want absent in %s", i, *g.Version, v)
				}
			}

			if len(got.Routes) != len(wantRoutes) {
				t.Fatalf("routes = %d, want %d: %s", len(got.Routes), len(wantRoutes), data)
			}
			for i, w := range wantRoutes {
				if g := got.Routes[i]; g.Dst != w.dst || g.GW != w.gw {
					t.Errorf("routes[%d] = %s via %s, want %s via %s", i, g.Dst, g.GW, w.dst, w.gw)
				}
			}
			if !reflect.DeepEqual(got.DNS.Nameservers, []string{"10.96.0.10"}) {
				t.Errorf("dns.nameservers = %v, want [10.96.0.10]", got.DNS.Nameservers)
			}
		})
	}
}

func TestBuildResultSingleStack(t *testing.T) {
	conf := &NetConf{NetConf: types.NetConf{CNIVersion: "0.3.1"}}
	res, err := buildResult(conf, veth.Link{Name: "h"}, veth.Link{Name: "eth0", Sandbox: "/run/netns/x"}, 1500,
		[]netip.Addr{netip.MustParseAddr("fd00::9")}, []netip.Prefix{netip.MustParsePrefix("::/0")})
	if err != nil {
		t.Fatalf("buildResult: %v", err)
	}
	data, err := json.Marshal(res)
	if err != nil {
		t.Fatalf("marshal: %v", err)
	}
	var got jsonResult
	if err := json.Unmarshal(data, &got); err != nil {
		t.Fatalf("unmarshal %s: %v", data, err)
	}
	if len(got.IPs) != 1 || got.IPs[0].Address != "fd00::9/128" || got.IPs[0].Version == nil || *got.IPs[0].Version != "6" {
		t.Errorf("ips = %s, want one v6 /128", data)
	}
}

func TestBuildResultUnknownVersion(t *testing.T) {
	conf := &NetConf{NetConf: types.NetConf{CNIVersion: "9.9.9"}}
	_, err := buildResult(conf, veth.Link{Name: "h"}, veth.Link{Name: "eth0"}, 1500,
		[]netip.Addr{netip.MustParseAddr("10.0.0.2")}, nil)
	if err == nil || !strings.Contains(err.Error(), "9.9.9") {
		t.Errorf("buildResult with cniVersion 9.9.9: err = %v, want an error naming the version", err)
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
			got := withDefaults(tt.ips, routes)
			if len(got) != len(tt.want) || (len(got) > 0 && !reflect.DeepEqual(got, tt.want)) {
				t.Errorf("withDefaults(%v, %v) = %v, want %v", tt.ips, tt.routes, got, tt.want)
			}
			// The caller's slice must not be written through, even with spare capacity.
			if tt.routes != nil && !reflect.DeepEqual(routes[:cap(routes)][len(tt.routes):], make([]netip.Prefix, cap(routes)-len(tt.routes))) {
				t.Errorf("withDefaults wrote into the caller's routes: %v", routes[:cap(routes)])
			}
		})
	}
}

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
			got, ok := prefixOf(tt.in)
			if !ok {
				t.Fatalf("prefixOf(%v) not ok", tt.in)
			}
			if !got.IsValid() || got.String() != tt.want {
				t.Errorf("prefixOf(%v) = %v, want %s", tt.in, got, tt.want)
			}
		})
	}
	for _, bad := range []net.IPNet{{}, {IP: net.IP{1, 2, 3}, Mask: net.CIDRMask(8, 32)}} {
		if p, ok := prefixOf(bad); ok {
			t.Errorf("prefixOf(%#v) = %v, true; want false", bad, p)
		}
	}
}

// A plugin that runs after another (prevResult present) extends its result:
// earlier interfaces and IPs stay, ours are appended with the right index.
func TestBuildResultExtendsPrevResult(t *testing.T) {
	prev := &current.Result{
		CNIVersion: "1.0.0",
		Interfaces: []*current.Interface{{Name: "lo0", Sandbox: "/run/netns/x"}},
		IPs:        []*current.IPConfig{{Interface: current.Int(0), Address: net.IPNet{IP: net.ParseIP("192.0.2.9").To4(), Mask: net.CIDRMask(32, 32)}}},
	}
	conf := &NetConf{NetConf: types.NetConf{CNIVersion: "1.0.0", PrevResult: prev}}
	res, err := buildResult(conf, veth.Link{Name: "h"}, veth.Link{Name: "eth0", Sandbox: "/run/netns/x"}, 1400,
		[]netip.Addr{netip.MustParseAddr("10.0.0.5")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	r, err := current.NewResultFromResult(res)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Interfaces) != 3 || r.Interfaces[0].Name != "lo0" || r.Interfaces[2].Name != "eth0" || r.Interfaces[2].Mtu != 1400 {
		t.Fatalf("interfaces = %+v, want lo0, h, eth0 (mtu 1400)", r.Interfaces)
	}
	if len(r.IPs) != 2 || *r.IPs[1].Interface != 2 || r.IPs[1].Address.IP.String() != "10.0.0.5" {
		t.Fatalf("ips = %+v, want the earlier one and 10.0.0.5 on interface 2", r.IPs)
	}
}
