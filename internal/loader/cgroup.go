package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// The socket programs (bpf/sock.h) run for the processes of one cgroup v2
// directory and its descendants: the hierarchy's root on a real node, a
// node's own cgroup in the emulated clusters of the tests. Their links are
// pinned as links/cgroup-<program>, one set per pin root.

type cgroupHook struct {
	prog   string
	attach ebpf.AttachType
}

var cgroupHooks = [...]cgroupHook{
	{ProgConnect4, ebpf.AttachCGroupInet4Connect},
	{ProgConnect6, ebpf.AttachCGroupInet6Connect},
	{ProgSendmsg4, ebpf.AttachCGroupUDP4Sendmsg},
	{ProgSendmsg6, ebpf.AttachCGroupUDP6Sendmsg},
	{ProgRecvmsg4, ebpf.AttachCGroupUDP4Recvmsg},
	{ProgRecvmsg6, ebpf.AttachCGroupUDP6Recvmsg},
	{ProgGetpeer4, ebpf.AttachCgroupInet4GetPeername},
	{ProgGetpeer6, ebpf.AttachCgroupInet6GetPeername},
}

const cgroupPrefix = "cgroup-"

func cgroupPin(root, prog string) string {
	return filepath.Join(LinkDir(root), cgroupPrefix+prog)
}

// byName is this build's program of that pin name.
func (p *Programs) byName(name string) *ebpf.Program {
	var out *ebpf.Program
	programFields(&p.DatapathPrograms, func(n string, field **ebpf.Program) error {
		if n == name {
			out = *field
		}
		return nil
	})
	return out
}

// cgroupID is the ID the kernel gives the cgroup v2 directory dir (its
// inode number).
func cgroupID(dir string) (uint64, error) {
	fi, err := os.Stat(dir)
	if err != nil {
		return 0, fmt.Errorf("cgroup %s: %w", dir, err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok || !fi.IsDir() {
		return 0, fmt.Errorf("cgroup %s: not a directory", dir)
	}
	return st.Ino, nil
}

// AttachCgroup makes the socket programs run for every process of the
// cgroup v2 directory dir and its descendants, once per pin root: a
// current attachment is kept, one of another build is updated in place,
// one to another cgroup is replaced. Programs of others stay (the links are
// multi-attach).
func (p *Programs) AttachCgroup(dir string) error {
	id, err := cgroupID(dir)
	if err != nil {
		return err
	}
	unlock, err := p.lockLinks()
	if err != nil {
		return err
	}
	defer unlock()
	for _, h := range cgroupHooks {
		pin := cgroupPin(p.root, h.prog)
		prog := p.byName(h.prog)
		if prog == nil {
			return fmt.Errorf("no program %s in this build", h.prog)
		}
		if l, err := link.LoadPinnedLink(pin, nil); err == nil {
			info, ierr := l.Info()
			if ierr == nil && info.Cgroup() != nil && info.Cgroup().CgroupId == id {
				err := l.Update(prog) // same program: a no-op
				l.Close()
				if err != nil {
					return fmt.Errorf("update %s link: %w", h.prog, err)
				}
				continue
			}
			l.Close()
			if err := unpinLink(pin); err != nil {
				return err
			}
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: dir, Attach: h.attach, Program: prog})
		if err != nil {
			return fmt.Errorf("attach %s to cgroup %s: %w", h.prog, dir, err)
		}
		err = l.Pin(pin)
		l.Close()
		if err != nil {
			return fmt.Errorf("pin %s link: %w", h.prog, err)
		}
	}
	return nil
}

// CgroupAttached reports whether every socket program of this build is
// attached to the cgroup dir through the pin root's links.
func (p *Programs) CgroupAttached(dir string) bool {
	id, err := cgroupID(dir)
	if err != nil {
		return false
	}
	for _, h := range cgroupHooks {
		l, err := link.LoadPinnedLink(cgroupPin(p.root, h.prog), nil)
		if err != nil {
			return false
		}
		info, err := l.Info()
		l.Close()
		if err != nil || info.Cgroup() == nil || info.Cgroup().CgroupId != id {
			return false
		}
		pi, err := p.byName(h.prog).Info()
		if err != nil {
			return false
		}
		if pid, _ := pi.ID(); pid != info.Program {
			return false
		}
	}
	return true
}

// DetachCgroup removes the socket programs' links of the pin root
// (ebpf-cni uninstall): Service addresses are no longer translated.
func DetachCgroup(root string) error {
	entries, err := os.ReadDir(LinkDir(root))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("list link pins: %w", err)
	}
	var errs []error
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), cgroupPrefix) {
			errs = append(errs, unpinLink(filepath.Join(LinkDir(root), e.Name())))
		}
	}
	return errors.Join(errs...)
}

// CgroupMount is where a cgroup v2 hierarchy is mounted when the node has
// none (a pure cgroup v1 layout), as the Cilium agent does.
const CgroupMount = "/run/ebpf-cni/cgroupv2"

// CgroupRoot finds the root of the node's cgroup v2 hierarchy, which holds
// every process of the node: the cgroup2 mount of the host's init process
// (seen through /proc/1/root, so a container with the host's PID namespace
// finds the host's and not its own cgroup namespace's view), else one of
// this process's mounts, else a cgroup2 mounted at CgroupMount.
func CgroupRoot() (string, error) {
	if mp, ok := cgroup2Mount("/proc/1/mountinfo"); ok {
		p := filepath.Join("/proc/1/root", mp)
		if _, err := cgroupID(p); err == nil {
			return p, nil
		}
	}
	if mp, ok := cgroup2Mount("/proc/self/mountinfo"); ok {
		return mp, nil
	}
	if err := os.MkdirAll(CgroupMount, 0o755); err != nil {
		return "", fmt.Errorf("create %s: %w", CgroupMount, err)
	}
	if err := unix.Mount("cgroup2", CgroupMount, "cgroup2", 0, ""); err != nil {
		return "", fmt.Errorf("mount cgroup2 at %s: %w", CgroupMount, err)
	}
	return CgroupMount, nil
}

// cgroup2Mount is the mount point of the first cgroup2 mount whose root is
// the hierarchy's root ("/") in a mountinfo file.
func cgroup2Mount(mountinfo string) (string, bool) {
	b, err := os.ReadFile(mountinfo)
	if err != nil {
		return "", false
	}
	for _, line := range strings.Split(string(b), "\n") {
		// id parent major:minor root mountpoint options ... - fstype source super
		pre, post, ok := strings.Cut(line, " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if !ok || len(f) < 5 || len(g) < 1 || g[0] != "cgroup2" || f[3] != "/" {
			continue
		}
		return f[4], true
	}
	return "", false
}
