package ipam

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/ebpf-cni/ebpf-cni/internal/flock"
)

const (
	lockFile       = "lock"
	lastFilePrefix = "last_reserved_ip."
	tempPattern    = ".tmp-*"
)

// DiskStore keeps reservations in one directory per network, shared by every
// plugin process on the node:
//
//	<dir>/lock                     flocked by Lock
//	<dir>/<ip>                     one JSON Record per reserved IP
//	<dir>/last_reserved_ip.<id>    last IP reserved for range set <id>
//	<dir>/.tmp-*                   temp files; leftovers of a crash are ignored
//
// Record files are written in full to a temp file, fsynced, and hard-linked
// into place, so a record is never seen half written and an existing record
// is never overwritten.
type DiskStore struct {
	dir string
}

var _ Store = (*DiskStore)(nil)

// NewDiskStore opens the store in dir (for example
// /var/lib/ebpf-cni/ipam/<network>), creating the directory with mode 0700
// when it is missing.
func NewDiskStore(dir string) (*DiskStore, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create ipam store %s: %w", dir, err)
	}
	return &DiskStore{dir: dir}, nil
}

// Dir returns the store's directory.
func (s *DiskStore) Dir() string { return s.dir }

// Lock implements Store with the node's flock on <dir>/lock. Each call opens
// the lock file anew: flock belongs to the open file description, so two
// Locks conflict whether they come from two processes, two DiskStores or two
// goroutines sharing one.
func (s *DiskStore) Lock(timeout time.Duration) (func(), error) {
	return flock.Acquire(filepath.Join(s.dir, lockFile), timeout)
}

func (s *DiskStore) recordPath(ip netip.Addr) string {
	return filepath.Join(s.dir, ip.String())
}

func (s *DiskStore) lastPath(rangeID string) string {
	return filepath.Join(s.dir, lastFilePrefix+rangeID)
}

// Reserve implements Store.
func (s *DiskStore) Reserve(rec Record, rangeID string) (bool, error) {
	if err := checkReserve(rec, rangeID); err != nil {
		return false, fmt.Errorf("reserve: %w", err)
	}
	data, err := json.Marshal(rec)
	if err != nil {
		return false, fmt.Errorf("reserve %s: encode record: %w", rec.IP, err)
	}
	tmp, err := s.writeTemp(data)
	if err != nil {
		return false, fmt.Errorf("reserve %s: %w", rec.IP, err)
	}
	defer os.Remove(tmp)

	path := s.recordPath(rec.IP)
	// link(2) fails on an existing name: the reservation is exclusive even
	// for a caller that forgot the lock.
	if err := os.Link(tmp, path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return false, nil
		}
		return false, fmt.Errorf("reserve %s: %w", rec.IP, err)
	}
	if err := s.writeFile(s.lastPath(rangeID), []byte(rec.IP.String()+"\n")); err != nil {
		// Without bookkeeping the reservation would still be valid, but the
		// caller is told it failed, so it must not stay behind.
		if rmErr := os.Remove(path); rmErr != nil && !errors.Is(rmErr, fs.ErrNotExist) {
			err = errors.Join(err, fmt.Errorf("undo reservation: %w", rmErr))
		}
		return false, fmt.Errorf("reserve %s: record last reserved ip: %w", rec.IP, err)
	}
	if err := s.syncDir(); err != nil {
		return false, fmt.Errorf("reserve %s: %w", rec.IP, err)
	}
	return true, nil
}

// writeTemp writes data to a new fsynced temp file in the store's directory
// and returns its path.
func (s *DiskStore) writeTemp(data []byte) (string, error) {
	f, err := os.CreateTemp(s.dir, tempPattern)
	if err != nil {
		return "", fmt.Errorf("create temp file: %w", err)
	}
	name := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(name)
		return "", fmt.Errorf("write temp file %s: %w", name, err)
	}
	return name, nil
}

// writeFile atomically replaces path with data.
func (s *DiskStore) writeFile(path string, data []byte) error {
	tmp, err := s.writeTemp(data)
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("rename %s: %w", tmp, err)
	}
	return nil
}

// syncDir makes renames, links and removals in the directory durable.
func (s *DiskStore) syncDir() error {
	d, err := os.Open(s.dir)
	if err != nil {
		return fmt.Errorf("open %s: %w", s.dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", s.dir, err)
	}
	return nil
}

// LastReserved implements Store.
func (s *DiskStore) LastReserved(rangeID string) (netip.Addr, error) {
	if err := checkReserve(Record{IP: netip.IPv4Unspecified()}, rangeID); err != nil {
		return netip.Addr{}, fmt.Errorf("read last reserved ip: %w", err)
	}
	path := s.lastPath(rangeID)
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return netip.Addr{}, nil
	}
	if err != nil {
		return netip.Addr{}, fmt.Errorf("read last reserved ip: %w", err)
	}
	ip, err := netip.ParseAddr(strings.TrimSpace(string(data)))
	if err != nil {
		return netip.Addr{}, fmt.Errorf("read last reserved ip from %s (delete the file to reset it): %w", path, err)
	}
	return ip, nil
}

// ReleaseOwner implements Store.
func (s *DiskStore) ReleaseOwner(containerID, ifName string) ([]Record, error) {
	all, err := s.List()
	if err != nil {
		return nil, fmt.Errorf("release %s/%s: %w", containerID, ifName, err)
	}
	removed := []Record{}
	for _, rec := range all {
		if rec.ContainerID != containerID || rec.IfName != ifName {
			continue
		}
		if err := s.remove(rec.IP); err != nil {
			return removed, fmt.Errorf("release %s/%s: %w", containerID, ifName, err)
		}
		removed = append(removed, rec)
	}
	if len(removed) > 0 {
		if err := s.syncDir(); err != nil {
			return removed, fmt.Errorf("release %s/%s: %w", containerID, ifName, err)
		}
	}
	return removed, nil
}

// Release implements Store.
func (s *DiskStore) Release(ip netip.Addr) error {
	if !ip.IsValid() || ip.Zone() != "" {
		return fmt.Errorf("release %s: %w", ip, ErrInvalidRecord)
	}
	if err := s.remove(ip); err != nil {
		return fmt.Errorf("release %s: %w", ip, err)
	}
	if err := s.syncDir(); err != nil {
		return fmt.Errorf("release %s: %w", ip, err)
	}
	return nil
}

func (s *DiskStore) remove(ip netip.Addr) error {
	if err := os.Remove(s.recordPath(ip)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// List implements Store. Only regular files named by an IP address in its
// canonical form are records; the lock, last_reserved_ip.* and temp files
// are skipped.
func (s *DiskStore) List() ([]Record, error) {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("list reservations in %s: %w", s.dir, err)
	}
	out := []Record{}
	for _, e := range entries {
		ip, err := netip.ParseAddr(e.Name())
		if err != nil || ip.String() != e.Name() || !e.Type().IsRegular() {
			continue
		}
		path := filepath.Join(s.dir, e.Name())
		data, err := os.ReadFile(path)
		if errors.Is(err, fs.ErrNotExist) {
			continue // released since ReadDir
		}
		if err != nil {
			return nil, fmt.Errorf("list reservations: %w", err)
		}
		var rec Record
		if err := json.Unmarshal(data, &rec); err != nil {
			return nil, fmt.Errorf("list reservations: decode %s: %w", path, err)
		}
		if rec.IP != ip {
			return nil, fmt.Errorf("list reservations: %s holds ip %s: %w", path, rec.IP, ErrInvalidRecord)
		}
		out = append(out, rec)
	}
	slices.SortFunc(out, func(a, b Record) int { return a.IP.Compare(b.IP) })
	return out, nil
}
