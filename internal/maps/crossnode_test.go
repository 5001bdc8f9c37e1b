package maps_test

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"runtime"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/ebpf-cni/ebpf-cni/internal/loader"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
)

var (
	remotePod  = netip.MustParseAddr("10.8.1.5")  // a pod on another node
	remotePod6 = netip.MustParseAddr("fd08:1::5") // its IPv6 address
	outsider   = netip.MustParseAddr("192.0.2.9") // not a pod of the cluster
	cluster    = []netip.Prefix{netip.MustParsePrefix("10.8.0.0/16"), netip.MustParsePrefix("10.9.0.0/16"),
		netip.MustParsePrefix("fd08::/16"), netip.MustParsePrefix("fd09::/16")}
	lo = net.HardwareAddr{0, 0, 0, 0, 0, 0} // the loopback's MAC: test runs see PACKET_HOST for it
)

// udpFrame is an IPv4 or IPv6 UDP datagram with ports, TTL and fragment
// bits (IPv4 only) chosen; payload bytes after the header.
func udpFrame(dst, src net.HardwareAddr, s, d netip.Addr, sport, dport uint16, ttl byte, fragOff uint16, payload int) []byte {
	var b bytes.Buffer
	b.Write(dst)
	b.Write(src)
	udp := make([]byte, 8+payload)
	binary.BigEndian.PutUint16(udp[0:], sport)
	binary.BigEndian.PutUint16(udp[2:], dport)
	binary.BigEndian.PutUint16(udp[4:], uint16(len(udp)))
	ipHeader(&b, s, d, 17, ttl, fragOff, len(udp))
	b.Write(udp)
	return padFrame(b.Bytes())
}

// ipHeader writes the ethertype and an IPv4 header (checksummed; fragOff
// is the flags and offset field) or IPv6 header (no fragment) for an L4
// part of l4len bytes.
func ipHeader(b *bytes.Buffer, src, dst netip.Addr, proto, ttl byte, fragOff uint16, l4len int) {
	if src.Is4() {
		binary.Write(b, binary.BigEndian, uint16(0x0800))
		ip := make([]byte, 20)
		ip[0] = 0x45
		binary.BigEndian.PutUint16(ip[2:], uint16(20+l4len))
		binary.BigEndian.PutUint16(ip[6:], fragOff)
		ip[8], ip[9] = ttl, proto
		s, d := src.As4(), dst.As4()
		copy(ip[12:], s[:])
		copy(ip[16:], d[:])
		binary.BigEndian.PutUint16(ip[10:], ipChecksum(ip))
		b.Write(ip)
		return
	}
	binary.Write(b, binary.BigEndian, uint16(0x86dd))
	ip := make([]byte, 40)
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], uint16(l4len))
	ip[6], ip[7] = proto, ttl
	s, d := src.As16(), dst.As16()
	copy(ip[8:], s[:])
	copy(ip[24:], d[:])
	b.Write(ip)
}

func ipChecksum(h []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(h); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(h[i:]))
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// ttlOf reads the TTL (hop limit) and, for IPv4, whether the header
// checksum still verifies.
func ttlOf(frame []byte) (ttl byte, csumOK bool) {
	if binary.BigEndian.Uint16(frame[12:]) == 0x0800 {
		return frame[14+8], ipChecksum(frame[14:34]) == 0
	}
	return frame[14+7], true
}

func withCluster(t *testing.T, m *maps.Maps) {
	t.Helper()
	if err := m.PutCluster(cluster); err != nil {
		t.Fatal(err)
	}
}

// from_node (an uplink's ingress): only pod-to-pod traffic for a local pod
// is redirected into it, as one routed hop; everything the host stack must
// see passes.
func TestFromNodeVerdicts(t *testing.T) {
	objs, m := load(t)
	withCluster(t, m)
	if err := m.ResetNodeStats(testIfindex); err != nil {
		t.Fatal(err)
	}
	if err := m.PutDevice(42, maps.Device{PodMAC: peerPod, HostMAC: peerHost, IPv4: peerIP, IPv6: peerIP6}); err != nil {
		t.Fatal(err) // its counters entry
	}
	// The endpoints of load(): peerIP/peerIP6 live behind ifindex 42. The
	// pod of the test device sends a datagram outside the cluster first:
	// from_pod guards its port, so the reply from another node must go
	// through the host (which may have NATed it).
	if err := m.PutEndpoint(maps.Endpoint{IP: podIP, Ifindex: testIfindex, PodMAC: podMAC, HostMAC: hostMAC}); err != nil {
		t.Fatal(err)
	}
	if got, _ := run(t, objs.FromPod, udpFrame(hostMAC, podMAC, podIP, outsider, 40000, 53, 64, 0, 8)); got != actUnspec {
		t.Fatalf("from_pod to outside: verdict %d, want the host path", int32(got))
	}
	guarded := udpFrame(lo, peerHost, remotePod, podIP, 53, 40000, 64, 0, 8)
	tests := []struct {
		name  string
		frame []byte
		want  uint32
	}{
		{"pod of another node to a local pod", udpFrame(lo, peerHost, remotePod, peerIP, 1000, 2000, 64, 0, 8), actRedirect},
		{"IPv6", udpFrame(lo, peerHost, remotePod6, peerIP6, 1000, 2000, 64, 0, 8), actRedirect},
		{"source outside the cluster (conntrack must see both ways)", udpFrame(lo, peerHost, outsider, peerIP, 1000, 2000, 64, 0, 8), actUnspec},
		{"destination not a local pod", udpFrame(lo, peerHost, remotePod, netip.MustParseAddr("10.9.0.77"), 1000, 2000, 64, 0, 8), actUnspec},
		{"a reply the host must un-NAT (guarded port)", guarded, actUnspec},
		{"first fragment", udpFrame(lo, peerHost, remotePod, peerIP, 1000, 2000, 64, 0x2000, 8), actUnspec},
		{"later fragment", udpFrame(lo, peerHost, remotePod, peerIP, 0, 0, 64, 0x0010, 8), actUnspec},
		{"TTL 1: the host answers Time Exceeded", udpFrame(lo, peerHost, remotePod, peerIP, 1000, 2000, 1, 0, 8), actUnspec},
		{"for another host (PACKET_OTHERHOST)", udpFrame(peerPod, peerHost, remotePod, peerIP, 1000, 2000, 64, 0, 8), actUnspec},
		{"ARP", arpFrame(peerHost, peerHost, remotePod, peerIP), actUnspec},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, out := run(t, objs.FromNode, tt.frame)
			if got != tt.want {
				t.Fatalf("verdict %d, want %d", int32(got), int32(tt.want))
			}
			if got != actRedirect {
				return
			}
			if !bytes.Equal(out[0:6], peerPod) || !bytes.Equal(out[6:12], peerHost) {
				t.Errorf("MACs %s <- %s, want %s <- %s", net.HardwareAddr(out[0:6]), net.HardwareAddr(out[6:12]), peerPod, peerHost)
			}
			if ttl, ok := ttlOf(out); ttl != 63 || !ok {
				t.Errorf("TTL %d (checksum ok %v), want 63 with a valid checksum", ttl, ok)
			}
		})
	}
	st, err := m.Stats(42)
	if err != nil {
		t.Fatal(err)
	}
	if st.FromNodePackets != 2 || st.ToPodPackets != 2 {
		t.Errorf("endpoint counters: from other nodes %d, delivered %d; want 2 and 2", st.FromNodePackets, st.ToPodPackets)
	}
	ns, err := m.NodeStats(testIfindex)
	if err != nil {
		t.Fatal(err)
	}
	if ns.RedirectPackets != 2 {
		t.Errorf("uplink counter: %d redirected, want 2", ns.RedirectPackets)
	}
}

// A shaped endpoint is reached through the host veth's qdiscs, also from
// other nodes.
func TestFromNodeShapedTakesTheHostPath(t *testing.T) {
	objs, m := load(t)
	withCluster(t, m)
	shaped := netip.MustParseAddr("10.9.0.50")
	if err := m.PutEndpoint(maps.Endpoint{IP: shaped, Ifindex: 43, PodMAC: peerPod, HostMAC: peerHost, Shaped: true}); err != nil {
		t.Fatal(err)
	}
	if got, _ := run(t, objs.FromNode, udpFrame(lo, peerHost, remotePod, shaped, 1, 2, 64, 0, 8)); got != actUnspec {
		t.Errorf("verdict %d, want the host path", int32(got))
	}
}

// same-node redirects are a routed hop too: the TTL drops by one.
func TestFromPodSameNodeDecrementsTTL(t *testing.T) {
	objs, _ := load(t)
	got, out := run(t, objs.FromPod, udpFrame(hostMAC, podMAC, podIP, peerIP, 1, 2, 64, 0, 8))
	if got != actRedirect {
		t.Fatalf("verdict %d, want redirect", int32(got))
	}
	if ttl, ok := ttlOf(out); ttl != 63 || !ok {
		t.Errorf("TTL %d (checksum ok %v), want 63 with a valid checksum", ttl, ok)
	}
}

// testNode is a network namespace standing for a node: a veth pair whose
// one end (ebtpod) plays the pod's host veth, the other (ebtup) the
// uplink, with forwarding on.
type testNode struct {
	handle        netns.NsHandle
	podIf, uplink netlink.Link
	gwMAC         net.HardwareAddr
}

func newTestNode(t *testing.T, neighbour bool) *testNode {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces)")
	}
	runtime.LockOSThread()
	t.Cleanup(runtime.UnlockOSThread)
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	h, err := netns.New() // also switches this thread into it
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { netns.Set(orig); orig.Close(); h.Close() })
	n := &testNode{handle: h, gwMAC: net.HardwareAddr{0x02, 0xaa, 0, 0, 0, 1}}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "ebtpod"}, PeerName: "ebtpodp"}))
	must(netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "ebtup", MTU: 1400}, PeerName: "ebtupp"}))
	for _, name := range []string{"ebtpod", "ebtpodp", "ebtup", "ebtupp", "lo"} {
		l, err := netlink.LinkByName(name)
		must(err)
		must(netlink.LinkSetUp(l))
	}
	n.podIf, _ = netlink.LinkByName("ebtpod")
	n.uplink, _ = netlink.LinkByName("ebtup")
	addr, _ := netlink.ParseAddr("10.77.0.1/24")
	must(netlink.AddrAdd(n.uplink, addr))
	_, dst, _ := net.ParseCIDR("10.8.0.0/16")
	must(netlink.RouteAdd(&netlink.Route{Dst: dst, Gw: net.ParseIP("10.77.0.2"), LinkIndex: n.uplink.Attrs().Index}))
	if neighbour {
		must(netlink.NeighSet(&netlink.Neigh{LinkIndex: n.uplink.Attrs().Index, IP: net.ParseIP("10.77.0.2"),
			HardwareAddr: n.gwMAC, State: netlink.NUD_PERMANENT}))
	}
	must(os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644))
	return n
}

// runOn runs prog on frame as if it arrived on ifindex.
func runOn(t *testing.T, prog *ebpf.Program, ifindex int, frame []byte) (uint32, []byte) {
	t.Helper()
	ctx := make([]byte, 192) // struct __sk_buff
	binary.NativeEndian.PutUint32(ctx[40:], uint32(ifindex))
	out := make([]byte, len(frame)+256)
	ret, err := prog.Run(&ebpf.RunOptions{Data: frame, DataOut: out, Context: ctx})
	if err != nil {
		t.Fatalf("run program: %v", err)
	}
	return ret, out[:len(frame)]
}

// from_pod routes a packet for another node's pod itself: a FIB lookup in
// the node's tables, then straight to the egress device with the
// neighbour's MAC (or to the kernel's neighbour resolution), TTL down by
// one. What needs a router's ICMP or the host's netfilter passes.
func TestFromPodForwardsToOtherNodes(t *testing.T) {
	for _, neighbour := range []bool{true, false} {
		name := map[bool]string{true: "neighbour resolved", false: "neighbour unresolved"}[neighbour]
		t.Run(name, func(t *testing.T) {
			n := newTestNode(t, neighbour)
			objs, err := loader.LoadUnpinned()
			if err != nil {
				t.Fatal(err)
			}
			defer objs.Close()
			m := maps.FromObjects(objs)
			withCluster(t, m)
			idx := n.podIf.Attrs().Index
			if err := m.PutDevice(idx, maps.Device{PodMAC: podMAC, HostMAC: hostMAC, IPv4: podIP}); err != nil {
				t.Fatal(err)
			}
			got, out := runOn(t, objs.FromPod, idx, udpFrame(hostMAC, podMAC, podIP, remotePod, 1000, 2000, 64, 0, 8))
			if got != actRedirect {
				t.Fatalf("verdict %d, want redirect", int32(got))
			}
			if ttl, ok := ttlOf(out); ttl != 63 || !ok {
				t.Errorf("TTL %d (checksum ok %v), want 63", ttl, ok)
			}
			if neighbour && (!bytes.Equal(out[0:6], n.gwMAC) || !bytes.Equal(out[6:12], n.uplink.Attrs().HardwareAddr)) {
				t.Errorf("MACs %s <- %s, want the gateway's %s <- the uplink's %s",
					net.HardwareAddr(out[0:6]), net.HardwareAddr(out[6:12]), n.gwMAC, n.uplink.Attrs().HardwareAddr)
			}
			st, _ := m.Stats(idx)
			if st.ToNodePackets != 1 {
				t.Errorf("to_node_packets %d, want 1", st.ToNodePackets)
			}

			for _, tc := range []struct {
				name  string
				frame []byte
			}{
				{"larger than the route MTU: frag needed from the host", udpFrame(hostMAC, podMAC, podIP, remotePod, 1000, 2000, 64, 0, 1450)},
				{"TTL 1: time exceeded from the host", udpFrame(hostMAC, podMAC, podIP, remotePod, 1000, 2000, 1, 0, 8)},
				{"no route into that part of the cluster", udpFrame(hostMAC, podMAC, podIP, netip.MustParseAddr("10.9.7.7"), 1000, 2000, 64, 0, 8)},
				{"outside the cluster: the host masquerades", udpFrame(hostMAC, podMAC, podIP, outsider, 1000, 2000, 64, 0, 8)},
			} {
				if got, _ := runOn(t, objs.FromPod, idx, tc.frame); got != actUnspec {
					t.Errorf("%s: verdict %d, want the host path", tc.name, int32(got))
				}
			}
			// The connection to outside left a guard for its port: replies
			// arriving from another node go through conntrack.
			if ok, err := m.Guarded(podIP, 1000, 17); err != nil || !ok {
				t.Errorf("no NAT guard for %s:1000 after a datagram to outside: %v", podIP, err)
			}
		})
	}
}

// to_overlay (the VXLAN device's egress) gives each packet the tunnel of
// the node owning its destination and that node's VTEP MAC; a destination
// without a tunnel is dropped and counted.
func TestToOverlay(t *testing.T) {
	objs, m := load(t)
	vtep := net.HardwareAddr{0x0e, 0xeb, 10, 253, 0, 2}
	for _, c := range []netip.Prefix{netip.MustParsePrefix("10.8.1.0/24"), netip.MustParsePrefix("fd08:1::/64")} {
		if err := m.PutTunnel(c, maps.Tunnel{Node: netip.MustParseAddr("10.253.0.2"), VTEPMAC: vtep}); err != nil {
			t.Fatal(err)
		}
	}
	if err := m.ResetNodeStats(testIfindex); err != nil {
		t.Fatal(err)
	}
	for _, dst := range []netip.Addr{remotePod, remotePod6} {
		src := podIP
		if dst.Is6() {
			src = podIP6
		}
		got, out := run(t, objs.ToOverlay, udpFrame(lo, hostMAC, src, dst, 1, 2, 63, 0, 8))
		if got != actUnspec {
			t.Fatalf("%s: verdict %d, want on to the device", dst, int32(got))
		}
		if !bytes.Equal(out[0:6], vtep) {
			t.Errorf("%s: inner destination MAC %s, want the peer's VTEP %s", dst, net.HardwareAddr(out[0:6]), vtep)
		}
	}
	if got, _ := run(t, objs.ToOverlay, udpFrame(lo, hostMAC, podIP, netip.MustParseAddr("10.8.2.9"), 1, 2, 63, 0, 8)); got != actShot {
		t.Errorf("no tunnel: verdict %d, want drop", int32(got))
	}
	ns, err := m.NodeStats(testIfindex)
	if err != nil {
		t.Fatal(err)
	}
	if ns.EncapPackets != 2 || ns.DropNoTunnel != 1 {
		t.Errorf("counters: encapsulated %d, dropped %d; want 2 and 1", ns.EncapPackets, ns.DropNoTunnel)
	}
	tun, err := m.Tunnels()
	if err != nil || len(tun) != 2 || tun[netip.MustParsePrefix("10.8.1.0/24")].Node != netip.MustParseAddr("10.253.0.2") {
		t.Errorf("Tunnels() = %v, %v", tun, err)
	}
}
