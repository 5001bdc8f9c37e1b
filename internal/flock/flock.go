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
//
// Order: a process holds at most two at once, and only as network lock then
// nat lock. Every other lock is taken and released on its own: ADD takes the
// IPAM lock (allocate), then bpffs and the pin root (first ADD only), then
// the network lock with the nat lock inside it; DEL and GC take the IPAM
// lock (release), then the network lock with the nat lock inside it. Read-only
// verbs (STATUS, CHECK) and `ebpf-cni inspect` take none and change nothing.
package flock

import (
	"errors"
	"fmt"
	"os"
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
