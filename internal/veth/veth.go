// Package veth wires a pod with a veth pair and no bridge: the pod gets its
// addresses as /32 and /128, a default route via a link-local gateway that a
// permanent neighbour entry resolves to the host veth's MAC (nothing on the
// host has to answer ARP or ND), and the host gets a /32 (/128) route and a
// permanent neighbour entry per pod address on the host veth.
//
// The pod namespace is only entered through a netlink handle opened at it
// (closed after use); no goroutine ever runs inside it. Teardown is
// idempotent: a missing link, route or namespace is success.
package veth

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// HostPrefix starts the name of every host-side veth ebpf-cni creates.
const HostPrefix = "ebpf"

// The link-local gateways every pod routes through. The pod resolves them
// with a permanent neighbour entry to its host veth's MAC.
var (
	GatewayV4 = netip.MustParseAddr("169.254.1.1")
	GatewayV6 = netip.MustParseAddr("fe80::1")
)

var (
	// ErrIfExists is returned when CNI_IFNAME already exists in the pod.
	ErrIfExists = errors.New("interface already exists")
	// ErrNetNS is returned when the pod's network namespace cannot be opened.
	ErrNetNS = errors.New("cannot open network namespace")
)

func hash(containerID, ifname string) []byte {
	sum := sha256.Sum256([]byte(containerID + "/" + ifname))
	return sum[:]
}

// HostName is the host veth's name for an attachment: HostPrefix and 11 hex
// digits of a hash of (container ID, ifname), 15 characters in all.
func HostName(containerID, ifname string) string {
	return HostPrefix + hex.EncodeToString(hash(containerID, ifname))[:15-len(HostPrefix)]
}

// IsHostVeth reports whether name is a host veth name ebpf-cni makes.
func IsHostVeth(name string) bool {
	if len(name) != 15 || !strings.HasPrefix(name, HostPrefix) {
		return false
	}
	_, err := hex.DecodeString(name[len(HostPrefix):] + "0")
	return err == nil
}

// MACs derives both MACs of an attachment: locally administered unicast,
// stable across retries of the same ADD.
func MACs(containerID, ifname string) (pod, host net.HardwareAddr) {
	h := hash(containerID, ifname)
	pod = net.HardwareAddr{0x0a, 0x58, h[0], h[1], h[2], h[3]}
	host = net.HardwareAddr{0x0a, 0xeb, h[0], h[1], h[2], h[3]}
	return pod, host
}

// Pod describes the attachment to create or check.
type Pod struct {
	NetNS    string // path of the pod's network namespace
	IfName   string // CNI_IFNAME
	HostName string
	MTU      int
	PodMAC   net.HardwareAddr
	HostMAC  net.HardwareAddr
	Addrs    []netip.Addr   // the pod's addresses, one per family at most
	Routes   []netip.Prefix // destinations routed via the gateway of their family
}

// Link is one end of the pair as created.
type Link struct {
	Name    string
	Index   int
	MAC     net.HardwareAddr
	Sandbox string // the netns path for the pod end, empty on the host
}

func openNS(path string) (netns.NsHandle, *netlinksafe.Handle, error) {
	nsh, err := netns.GetFromPath(path)
	if err != nil {
		return 0, nil, fmt.Errorf("%w %s: %w", ErrNetNS, path, err)
	}
	h, err := netlinksafe.NewHandleAt(nsh)
	if err != nil {
		nsh.Close()
		return 0, nil, fmt.Errorf("%w %s (not a network namespace?): %w", ErrNetNS, path, err)
	}
	return nsh, &h, nil
}

func hostPrefix(a netip.Addr) netip.Prefix { return netip.PrefixFrom(a, a.BitLen()) }

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func gateway(a netip.Addr) netip.Addr {
	if a.Is4() {
		return GatewayV4
	}
	return GatewayV6
}

// Setup creates the pair and configures both ends. On error nothing it made
// is left behind.
func Setup(p Pod) (host, pod Link, retErr error) {
	nsh, h, err := openNS(p.NetNS)
	if err != nil {
		return host, pod, err
	}
	defer nsh.Close()
	defer h.Close()

	if _, err := h.LinkByName(p.IfName); err == nil {
		return host, pod, fmt.Errorf("%s in %s: %w", p.IfName, p.NetNS, ErrIfExists)
	}
	v := &netlink.Veth{
		LinkAttrs: netlink.LinkAttrs{
			Name:         p.HostName,
			MTU:          p.MTU,
			HardwareAddr: p.HostMAC,
		},
		PeerName:         p.IfName,
		PeerHardwareAddr: p.PodMAC,
		PeerNamespace:    netlink.NsFd(int(nsh)),
	}
	if err := netlink.LinkAdd(v); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return host, pod, fmt.Errorf("create veth %s: host side already exists (ADD repeated for this container and ifname?): %w", p.HostName, err)
		}
		return host, pod, fmt.Errorf("create veth %s/%s: %w", p.HostName, p.IfName, err)
	}
	defer func() {
		if retErr != nil {
			Teardown(p.HostName)
		}
	}()

	hl, err := netlinksafe.LinkByName(p.HostName)
	if err != nil {
		return host, pod, fmt.Errorf("find host veth %s: %w", p.HostName, err)
	}
	pl, err := h.LinkByName(p.IfName)
	if err != nil {
		return host, pod, fmt.Errorf("find %s in pod: %w", p.IfName, err)
	}
	if err := configurePod(h, pl, p); err != nil {
		return host, pod, err
	}
	if err := configureHost(hl, p); err != nil {
		return host, pod, err
	}
	host = Link{Name: p.HostName, Index: hl.Attrs().Index, MAC: p.HostMAC}
	pod = Link{Name: p.IfName, Index: pl.Attrs().Index, MAC: p.PodMAC, Sandbox: p.NetNS}
	return host, pod, nil
}

func configurePod(h *netlinksafe.Handle, l netlink.Link, p Pod) error {
	if err := h.LinkSetMTU(l, p.MTU); err != nil {
		return fmt.Errorf("set mtu %d on %s: %w", p.MTU, p.IfName, err)
	}
	if err := h.LinkSetUp(l); err != nil {
		return fmt.Errorf("set %s up: %w", p.IfName, err)
	}
	idx := l.Attrs().Index
	families := map[bool]bool{}
	for _, a := range p.Addrs {
		addr := &netlink.Addr{IPNet: ipNet(hostPrefix(a))}
		if a.Is6() {
			addr.Flags = unix.IFA_F_NODAD
		}
		if err := h.AddrAdd(l, addr); err != nil {
			return fmt.Errorf("add address %s to %s: %w", a, p.IfName, err)
		}
		families[a.Is4()] = true
	}
	for is4 := range families {
		gw := GatewayV6
		if is4 {
			gw = GatewayV4
			// 169.254.1.1 is on no subnet of the pod: make it on-link first.
			r := &netlink.Route{LinkIndex: idx, Dst: ipNet(hostPrefix(gw)), Scope: netlink.SCOPE_LINK}
			if err := h.RouteReplace(r); err != nil {
				return fmt.Errorf("add route to gateway %s in pod: %w", gw, err)
			}
		}
		n := &netlink.Neigh{LinkIndex: idx, State: netlink.NUD_PERMANENT, IP: gw.AsSlice(), HardwareAddr: p.HostMAC}
		if err := h.NeighSet(n); err != nil {
			return fmt.Errorf("add neighbour %s in pod: %w", gw, err)
		}
	}
	for _, dst := range p.Routes {
		if !families[dst.Addr().Is4()] {
			continue // no address of that family: no route either
		}
		r := &netlink.Route{LinkIndex: idx, Dst: ipNet(dst), Gw: gateway(dst.Addr()).AsSlice()}
		if err := h.RouteReplace(r); err != nil {
			return fmt.Errorf("add route %s via %s in pod: %w", dst, gateway(dst.Addr()), err)
		}
	}
	return nil
}

func configureHost(l netlink.Link, p Pod) error {
	// No duplicate address detection on the host veth: its link-local
	// address is usable at once (host -> pod IPv6 may pick it as source).
	dad := filepath.Join("/proc/sys/net/ipv6/conf", p.HostName, "accept_dad")
	if err := os.WriteFile(dad, []byte("0"), 0o644); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("disable DAD on %s: %w", p.HostName, err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return fmt.Errorf("set %s up: %w", p.HostName, err)
	}
	idx := l.Attrs().Index
	for _, a := range p.Addrs {
		r := &netlink.Route{LinkIndex: idx, Dst: ipNet(hostPrefix(a)), Scope: netlink.SCOPE_LINK}
		if err := netlink.RouteReplace(r); err != nil {
			return fmt.Errorf("add host route %s dev %s: %w", a, p.HostName, err)
		}
		n := &netlink.Neigh{LinkIndex: idx, State: netlink.NUD_PERMANENT, IP: a.AsSlice(), HardwareAddr: p.PodMAC}
		if err := netlink.NeighSet(n); err != nil {
			return fmt.Errorf("add neighbour %s dev %s: %w", a, p.HostName, err)
		}
	}
	return nil
}

// Teardown deletes the host veth (and with it the pod end, the host routes
// and neighbours). A missing link is success.
func Teardown(hostName string) error {
	l, err := netlinksafe.LinkByName(hostName)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return fmt.Errorf("find host veth %s: %w", hostName, err)
	}
	if _, ok := l.(*netlink.Veth); !ok {
		return fmt.Errorf("%s is a %s, not a veth: left alone", hostName, l.Type())
	}
	if err := netlink.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete host veth %s: %w", hostName, err)
	}
	return nil
}

// HostIndex returns the ifindex of a host veth, 0 when it does not exist.
func HostIndex(hostName string) int {
	l, err := netlinksafe.LinkByName(hostName)
	if err != nil {
		return 0
	}
	return l.Attrs().Index
}

// EnableForwarding turns on IPv4 (and, for IPv6 pods, IPv6) forwarding, as
// the reference ptp plugin does; pods reach the outside through the host.
func EnableForwarding(addrs []netip.Addr) error {
	for _, a := range addrs {
		path := "/proc/sys/net/ipv4/ip_forward"
		if a.Is6() {
			path = "/proc/sys/net/ipv6/conf/all/forwarding"
		}
		if b, err := os.ReadFile(path); err == nil && len(b) > 0 && b[0] == '1' {
			continue
		}
		if err := os.WriteFile(path, []byte("1"), 0o644); err != nil {
			return fmt.Errorf("enable forwarding (%s): %w", filepath.Base(filepath.Dir(path)), err)
		}
	}
	return nil
}

// CheckAbsent fails when the pod namespace cannot be opened or ifname already
// exists in it. ADD calls it before reserving anything.
func CheckAbsent(netnsPath, ifname string) error {
	nsh, h, err := openNS(netnsPath)
	if err != nil {
		return err
	}
	defer nsh.Close()
	defer h.Close()
	if _, err := h.LinkByName(ifname); err == nil {
		return fmt.Errorf("%s in %s: %w", ifname, netnsPath, ErrIfExists)
	}
	return nil
}
