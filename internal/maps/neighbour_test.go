package maps_test

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
)

var (
	gw4      = netip.MustParseAddr("169.254.1.1")
	gw6      = netip.MustParseAddr("fe80::1")
	podLL    = netip.MustParseAddr("fe80::858:1ff:fe00:1")
	solicitd = netip.MustParseAddr("ff02::1:ff00:1")
)

// icmp6Frame is an IPv6 frame carrying an ICMPv6 neighbour message: type,
// flags word, target and one link-layer option (optType, optMAC), with a
// correct checksum.
func icmp6Frame(dstMAC, srcMAC net.HardwareAddr, src, dst netip.Addr, typ byte, flags uint32, target netip.Addr, optType byte, optMAC net.HardwareAddr) []byte {
	msg := make([]byte, 32)
	msg[0] = typ
	binary.BigEndian.PutUint32(msg[4:], flags)
	t := target.As16()
	copy(msg[8:], t[:])
	msg[24], msg[25] = optType, 1
	copy(msg[26:], optMAC)
	binary.BigEndian.PutUint16(msg[2:], icmp6Checksum(src, dst, msg))
	var b bytes.Buffer
	b.Write(dstMAC)
	b.Write(srcMAC)
	binary.Write(&b, binary.BigEndian, uint16(0x86dd))
	ip := make([]byte, 40)
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], uint16(len(msg)))
	ip[6], ip[7] = 58, 255
	s, d := src.As16(), dst.As16()
	copy(ip[8:], s[:])
	copy(ip[24:], d[:])
	b.Write(ip)
	b.Write(msg)
	return padFrame(b.Bytes())
}

func icmp6Checksum(src, dst netip.Addr, msg []byte) uint16 {
	var p bytes.Buffer
	s, d := src.As16(), dst.As16()
	p.Write(s[:])
	p.Write(d[:])
	binary.Write(&p, binary.BigEndian, uint32(len(msg)))
	binary.Write(&p, binary.BigEndian, uint32(58))
	m := bytes.Clone(msg)
	m[2], m[3] = 0, 0
	p.Write(m)
	return ipChecksum(p.Bytes())
}

// A pod that lost its permanent neighbour entries (a MAC change flushes
// them) asks for its gateway: from_pod answers ARP for 169.254.1.1 and
// neighbour solicitations for fe80::1 with the host veth's MAC, back to the
// pod, and nothing on the host has to.
func TestGatewayResponder(t *testing.T) {
	objs, _ := load(t)
	req := arpFrame(podMAC, podMAC, podIP, gw4)
	got, out := run(t, objs.FromPod, req)
	if got != actRedirect {
		t.Fatalf("ARP request for the gateway: verdict %d, want the reply sent back (redirect)", int32(got))
	}
	arp := out[14:]
	switch {
	case !bytes.Equal(out[0:6], podMAC) || !bytes.Equal(out[6:12], hostMAC):
		t.Errorf("reply MACs %s <- %s", net.HardwareAddr(out[0:6]), net.HardwareAddr(out[6:12]))
	case binary.BigEndian.Uint16(arp[6:]) != 2:
		t.Errorf("op %d, want reply", binary.BigEndian.Uint16(arp[6:]))
	case !bytes.Equal(arp[8:14], hostMAC) || netip.AddrFrom4([4]byte(arp[14:18])) != gw4:
		t.Errorf("sender %s %s, want the host veth's MAC for %s", net.HardwareAddr(arp[8:14]), netip.AddrFrom4([4]byte(arp[14:18])), gw4)
	case !bytes.Equal(arp[18:24], podMAC) || netip.AddrFrom4([4]byte(arp[24:28])) != podIP:
		t.Errorf("target %s %s, want the pod", net.HardwareAddr(arp[18:24]), netip.AddrFrom4([4]byte(arp[24:28])))
	}
	// ARP for anything else is the host's business; a spoofed asker is dropped.
	if got, _ := run(t, objs.FromPod, arpFrame(podMAC, podMAC, podIP, peerIP)); got != actUnspec {
		t.Errorf("ARP for another address: verdict %d, want pass", int32(got))
	}
	if got, _ := run(t, objs.FromPod, arpFrame(podMAC, podMAC, peerIP, gw4)); got != actShot {
		t.Errorf("ARP for the gateway with another pod's sender IP: verdict %d, want drop", int32(got))
	}

	for _, src := range []netip.Addr{podLL, podIP6} {
		ns := icmp6Frame(net.HardwareAddr{0x33, 0x33, 0xff, 0, 0, 1}, podMAC, src, solicitd, 135, 0, gw6, 1, podMAC)
		got, out := run(t, objs.FromPod, ns)
		if got != actRedirect {
			t.Fatalf("solicitation for fe80::1 from %s: verdict %d, want the advertisement sent back", src, int32(got))
		}
		ip, msg := out[14:54], out[54:86]
		s, d := netip.AddrFrom16([16]byte(ip[8:24])), netip.AddrFrom16([16]byte(ip[24:40]))
		switch {
		case !bytes.Equal(out[0:6], podMAC) || !bytes.Equal(out[6:12], hostMAC):
			t.Errorf("NA MACs %s <- %s", net.HardwareAddr(out[0:6]), net.HardwareAddr(out[6:12]))
		case s != gw6 || d != src || ip[7] != 255:
			t.Errorf("NA %s -> %s hop limit %d, want fe80::1 -> %s 255", s, d, ip[7], src)
		case msg[0] != 136 || binary.BigEndian.Uint32(msg[4:]) != 0xe0000000:
			t.Errorf("type %d flags %#x, want an advertisement (router, solicited, override)", msg[0], binary.BigEndian.Uint32(msg[4:]))
		case netip.AddrFrom16([16]byte(msg[8:24])) != gw6 || msg[24] != 2 || !bytes.Equal(msg[26:32], hostMAC):
			t.Errorf("target %s option %d %s", netip.AddrFrom16([16]byte(msg[8:24])), msg[24], net.HardwareAddr(msg[26:32]))
		case binary.BigEndian.Uint16(msg[2:]) != icmp6Checksum(s, d, msg):
			t.Errorf("checksum %#x, want %#x", binary.BigEndian.Uint16(msg[2:]), icmp6Checksum(s, d, msg))
		}
	}
	// Advertisements: for the pod's own address or a link-local one pass;
	// claiming another pod's address is dropped.
	for _, tc := range []struct {
		target netip.Addr
		want   uint32
	}{{podIP6, actUnspec}, {podLL, actUnspec}, {peerIP6, actShot}, {netip.MustParseAddr("fd09::99"), actShot}} {
		na := icmp6Frame(net.HardwareAddr{0x33, 0x33, 0, 0, 0, 1}, podMAC, podLL, netip.MustParseAddr("ff02::1"), 136, 0x20000000, tc.target, 2, podMAC)
		if got, _ := run(t, objs.FromPod, na); got != tc.want {
			t.Errorf("advertisement for %s: verdict %d, want %d", tc.target, int32(got), int32(tc.want))
		}
	}
}
