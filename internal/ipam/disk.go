package ipam

import (
	"crypto/sha256"
	"encoding/hex"
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

	"github.com/ebpf-cni/ebpf-cni/internal/atomicfile"
	"github.com/ebpf-cni/ebpf-cni/internal/flock"
	"github.com/ebpf-cni/ebpf-cni/internal/killpoint"
)

const (
	lockFile       = "lock"
	lastFilePrefix = "last_reserved_ip."
	tempPattern    = ".tmp-*"
	ownersDir      = "owners"
)

// DiskStore keeps reservations in one directory per network, shared by every
// plugin process on the node:
//
//	<dir>/lock                     flocked by Lock
//	<dir>/<ip>                     one JSON Record per reserved IP
//	<dir>/last_reserved_ip.<id>    last IP reserved for range set <id>
//	<dir>/owners/<hash>            the IPs of one (containerID, ifName), so
//	                               ADD and DEL never read every record
//	<dir>/.tmp-*                   temp files; leftovers of a crash are swept by GC
//
// Record files are written in full to a temp file, fsynced, and hard-linked
// into place, so a record is never seen half written and an existing record
// is never overwritten. The owner index names an IP before its record
// exists, so releasing by owner finds every reservation whatever step a
// crash stopped at. A file that does not decode (damaged) never fails a
// whole call: it is skipped by listing (Damaged names it), released with its
// owner when an owner index names it, and reclaimed by GC otherwise.
type DiskStore struct {
	dir string
}

var _ Store = (*DiskStore)(nil)

// NewDiskStore returns the store in dir (for example
// /var/lib/ebpf-cni/ipam/<network>). Nothing is created until the first
// write: reading a store that does not exist yet finds no reservation.
func NewDiskStore(dir string) *DiskStore {
	return &DiskStore{dir: dir}
}

// create makes the store's directory (mode 0700) on the first write.
func (s *DiskStore) create() error {
	if err := os.MkdirAll(s.dir, 0o700); err != nil {
		return fmt.Errorf("create ipam store %s: %w", s.dir, err)
	}
	return nil
}

// Lock implements Store with the node's flock on <dir>/lock. Each call opens
// the lock file anew: flock belongs to the open file description, so two
// Locks conflict whether they come from two processes, two DiskStores or two
// goroutines sharing one.
func (s *DiskStore) Lock(timeout time.Duration) (func(), error) {
	if err := s.create(); err != nil {
		return nil, err
	}
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
	path := s.recordPath(rec.IP)
	if _, err := os.Lstat(path); err == nil {
		return false, nil // taken: skip writing a record that cannot be linked
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
	killpoint.At("ipam-temp-written")

	// The owner index first: a crash after it leaves an IP the owner's
	// release removes from the index, never a reservation nobody finds.
	idx := s.readOwnerOrEmpty(rec.ContainerID, rec.IfName)
	idx.IPs = append(slices.DeleteFunc(idx.IPs, func(a netip.Addr) bool { return a == rec.IP }), rec.IP)
	if err := s.writeOwner(idx); err != nil {
		return false, fmt.Errorf("reserve %s: owner index: %w", rec.IP, err)
	}
	killpoint.At("ipam-owner-indexed")
	unindex := func() error {
		idx.IPs = slices.DeleteFunc(idx.IPs, func(a netip.Addr) bool { return a == rec.IP })
		return s.writeOwner(idx)
	}

	// link(2) fails on an existing name: the reservation is exclusive even
	// for a caller that forgot the lock.
	if err := os.Link(tmp, path); err != nil {
		uerr := unindex()
		if errors.Is(err, fs.ErrExist) {
			return false, uerr
		}
		return false, errors.Join(fmt.Errorf("reserve %s: %w", rec.IP, err), uerr)
	}
	killpoint.At("ipam-linked")
	if err := s.writeFile(s.lastPath(rangeID), []byte(rec.IP.String()+"\n")); err != nil {
		// Without bookkeeping the reservation would still be valid, but the
		// caller is told it failed, so it must not stay behind.
		if rmErr := os.Remove(path); rmErr != nil && !errors.Is(rmErr, fs.ErrNotExist) {
			err = errors.Join(err, fmt.Errorf("undo reservation: %w", rmErr))
		}
		return false, errors.Join(fmt.Errorf("reserve %s: bookkeeping: %w", rec.IP, err), unindex())
	}
	if err := s.syncDir(); err != nil {
		return false, fmt.Errorf("reserve %s: %w", rec.IP, err)
	}
	return true, nil
}

// writeTemp writes data to a new fsynced temp file in the store's directory
// and returns its path.
func (s *DiskStore) writeTemp(data []byte) (string, error) {
	if err := s.create(); err != nil {
		return "", err
	}
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

// writeFile atomically replaces path with data, without an fsync: it keeps
// the owner index and the last reserved address, which a crash may roll back
// (a reservation whose owner index is lost is released by GC; a stale last
// address only changes where round-robin resumes). Records are fsynced.
func (s *DiskStore) writeFile(path string, data []byte) error {
	return atomicfile.Write(path, data, 0o600)
}

// syncDir makes renames, links and removals in the directory durable.
func (s *DiskStore) syncDir() error {
	d, err := os.Open(s.dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil // never written: nothing to make durable
	}
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
		// Only where round-robin resumes: start over (the next
		// reservation rewrites the file) rather than refuse every ADD.
		return netip.Addr{}, nil
	}
	return ip, nil
}

// ownerIndex is the content of an owners/ file.
type ownerIndex struct {
	ContainerID string       `json:"containerID"`
	IfName      string       `json:"ifName"`
	IPs         []netip.Addr `json:"ips"`
}

func (s *DiskStore) ownerPath(containerID, ifName string) string {
	sum := sha256.Sum256([]byte(containerID + "\x00" + ifName))
	return filepath.Join(s.dir, ownersDir, hex.EncodeToString(sum[:16]))
}

// readOwnerOrEmpty is readOwner with a damaged index read as empty: the
// records still name their owner, and GC reclaims what the index lost.
func (s *DiskStore) readOwnerOrEmpty(containerID, ifName string) ownerIndex {
	idx, err := s.readOwner(containerID, ifName)
	if err != nil {
		return ownerIndex{ContainerID: containerID, IfName: ifName}
	}
	return idx
}

func (s *DiskStore) readOwner(containerID, ifName string) (ownerIndex, error) {
	idx := ownerIndex{ContainerID: containerID, IfName: ifName}
	data, err := os.ReadFile(s.ownerPath(containerID, ifName))
	if errors.Is(err, fs.ErrNotExist) {
		return idx, nil
	}
	if err != nil {
		return idx, fmt.Errorf("read owner index: %w", err)
	}
	if err := json.Unmarshal(data, &idx); err != nil {
		return idx, fmt.Errorf("decode owner index %s: %w", s.ownerPath(containerID, ifName), err)
	}
	return idx, nil
}

// writeOwner stores idx, or removes its file when it holds no IP.
func (s *DiskStore) writeOwner(idx ownerIndex) error {
	path := s.ownerPath(idx.ContainerID, idx.IfName)
	if len(idx.IPs) == 0 {
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove owner index: %w", err)
		}
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("create owner index dir: %w", err)
	}
	data, err := json.Marshal(idx)
	if err != nil {
		return fmt.Errorf("encode owner index: %w", err)
	}
	return s.writeFile(path, data)
}

// readRecord returns the record of ip; ok is false when there is none. A
// file that does not decode wraps ErrDamaged.
func (s *DiskStore) readRecord(ip netip.Addr) (Record, bool, error) {
	data, err := os.ReadFile(s.recordPath(ip))
	if errors.Is(err, fs.ErrNotExist) {
		return Record{}, false, nil
	}
	if err != nil {
		return Record{}, false, err
	}
	var rec Record
	if err := json.Unmarshal(data, &rec); err != nil || rec.IP != ip {
		return Record{}, true, fmt.Errorf("%s: %w", s.recordPath(ip), ErrDamaged)
	}
	return rec, true, nil
}

// Owned implements Store through the owner index. A damaged record the
// index names counts as the owner's (only the index says whose it is).
func (s *DiskStore) Owned(containerID, ifName string) ([]Record, error) {
	idx := s.readOwnerOrEmpty(containerID, ifName)
	out := []Record{}
	for _, ip := range idx.IPs {
		rec, ok, err := s.readRecord(ip)
		switch {
		case errors.Is(err, ErrDamaged):
			out = append(out, Record{IP: ip, ContainerID: containerID, IfName: ifName})
		case err != nil:
			return nil, fmt.Errorf("owned by %s/%s: %w", containerID, ifName, err)
		case ok && rec.ContainerID == containerID && rec.IfName == ifName:
			out = append(out, rec)
		}
	}
	slices.SortFunc(out, func(a, b Record) int { return a.IP.Compare(b.IP) })
	return out, nil
}

// ReleaseOwner implements Store: every record the owner index names (that
// is the owner's, or damaged), then the index.
func (s *DiskStore) ReleaseOwner(containerID, ifName string) ([]Record, error) {
	owned, err := s.Owned(containerID, ifName)
	if err != nil {
		return nil, fmt.Errorf("release %s/%s: %w", containerID, ifName, err)
	}
	removed := []Record{}
	for _, rec := range owned {
		if err := s.remove(rec.IP); err != nil {
			return removed, fmt.Errorf("release %s/%s: %w", containerID, ifName, err)
		}
		removed = append(removed, rec)
	}
	killpoint.At("ipam-records-removed")
	if err := s.writeOwner(ownerIndex{ContainerID: containerID, IfName: ifName}); err != nil {
		return removed, fmt.Errorf("release %s/%s: %w", containerID, ifName, err)
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
	rec, ok, err := s.readRecord(ip)
	if errors.Is(err, ErrDamaged) {
		ok, err = false, nil // no owner to unindex: remove the file alone
	}
	if err != nil {
		return fmt.Errorf("release %s: %w", ip, err)
	}
	if err := s.remove(ip); err != nil {
		return fmt.Errorf("release %s: %w", ip, err)
	}
	if ok {
		idx := s.readOwnerOrEmpty(rec.ContainerID, rec.IfName)
		idx.IPs = slices.DeleteFunc(idx.IPs, func(a netip.Addr) bool { return a == ip })
		if err := s.writeOwner(idx); err != nil {
			return fmt.Errorf("release %s: %w", ip, err)
		}
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
// are skipped, and so are damaged records (Damaged lists them).
func (s *DiskStore) List() ([]Record, error) {
	out := []Record{}
	err := s.each(func(ip netip.Addr, rec Record, damaged bool) {
		if !damaged {
			out = append(out, rec)
		}
	})
	return out, err
}

// Damaged implements Store.
func (s *DiskStore) Damaged() ([]netip.Addr, error) {
	var out []netip.Addr
	err := s.each(func(ip netip.Addr, _ Record, damaged bool) {
		if damaged {
			out = append(out, ip)
		}
	})
	return out, err
}

// each visits every record file, sorted by IP.
func (s *DiskStore) each(fn func(ip netip.Addr, rec Record, damaged bool)) error {
	entries, err := os.ReadDir(s.dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("list reservations in %s: %w", s.dir, err)
	}
	var ips []netip.Addr
	for _, e := range entries {
		ip, err := netip.ParseAddr(e.Name())
		if err == nil && ip.String() == e.Name() && e.Type().IsRegular() {
			ips = append(ips, ip)
		}
	}
	slices.SortFunc(ips, netip.Addr.Compare)
	for _, ip := range ips {
		rec, ok, err := s.readRecord(ip)
		switch {
		case errors.Is(err, ErrDamaged):
			fn(ip, Record{IP: ip}, true)
		case err != nil:
			return fmt.Errorf("list reservations: %w", err)
		case ok:
			fn(ip, rec, false)
		}
	}
	return nil
}

// Owners implements Store: every owner index, by IP.
func (s *DiskStore) Owners() (map[netip.Addr]Owner, error) {
	out := map[netip.Addr]Owner{}
	entries, err := os.ReadDir(filepath.Join(s.dir, ownersDir))
	if errors.Is(err, fs.ErrNotExist) {
		return out, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list owner indexes: %w", err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".") {
			continue
		}
		data, err := os.ReadFile(filepath.Join(s.dir, ownersDir, e.Name()))
		var idx ownerIndex
		if err != nil || json.Unmarshal(data, &idx) != nil {
			continue // damaged: its records still name their owner
		}
		for _, ip := range idx.IPs {
			out[ip] = Owner{ContainerID: idx.ContainerID, IfName: idx.IfName}
		}
	}
	return out, nil
}

// SweepTemp implements Store: temp files older than age are leftovers of a
// process that died writing (newer ones may be in flight).
func (s *DiskStore) SweepTemp(age time.Duration) error {
	return sweepTemp([]string{s.dir, filepath.Join(s.dir, ownersDir)}, age)
}

// sweepTemp removes ".tmp-*" files older than age in dirs.
func sweepTemp(dirs []string, age time.Duration) error {
	var errs []error
	for _, dir := range dirs {
		matches, _ := filepath.Glob(filepath.Join(dir, tempPattern))
		for _, m := range matches {
			fi, err := os.Stat(m)
			if err != nil || time.Since(fi.ModTime()) < age {
				continue
			}
			if err := os.Remove(m); err != nil && !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}
