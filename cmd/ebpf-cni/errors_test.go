package main

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/ebpf-cni/ebpf-cni/internal/config"
	"github.com/ebpf-cni/ebpf-cni/internal/flock"
	"github.com/ebpf-cni/ebpf-cni/internal/ipam"
	"github.com/ebpf-cni/ebpf-cni/internal/loader"
	"github.com/ebpf-cni/ebpf-cni/internal/veth"
)

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
			c, err := config.Parse([]byte(tt.stdin))
			if err == nil {
				t.Fatalf("config.Parse(%s) = %+v, want an error", tt.stdin, c)
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

func TestParseArgsMalformed(t *testing.T) {
	for in, bad := range map[string]string{
		"foo": "foo", "K8S_POD_NAME=p;foo": "foo", "IgnoreUnknown=1;foo;K8S_POD_UID=u": "foo",
		// Kubernetes names cannot hold '='; the CNI library refuses a second one.
		"K8S_POD_NAME=a=b": "K8S_POD_NAME=a=b",
	} {
		t.Run(in, func(t *testing.T) {
			_, err := config.ParseArgs(in)
			if err == nil {
				t.Fatalf("ParseArgs(%q) succeeded, want an error", in)
			}
			var ce *types.Error
			if !errors.As(toCNI(err), &ce) {
				t.Fatalf("toCNI(%v) = %T, want *types.Error", err, toCNI(err))
			}
			if ce.Code != types.ErrInvalidEnvironmentVariables {
				t.Errorf("code = %d, want %d", ce.Code, types.ErrInvalidEnvironmentVariables)
			}
			if !strings.Contains(ce.Msg, "CNI_ARGS") || !strings.Contains(ce.Msg, bad) {
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
		{"wrapped config error", fmt.Errorf("add: %w", config.Invalid("mtu", "bad")), types.ErrInvalidNetworkConfig, "mtu: bad"},
		{"wrapped decode error", fmt.Errorf("add: %w", &config.DecodeError{Err: errors.New("eof")}), types.ErrDecodingFailure, "decode network config: eof"},
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
