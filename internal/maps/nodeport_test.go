package maps_test

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/ebpf-cni/ebpf-cni/internal/loader"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
)

// l4Frame is a TCP segment (flags) or UDP datagram (proto 17) with valid
// IP and L4 checksums.
func l4Frame(dstMAC, srcMAC net.HardwareAddr, src, dst netip.AddrPort, proto byte, flags byte) []byte {
	var l4 []byte
	if proto == syscall.IPPROTO_TCP {
		l4 = make([]byte, 20+4)
		l4[12], l4[13] = 5<<4, flags
		copy(l4[20:], "data")
	} else {
		l4 = make([]byte, 8+4)
		binary.BigEndian.PutUint16(l4[4:], uint16(len(l4)))
		copy(l4[8:], "data")
	}
	binary.BigEndian.PutUint16(l4[0:], src.Port())
	binary.BigEndian.PutUint16(l4[2:], dst.Port())
	var b bytes.Buffer
	b.Write(dstMAC)
	b.Write(srcMAC)
	ipHeader(&b, src.Addr(), dst.Addr(), proto, 64, 0, len(l4))
	csumAt := 16
	if proto == syscall.IPPROTO_UDP {
		csumAt = 6
	}
	binary.BigEndian.PutUint16(l4[csumAt:], l4Checksum(src.Addr(), dst.Addr(), proto, l4))
	b.Write(l4)
	return b.Bytes()
}

// l4Checksum is the TCP/UDP checksum of l4 (its checksum field zero or
// not: a valid segment sums to 0).
func l4Checksum(src, dst netip.Addr, proto byte, l4 []byte) uint16 {
	var pseudo []byte
	pseudo = append(pseudo, src.AsSlice()...)
	pseudo = append(pseudo, dst.AsSlice()...)
	pseudo = append(pseudo, 0, proto)
	pseudo = binary.BigEndian.AppendUint16(pseudo, uint16(len(l4)))
	data := append(pseudo, l4...)
	if len(data)%2 == 1 {
		data = append(data, 0)
	}
	return ipChecksum(data)
}

// tuple is what a frame carries: addresses, ports, and whether its
// checksums verify.
type tuple struct {
	src, dst netip.AddrPort
	ttl      byte
	csumOK   bool
}

func tupleOf(f []byte, proto byte) tuple {
	var t tuple
	var l4 []byte
	var s, d netip.Addr
	if binary.BigEndian.Uint16(f[12:]) == 0x0800 {
		ip := f[14:34]
		s, d = netip.AddrFrom4([4]byte(ip[12:16])), netip.AddrFrom4([4]byte(ip[16:20]))
		l4 = f[34 : 14+int(binary.BigEndian.Uint16(ip[2:]))]
		t.ttl = ip[8]
		t.csumOK = ipChecksum(ip) == 0
	} else {
		ip := f[14:54]
		s, d = netip.AddrFrom16([16]byte(ip[8:24])), netip.AddrFrom16([16]byte(ip[24:40]))
		l4 = f[54 : 54+int(binary.BigEndian.Uint16(ip[4:]))]
		t.ttl = ip[7]
		t.csumOK = true
	}
	t.src = netip.AddrPortFrom(s, binary.BigEndian.Uint16(l4[0:]))
	t.dst = netip.AddrPortFrom(d, binary.BigEndian.Uint16(l4[2:]))
	t.csumOK = t.csumOK && l4Checksum(s, d, proto, l4) == 0
	return t
}

// NodePorts and external IPs from outside: from_node translates the first
// packet of a flow (destination to the backend; the source to the node
// with externalTrafficPolicy Cluster), sends it into a local pod or back
// out to another node, and from_pod / from_node translate the replies, all
// with valid checksums. Flows the Service cannot take go to the host or
// are dropped as kube-proxy would.
func TestNodePort(t *testing.T) {
	n := newTestNode(t, true)
	objs, err := loader.LoadUnpinned()
	if err != nil {
		t.Fatal(err)
	}
	defer objs.Close()
	m := maps.FromObjects(objs)
	withCluster(t, m)
	up := n.uplink.Attrs()
	pod := n.podIf.Attrs().Index
	must(t, m.PutDevice(pod, maps.Device{PodMAC: peerPod, HostMAC: peerHost, IPv4: peerIP, IPv6: peerIP6}))
	for _, ip := range []netip.Addr{peerIP, peerIP6} {
		must(t, m.PutEndpoint(maps.Endpoint{IP: ip, Ifindex: pod, PodMAC: peerPod, HostMAC: peerHost}))
	}
	// The client's network and IPv6 on the uplink.
	_, cn, _ := net.ParseCIDR("192.0.2.0/24")
	must(t, netlink.RouteAdd(&netlink.Route{Dst: cn, Gw: net.ParseIP("10.77.0.2"), LinkIndex: up.Index}))
	a6, _ := netlink.ParseAddr("fd77::1/64")
	a6.Flags = syscall.IFA_F_NODAD
	must(t, netlink.AddrAdd(n.uplink, a6))
	must(t, netlink.NeighSet(&netlink.Neigh{LinkIndex: up.Index, IP: net.ParseIP("fd77::2"), HardwareAddr: n.gwMAC, State: netlink.NUD_PERMANENT}))
	_, cn6, _ := net.ParseCIDR("fd00:192::/64")
	must(t, netlink.RouteAdd(&netlink.Route{Dst: cn6, Gw: net.ParseIP("fd77::2"), LinkIndex: up.Index}))

	must(t, os.WriteFile("/proc/sys/net/ipv6/conf/all/forwarding", []byte("1"), 0o644))
	node, node6 := netip.MustParseAddr("10.77.0.1"), netip.MustParseAddr("fd77::1")
	must(t, m.PutNodeAddr(node))
	must(t, m.PutNodeAddr(node6))
	must(t, m.SetSNAT(node, false))
	must(t, m.SetSNAT(node6, true))
	local := netip.AddrPortFrom(peerIP, 8080)
	remote := netip.AddrPortFrom(remotePod, 8080)
	id := uint32(0)
	svc := func(addr netip.Addr, port uint16, proto uint8, flags maps.SvcFlags, backends ...netip.AddrPort) {
		id++
		f := maps.Frontend{Addr: addr, Port: port, Proto: proto, Scope: maps.ScopeExt}
		fid := id
		for i, b := range backends {
			id++
			must(t, m.PutBackend(id, maps.Backend{Addr: b, Proto: proto}))
			must(t, m.PutSlot(f, uint16(i+1), id))
		}
		must(t, m.PutService(f, maps.Service{ID: fid, Count: uint16(len(backends)), Flags: flags}))
	}
	any4, any6 := netip.IPv4Unspecified(), netip.IPv6Unspecified()
	svc(any4, 30080, syscall.IPPROTO_TCP, maps.SvcNodePort, local)
	svc(any4, 30081, syscall.IPPROTO_TCP, maps.SvcNodePort|maps.SvcLocal, local)
	svc(any4, 30082, syscall.IPPROTO_UDP, maps.SvcNodePort, remote)
	svc(any4, 30083, syscall.IPPROTO_TCP, maps.SvcNodePort|maps.SvcLocal)
	svc(any4, 30084, syscall.IPPROTO_TCP, maps.SvcNodePort)
	svc(netip.MustParseAddr("203.0.113.7"), 80, syscall.IPPROTO_TCP, maps.SvcExternal, local)
	svc(any6, 30085, syscall.IPPROTO_UDP, maps.SvcNodePort, netip.AddrPortFrom(peerIP6, 8080))

	client := netip.MustParseAddrPort("192.0.2.9:40000")
	in := func(dst netip.AddrPort, src netip.AddrPort, proto, flags byte) (uint32, tuple, []byte) {
		t.Helper()
		got, out := runOn(t, objs.FromNode, up.Index, l4Frame(up.HardwareAddr, n.gwMAC, src, dst, proto, flags))
		return got, tupleOf(out, proto), out
	}
	fromPod := func(src, dst netip.AddrPort, proto, flags byte) (uint32, tuple, []byte) {
		t.Helper()
		got, out := runOn(t, objs.FromPod, pod, l4Frame(peerHost, peerPod, src, dst, proto, flags))
		return got, tupleOf(out, proto), out
	}
	const syn, synack = 0x02, 0x12
	// Steps run in this goroutine: the test's network namespace belongs to
	// its OS thread.
	step := func(name string, fn func()) {
		t.Logf("step: %s", name)
		fn()
	}

	step("externalTrafficPolicy Cluster, local backend", func() {
		got, tp, out := in(netip.AddrPortFrom(node, 30080), client, syscall.IPPROTO_TCP, syn)
		if got != actRedirect {
			t.Fatalf("verdict %d, want redirect into the pod", int32(got))
		}
		if tp.dst != local || tp.src.Addr() != node || tp.src.Port() < 61000 || !tp.csumOK || tp.ttl != 63 {
			t.Fatalf("translated to %+v, want %s -> %s:61000+ with valid checksums, TTL 63", tp, local, node)
		}
		if !bytes.Equal(out[0:6], peerPod) {
			t.Errorf("destination MAC %s, want the pod's", net.HardwareAddr(out[0:6]))
		}
		// The pod's answer goes back out to the client, as the NodePort.
		got, rp, out := fromPod(local, tp.src, syscall.IPPROTO_TCP, synack)
		if got != actRedirect {
			t.Fatalf("reply verdict %d, want redirect", int32(got))
		}
		if rp.src != netip.AddrPortFrom(node, 30080) || rp.dst != client || !rp.csumOK {
			t.Errorf("reply translated to %+v, want %s:30080 -> %s, valid checksums", rp, node, client)
		}
		if !bytes.Equal(out[0:6], n.gwMAC) {
			t.Errorf("reply MAC %s, want the gateway's", net.HardwareAddr(out[0:6]))
		}
		// The client's next segment takes the same translation.
		if got, tp2, _ := in(netip.AddrPortFrom(node, 30080), client, syscall.IPPROTO_TCP, 0x10); got != actRedirect || tp2.src != tp.src || tp2.dst != local {
			t.Errorf("second segment: verdict %d %+v, want the flow's translation %+v", int32(got), tp2, tp)
		}
	})
	step("externalTrafficPolicy Local keeps the client address", func() {
		c := netip.MustParseAddrPort("192.0.2.9:40001")
		got, tp, _ := in(netip.AddrPortFrom(node, 30081), c, syscall.IPPROTO_TCP, syn)
		if got != actRedirect || tp.src != c || tp.dst != local || !tp.csumOK {
			t.Fatalf("verdict %d %+v, want %s -> %s", int32(got), tp, c, local)
		}
		got, rp, _ := fromPod(local, c, syscall.IPPROTO_TCP, synack)
		if got != actRedirect || rp.src != netip.AddrPortFrom(node, 30081) || rp.dst != c || !rp.csumOK {
			t.Errorf("reply: verdict %d %+v, want %s:30081 -> %s", int32(got), rp, node, c)
		}
	})
	step("backend on another node: masqueraded both ways", func() {
		c := netip.MustParseAddrPort("192.0.2.9:40002")
		got, tp, _ := in(netip.AddrPortFrom(node, 30082), c, syscall.IPPROTO_UDP, 0)
		if got != actRedirect || tp.dst != remote || tp.src.Addr() != node || !tp.csumOK {
			t.Fatalf("verdict %d %+v, want %s -> %s", int32(got), tp, node, remote)
		}
		got, rp, _ := in(tp.src, remote, syscall.IPPROTO_UDP, 0) // the reply comes back to the node
		if got != actRedirect || rp.src != netip.AddrPortFrom(node, 30082) || rp.dst != c || !rp.csumOK {
			t.Errorf("reply: verdict %d %+v, want %s:30082 -> %s", int32(got), rp, node, c)
		}
	})
	step("external IP", func() {
		c := netip.MustParseAddrPort("192.0.2.9:40003")
		got, tp, _ := in(netip.MustParseAddrPort("203.0.113.7:80"), c, syscall.IPPROTO_TCP, syn)
		if got != actRedirect || tp.dst != local || tp.src.Addr() != node || !tp.csumOK {
			t.Errorf("verdict %d %+v, want masqueraded to %s -> %s", int32(got), tp, node, local)
		}
	})
	step("IPv6", func() {
		c := netip.MustParseAddrPort("[fd00:192::9]:40004")
		got, tp, _ := in(netip.AddrPortFrom(node6, 30085), c, syscall.IPPROTO_UDP, 0)
		if got != actRedirect || tp.dst != netip.AddrPortFrom(peerIP6, 8080) || tp.src.Addr() != node6 || !tp.csumOK {
			t.Fatalf("verdict %d %+v, want %s -> [%s]:8080", int32(got), tp, node6, peerIP6)
		}
		got, rp, _ := fromPod(tp.dst, tp.src, syscall.IPPROTO_UDP, 0)
		if got != actRedirect || rp.src != netip.AddrPortFrom(node6, 30085) || rp.dst != c || !rp.csumOK {
			t.Errorf("reply: verdict %d %+v, want [%s]:30085 -> %s", int32(got), rp, node6, c)
		}
	})
	for _, c := range []struct {
		name string
		port uint16
		want uint32
	}{
		{"Local with endpoints on other nodes only: dropped", 30083, actShot},
		{"no endpoint at all: the host refuses", 30084, actUnspec},
		{"not a NodePort: the host's", 22, actUnspec},
	} {
		if got, _, _ := in(netip.AddrPortFrom(node, c.port), netip.MustParseAddrPort("192.0.2.9:40100"), syscall.IPPROTO_TCP, syn); got != c.want {
			t.Errorf("%s: verdict %d, want %d", c.name, int32(got), int32(c.want))
		}
	}
	st, err := m.LBStats()
	must(t, err)
	if st.NodeportNew != 5 || st.NodeportDropped != 1 {
		t.Errorf("counters: %d new flows, %d dropped; want 5 and 1", st.NodeportNew, st.NodeportDropped)
	}
	// Idle flows go, both directions at once.
	flows, _ := m.NATFlows()
	if flows != 10 {
		t.Errorf("lb_nat_v1 holds %d entries, want 10 (5 flows, both ways)", flows)
	}
	gone, err := m.SweepNAT(time.Duration(1<<62), maps.NATTimeouts{TCP: time.Hour, Closing: time.Second, UDP: time.Minute})
	must(t, err)
	if flows, _ := m.NATFlows(); gone != 5 || flows != 0 {
		t.Errorf("sweep removed %d flows, %d entries left; want 5 and 0", gone, flows)
	}
}
