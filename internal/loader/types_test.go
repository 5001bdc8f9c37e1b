package loader

import (
	"encoding/binary"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
)

// TestTypesMatchBTF checks the bpf2go types against the C structs as the
// embedded object's BTF describes them: same size, no implicit padding on the
// Go side, and every field at the C member's offset.
func TestTypesMatchBTF(t *testing.T) {
	spec, err := LoadDatapath()
	if err != nil {
		t.Fatalf("LoadDatapath: %v", err)
	}
	tests := []struct {
		cName string
		goVal any
	}{
		{"endpoint_key", DatapathEndpointKey{}},
		{"endpoint_info", DatapathEndpointInfo{}},
		{"device_info", DatapathDeviceInfo{}},
		{"endpoint_stats", DatapathEndpointStats{}},
		{"flow_key", DatapathFlowKey{}},
		{"flow_info", DatapathFlowInfo{}},
		{"lpm_key", DatapathLpmKey{}},
		{"cluster_info", DatapathClusterInfo{}},
		{"tunnel_info", DatapathTunnelInfo{}},
		{"guard_key", DatapathGuardKey{}},
		{"node_stats", DatapathNodeStats{}},
	}
	for _, tt := range tests {
		t.Run(tt.cName, func(t *testing.T) {
			var s *btf.Struct
			if err := spec.Types.TypeByName(tt.cName, &s); err != nil {
				t.Fatalf("BTF struct %s: %v", tt.cName, err)
			}
			typ := reflect.TypeOf(tt.goVal)
			if got := typ.Size(); got != uintptr(s.Size) {
				t.Errorf("unsafe.Sizeof(%s) = %d, C struct %s is %d bytes", typ.Name(), got, tt.cName, s.Size)
			}
			if got := binary.Size(tt.goVal); got != int(s.Size) {
				t.Errorf("binary.Size(%s) = %d, C struct %s is %d bytes", typ.Name(), got, tt.cName, s.Size)
			}

			var fields []reflect.StructField
			for i := range typ.NumField() {
				if f := typ.Field(i); f.Name != "_" {
					fields = append(fields, f)
				}
			}
			if len(fields) != len(s.Members) {
				t.Fatalf("%s has %d fields, C struct %s has %d members", typ.Name(), len(fields), tt.cName, len(s.Members))
			}
			for i, m := range s.Members {
				f := fields[i]
				if want := goName(m.Name); f.Name != want {
					t.Errorf("%s field %d is %s, C member is %s (Go name %s)", typ.Name(), i, f.Name, m.Name, want)
				}
				if m.BitfieldSize != 0 {
					t.Errorf("%s.%s is a bitfield", tt.cName, m.Name)
				}
				if want := uintptr(m.Offset.Bytes()); f.Offset != want {
					t.Errorf("%s.%s at offset %d, C member %s at %d", typ.Name(), f.Name, f.Offset, m.Name, want)
				}
				size, err := btf.Sizeof(m.Type)
				if err != nil {
					t.Fatalf("size of %s.%s: %v", tt.cName, m.Name, err)
				}
				if f.Type.Size() != uintptr(size) {
					t.Errorf("%s.%s is %d bytes, C member %s is %d", typ.Name(), f.Name, f.Type.Size(), m.Name, size)
				}
			}
		})
	}
}

// TestMapSizes checks each pinned map's key and value size against the Go
// types that internal/maps writes into it.
func TestMapSizes(t *testing.T) {
	spec, err := LoadDatapath()
	if err != nil {
		t.Fatalf("LoadDatapath: %v", err)
	}
	tests := []struct {
		name       string
		key, value any
	}{
		{MapEndpoints, DatapathEndpointKey{}, DatapathEndpointInfo{}},
		{MapDevices, uint32(0), DatapathDeviceInfo{}},
		{MapStats, uint32(0), DatapathEndpointStats{}},
		{MapHostFlows, DatapathFlowKey{}, DatapathFlowInfo{}},
		{MapCluster, DatapathLpmKey{}, DatapathClusterInfo{}},
		{MapTunnel, DatapathLpmKey{}, DatapathTunnelInfo{}},
		{MapNatGuard, DatapathGuardKey{}, DatapathFlowInfo{}},
		{MapNodeStats, uint32(0), DatapathNodeStats{}},
		{MapSvc, DatapathSvcKey{}, DatapathSvcInfo{}},
		{MapBackends, uint32(0), DatapathBackendInfo{}},
		{MapSock, DatapathSockKey{}, DatapathSockInfo{}},
		{MapAffinity, DatapathAffinityKey{}, DatapathAffinityInfo{}},
		{MapAffinityMatch, DatapathAffinityMatch{}, uint32(0)},
		{MapNodeAddr, DatapathEndpointKey{}, DatapathNodeaddrInfo{}},
		{MapSNAT, uint32(0), DatapathSnatInfo{}},
		{MapNAT, DatapathFlowKey{}, DatapathNatEntry{}},
		{MapLBStats, uint32(0), DatapathLbStats{}},
		{MapSvcCIDR, DatapathLpmKey{}, DatapathClusterInfo{}},
		{MapIPCache, DatapathLpmKey{}, DatapathPeerInfo{}},
		{MapPolicy, DatapathPolicyKey{}, DatapathPolicyEntry{}},
		{MapEPPolicy, uint32(0), DatapathEpPolicy{}},
		{MapCT, DatapathFlowKey{}, DatapathCtEntry{}},
		{MapPolicyStats, uint32(0), DatapathPolicyStats{}},
		{MapPolicyEvents, nil, nil}, // a ring buffer: records of DatapathPolicyEvent
	}
	var pinned []string
	for name, m := range spec.Maps {
		if m.Pinning == ebpf.PinByName {
			pinned = append(pinned, name)
		}
	}
	if len(pinned) != len(tests) {
		t.Errorf("object pins maps %v, want exactly %d (a new pinned map needs its sizes checked here)", pinned, len(tests))
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, ok := spec.Maps[tt.name]
			if !ok {
				t.Fatalf("no map %s in the object", tt.name)
			}
			if tt.key == nil {
				if m.Type != ebpf.RingBuf || m.Pinning != ebpf.PinByName {
					t.Errorf("map %s: %s, pinning %d; want a pinned ring buffer", tt.name, m.Type, m.Pinning)
				}
				return
			}
			if got, want := m.KeySize, reflect.TypeOf(tt.key).Size(); uintptr(got) != want {
				t.Errorf("KeySize = %d, Go key %T is %d bytes", got, tt.key, want)
			}
			if got, want := m.ValueSize, reflect.TypeOf(tt.value).Size(); uintptr(got) != want {
				t.Errorf("ValueSize = %d, Go value %T is %d bytes", got, tt.value, want)
			}
			if m.Pinning != ebpf.PinByName {
				t.Errorf("map %s is not pinned by name", tt.name)
			}
			if m.Key == nil || m.Value == nil {
				t.Errorf("map %s carries no BTF for key or value", tt.name)
			}
		})
	}
}

// goName is bpf2go's Go name for a C member: pod_mac becomes PodMac.
func goName(c string) string {
	var b strings.Builder
	for part := range strings.SplitSeq(c, "_") {
		if part != "" {
			b.WriteString(strings.ToUpper(part[:1]) + part[1:])
		}
	}
	return b.String()
}

func TestTag(t *testing.T) {
	if !regexp.MustCompile(`^[0-9a-f]{12}$`).MatchString(Tag()) {
		t.Errorf("Tag() = %q, want 12 lowercase hex characters", Tag())
	}
}

// The names internal/maps and the loader open must be in the object.
func TestNames(t *testing.T) {
	spec, err := LoadDatapath()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []string{MapEndpoints, MapDevices, MapStats, MapHostFlows, MapCluster, MapTunnel, MapNatGuard, MapNodeStats} {
		if _, ok := spec.Maps[m]; !ok {
			t.Errorf("no map %s in the object", m)
		}
	}
	pinned := 0 // not clang's constant sections (.rodata.cst16), nor the scratch map
	for name, m := range spec.Maps {
		if m.Pinning == ebpf.PinByName {
			pinned++
			if !slices.Contains(MapNames(), name) {
				t.Errorf("pinned map %s is not in MapNames()", name)
			}
		}
	}
	if got := MapNames(); len(got) != pinned {
		t.Errorf("MapNames() = %v, the object pins %d maps", got, pinned)
	}
	for _, p := range []string{ProgFromPod, ProgToPod, ProgFromNode, ProgToOverlay, ProgConnect4, ProgConnect6,
		ProgSendmsg4, ProgSendmsg6, ProgRecvmsg4, ProgRecvmsg6, ProgGetpeer4, ProgGetpeer6} {
		if _, ok := spec.Programs[p]; !ok {
			t.Errorf("no program %s in the object", p)
		}
	}
}
