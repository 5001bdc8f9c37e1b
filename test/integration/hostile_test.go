package integration

import (
	"bytes"
	"encoding/binary"

	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func dualNode(t *testing.T) *node {
	t.Helper()
	n := newNode(t, map[string]any{"ranges": [][]map[string]string{{{"subnet": "10.250.0.0/24"}}, {{"subnet": "fd00:250::/120"}}}})
	n.writeConflist()
	return n
}

// A pod that changes its MAC loses its permanent gateway neighbours (the
// kernel flushes them) and is cut off while it sends from a MAC that is
// not its own (anti-spoofing); back on its own MAC it reaches its gateway
// again, because from_pod answers ARP and ND for 169.254.1.1 and fe80::1.
func TestPodMACChange(t *testing.T) {
	n := dualNode(t)
	a, b := n.newNS(), n.newNS()
	n.add(a)
	n.add(b)
	for _, v6 := range []bool{false, true} {
		a.ping(b.ip(v6))
	}
	orig := podMAC(t, a)
	if out, err := a.run("ip", "link", "set", "eth0", "address", "0a:58:de:ad:be:ef"); err != nil {
		t.Fatalf("set MAC: %v: %s", err, out)
	}
	for _, v6 := range []bool{false, true} {
		if out, err := a.run("ping", "-c", "1", "-W", "1", b.ip(v6).String()); err == nil {
			t.Errorf("ping from a forged MAC went through: %s", out)
		}
	}
	if out, err := a.run("ip", "link", "set", "eth0", "address", orig); err != nil {
		t.Fatalf("restore MAC: %v: %s", err, out)
	}
	if out, _ := a.run("ip", "neigh", "show", "169.254.1.1"); strings.Contains(string(out), "PERMANENT") {
		t.Fatalf("the permanent gateway entry survived the MAC change; the test proves nothing: %s", out)
	}
	for _, v6 := range []bool{false, true} {
		if out, err := a.run("ping", "-c", "2", "-W", "2", b.ip(v6).String()); err != nil {
			t.Errorf("after restoring its MAC, %s -> %s: %v\n%s", a.ns, b.ip(v6), err, out)
		}
	}
	if out, _ := a.run("ip", "neigh", "show", "169.254.1.1"); !strings.Contains(string(out), "0a:eb:") {
		t.Errorf("the gateway resolved to %q, want the host veth's MAC (0a:eb:...)", out)
	}
}

func podMAC(t *testing.T, p *pod) string {
	t.Helper()
	var mac string
	err := inNS(p.path, func() error {
		l, err := netlink.LinkByName("eth0")
		if err == nil {
			mac = l.Attrs().HardwareAddr.String()
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return mac
}

// sendRaw writes Ethernet frames out of the pod's eth0 (AF_PACKET), as a
// hostile process in the pod could.
func sendRaw(t *testing.T, p *pod, frames ...[]byte) {
	t.Helper()
	err := inNS(p.path, func() error {
		ifc, err := net.InterfaceByName("eth0")
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		for _, f := range frames {
			if err := unix.Sendto(fd, f, 0, &unix.SockaddrLinklayer{Ifindex: ifc.Index, Halen: 6}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("send raw frames from %s: %v", p.ns, err)
	}
}

func mac(t *testing.T, s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// A hostile pod claims a neighbour's addresses with real frames:
// gratuitous ARP and unsolicited neighbour advertisements for the victim's
// IPv4 and IPv6 address, from its own MAC and from the victim's; a
// VLAN-tagged frame; a link-local source towards the victim. None reaches
// the victim or the host's neighbour tables, each is counted as a drop, and
// the victim keeps talking.
func TestSpoofedNeighbourClaims(t *testing.T) {
	n := dualNode(t)
	attacker, victim, peer := n.newNS(), n.newNS(), n.newNS()
	for _, p := range []*pod{attacker, victim, peer} {
		n.add(p)
	}
	am, vm := mac(t, podMAC(t, attacker)), mac(t, podMAC(t, victim))
	bcast := net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	v4, v6 := victim.ip(false), victim.ip(true)
	frames := [][]byte{
		garp(bcast, am, am, v4),                       // "10.250.0.x is at my MAC"
		garp(bcast, vm, vm, v4),                       // the same, from the victim's MAC
		ndAdvert(bcast, am, podLinkLocal(am), v6, am), // "fd00:250::x is at my MAC"
		vlanTagged(bcast, am, 7),
	}
	before := n.inspect()[attacker.ip(false)].Counters
	for i := 0; i < 5; i++ {
		sendRaw(t, attacker, frames...)
	}
	time.Sleep(200 * time.Millisecond)
	after := n.inspect()[attacker.ip(false)].Counters
	if got := after.DropSpoofedIp - before.DropSpoofedIp; got < 5 {
		t.Errorf("spoofed-IP drops grew by %d, want >= 5 (gratuitous ARP, advertisements)", got)
	}
	if got := after.DropSpoofedMac - before.DropSpoofedMac; got < 5 {
		t.Errorf("spoofed-MAC drops grew by %d, want >= 5 (frames from the victim's MAC)", got)
	}
	if got := after.DropProtocol - before.DropProtocol; got < 5 {
		t.Errorf("protocol drops grew by %d, want >= 5 (VLAN tags)", got)
	}
	// The host learnt nothing on the attacker's veth.
	neighs, err := netlink.NeighList(hostIfindex(t, n, attacker), netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	for _, ng := range neighs {
		if a, _ := netip.AddrFromSlice(ng.IP); a.Unmap() == v4 || a == v6 {
			t.Errorf("the host learnt %s on the attacker's veth: %+v", a, ng)
		}
	}
	// The victim still talks to its peer, both families.
	for _, v6 := range []bool{false, true} {
		peer.ping(victim.ip(v6))
		tcp(t, peer, victim, victim.ip(v6))
	}
}

// veth returns the ifindex of a pod's host veth.
func hostIfindex(t *testing.T, n *node, p *pod) int {
	t.Helper()
	e := n.inspect()[p.ip(false)]
	return e.HostIfindex
}

func garp(dst, src, sender net.HardwareAddr, ip netip.Addr) []byte {
	var b bytes.Buffer
	b.Write(dst)
	b.Write(src)
	binary.Write(&b, binary.BigEndian, uint16(0x0806))
	binary.Write(&b, binary.BigEndian, []uint16{1, 0x0800})
	b.Write([]byte{6, 4, 0, 2}) // reply: gratuitous
	a := ip.As4()
	b.Write(sender)
	b.Write(a[:])
	b.Write(dst)
	b.Write(a[:])
	return pad60(b.Bytes())
}

func podLinkLocal(m net.HardwareAddr) netip.Addr {
	return netip.AddrFrom16([16]byte{0xfe, 0x80, 8: m[0] ^ 2, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]})
}

// ndAdvert is an unsolicited, overriding neighbour advertisement.
func ndAdvert(dst, src net.HardwareAddr, from, target netip.Addr, ll net.HardwareAddr) []byte {
	msg := make([]byte, 32)
	msg[0] = 136
	binary.BigEndian.PutUint32(msg[4:], 0x20000000) // override
	t := target.As16()
	copy(msg[8:], t[:])
	msg[24], msg[25] = 2, 1
	copy(msg[26:], ll)
	all := netip.MustParseAddr("ff02::1")
	var p bytes.Buffer
	s, d := from.As16(), all.As16()
	p.Write(s[:])
	p.Write(d[:])
	binary.Write(&p, binary.BigEndian, uint32(len(msg)))
	binary.Write(&p, binary.BigEndian, uint32(58))
	p.Write(msg)
	binary.BigEndian.PutUint16(msg[2:], checksum(p.Bytes()))
	var b bytes.Buffer
	b.Write(dst)
	b.Write(src)
	binary.Write(&b, binary.BigEndian, uint16(0x86dd))
	ip := make([]byte, 40)
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], uint16(len(msg)))
	ip[6], ip[7] = 58, 255
	copy(ip[8:], s[:])
	copy(ip[24:], d[:])
	b.Write(ip)
	b.Write(msg)
	return b.Bytes()
}

func vlanTagged(dst, src net.HardwareAddr, vid uint16) []byte {
	var b bytes.Buffer
	b.Write(dst)
	b.Write(src)
	binary.Write(&b, binary.BigEndian, []uint16{0x8100, vid, 0x0806})
	b.Write(make([]byte, 28))
	return pad60(b.Bytes())
}

func pad60(f []byte) []byte {
	if len(f) < 60 {
		f = append(f, make([]byte, 60-len(f))...)
	}
	return f
}

func checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}
