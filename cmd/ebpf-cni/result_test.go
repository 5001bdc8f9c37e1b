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

	"github.com/ebpf-cni/ebpf-cni/internal/config"
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
			conf := &config.NetConf{NetConf: types.NetConf{
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
	conf := &config.NetConf{NetConf: types.NetConf{CNIVersion: "0.3.1"}}
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
	conf := &config.NetConf{NetConf: types.NetConf{CNIVersion: "9.9.9"}}
	_, err := buildResult(conf, veth.Link{Name: "h"}, veth.Link{Name: "eth0"}, 1500,
		[]netip.Addr{netip.MustParseAddr("10.0.0.2")}, nil)
	if err == nil || !strings.Contains(err.Error(), "9.9.9") {
		t.Errorf("buildResult with cniVersion 9.9.9: err = %v, want an error naming the version", err)
	}
}

func TestBuildResultExtendsPrevResult(t *testing.T) {
	prev := &current.Result{
		CNIVersion: "1.0.0",
		Interfaces: []*current.Interface{{Name: "lo0", Sandbox: "/run/netns/x"}},
		IPs:        []*current.IPConfig{{Interface: current.Int(0), Address: net.IPNet{IP: net.ParseIP("192.0.2.9").To4(), Mask: net.CIDRMask(32, 32)}}},
	}
	conf := &config.NetConf{NetConf: types.NetConf{CNIVersion: "1.0.0", PrevResult: prev}}
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
