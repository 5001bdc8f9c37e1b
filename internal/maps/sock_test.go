package maps_test

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"

	"github.com/ebpf-cni/ebpf-cni/internal/loader"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
)

// sockEnv is the socket programs attached to a test cgroup that holds this
// test process, with their maps pinned under a test pin root; clients run
// in a fresh network namespace with only loopback (an untranslated Service
// address fails there at once instead of leaving the machine).
type sockEnv struct {
	m      *maps.Maps
	netns  ns.NetNS
	nextID uint32
}

func newSockEnv(t *testing.T) *sockEnv {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("the socket load-balancing tests need root (cgroups, BPF); run them as root")
	}
	cgroot, err := loader.CgroupRoot()
	if err != nil {
		t.Fatal(err)
	}
	pinRoot := filepath.Join(loader.DefaultMount, fmt.Sprintf("ebt-sock-%d", os.Getpid()))
	t.Cleanup(func() { os.RemoveAll(pinRoot) })
	progs, err := loader.Ensure(pinRoot)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { progs.Close() })
	cg := filepath.Join(cgroot, fmt.Sprintf("ebt-sock-%d", os.Getpid()))
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	// Back to the hierarchy's root before the cgroup goes (a cgroup with
	// processes cannot be removed).
	t.Cleanup(func() {
		os.WriteFile(filepath.Join(cgroot, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0o644)
		loader.DetachCgroup(pinRoot)
		if err := os.Remove(cg); err != nil {
			t.Errorf("remove test cgroup: %v", err)
		}
	})
	if err := progs.AttachCgroup(cg); err != nil {
		t.Fatal(err)
	}
	if !progs.CgroupAttached(cg) {
		t.Fatal("CgroupAttached is false right after AttachCgroup")
	}
	if err := os.WriteFile(filepath.Join(cg, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		t.Fatalf("move the test into its cgroup: %v", err)
	}
	m, err := maps.Open(pinRoot)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	netns, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { netns.Close(); testutils.UnmountNS(netns) })
	netns.Do(func(ns.NetNS) error {
		lo, err := netlink.LinkByName("lo")
		if err == nil {
			err = netlink.LinkSetUp(lo)
		}
		if err != nil {
			t.Fatal(err)
		}
		return nil
	})
	return &sockEnv{m: m, netns: netns, nextID: 1}
}

// in runs fn in the test namespace (sockets made there stay there).
func (e *sockEnv) in(t *testing.T, fn func()) {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := e.netns.Do(func(ns.NetNS) error { fn(); return nil }); err != nil {
		t.Fatal(err)
	}
}

// service programs frontend f with backends (slot order) and returns its ID.
func (e *sockEnv) service(t *testing.T, f maps.Frontend, flags maps.SvcFlags, timeout uint32, backends ...netip.AddrPort) uint32 {
	t.Helper()
	id := e.nextID
	e.nextID++
	for i, b := range backends {
		bid := e.nextID
		e.nextID++
		must(t, e.m.PutBackend(bid, maps.Backend{Addr: b, Proto: f.Proto}))
		must(t, e.m.PutSlot(f, uint16(i+1), bid))
		if flags&maps.SvcAffinity != 0 {
			must(t, e.m.PutAffinityMatch(id, bid))
		}
	}
	must(t, e.m.PutService(f, maps.Service{ID: id, Count: uint16(len(backends)), Flags: flags, AffinityTimeout: timeout}))
	return id
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// tcpServers listen on addrs and answer every connection with their own
// address; they live in the test namespace.
func tcpServers(t *testing.T, addrs ...string) {
	t.Helper()
	for _, a := range addrs {
		var l net.Listener
		var err error
		func() {
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			l, err = net.Listen("tcp", a)
		}()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				io.WriteString(c, a)
				c.Close()
			}
		}()
	}
}

// dial connects to addr and returns what the server said and the peer
// address the socket reports.
func dial(network, addr string) (string, string, error) {
	c, err := net.DialTimeout(network, addr, 2*time.Second)
	if err != nil {
		return "", "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	b, err := io.ReadAll(c)
	return string(b), c.RemoteAddr().String(), err
}

var vip = netip.MustParseAddr("172.31.97.7")

func TestSockConnectTranslates(t *testing.T) {
	e := newSockEnv(t)
	f := maps.Frontend{Addr: vip, Port: 80, Proto: syscall.IPPROTO_TCP, Scope: maps.ScopeInt}
	e.in(t, func() {
		tcpServers(t, "127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083")
		e.service(t, f, 0, 0, netip.MustParseAddrPort("127.0.0.1:8081"), netip.MustParseAddrPort("127.0.0.1:8082"),
			netip.MustParseAddrPort("127.0.0.1:8083"))
		seen := map[string]int{}
		for range 60 {
			got, peer, err := dial("tcp", "172.31.97.7:80")
			if err != nil {
				t.Fatalf("connect to the Service: %v", err)
			}
			if peer != "172.31.97.7:80" {
				t.Fatalf("getpeername = %s, want the Service address", peer)
			}
			seen[got]++
		}
		if len(seen) != 3 {
			t.Errorf("60 connections reached %v, want all 3 backends", seen)
		}
		// Not a Service: untouched (no route in this namespace).
		if _, _, err := dial("tcp", "10.97.7.8:80"); !errors.Is(err, syscall.ENETUNREACH) {
			t.Errorf("connect to a non-Service address: %v, want ENETUNREACH (untranslated)", err)
		}
	})
	st, err := e.m.LBStats()
	must(t, err)
	if st.SockTranslated < 60 {
		t.Errorf("sock_translated = %d, want >= 60", st.SockTranslated)
	}
}

func TestSockRefusals(t *testing.T) {
	e := newSockEnv(t)
	e.service(t, maps.Frontend{Addr: vip, Port: 80, Proto: syscall.IPPROTO_TCP, Scope: maps.ScopeInt}, 0, 0)
	e.service(t, maps.Frontend{Addr: vip, Port: 53, Proto: syscall.IPPROTO_UDP, Scope: maps.ScopeInt}, 0, 0)
	e.service(t, maps.Frontend{Addr: vip, Scope: maps.ScopeInt}, maps.SvcAddress, 0)
	must(t, e.m.PutServiceCIDR(netip.MustParsePrefix("172.31.0.0/16")))
	e.in(t, func() {
		for _, c := range []struct{ network, addr, what string }{
			{"tcp", "172.31.97.7:80", "TCP to a Service without endpoints"},
			{"udp", "172.31.97.7:53", "UDP connect to a Service without endpoints"},
			{"tcp", "172.31.97.7:81", "a port the Service address does not serve"},
			{"tcp", "172.31.99.9:80", "an address of the Service range no Service has"},
		} {
			start := time.Now()
			_, _, err := dial(c.network, c.addr)
			if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("%s: %v, want ECONNREFUSED", c.what, err)
			}
			if d := time.Since(start); d > time.Second {
				t.Errorf("%s: refused after %s, want at once", c.what, d)
			}
		}
		// Unconnected UDP: sendto fails at once too.
		pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
		must(t, err)
		defer pc.Close()
		if _, err := pc.WriteTo([]byte("x"), net.UDPAddrFromAddrPort(netip.MustParseAddrPort("172.31.97.7:53"))); !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("sendto a Service without endpoints: %v, want ECONNREFUSED", err)
		}
	})
}

// udpEcho answers each datagram with the server's own address, from addr.
func udpEcho(t *testing.T, network, addr string) {
	t.Helper()
	var pc net.PacketConn
	var err error
	func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		pc, err = net.ListenPacket(network, addr)
	}()
	must(t, err)
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 65536)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo([]byte(addr), from)
		}
	}()
}

func TestSockUDP(t *testing.T) {
	e := newSockEnv(t)
	vip6 := netip.MustParseAddr("fd00:96::7")
	e.service(t, maps.Frontend{Addr: vip, Port: 53, Proto: syscall.IPPROTO_UDP, Scope: maps.ScopeInt}, 0, 0,
		netip.MustParseAddrPort("127.0.0.1:5301"))
	e.service(t, maps.Frontend{Addr: vip6, Port: 53, Proto: syscall.IPPROTO_UDP, Scope: maps.ScopeInt}, 0, 0,
		netip.MustParseAddrPort("[::1]:5302"))
	e.in(t, func() {
		udpEcho(t, "udp4", "127.0.0.1:5301")
		udpEcho(t, "udp6", "[::1]:5302")
		buf := make([]byte, 100)
		for _, c := range []struct{ network, local, svc, backend string }{
			{"udp4", "127.0.0.1:0", "172.31.97.7:53", "127.0.0.1:5301"},
			{"udp6", "[::1]:0", "[fd00:96::7]:53", "[::1]:5302"},
			// a dual-stack socket talking IPv4 (v4-mapped: connect6,
			// sendmsg4, recvmsg6)
			{"udp", ":0", "172.31.97.7:53", "127.0.0.1:5301"},
		} {
			// Unconnected: sendto the Service, the reply's source is the Service.
			pc, err := net.ListenPacket(c.network, c.local)
			must(t, err)
			svc := netip.MustParseAddrPort(c.svc)
			if _, err := pc.WriteTo([]byte("q"), net.UDPAddrFromAddrPort(svc)); err != nil {
				t.Fatalf("%s sendto %s: %v", c.network, c.svc, err)
			}
			pc.SetReadDeadline(time.Now().Add(2 * time.Second))
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				t.Fatalf("%s: no reply from %s: %v", c.network, c.svc, err)
			}
			if got := from.(*net.UDPAddr).AddrPort(); netip.AddrPortFrom(got.Addr().Unmap(), got.Port()) != svc {
				t.Errorf("%s: reply from %s, want the Service address %s", c.network, got, svc)
			}
			if string(buf[:n]) != c.backend {
				t.Errorf("%s: answered by %q, want %s", c.network, buf[:n], c.backend)
			}
			pc.Close()
			// Connected.
			conn, err := net.Dial(c.network, c.svc)
			must(t, err)
			if got := conn.RemoteAddr().(*net.UDPAddr).AddrPort(); netip.AddrPortFrom(got.Addr().Unmap(), got.Port()) != svc {
				t.Errorf("%s connected: peer %s, want %s", c.network, got, svc)
			}
			conn.Write([]byte("q"))
			conn.SetReadDeadline(time.Now().Add(2 * time.Second))
			if n, err := conn.Read(buf); err != nil || string(buf[:n]) != c.backend {
				t.Errorf("%s connected: %q %v, want %s", c.network, buf[:n], err, c.backend)
			}
			conn.Close()
		}
	})
}

// A closed backend port is reported to a connected UDP client of the
// Service as ECONNREFUSED (the ICMP error quotes the backend's address,
// which the socket is connected to).
func TestSockUDPRefusedBackendPort(t *testing.T) {
	e := newSockEnv(t)
	e.service(t, maps.Frontend{Addr: vip, Port: 53, Proto: syscall.IPPROTO_UDP, Scope: maps.ScopeInt}, 0, 0,
		netip.MustParseAddrPort("127.0.0.1:5399")) // nobody listens
	e.in(t, func() {
		conn, err := net.Dial("udp", "172.31.97.7:53")
		must(t, err)
		defer conn.Close()
		buf := make([]byte, 10)
		var rerr error
		for range 5 {
			conn.Write([]byte("q"))
			conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			if _, rerr = conn.Read(buf); errors.Is(rerr, syscall.ECONNREFUSED) {
				return
			}
		}
		t.Errorf("UDP to a Service whose backend port is closed: %v, want ECONNREFUSED", rerr)
	})
}

func TestSockAffinityAndNodePort(t *testing.T) {
	e := newSockEnv(t)
	backends := []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:8091"), netip.MustParseAddrPort("127.0.0.1:8092"),
		netip.MustParseAddrPort("127.0.0.1:8093")}
	e.service(t, maps.Frontend{Addr: vip, Port: 80, Proto: syscall.IPPROTO_TCP, Scope: maps.ScopeInt}, maps.SvcAffinity, 10800, backends...)
	// NodePort 30080 on the node's address 127.0.0.2.
	must(t, e.m.PutNodeAddr(netip.MustParseAddr("127.0.0.2")))
	e.service(t, maps.Frontend{Addr: netip.IPv4Unspecified(), Port: 30080, Proto: syscall.IPPROTO_TCP, Scope: maps.ScopeInt},
		maps.SvcNodePort, 0, backends[2])
	e.in(t, func() {
		tcpServers(t, "127.0.0.1:8091", "127.0.0.1:8092", "127.0.0.1:8093")
		first, _, err := dial("tcp", "172.31.97.7:80")
		must(t, err)
		for range 30 {
			got, _, err := dial("tcp", "172.31.97.7:80")
			must(t, err)
			if got != first {
				t.Fatalf("session affinity: a connection went to %s after %s", got, first)
			}
		}
		got, peer, err := dial("tcp", "127.0.0.2:30080")
		if err != nil || got != "127.0.0.1:8093" || peer != "127.0.0.2:30080" {
			t.Errorf("NodePort on a node address: %q peer %s %v, want 127.0.0.1:8093 peer 127.0.0.2:30080", got, peer, err)
		}
	})
}
