package config

import (
	"net/netip"
	"reflect"
	"testing"

	"github.com/ebpf-cni/ebpf-cni/internal/ipam"
)

func TestParseConfigDefaults(t *testing.T) {
	conf, err := Parse([]byte(`{
		"cniVersion": "1.0.0",
		"name": "pods",
		"type": "ebpf-cni",
		"ipam": {"ranges": [[{"subnet": "10.0.0.0/24"}]]}
	}`))
	if err != nil {
		t.Fatalf("parseConfig: %v", err)
	}
	for _, c := range []struct{ field, got, want string }{
		{"cniVersion", conf.CNIVersion, "1.0.0"},
		{"name", conf.Name, "pods"},
		{"pinRoot", conf.PinRoot, "/sys/fs/bpf/ebpf-cni"},
		{"stateDir", conf.StateDir, "/var/lib/ebpf-cni"},
		{"attach", conf.Attach, "auto"},
		{"logFile", conf.LogFile, ""},
		{"ipam.dataDir", conf.IPAM.DataDir, "/var/lib/ebpf-cni/ipam"},
		{"ipamName", conf.Addresses.Name(), "ebpf-cni"},
	} {
		if c.got != c.want {
			t.Errorf("%s = %q, want %q", c.field, c.got, c.want)
		}
	}
	if conf.MTU != 0 {
		t.Errorf("mtu = %d, want 0 (the host's default route MTU is used)", conf.MTU)
	}
	if conf.Masquerade == nil || !*conf.Masquerade {
		t.Errorf("masquerade = %v, want true", conf.Masquerade)
	}
	if !builtin(conf) {
		t.Error("builtin = false, want true when ipam.type is empty")
	}
	want := []ipam.RangeSet{{{
		Subnet:     netip.MustParsePrefix("10.0.0.0/24"),
		RangeStart: netip.MustParseAddr("10.0.0.1"),
		RangeEnd:   netip.MustParseAddr("10.0.0.254"),
	}}}
	if !reflect.DeepEqual(sets(conf), want) {
		t.Errorf("sets = %v, want %v", sets(conf), want)
	}
	if len(routes(conf)) != 0 {
		t.Errorf("routes = %v, want none", routes(conf))
	}
}

func TestParseConfigGood(t *testing.T) {
	tests := []struct {
		name  string
		stdin string
		check func(t *testing.T, c *NetConf)
	}{
		{
			name:  "ipam type ebpf-cni is the built-in IPAM",
			stdin: `{"cniVersion":"0.3.1","name":"n","ipam":{"type":"ebpf-cni","ranges":[[{"subnet":"10.1.0.0/16"}]]}}`,
			check: func(t *testing.T, c *NetConf) {
				if !builtin(c) || c.Addresses.Name() != "ebpf-cni" {
					t.Errorf("builtin = %v, ipamName = %q; want built-in", builtin(c), c.Addresses.Name())
				}
				if c.IPAM.DataDir != "/var/lib/ebpf-cni/ipam" {
					t.Errorf("ipam.dataDir = %q, want the default", c.IPAM.DataDir)
				}
			},
		},
		{
			name:  "host-local is delegated and its section is not checked",
			stdin: `{"cniVersion":"1.1.0","name":"n","ipam":{"type":"host-local","subnet":"10.2.0.0/16"}}`,
			check: func(t *testing.T, c *NetConf) {
				if builtin(c) {
					t.Error("builtin = true, want delegated")
				}
				if c.Addresses.Name() != "host-local" {
					t.Errorf("ipamName = %q, want host-local", c.Addresses.Name())
				}
				if sets(c) != nil {
					t.Errorf("sets = %v, want none for a delegated IPAM", sets(c))
				}
			},
		},
		{
			name: "dual stack with routes",
			stdin: `{"cniVersion":"0.4.0","name":"dual","ipam":{
				"ranges":[
					[{"subnet":"10.244.1.0/24","rangeStart":"10.244.1.10","rangeEnd":"10.244.1.20","gateway":"10.244.1.1"}],
					[{"subnet":"fd00:10:244:1::/64"}]
				],
				"routes":[{"dst":"10.96.0.1/12"},{"dst":"fd00:10:96::/112"}]}}`,
			check: func(t *testing.T, c *NetConf) {
				want := []ipam.RangeSet{
					{{
						Subnet:     netip.MustParsePrefix("10.244.1.0/24"),
						RangeStart: netip.MustParseAddr("10.244.1.10"),
						RangeEnd:   netip.MustParseAddr("10.244.1.20"),
						Gateway:    netip.MustParseAddr("10.244.1.1"),
					}},
					{{
						Subnet:     netip.MustParsePrefix("fd00:10:244:1::/64"),
						RangeStart: netip.MustParseAddr("fd00:10:244:1::1"),
						RangeEnd:   netip.MustParseAddr("fd00:10:244:1:ffff:ffff:ffff:ffff"),
					}},
				}
				if !reflect.DeepEqual(sets(c), want) {
					t.Errorf("sets = %v, want %v", sets(c), want)
				}
				// Route destinations are stored masked.
				wantRoutes := []netip.Prefix{
					netip.MustParsePrefix("10.96.0.0/12"),
					netip.MustParsePrefix("fd00:10:96::/112"),
				}
				if !reflect.DeepEqual(routes(c), wantRoutes) {
					t.Errorf("routes = %v, want %v", routes(c), wantRoutes)
				}
			},
		},
		{
			name: "explicit values are kept",
			stdin: `{"cniVersion":"1.0.0","name":"a.b_c-1","mtu":1400,"pinRoot":"/run/pins/../bpf/x/",
				"stateDir":"/tmp/state","masquerade":false,"logFile":"/var/log/ebpf-cni.log","attach":"tc",
				"ipam":{"ranges":[[{"subnet":"192.168.0.0/30"}]],"dataDir":"/tmp/ipam"}}`,
			check: func(t *testing.T, c *NetConf) {
				if c.MTU != 1400 {
					t.Errorf("mtu = %d, want 1400", c.MTU)
				}
				if c.PinRoot != "/run/bpf/x" {
					t.Errorf("pinRoot = %q, want the cleaned /run/bpf/x", c.PinRoot)
				}
				if c.StateDir != "/tmp/state" {
					t.Errorf("stateDir = %q, want /tmp/state", c.StateDir)
				}
				if c.Masquerade == nil || *c.Masquerade {
					t.Errorf("masquerade = %v, want false", c.Masquerade)
				}
				if c.LogFile != "/var/log/ebpf-cni.log" {
					t.Errorf("logFile = %q", c.LogFile)
				}
				if c.Attach != "tc" {
					t.Errorf("attach = %q, want tc", c.Attach)
				}
				if c.IPAM.DataDir != "/tmp/ipam" {
					t.Errorf("ipam.dataDir = %q, want /tmp/ipam", c.IPAM.DataDir)
				}
			},
		},
		{
			name:  "attach tcx and mtu bounds",
			stdin: `{"cniVersion":"1.0.0","name":"n","mtu":65535,"attach":"tcx","ipam":{"ranges":[[{"subnet":"10.0.0.0/8"}]]}}`,
			check: func(t *testing.T, c *NetConf) {
				if c.Attach != "tcx" || c.MTU != 65535 {
					t.Errorf("attach = %q, mtu = %d; want tcx, 65535", c.Attach, c.MTU)
				}
			},
		},
		{
			name: "prevResult is parsed",
			stdin: `{"cniVersion":"1.0.0","name":"n","ipam":{"ranges":[[{"subnet":"10.0.0.0/24"}]]},
				"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/run/netns/x"}],
				"ips":[{"address":"10.0.0.5/32","interface":0}]}}`,
			check: func(t *testing.T, c *NetConf) {
				if c.PrevResult == nil {
					t.Fatal("prevResult = nil, want parsed")
				}
				if v := c.PrevResult.Version(); v != "1.0.0" {
					t.Errorf("prevResult version = %q, want 1.0.0", v)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse([]byte(tt.stdin))
			if err != nil {
				t.Fatalf("parseConfig: %v", err)
			}
			tt.check(t, c)
		})
	}
}

// builtin reports whether the built-in IPAM serves the network.
func builtin(c *NetConf) bool {
	_, ok := c.Addresses.(*ipam.Builtin)
	return ok
}

func sets(c *NetConf) []ipam.RangeSet {
	if b, ok := c.Addresses.(*ipam.Builtin); ok {
		return b.Sets()
	}
	return nil
}

func routes(c *NetConf) []netip.Prefix {
	if b, ok := c.Addresses.(*ipam.Builtin); ok {
		return b.Routes()
	}
	return nil
}

// podArgs is what ParseArgs reads, for comparison.
type podArgs struct{ namespace, name, uid string }

func TestParseArgs(t *testing.T) {
	want := podArgs{"ns", "p", "u"}
	tests := []struct {
		name string
		in   string
		want podArgs
	}{
		{"containerd order", "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_INFRA_CONTAINER_ID=x;K8S_POD_UID=u", want},
		{"other order", "K8S_POD_UID=u;K8S_POD_INFRA_CONTAINER_ID=x;K8S_POD_NAME=p;IgnoreUnknown=1;K8S_POD_NAMESPACE=ns", want},
		{"trailing separator", "K8S_POD_NAME=p;K8S_POD_NAMESPACE=ns;K8S_POD_UID=u;", want},
		{"podman: name only", "K8S_POD_NAME=web", podArgs{name: "web"}},
		{"empty value", "K8S_POD_NAMESPACE=", podArgs{}},
		{"empty", "", podArgs{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, err := ParseArgs(tt.in)
			if err != nil {
				t.Fatalf("ParseArgs(%q): %v", tt.in, err)
			}
			got := podArgs{string(a.K8S_POD_NAMESPACE), string(a.K8S_POD_NAME), string(a.K8S_POD_UID)}
			if got != tt.want {
				t.Errorf("ParseArgs(%q) = %+v, want %+v", tt.in, got, tt.want)
			}
		})
	}
}
