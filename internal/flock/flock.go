// Package flock is the bounded-wait exclusive file lock every ebpf-cni
// process uses to serialise work on shared node state (IPAM records, the
// first creation of shared pins, a network's masquerade rules).
//
// A lock is an flock(2) on an open file description, so it is released when
// the holder exits, even on a crash: no stale lock files to clean up.
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
