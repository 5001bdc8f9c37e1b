package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/ebpf-cni/ebpf-cni/internal/flock"
)

// ErrNoBPFFS means the pin root is not on a bpffs mount and none could be
// mounted. The caller reports "try again later": the node is not ready yet.
var ErrNoBPFFS = errors.New("bpffs is not mounted")

// DefaultMount is where bpffs lives on a Kubernetes node and where ebpf-cni
// mounts it when it is missing, as the Cilium agent does.
const DefaultMount = "/sys/fs/bpf"

// lockDir holds node locks that cannot live on bpffs.
const lockDir = "/run/ebpf-cni"

// EnsureBPFFS checks that root is (or would be created) on a bpffs. When it
// is not and root lies under /sys/fs/bpf, bpffs is mounted there first.
func EnsureBPFFS(root string) error {
	ok, at, err := onBPFFS(root)
	if err != nil {
		return err
	}
	if ok {
		return nil
	}
	if root != DefaultMount && !strings.HasPrefix(root, DefaultMount+"/") {
		return fmt.Errorf("pin root %s (%s is not bpffs): %w", root, at, ErrNoBPFFS)
	}
	// Concurrent first ADDs must not stack two mounts: the second would hide
	// the pins the first made. The lock cannot live on bpffs itself.
	if err := os.MkdirAll(lockDir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", lockDir, err)
	}
	unlock, err := flock.Acquire(filepath.Join(lockDir, "bpffs.lock"), flock.DefaultWait)
	if err != nil {
		return fmt.Errorf("lock bpffs mount: %w", err)
	}
	defer unlock()
	if ok, _, err := onBPFFS(root); err != nil || ok {
		return err // mounted by another ADD meanwhile
	}
	if err := unix.Mount("bpffs", DefaultMount, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w: %w", DefaultMount, err, ErrNoBPFFS)
	}
	if ok, _, err := onBPFFS(root); err != nil || !ok {
		return fmt.Errorf("pin root %s after mounting %s: %w", root, DefaultMount, ErrNoBPFFS)
	}
	return nil
}

// CheckBPFFS reports, without mounting anything, whether an ADD could pin
// under root: root is on bpffs, or lies under /sys/fs/bpf where ADD mounts
// it. It wraps ErrNoBPFFS otherwise.
func CheckBPFFS(root string) error {
	ok, at, err := onBPFFS(root)
	if err != nil || ok {
		return err
	}
	if root == DefaultMount || strings.HasPrefix(root, DefaultMount+"/") {
		return nil
	}
	return fmt.Errorf("pin root %s (%s is not bpffs): %w", root, at, ErrNoBPFFS)
}

// onBPFFS walks up from path to the first existing directory and reports
// whether that directory is on bpffs.
func onBPFFS(path string) (bool, string, error) {
	p := filepath.Clean(path)
	for {
		var st unix.Statfs_t
		err := unix.Statfs(p, &st)
		if err == nil {
			return st.Type == unix.BPF_FS_MAGIC, p, nil
		}
		if !errors.Is(err, os.ErrNotExist) {
			return false, p, fmt.Errorf("statfs %s: %w", p, err)
		}
		parent := filepath.Dir(p)
		if parent == p {
			return false, p, nil
		}
		p = parent
	}
}
