package maps_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ebpf-cni/ebpf-cni/internal/loader"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
)

// Verdicts of a tc program (linux/pkt_cls.h).
const (
	actUnspec   = ^uint32(0) // TC_ACT_UNSPEC (-1): continue (TCX_NEXT)
	actShot     = 2
	actRedirect = 7
)

// Without a context BPF_PROG_TEST_RUN runs on the loopback device, so the
// "host veth" of the endpoint under test is ifindex 1.
const testIfindex = 1

var (
	podMAC   = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0x01}
	hostMAC  = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0xee}
	peerPod  = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0x02}
	peerHost = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0xef}
	podIP    = netip.MustParseAddr("10.9.0.1")
	peerIP   = netip.MustParseAddr("10.9.0.2")
	podIP6   = netip.MustParseAddr("fd09::1")
	peerIP6  = netip.MustParseAddr("fd09::2")
)

func ipv4Frame(srcMAC net.HardwareAddr, src, dst netip.Addr) []byte {
	var b bytes.Buffer
	b.Write(hostMAC)
	b.Write(srcMAC)
	binary.Write(&b, binary.BigEndian, uint16(0x0800))
	ip := make([]byte, 20)
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], 20+8)
	ip[8], ip[9] = 64, 17
	s, d := src.As4(), dst.As4()
	copy(ip[12:], s[:])
	copy(ip[16:], d[:])
	b.Write(ip)
	b.Write(make([]byte, 8)) // UDP header
	return padFrame(b.Bytes())
}

func ipv6Frame(srcMAC net.HardwareAddr, src, dst netip.Addr) []byte {
	var b bytes.Buffer
	b.Write(hostMAC)
	b.Write(srcMAC)
	binary.Write(&b, binary.BigEndian, uint16(0x86dd))
	ip := make([]byte, 40)
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], 8)
	ip[6], ip[7] = 17, 64
	s, d := src.As16(), dst.As16()
	copy(ip[8:], s[:])
	copy(ip[24:], d[:])
	b.Write(ip)
	b.Write(make([]byte, 8))
	return padFrame(b.Bytes())
}

func arpFrame(srcMAC, senderMAC net.HardwareAddr, sender, target netip.Addr) []byte {
	var b bytes.Buffer
	b.Write([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	b.Write(srcMAC)
	binary.Write(&b, binary.BigEndian, uint16(0x0806))
	binary.Write(&b, binary.BigEndian, []uint16{1, 0x0800})
	b.Write([]byte{6, 4, 0, 1})
	b.Write(senderMAC)
	s, t := sender.As4(), target.As4()
	b.Write(s[:])
	b.Write(make([]byte, 6))
	b.Write(t[:])
	return padFrame(b.Bytes())
}

// vlanFrame is 802.1Q VID 0 around an IPv4 packet from the pod.
func vlanFrame(src net.HardwareAddr) []byte {
	inner := ipv4Frame(src, podIP, peerIP)
	var b bytes.Buffer
	b.Write(inner[:12])
	binary.Write(&b, binary.BigEndian, []uint16{0x8100, 0})
	b.Write(inner[12:])
	return b.Bytes()
}

func etherFrame(src net.HardwareAddr, proto uint16) []byte {
	var b bytes.Buffer
	b.Write(hostMAC)
	b.Write(src)
	binary.Write(&b, binary.BigEndian, proto)
	return padFrame(b.Bytes())
}

// tcpFrame is an IPv4 TCP segment with the given ports and flags.
func tcpFrame(dstMAC, srcMAC net.HardwareAddr, src, dst netip.Addr, sport, dport uint16, flags byte) []byte {
	var b bytes.Buffer
	b.Write(dstMAC)
	b.Write(srcMAC)
	binary.Write(&b, binary.BigEndian, uint16(0x0800))
	ip := make([]byte, 20)
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], 20+20)
	ip[8], ip[9] = 64, 6
	s, d := src.As4(), dst.As4()
	copy(ip[12:], s[:])
	copy(ip[16:], d[:])
	b.Write(ip)
	tcp := make([]byte, 20)
	binary.BigEndian.PutUint16(tcp[0:], sport)
	binary.BigEndian.PutUint16(tcp[2:], dport)
	tcp[12], tcp[13] = 5<<4, flags
	b.Write(tcp)
	return padFrame(b.Bytes())
}

func padFrame(f []byte) []byte {
	if len(f) < 60 {
		f = append(f, make([]byte, 60-len(f))...)
	}
	return f
}

func load(t testing.TB) (*loader.DatapathObjects, *maps.Maps) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("loading BPF programs needs root (CAP_BPF, CAP_NET_ADMIN)")
	}
	objs, err := loader.LoadUnpinned()
	if err != nil {
		t.Fatalf("load datapath: %v", err)
	}
	t.Cleanup(func() { objs.Close() })
	m := maps.FromObjects(objs)
	if err := m.PutDevice(testIfindex, maps.Device{PodMAC: podMAC, HostMAC: hostMAC, IPv4: podIP, IPv6: podIP6}); err != nil {
		t.Fatal(err)
	}
	for _, ip := range []netip.Addr{peerIP, peerIP6} {
		if err := m.PutEndpoint(maps.Endpoint{IP: ip, Ifindex: 42, PodMAC: peerPod, HostMAC: peerHost}); err != nil {
			t.Fatal(err)
		}
	}
	return objs, m
}

func run(t *testing.T, prog *ebpf.Program, frame []byte) (uint32, []byte) {
	t.Helper()
	out := make([]byte, len(frame)+256)
	ret, err := prog.Run(&ebpf.RunOptions{Data: frame, DataOut: out})
	if err != nil {
		t.Fatalf("run program: %v", err)
	}
	return ret, out[:len(frame)]
}

func TestFromPodVerdicts(t *testing.T) {
	objs, m := load(t)
	spoofMAC := net.HardwareAddr{0x02, 0xba, 0xd0, 0, 0, 1}
	other := netip.MustParseAddr("192.0.2.7")
	tests := []struct {
		name    string
		frame   []byte
		want    uint32
		counter func(maps.Stats) uint64
	}{
		{"ipv4 to local pod is redirected", ipv4Frame(podMAC, podIP, peerIP), actRedirect, func(s maps.Stats) uint64 { return s.RedirectPackets }},
		{"ipv6 to local pod is redirected", ipv6Frame(podMAC, podIP6, peerIP6), actRedirect, func(s maps.Stats) uint64 { return s.RedirectPackets }},
		{"ipv4 to non-local passes to the host", ipv4Frame(podMAC, podIP, other), actUnspec, func(s maps.Stats) uint64 { return s.FromPodPackets }},
		{"ipv6 link-local passes", ipv6Frame(podMAC, netip.MustParseAddr("fe80::1234"), peerIP6), actUnspec, func(s maps.Stats) uint64 { return s.FromPodPackets }},
		{"spoofed ipv4 source is dropped", ipv4Frame(podMAC, other, peerIP), actShot, func(s maps.Stats) uint64 { return s.DropSpoofedIp }},
		{"spoofed ipv6 source is dropped", ipv6Frame(podMAC, netip.MustParseAddr("fd09::99"), peerIP6), actShot, func(s maps.Stats) uint64 { return s.DropSpoofedIp }},
		{"spoofed source mac is dropped", ipv4Frame(spoofMAC, podIP, peerIP), actShot, func(s maps.Stats) uint64 { return s.DropSpoofedMac }},
		{"arp from the pod passes", arpFrame(podMAC, podMAC, podIP, peerIP), actUnspec, func(s maps.Stats) uint64 { return s.FromPodPackets }},
		{"arp with spoofed sender ip is dropped", arpFrame(podMAC, podMAC, other, peerIP), actShot, func(s maps.Stats) uint64 { return s.DropSpoofedIp }},
		{"arp with spoofed sender mac is dropped", arpFrame(podMAC, spoofMAC, podIP, peerIP), actShot, func(s maps.Stats) uint64 { return s.DropSpoofedMac }},
		{"vlan-tagged frame is dropped", vlanFrame(podMAC), actShot, func(s maps.Stats) uint64 { return s.DropProtocol }},
		{"unknown ethertype is dropped", etherFrame(podMAC, 0x88cc), actShot, func(s maps.Stats) uint64 { return s.DropProtocol }},
		{"truncated arp is dropped", arpFrame(podMAC, podMAC, podIP, peerIP)[:24], actShot, func(s maps.Stats) uint64 { return s.DropMalformed }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before, err := m.Stats(testIfindex)
			if err != nil {
				t.Fatal(err)
			}
			got, out := run(t, objs.FromPod, tt.frame)
			if got != tt.want {
				t.Fatalf("verdict = %d, want %d", int32(got), int32(tt.want))
			}
			after, err := m.Stats(testIfindex)
			if err != nil {
				t.Fatal(err)
			}
			if d := tt.counter(after) - tt.counter(before); d != 1 {
				t.Errorf("counter moved by %d, want 1 (before %+v after %+v)", d, before, after)
			}
			if tt.want == actRedirect {
				if !bytes.Equal(out[0:6], peerPod) || !bytes.Equal(out[6:12], peerHost) {
					t.Errorf("macs after redirect dst=%s src=%s, want dst=%s src=%s",
						net.HardwareAddr(out[0:6]), net.HardwareAddr(out[6:12]), peerPod, peerHost)
				}
			}
		})
	}
}

// Our programs are only attached to endpoints: without a device entry (a
// DEL half done, a lost entry) nothing the pod sends is trusted.
func TestFromPodUnknownDeviceDrops(t *testing.T) {
	objs, m := load(t)
	if err := m.DeleteDevice(testIfindex, peerPod); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Device(testIfindex); err != nil {
		t.Fatalf("DeleteDevice with another pod's MAC removed the entry: %v", err)
	}
	if err := m.DeleteDevice(testIfindex, podMAC); err != nil {
		t.Fatal(err)
	}
	got, _ := run(t, objs.FromPod, ipv4Frame(podMAC, podIP, peerIP))
	if got != actShot {
		t.Fatalf("verdict without a device entry = %d, want drop", int32(got))
	}
	if _, err := m.Stats(testIfindex); !errors.Is(err, maps.ErrNotFound) {
		t.Fatalf("counters of a deleted device: %v, want ErrNotFound", err)
	}
}

func TestToPodCounts(t *testing.T) {
	objs, m := load(t)
	frame := ipv4Frame(hostMAC, peerIP, podIP)
	if got, _ := run(t, objs.ToPod, frame); got != actUnspec {
		t.Fatalf("verdict = %d, want pass", int32(got))
	}
	s, err := m.Stats(testIfindex)
	if err != nil {
		t.Fatal(err)
	}
	if s.ToPodPackets != 1 || s.ToPodBytes != uint64(len(frame)) {
		t.Fatalf("to_pod counters = %d packets %d bytes, want 1 and %d", s.ToPodPackets, s.ToPodBytes, len(frame))
	}
}

func TestEndpointOwnership(t *testing.T) {
	_, m := load(t)
	if err := m.DeleteEndpoint(peerIP, podMAC); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Endpoint(peerIP); err != nil {
		t.Fatalf("entry of %s was removed by a DEL for %s: %v", peerPod, podMAC, err)
	}
	err := m.PutEndpoint(maps.Endpoint{IP: peerIP, Ifindex: 7, PodMAC: podMAC, HostMAC: hostMAC})
	if !errors.Is(err, maps.ErrTaken) {
		t.Fatalf("put over another pod's address: %v, want ErrTaken", err)
	}
	if err := m.PutEndpoint(maps.Endpoint{IP: peerIP, Ifindex: 44, PodMAC: peerPod, HostMAC: peerHost}); err != nil {
		t.Fatalf("the same pod again: %v", err)
	}
	if ep, _ := m.Endpoint(peerIP); ep.Ifindex != 44 {
		t.Fatalf("retried put kept ifindex %d, want 44", ep.Ifindex)
	}
	if err := m.DeleteEndpoint(peerIP, peerPod); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Endpoint(peerIP); !errors.Is(err, maps.ErrNotFound) {
		t.Fatalf("after delete: %v, want ErrNotFound", err)
	}
	if err := m.DeleteEndpoint(peerIP, peerPod); err != nil {
		t.Fatalf("second delete: %v", err)
	}
}

// A flow the host stack delivered to the pod (a Service DNAT: from the local
// peer, not redirected) has its replies sent back through the host, so
// conntrack can undo the NAT. A new direct connection with the same ports
// goes back to the fast path.
func TestHostPathFlows(t *testing.T) {
	objs, m := load(t)
	const syn, synAck, ack = 0x02, 0x12, 0x10
	if err := m.PutEndpoint(maps.Endpoint{IP: podIP, Ifindex: testIfindex, PodMAC: podMAC, HostMAC: hostMAC}); err != nil {
		t.Fatal(err)
	}
	reply := tcpFrame(hostMAC, podMAC, podIP, peerIP, 8080, 40000, synAck)
	if got, _ := run(t, objs.FromPod, reply); got != actRedirect {
		t.Fatalf("before any host-delivered flow: verdict %d, want redirect", int32(got))
	}
	delivered := tcpFrame(podMAC, hostMAC, peerIP, podIP, 40000, 8080, syn)
	if got, _ := run(t, objs.ToPod, delivered); got != actUnspec {
		t.Fatalf("to_pod verdict %d, want pass", int32(got))
	}
	if n, err := m.HostFlows(); err != nil || n != 1 {
		t.Fatalf("host flows after delivery: %d, %v; want 1", n, err)
	}
	if d, _ := m.Device(testIfindex); !d.HostFlows {
		t.Fatalf("to_pod did not flag the pod's device")
	}
	before, _ := m.Stats(testIfindex)
	if got, _ := run(t, objs.FromPod, reply); got != actUnspec {
		t.Fatalf("reply of a host-delivered flow: verdict %d, want pass to the host", int32(got))
	}
	after, _ := m.Stats(testIfindex)
	if after.HostPathPackets != before.HostPathPackets+1 {
		t.Errorf("host_path_packets %d -> %d, want +1", before.HostPathPackets, after.HostPathPackets)
	}
	// Other ports between the same pods still take the fast path.
	if got, _ := run(t, objs.FromPod, tcpFrame(hostMAC, podMAC, podIP, peerIP, 8080, 40001, ack)); got != actRedirect {
		t.Errorf("unrelated flow: verdict %d, want redirect", int32(got))
	}
	// The peer opens a direct connection reusing the ports: its redirected
	// SYN removes the stale host-path entry.
	if err := m.PutDevice(testIfindex, maps.Device{PodMAC: peerPod, HostMAC: hostMAC, IPv4: peerIP}); err != nil {
		t.Fatal(err)
	}
	if got, _ := run(t, objs.FromPod, tcpFrame(hostMAC, peerPod, peerIP, podIP, 40000, 8080, syn)); got != actRedirect {
		t.Fatalf("direct SYN: verdict %d, want redirect", int32(got))
	}
	if n, _ := m.HostFlows(); n != 0 {
		t.Errorf("host flows after a direct SYN reused the ports: %d, want 0", n)
	}
}

// A rate-limited endpoint (bandwidth plugin) is reached through the host,
// whose qdiscs enforce the limit, in both directions.
func TestShapedEndpointsTakeTheHostPath(t *testing.T) {
	objs, m := load(t)
	if got, _ := run(t, objs.FromPod, ipv4Frame(podMAC, podIP, peerIP)); got != actRedirect {
		t.Fatalf("unshaped: verdict %d, want redirect", int32(got))
	}
	if err := m.PutEndpoint(maps.Endpoint{IP: peerIP, Ifindex: 42, PodMAC: peerPod, HostMAC: peerHost, Shaped: true}); err != nil {
		t.Fatal(err)
	}
	if got, _ := run(t, objs.FromPod, ipv4Frame(podMAC, podIP, peerIP)); got != actUnspec {
		t.Errorf("to a shaped pod: verdict %d, want the host path", int32(got))
	}
	if err := m.PutEndpoint(maps.Endpoint{IP: peerIP, Ifindex: 42, PodMAC: peerPod, HostMAC: peerHost}); err != nil {
		t.Fatal(err)
	}
	if err := m.PutDevice(testIfindex, maps.Device{PodMAC: podMAC, HostMAC: hostMAC, IPv4: podIP, Shaped: true}); err != nil {
		t.Fatal(err)
	}
	if got, _ := run(t, objs.FromPod, ipv4Frame(podMAC, podIP, peerIP)); got != actUnspec {
		t.Errorf("from a shaped pod: verdict %d, want the host path", int32(got))
	}
	if s, _ := m.Stats(testIfindex); s.HostPathPackets != 1 {
		t.Errorf("host_path_packets = %d, want 1 (counters reset by PutDevice)", s.HostPathPackets)
	}
}

// BenchmarkFromPod reports the program's own run time per frame, measured
// in the kernel (BPF_PROG_TEST_RUN with repeat), for a pod's frame to an
// address outside the node: every check and lookup of the redirect path but
// the MAC rewrite (repeated runs share one frame, and a rewritten frame would
// fail the source MAC check on the next run).
func BenchmarkFromPod(b *testing.B) {
	objs, _ := load(b)
	frame := tcpFrame(hostMAC, podMAC, podIP, netip.MustParseAddr("192.0.2.9"), 40000, 8080, 0x10)
	const repeat = 200000
	ret, per, err := objs.FromPod.Benchmark(frame, repeat, nil)
	if err != nil {
		b.Fatal(err)
	}
	if ret != actUnspec {
		b.Fatalf("verdict %d, want pass", int32(ret))
	}
	b.ReportMetric(float64(per.Nanoseconds()), "ns/frame")
}
