package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	"github.com/ebpf-cni/ebpf-cni/internal/flock"
)

// Role is what ebpf-cni runs on a node-wide device.
type Role string

const (
	// RoleUplink: from_node on ingress (pods of other nodes arriving).
	RoleUplink Role = "uplink"
	// RoleOverlay, the metadata-mode VXLAN device: from_node on ingress,
	// to_overlay on egress (the tunnel key of every packet sent into it).
	RoleOverlay Role = "overlay"
)

// NodeDevice is a device of the node (not a pod's veth) ebpf-cni attaches to.
type NodeDevice struct {
	Name  string
	Index int
	Role  Role
}

// nodePrefix starts the link pins of node devices: links/node-<ifname>-<hook>.
const nodePrefix = "node-"

func nodePin(root, ifname, dir string) string {
	return filepath.Join(LinkDir(root), nodePrefix+ifname+"-"+dir)
}

func (r Role) hooks() []hook {
	if r == RoleOverlay {
		return hooks[:]
	}
	return hooks[:1] // ingress only
}

func (p *Programs) nodeProg(r Role, h hook) *ebpf.Program {
	if h.dir == "ingress" {
		return p.FromNode
	}
	return p.ToOverlay
}

// NodeAttached reports whether every hook of d's role holds a live
// attachment of this build's program, reading pins only (no lock).
func (p *Programs) NodeAttached(d NodeDevice) bool {
	for _, h := range d.Role.hooks() {
		if !p.pinnedCurrent(nodePin(p.root, d.Name, h.dir), d.Index, p.nodeProg(d.Role, h)) {
			return false
		}
	}
	return true
}

// pinnedCurrent reports whether the link pinned at pin is attached to
// ifindex and runs prog.
func (p *Programs) pinnedCurrent(pin string, ifindex int, prog *ebpf.Program) bool {
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		return false
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil || info.TCX() == nil || int(info.TCX().Ifindex) != ifindex {
		return false
	}
	pi, err := prog.Info()
	if err != nil {
		return false
	}
	id, _ := pi.ID()
	return info.Program == id
}

// AttachNode makes d run its role's programs, appended after the programs
// of others (TCX, legacy tc where TCX is missing), once per node: the pin
// root lock serialises concurrent callers, a current attachment is kept, an
// attachment of another build is updated in place (link.Update keeps its
// position), and a stale pin (the device was re-created) is replaced.
func (p *Programs) AttachNode(d NodeDevice) error {
	if p.NodeAttached(d) {
		return nil
	}
	unlock, err := p.lockLinks()
	if err != nil {
		return err
	}
	defer unlock()
	for _, h := range d.Role.hooks() {
		pin := nodePin(p.root, d.Name, h.dir)
		prog := p.nodeProg(d.Role, h)
		if l, err := link.LoadPinnedLink(pin, nil); err == nil {
			info, ierr := l.Info()
			if ierr == nil && info.TCX() != nil && int(info.TCX().Ifindex) == d.Index {
				err := l.Update(prog) // same program: a no-op
				l.Close()
				if err != nil {
					return fmt.Errorf("update %s link of %s: %w", h.dir, d.Name, err)
				}
				continue
			}
			l.Close()
			if err := unpinLink(pin); err != nil {
				return err
			}
		}
		l, err := link.AttachTCX(link.TCXOptions{Interface: d.Index, Program: prog, Attach: h.tcx, Anchor: link.Tail()})
		if errors.Is(err, ebpf.ErrNotSupported) {
			if err := p.attachTCOne(d.Index, d.Name, h, prog); err != nil {
				return err
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("attach tcx %s to %s: %w", h.dir, d.Name, err)
		}
		err = l.Pin(pin)
		l.Close()
		if err != nil {
			return fmt.Errorf("pin tcx %s link of %s: %w", h.dir, d.Name, err)
		}
	}
	return nil
}

// NodeAttachment is one hook of a node device as `ebpf-cni inspect` shows it.
type NodeAttachment struct {
	Device string `json:"device"`
	Attachment
}

// NodeAttachments lists the node devices with our link pins, and what the
// kernel reports attached on each hook.
func NodeAttachments(root string) ([]NodeAttachment, error) {
	names, err := pinnedDevices(root, true)
	if err != nil {
		return nil, err
	}
	var out []NodeAttachment
	for _, name := range names {
		idx := 0
		if l, err := netlink.LinkByName(name); err == nil {
			idx = l.Attrs().Index
		}
		for _, h := range hooks {
			if _, err := os.Stat(nodePin(root, name, h.dir)); err != nil {
				continue
			}
			a, err := attachedAt(nodePin(root, name, h.dir), idx, h)
			if err != nil {
				return nil, err
			}
			out = append(out, NodeAttachment{Device: name, Attachment: a})
		}
	}
	return out, nil
}

// DetachNodes removes every node-device attachment of ours (ebpf-cni
// uninstall): their link pins, which detaches TCX links, and our tc filters.
func DetachNodes(root string) error {
	names, err := pinnedDevices(root, true)
	var errs []error
	errs = append(errs, err)
	for _, name := range names {
		idx := 0
		if l, err := netlink.LinkByName(name); err == nil {
			idx = l.Attrs().Index
		}
		for _, h := range hooks {
			errs = append(errs, unpinLink(nodePin(root, name, h.dir)))
		}
		if idx > 0 {
			errs = append(errs, detachTC(idx, name))
		}
	}
	return errors.Join(errs...)
}

// SweepNodes removes the link pins of node devices that are gone (the
// kernel reports such a link with ifindex 0) or were re-created under the
// same name (another ifindex): the next ADD attaches to the new device.
func SweepNodes(root string) error {
	names, err := pinnedDevices(root, true)
	errs := []error{err}
	for _, name := range names {
		idx := 0
		if l, err := netlink.LinkByName(name); err == nil {
			idx = l.Attrs().Index
		}
		for _, h := range hooks {
			pin := nodePin(root, name, h.dir)
			l, err := link.LoadPinnedLink(pin, nil)
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			stale := err != nil
			if err == nil {
				info, ierr := l.Info()
				stale = ierr != nil || info.TCX() == nil || info.TCX().Ifindex == 0 || int(info.TCX().Ifindex) != idx
				l.Close()
			}
			if stale {
				errs = append(errs, unpinLink(pin))
			}
		}
	}
	return errors.Join(errs...)
}

// lockLinks takes the pin root's lock for node-wide attachments and makes
// sure the link pin directory exists.
func (p *Programs) lockLinks() (func(), error) {
	unlock, err := flock.Acquire(p.root, flock.DefaultWait)
	if err != nil {
		return nil, fmt.Errorf("lock pin root: %w", err)
	}
	if err := os.MkdirAll(LinkDir(p.root), 0o700); err != nil {
		unlock()
		return nil, fmt.Errorf("create %s: %w", LinkDir(p.root), err)
	}
	return unlock, nil
}
