package main

import (
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/ebpf-cni/ebpf-cni/internal/flock"
	"github.com/ebpf-cni/ebpf-cni/internal/ipam"
	"github.com/ebpf-cni/ebpf-cni/internal/loader"
	"github.com/ebpf-cni/ebpf-cni/internal/veth"
)

func TestParseConfigDefaults(t *testing.T) {
	conf, err := parseConfig([]byte(`{
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
		{"ipam.dataDir", conf.IPAMConf.DataDir, "/var/lib/ebpf-cni/ipam"},
		{"ipamName", ipamName(conf), "ebpf-cni"},
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
	if !conf.builtin {
		t.Error("builtin = false, want true when ipam.type is empty")
	}
	want := []ipam.RangeSet{{{
		Subnet:     netip.MustParsePrefix("10.0.0.0/24"),
		RangeStart: netip.MustParseAddr("10.0.0.1"),
		RangeEnd:   netip.MustParseAddr("10.0.0.254"),
	}}}
	if !reflect.DeepEqual(conf.sets, want) {
		t.Errorf("sets = %v, want %v", conf.sets, want)
	}
	if len(conf.routes) != 0 {
		t.Errorf("routes = %v, want none", conf.routes)
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
				if !c.builtin || ipamName(c) != "ebpf-cni" {
					t.Errorf("builtin = %v, ipamName = %q; want built-in", c.builtin, ipamName(c))
				}
				if c.IPAMConf.DataDir != "/var/lib/ebpf-cni/ipam" {
					t.Errorf("ipam.dataDir = %q, want the default", c.IPAMConf.DataDir)
				}
			},
		},
		{
			name:  "host-local is delegated and its section is not checked",
			stdin: `{"cniVersion":"1.1.0","name":"n","ipam":{"type":"host-local","subnet":"10.2.0.0/16"}}`,
			check: func(t *testing.T, c *NetConf) {
				if c.builtin {
					t.Error("builtin = true, want delegated")
				}
				if ipamName(c) != "host-local" {
					t.Errorf("ipamName = %q, want host-local", ipamName(c))
				}
				if c.sets != nil {
					t.Errorf("sets = %v, want none for a delegated IPAM", c.sets)
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
				if !reflect.DeepEqual(c.sets, want) {
					t.Errorf("sets = %v, want %v", c.sets, want)
				}
				// Route destinations are stored masked.
				wantRoutes := []netip.Prefix{
					netip.MustParsePrefix("10.96.0.0/12"),
					netip.MustParsePrefix("fd00:10:96::/112"),
				}
				if !reflect.DeepEqual(c.routes, wantRoutes) {
					t.Errorf("routes = %v, want %v", c.routes, wantRoutes)
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
				if c.IPAMConf.DataDir != "/tmp/ipam" {
					t.Errorf("ipam.dataDir = %q, want /tmp/ipam", c.IPAMConf.DataDir)
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
			c, err := parseConfig([]byte(tt.stdin))
			if err != nil {
				t.Fatalf("parseConfig: %v", err)
			}
			tt.check(t, c)
		})
	}
}

func TestParseConfigBad(t *testing.T) {
	// conf builds a config around a valid one, with ipam and extra fields
	// spliced in.
	conf := func(extra, ipamJSON string) string {
		s := `{"cniVersion":"1.0.0","name":"n"`
		if extra != "" {
			s += "," + extra
		}
		if ipamJSON != "" {
			s += `,"ipam":` + ipamJSON
		}
		return s + "}"
	}
	rng := func(r string) string { return `{"ranges":[[` + r + `]]}` }
	tests := []struct {
		name  string
		stdin string
		code  uint
		field string // must appear in the error message
	}{
		{"not JSON", `{"cniVersion":`, types.ErrDecodingFailure, "decode network config"},
		{"ipam not an object", conf("", `"host-local"`), types.ErrDecodingFailure, "ipam"},
		{"ranges not a list", conf("", `{"ranges":"10.0.0.0/24"}`), types.ErrDecodingFailure, "ipam"},
		{"mtu not a number", conf(`"mtu":"1500"`, rng(`{"subnet":"10.0.0.0/24"}`)), types.ErrDecodingFailure, "mtu"},
		{"prevResult not an object", conf(`"prevResult":"x"`, rng(`{"subnet":"10.0.0.0/24"}`)), types.ErrDecodingFailure, "prevResult"},
		{"missing cniVersion", `{"name":"n","ipam":{"ranges":[[{"subnet":"10.0.0.0/24"}]]}}`, types.ErrInvalidNetworkConfig, "cniVersion"},
		{"unsupported cniVersion", `{"cniVersion":"0.2.0","name":"n","ipam":{"ranges":[[{"subnet":"10.0.0.0/24"}]]}}`, types.ErrInvalidNetworkConfig, "cniVersion"},
		{"cniVersion not a version", `{"cniVersion":"one","name":"n","ipam":{"ranges":[[{"subnet":"10.0.0.0/24"}]]}}`, types.ErrInvalidNetworkConfig, "cniVersion"},
		{"missing name", `{"cniVersion":"1.0.0","ipam":{"ranges":[[{"subnet":"10.0.0.0/24"}]]}}`, types.ErrInvalidNetworkConfig, "name"},
		{"name with slash", `{"cniVersion":"1.0.0","name":"a/b","ipam":{"ranges":[[{"subnet":"10.0.0.0/24"}]]}}`, types.ErrInvalidNetworkConfig, "name"},
		{"name starting with dot", `{"cniVersion":"1.0.0","name":"..","ipam":{"ranges":[[{"subnet":"10.0.0.0/24"}]]}}`, types.ErrInvalidNetworkConfig, "name"},
		{"mtu too small", conf(`"mtu":10`, rng(`{"subnet":"10.0.0.0/24"}`)), types.ErrInvalidNetworkConfig, "mtu"},
		{"mtu too large", conf(`"mtu":70000`, rng(`{"subnet":"10.0.0.0/24"}`)), types.ErrInvalidNetworkConfig, "mtu"},
		{"relative pinRoot", conf(`"pinRoot":"bpf/ebpf-cni"`, rng(`{"subnet":"10.0.0.0/24"}`)), types.ErrInvalidNetworkConfig, "pinRoot"},
		{"relative stateDir", conf(`"stateDir":"state"`, rng(`{"subnet":"10.0.0.0/24"}`)), types.ErrInvalidNetworkConfig, "stateDir"},
		{"relative logFile", conf(`"logFile":"cni.log"`, rng(`{"subnet":"10.0.0.0/24"}`)), types.ErrInvalidNetworkConfig, "logFile"},
		{"attach xdp", conf(`"attach":"xdp"`, rng(`{"subnet":"10.0.0.0/24"}`)), types.ErrInvalidNetworkConfig, "attach"},
		{"no ipam section", conf("", ""), types.ErrInvalidNetworkConfig, "ipam.ranges"},
		{"ipam.ranges missing", conf("", `{"type":"ebpf-cni"}`), types.ErrInvalidNetworkConfig, "ipam.ranges"},
		{"empty range set", conf("", `{"ranges":[[]]}`), types.ErrInvalidNetworkConfig, "ipam.ranges[0]"},
		{"subnet missing", conf("", rng(`{"rangeStart":"10.0.0.5"}`)), types.ErrInvalidNetworkConfig, "ipam.ranges[0][0].subnet"},
		{"subnet /33", conf("", rng(`{"subnet":"10.0.0.0/33"}`)), types.ErrInvalidNetworkConfig, "ipam.ranges[0][0].subnet"},
		{"subnet not canonical", conf("", rng(`{"subnet":"10.0.0.1/24"}`)), types.ErrInvalidNetworkConfig, "ipam.ranges[0][0].subnet"},
		{"subnet too small", conf("", rng(`{"subnet":"10.0.0.0/31"}`)), types.ErrInvalidNetworkConfig, "ipam.ranges[0][0].subnet"},
		{"rangeStart outside subnet", conf("", rng(`{"subnet":"10.0.0.0/24","rangeStart":"10.0.1.5"}`)), types.ErrInvalidNetworkConfig, "ipam.ranges[0][0].rangeStart"},
		{"rangeStart not an IP", conf("", rng(`{"subnet":"10.0.0.0/24","rangeStart":"ten"}`)), types.ErrInvalidNetworkConfig, "ipam.ranges[0][0].rangeStart"},
		{"rangeEnd before rangeStart", conf("", rng(`{"subnet":"10.0.0.0/24","rangeStart":"10.0.0.9","rangeEnd":"10.0.0.8"}`)), types.ErrInvalidNetworkConfig, "ipam.ranges[0][0].rangeEnd"},
		{"gateway not an IP", conf("", rng(`{"subnet":"10.0.0.0/24","gateway":"10.0.0"}`)), types.ErrInvalidNetworkConfig, "ipam.ranges[0][0].gateway"},
		{"gateway outside subnet", conf("", rng(`{"subnet":"10.0.0.0/24","gateway":"10.0.1.1"}`)), types.ErrInvalidNetworkConfig, "ipam.ranges[0][0].gateway"},
		{"mixed families in a set", conf("", rng(`{"subnet":"10.0.0.0/24"},{"subnet":"fd00::/64"}`)), types.ErrInvalidNetworkConfig, "ipam.ranges[0][1].subnet"},
		{"overlapping sets", conf("", `{"ranges":[[{"subnet":"10.0.0.0/16"}],[{"subnet":"10.0.1.0/24"}]]}`), types.ErrInvalidNetworkConfig, "ipam.ranges[1][0]"},
		{"two IPv4 sets", conf("", `{"ranges":[[{"subnet":"10.0.0.0/24"}],[{"subnet":"10.1.0.0/24"}]]}`), types.ErrInvalidNetworkConfig, "ipam.ranges[1]"},
		{"name too long", `{"cniVersion":"1.0.0","name":"nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn","ipam":{"ranges":[[{"subnet":"10.0.0.0/24"}]]}}`, types.ErrInvalidNetworkConfig, "name"},
		{"route dst bad", conf("", `{"ranges":[[{"subnet":"10.0.0.0/24"}]],"routes":[{"dst":"10.96.0.0"}]}`), types.ErrInvalidNetworkConfig, "ipam.routes[0].dst"},
		{"second route dst bad", conf("", `{"ranges":[[{"subnet":"10.0.0.0/24"}]],"routes":[{"dst":"0.0.0.0/0"},{"dst":""}]}`), types.ErrInvalidNetworkConfig, "ipam.routes[1].dst"},
		{"relative ipam.dataDir", conf("", `{"ranges":[[{"subnet":"10.0.0.0/24"}]],"dataDir":"ipam"}`), types.ErrInvalidNetworkConfig, "ipam.dataDir"},
		{"ipam.type with path", conf("", `{"type":"../evil"}`), types.ErrInvalidNetworkConfig, "ipam.type"},
		{"ipam.type dot-dot", conf("", `{"type":".."}`), types.ErrInvalidNetworkConfig, "ipam.type"},
		{"ipam.type with backslash", conf("", `{"type":"a\\b"}`), types.ErrInvalidNetworkConfig, "ipam.type"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := parseConfig([]byte(tt.stdin))
			if err == nil {
				t.Fatalf("parseConfig(%s) = %+v, want an error", tt.stdin, c)
			}
			var ce *types.Error
			if !errors.As(toCNI(err), &ce) {
				t.Fatalf("toCNI(%v) = %T, want *types.Error", err, toCNI(err))
			}
			if ce.Code != tt.code {
				t.Errorf("code = %d, want %d (msg %q)", ce.Code, tt.code, ce.Msg)
			}
			// A config error starts with the field it is about; a decode
			// error names it somewhere in the decoder's message.
			named := strings.Contains(ce.Msg, tt.field)
			if tt.code == types.ErrInvalidNetworkConfig {
				named = strings.HasPrefix(ce.Msg, tt.field+": ")
			}
			if !named {
				t.Errorf("msg %q does not name %q", ce.Msg, tt.field)
			}
		})
	}
}

func TestParseArgs(t *testing.T) {
	want := podArgs{Namespace: "ns", Name: "p", UID: "u"}
	tests := []struct {
		name string
		in   string
		want podArgs
	}{
		{"containerd order", "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_INFRA_CONTAINER_ID=x;K8S_POD_UID=u", want},
		{"other order", "K8S_POD_UID=u;K8S_POD_INFRA_CONTAINER_ID=x;K8S_POD_NAME=p;IgnoreUnknown=1;K8S_POD_NAMESPACE=ns", want},
		{"trailing separator", "K8S_POD_NAME=p;K8S_POD_NAMESPACE=ns;K8S_POD_UID=u;", want},
		{"podman: name only", "K8S_POD_NAME=web", podArgs{Name: "web"}},
		{"value with equals sign", "K8S_POD_NAME=a=b", podArgs{Name: "a=b"}},
		{"empty value", "K8S_POD_NAMESPACE=", podArgs{}},
		{"empty", "", podArgs{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseArgs(tt.in)
			if err != nil {
				t.Fatalf("parseArgs(%q): %v", tt.in, err)
			}
			if got != tt.want {
				t.Errorf("parseArgs(%q) = %+v, want %+v", tt.in, got, tt.want)
			}
		})
	}
}

func TestParseArgsMalformed(t *testing.T) {
	for _, in := range []string{"foo", "K8S_POD_NAME=p;foo", "IgnoreUnknown=1;foo;K8S_POD_UID=u"} {
		t.Run(in, func(t *testing.T) {
			_, err := parseArgs(in)
			if err == nil {
				t.Fatalf("parseArgs(%q) succeeded, want an error", in)
			}
			var ce *types.Error
			if !errors.As(toCNI(err), &ce) {
				t.Fatalf("toCNI(%v) = %T, want *types.Error", err, toCNI(err))
			}
			if ce.Code != types.ErrInvalidEnvironmentVariables {
				t.Errorf("code = %d, want %d", ce.Code, types.ErrInvalidEnvironmentVariables)
			}
			if !strings.Contains(ce.Msg, "CNI_ARGS") || !strings.Contains(ce.Msg, "foo") {
				t.Errorf("msg %q does not name CNI_ARGS and the bad pair", ce.Msg)
			}
		})
	}
}

func TestToCNI(t *testing.T) {
	tests := []struct {
		name string
		err  error
		code uint
		msg  string // must appear in Msg
	}{
		{"flock timeout", fmt.Errorf("lock /run/x after 10s: %w", flock.ErrTimeout), types.ErrTryAgainLater, "lock wait timed out"},
		{"ipam lock timeout", fmt.Errorf("allocate address: %w", ipam.ErrLockTimeout), types.ErrTryAgainLater, "lock wait timed out"},
		{"no bpffs", fmt.Errorf("load datapath: %w", loader.ErrNoBPFFS), types.ErrTryAgainLater, "bpffs"},
		{"netns", fmt.Errorf("%w /proc/1/ns/x: %w", veth.ErrNetNS, errors.New("no such file")), types.ErrInvalidNetNS, "CNI_NETNS"},
		{"interface exists", fmt.Errorf("eth0: %w", veth.ErrIfExists), types.ErrInvalidEnvironmentVariables, "CNI_IFNAME"},
		{"exhausted", fmt.Errorf("allocate address: %w", ipam.ErrExhausted), 100, "no free addresses"},
		{"plain", errors.New("something odd"), types.ErrInternal, "something odd"},
		{"wrapped config error", fmt.Errorf("add: %w", invalid("mtu", "bad")), types.ErrInvalidNetworkConfig, "mtu: bad"},
		{"wrapped decode error", fmt.Errorf("add: %w", &decodeError{errors.New("eof")}), types.ErrDecodingFailure, "decode network config: eof"},
		{"CNI error passes through", fmt.Errorf("x: %w", types.NewError(types.ErrUnknownContainer, "gone", "")), types.ErrUnknownContainer, "gone"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var ce *types.Error
			if !errors.As(toCNI(tt.err), &ce) {
				t.Fatalf("toCNI(%v) = %T, want *types.Error", tt.err, toCNI(tt.err))
			}
			if ce.Code != tt.code {
				t.Errorf("code = %d, want %d (msg %q)", ce.Code, tt.code, ce.Msg)
			}
			if !strings.Contains(ce.Msg, tt.msg) {
				t.Errorf("msg %q does not contain %q", ce.Msg, tt.msg)
			}
		})
	}
	if err := toCNI(nil); err != nil {
		t.Errorf("toCNI(nil) = %#v, want nil", err)
	}
}
