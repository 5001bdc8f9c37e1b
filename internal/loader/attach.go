package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ebpf-cni/ebpf-cni/internal/nl"
)

// Mode says how programs are attached to a host veth.
type Mode string

const (
	ModeAuto Mode = "auto" // TCX where the kernel has it (>= 6.6), else legacy tc
	ModeTCX  Mode = "tcx"
	ModeTC   Mode = "tc" // clsact qdisc + cls_bpf in direct-action mode
)

// filterPrefix names our cls_bpf filters; only filters with it are removed.
const filterPrefix = "ebpf-cni:"

// legacyPriority is the cls_bpf priority of our filters (1 is what most
// tools take; stay clear of it).
const legacyPriority = 0xeb

type hook struct {
	dir    string // "ingress" or "egress"
	tcx    ebpf.AttachType
	parent uint32
}

var hooks = [2]hook{
	{"ingress", ebpf.AttachTCXIngress, netlink.HANDLE_MIN_INGRESS},
	{"egress", ebpf.AttachTCXEgress, netlink.HANDLE_MIN_EGRESS},
}

func (p *Programs) prog(h hook) *ebpf.Program {
	if h.dir == "ingress" {
		return p.FromPod // ingress of the host veth = what the pod sends
	}
	return p.ToPod
}

func linkPin(root, ifname, dir string) string {
	return filepath.Join(LinkDir(root), ifname+"-"+dir)
}

// Orphans lists the interfaces that have link pins under root but no
// longer exist (a veth deleted with its pod's namespace).
func Orphans(root string) ([]string, error) {
	names, err := pinnedDevices(root, false)
	var out []string
	for _, ifname := range names {
		_, err := netlink.LinkByName(ifname)
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			out = append(out, ifname)
		}
	}
	return out, err
}

// pinnedDevices lists, once each, the device names that have link pins
// under root: the node devices' (node) or the host veths'.
func pinnedDevices(root string, node bool) ([]string, error) {
	entries, err := os.ReadDir(LinkDir(root))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list link pins: %w", err)
	}
	seen := map[string]bool{}
	var out []string
	for _, e := range entries {
		rest, isNode := strings.CutPrefix(e.Name(), nodePrefix)
		if isNode != node {
			continue
		}
		for _, h := range hooks {
			if name, ok := strings.CutSuffix(rest, "-"+h.dir); ok && name != "" && !seen[name] {
				seen[name] = true
				out = append(out, name)
			}
		}
	}
	return out, nil
}

// Attach puts from_pod on ingress and to_pod on egress of the host veth and
// returns the mode used. TCX links are appended after programs already there
// and pinned; with legacy tc a clsact qdisc is added if missing.
func (p *Programs) Attach(ifindex int, ifname string, mode Mode) (Mode, error) {
	if mode == ModeAuto || mode == "" {
		err := p.attachTCX(ifindex, ifname)
		if err == nil {
			return ModeTCX, nil
		}
		if !errors.Is(err, ebpf.ErrNotSupported) {
			return "", err
		}
		mode = ModeTC
	}
	switch mode {
	case ModeTCX:
		return ModeTCX, p.attachTCX(ifindex, ifname)
	case ModeTC:
		return ModeTC, p.attachTC(ifindex, ifname)
	}
	return "", fmt.Errorf("unknown attach mode %q", mode)
}

func (p *Programs) attachTCX(ifindex int, ifname string) (retErr error) {
	if err := os.MkdirAll(LinkDir(p.root), 0o700); err != nil {
		return fmt.Errorf("create %s: %w", LinkDir(p.root), err)
	}
	for _, h := range hooks {
		pin := linkPin(p.root, ifname, h.dir)
		if p.pinnedCurrent(pin, ifindex, p.prog(h)) {
			continue // already attached (a repair of the other hook)
		}
		l, err := link.AttachTCX(link.TCXOptions{
			Interface: ifindex,
			Program:   p.prog(h),
			Attach:    h.tcx,
			Anchor:    link.Tail(),
		})
		if err != nil {
			return fmt.Errorf("attach tcx %s to %s: %w", h.dir, ifname, err)
		}
		unpinLink(pin) // a stale pin of a deleted veth with the same name
		err = l.Pin(pin)
		l.Close() // the pin holds the link from here on
		if err != nil {
			return fmt.Errorf("pin tcx %s link of %s: %w", h.dir, ifname, err)
		}
		defer func() {
			if retErr != nil {
				unpinLink(pin)
			}
		}()
	}
	return nil
}

func (p *Programs) attachTC(ifindex int, ifname string) error {
	for _, h := range hooks {
		if err := p.attachTCOne(ifindex, ifname, h, p.prog(h)); err != nil {
			return err
		}
	}
	return nil
}

// attachTCOne puts prog on one hook of ifindex with legacy tc: a clsact
// qdisc (added if missing) and a cls_bpf filter of our name and priority.
func (p *Programs) attachTCOne(ifindex int, ifname string, h hook, prog *ebpf.Program) error {
	qdisc := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: ifindex,
			Handle:    netlink.MakeHandle(0xffff, 0),
			Parent:    netlink.HANDLE_CLSACT,
		},
		QdiscType: "clsact",
	}
	if err := netlink.QdiscAdd(qdisc); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add clsact qdisc to %s: %w", ifname, err)
	}
	f := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: ifindex,
			Parent:    h.parent,
			Handle:    netlink.MakeHandle(0, 1),
			Protocol:  unix.ETH_P_ALL,
			Priority:  legacyPriority,
		},
		Fd:           prog.FD(),
		Name:         filterPrefix + h.dir,
		DirectAction: true,
	}
	if err := netlink.FilterReplace(f); err != nil {
		return fmt.Errorf("attach tc %s filter to %s: %w", h.dir, ifname, err)
	}
	return nil
}

// Detach removes what Attach made for the host veth: link pins (which
// detaches TCX links) and our cls_bpf filters. A gone veth or pin is success.
func Detach(root string, ifindex int, ifname string) error {
	var errs []error
	for _, h := range hooks {
		errs = append(errs, unpinLink(linkPin(root, ifname, h.dir)))
	}
	if ifindex > 0 {
		errs = append(errs, detachTC(ifindex, ifname))
	}
	return errors.Join(errs...)
}

func unpinLink(pin string) error {
	l, err := link.LoadPinnedLink(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		// Not a link we can open (defunct or foreign): drop the pin anyway.
		if rmErr := os.Remove(pin); rmErr != nil && !errors.Is(rmErr, os.ErrNotExist) {
			return fmt.Errorf("remove link pin %s: %w", pin, rmErr)
		}
		return nil
	}
	defer l.Close()
	if err := l.Unpin(); err != nil {
		return fmt.Errorf("unpin %s: %w", pin, err)
	}
	return nil
}

func detachTC(ifindex int, ifname string) error {
	lnk, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return nil // gone, and our filters with it
	}
	var errs []error
	for _, h := range hooks {
		filters, err := nl.FilterList(lnk, h.parent)
		if err != nil {
			continue // no clsact: nothing of ours
		}
		for _, f := range filters {
			if bf, ok := f.(*netlink.BpfFilter); ok && strings.HasPrefix(bf.Name, filterPrefix) {
				if err := netlink.FilterDel(bf); err != nil && !errors.Is(err, unix.ENOENT) {
					errs = append(errs, fmt.Errorf("remove tc %s filter from %s: %w", h.dir, ifname, err))
				}
			}
		}
	}
	return errors.Join(errs...)
}

// Attachment describes what of ours is attached to one host veth hook.
type Attachment struct {
	Hook      string // ingress or egress
	Mode      Mode   // tcx or tc; empty when nothing of ours is attached
	ProgramID ebpf.ProgramID
	LinkID    link.ID // TCX only
}

// Attached lists our programs attached to the host veth, from the kernel's
// view (BPF_PROG_QUERY for TCX, the filter list for tc), cross-checked with
// our link pins. bpftool and tc of Debian 12 cannot list TCX programs; this can.
func Attached(root string, ifindex int, ifname string) ([]Attachment, error) {
	var out []Attachment
	for _, h := range hooks {
		a, err := attachedAt(linkPin(root, ifname, h.dir), ifindex, h)
		if err != nil {
			return nil, err
		}
		out = append(out, a)
	}
	return out, nil
}

func attachedAt(pin string, ifindex int, h hook) (Attachment, error) {
	a := Attachment{Hook: h.dir}
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		info, infoErr := l.Info()
		l.Close()
		if infoErr == nil {
			res, qErr := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: h.tcx})
			if qErr == nil {
				for _, ap := range res.Programs {
					if lid, ok := ap.LinkID(); ok && lid == info.ID {
						a.Mode, a.ProgramID, a.LinkID = ModeTCX, ap.ID, lid
						return a, nil
					}
				}
			}
		}
	}
	lnk, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return a, nil
	}
	filters, err := nl.FilterList(lnk, h.parent)
	if err != nil {
		return a, nil
	}
	for _, f := range filters {
		if bf, ok := f.(*netlink.BpfFilter); ok && strings.HasPrefix(bf.Name, filterPrefix) {
			a.Mode, a.ProgramID = ModeTC, ebpf.ProgramID(bf.Id)
			return a, nil
		}
	}
	return a, nil
}
