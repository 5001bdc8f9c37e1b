// Package flock is the bounded-wait exclusive file lock every ebpf-cni
// process uses to serialise work on shared node state.
//
// A lock is an flock(2) on an open file description, so it is released when
// the holder exits, even on a crash: no stale lock files to clean up. Every
// wait is bounded by DefaultWait; a timeout becomes CNI error 11 (try again
// later).
//
// The node's locks, what each guards, and who takes it:
//
//	/run/ebpf-cni/bpffs.lock      mounting bpffs at /sys/fs/bpf (loader.EnsureBPFFS;
//	                              the lock cannot live on bpffs itself)
//	<pinRoot> (the directory)     first creation of the pinned maps and programs
//	                              (loader.Ensure)
//	<dataDir>/<network>/lock      the built-in IPAM's reservations, owner index and
//	                              round-robin cursor (ipam.DiskStore.Lock)
//	<stateDir>/<network>/lock     the network's endpoint records together with its
//	                              masquerade rules (endpoint.Store.Lock)
//	/run/ebpf-cni/nat.lock        the nftables table inet ebpf-cni, shared by every
//	                              network (nat.Ensure, nat.Remove)
//	<stateDir>/<network>/locks/<containerID>:<ifname>.lock
//	                              one attachment, for the whole of its ADD or
//	                              DEL (a runtime's retry never overlaps the first
//	                              call); GC skips an attachment whose lock is
//	                              held; the lock file goes with the attachment
//	                              (Removable)
//
// Order: the attachment lock is taken first and held throughout; inside it a
// process holds at most two more at once, and only as network lock then nat
// lock. Every other lock is taken and released on its own: ADD takes the
// IPAM lock (allocate), then bpffs and the pin root (first ADD only, or to
// attach node devices), then the network lock with the nat lock inside it;
// DEL and GC take the IPAM lock (release), then the network lock with the
// nat lock inside it. Read-only verbs (STATUS, CHECK) and `ebpf-cni inspect`
// take none and change nothing.
package flock

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// ErrTimeout is returned when the lock stays held by another process for the
// whole wait. Callers report it as "try again later".
var ErrTimeout = errors.New("lock wait timed out")

// DefaultWait is the longest any CNI call waits for a node lock.
const DefaultWait = 10 * time.Second

// Acquire takes an exclusive lock on path, creating the file (or opening the
// directory) if needed, waiting at most wait. The returned function releases it.
func Acquire(path string, wait time.Duration) (func(), error) {
	f, err := open(path)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(wait)
	delay := time.Millisecond
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			var once sync.Once
			// Closing the only descriptor of this open file drops the lock.
			return func() { once.Do(func() { f.Close() }) }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("lock %s: waited %s: %w", path, wait, ErrTimeout)
		}
		time.Sleep(delay)
		if delay < 20*time.Millisecond {
			delay *= 2
		}
	}
}

// Removable is a lock on a file its holder may delete when done (one lock
// file per attachment would otherwise pile up): taking it checks, once
// locked, that the path still names the locked file, and starts over if a
// holder removed it meanwhile.
type Removable struct {
	f    *os.File
	path string
}

// ErrBusy is returned by TryAcquireRemovable when another process holds the lock.
var ErrBusy = errors.New("lock held by another process")

// AcquireRemovable takes the lock on path (created with its directory if
// needed), waiting at most wait.
func AcquireRemovable(path string, wait time.Duration) (*Removable, error) {
	return acquireRemovable(path, wait, false)
}

// TryAcquireRemovable takes the lock on path if it is free, else ErrBusy.
func TryAcquireRemovable(path string) (*Removable, error) {
	return acquireRemovable(path, 0, true)
}

func acquireRemovable(path string, wait time.Duration, try bool) (*Removable, error) {
	deadline := time.Now().Add(wait)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("create lock dir: %w", err)
	}
	for {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			return nil, fmt.Errorf("open lock file %s: %w", path, err)
		}
		left := time.Until(deadline)
		if try {
			err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
			if errors.Is(err, unix.EWOULDBLOCK) {
				f.Close()
				return nil, fmt.Errorf("lock %s: %w", path, ErrBusy)
			}
		} else {
			err = flockWait(f, max(left, 0))
		}
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		// Still the file at path? A holder may have removed it before we got
		// it; then this lock guards nothing and we start over.
		var held, now unix.Stat_t
		if unix.Fstat(int(f.Fd()), &held) == nil && unix.Stat(path, &now) == nil && held.Ino == now.Ino && held.Dev == now.Dev {
			return &Removable{f: f, path: path}, nil
		}
		f.Close()
		if !try && time.Now().After(deadline) {
			return nil, fmt.Errorf("lock %s: waited %s: %w", path, wait, ErrTimeout)
		}
	}
}

// flockWait polls for the exclusive lock on f until wait has passed.
func flockWait(f *os.File, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	delay := time.Millisecond
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("waited %s: %w", wait, ErrTimeout)
		}
		time.Sleep(delay)
		if delay < 20*time.Millisecond {
			delay *= 2
		}
	}
}

// Release drops the lock and keeps the file.
func (r *Removable) Release() { r.f.Close() }

// ReleaseAndRemove deletes the lock file, then drops the lock: whoever waits
// on it starts over on a new file.
func (r *Removable) ReleaseAndRemove() {
	os.Remove(r.path)
	r.f.Close()
}

func open(path string) (*os.File, error) {
	if fi, err := os.Stat(path); err == nil && fi.IsDir() {
		f, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("open lock directory %s: %w", path, err)
		}
		return f, nil
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open lock file %s: %w", path, err)
	}
	return f, nil
}
