// Package endpoint is the node's model of an attachment (one pod interface
// wired by ebpf-cni): the record ADD writes so DEL and GC can undo it after
// the pod's namespace is gone, the store of those records per network, and
// the teardown DEL and GC share.
//
// Records live in <stateDir>/<network>/endpoints/<containerID>:<ifname>.json
// (':' can appear in neither a container ID nor an interface name), written
// atomically. The network lock (<stateDir>/<network>/lock, see
// internal/flock) serialises the record set with the network's masquerade
// rules: the last teardown removes them while a concurrent ADD adds its
// record first.
package endpoint

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/ebpf-cni/ebpf-cni/internal/atomicfile"
	"github.com/ebpf-cni/ebpf-cni/internal/flock"
)

// Record is what ADD remembers of an attachment.
type Record struct {
	ContainerID  string         `json:"containerID"`
	IfName       string         `json:"ifname"`
	NetNS        string         `json:"netns"`
	HostVeth     string         `json:"hostVeth"`
	HostIndex    int            `json:"hostIfindex"`
	PodMAC       string         `json:"podMAC"`
	HostMAC      string         `json:"hostMAC"`
	IPs          []netip.Prefix `json:"ips"` // as IPAM returned them (subnet mask)
	MTU          int            `json:"mtu"`
	PodNamespace string         `json:"podNamespace,omitempty"`
	PodName      string         `json:"podName,omitempty"`
	Attach       string         `json:"attach"`
	IPAM         string         `json:"ipam"`
	Shaped       bool           `json:"shaped,omitempty"` // rate-limited: the host path both ways
	PinRoot      string         `json:"pinRoot,omitempty"`
	ClusterCIDRs []netip.Prefix `json:"clusterCIDRs,omitempty"`
	// BootID is the kernel's boot ID at ADD: a record of a previous boot
	// belongs to no live pod.
	BootID string `json:"bootID,omitempty"`
}

// ErrDamaged is a record file that does not decode: DEL and GC go on with
// what the attachment's name tells (host veth, MACs, IPAM owner).
var ErrDamaged = errors.New("damaged endpoint record")

// Addrs returns the record's addresses without their masks.
func (r *Record) Addrs() []netip.Addr {
	out := make([]netip.Addr, len(r.IPs))
	for i, p := range r.IPs {
		out[i] = p.Addr()
	}
	return out
}

// MACs parses the record's MACs.
func (r *Record) MACs() (pod, host net.HardwareAddr) {
	pod, _ = net.ParseMAC(r.PodMAC)
	host, _ = net.ParseMAC(r.HostMAC)
	return pod, host
}

// Store is the records of one network.
type Store struct {
	dir string // <stateDir>/<network>
}

// NewStore returns the store of network under stateDir. Nothing is created
// until the first write.
func NewStore(stateDir, network string) Store {
	return Store{dir: filepath.Join(stateDir, network)}
}

func (s Store) endpointsDir() string { return filepath.Join(s.dir, "endpoints") }

// Path is the record file of an attachment.
func (s Store) Path(containerID, ifname string) string {
	return filepath.Join(s.endpointsDir(), containerID+":"+ifname+".json")
}

// Lock takes the network lock (bounded wait, see internal/flock).
func (s Store) Lock() (func(), error) {
	if err := os.MkdirAll(s.dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state dir %s: %w", s.dir, err)
	}
	return flock.Acquire(filepath.Join(s.dir, "lock"), flock.DefaultWait)
}

// Write replaces the record of r's attachment.
func (s Store) Write(r *Record) error {
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("encode endpoint record: %w", err)
	}
	return atomicfile.Write(s.Path(r.ContainerID, r.IfName), data, 0o600)
}

// Read returns nil, nil when the attachment has no record.
func (s Store) Read(containerID, ifname string) (*Record, error) {
	return readFile(s.Path(containerID, ifname))
}

func readFile(path string) (*Record, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read endpoint record: %w", err)
	}
	var r Record
	if err := json.Unmarshal(data, &r); err != nil || r.ContainerID == "" || r.IfName == "" {
		return nil, fmt.Errorf("%s: %w", path, ErrDamaged)
	}
	return &r, nil
}

// Remove deletes the attachment's record; a missing one is success.
func (s Store) Remove(containerID, ifname string) error {
	err := os.Remove(s.Path(containerID, ifname))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove endpoint record: %w", err)
	}
	return nil
}

func isRecord(name string) bool {
	return strings.HasSuffix(name, ".json") && !strings.HasPrefix(name, ".")
}

// Attachment names an attachment.
type Attachment struct{ ContainerID, IfName string }

// List returns every record of the network, and the attachments whose
// record is damaged (named by its file), which it skips.
func (s Store) List() ([]*Record, []Attachment, error) {
	entries, err := os.ReadDir(s.endpointsDir())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("list endpoint records: %w", err)
	}
	var out []*Record
	var damaged []Attachment
	for _, e := range entries {
		if e.IsDir() || !isRecord(e.Name()) {
			continue
		}
		r, err := readFile(filepath.Join(s.endpointsDir(), e.Name()))
		if errors.Is(err, ErrDamaged) {
			cid, ifname, ok := strings.Cut(strings.TrimSuffix(e.Name(), ".json"), ":")
			if ok {
				damaged = append(damaged, Attachment{ContainerID: cid, IfName: ifname})
			}
			continue
		}
		if err != nil {
			return nil, nil, err
		}
		if r != nil {
			out = append(out, r)
		}
	}
	return out, damaged, nil
}

// LockAttachment takes the attachment's lock for a whole ADD or DEL
// (bounded wait; see internal/flock).
func (s Store) LockAttachment(containerID, ifname string) (*flock.Removable, error) {
	return flock.AcquireRemovable(s.lockPath(containerID, ifname), flock.DefaultWait)
}

// TryLockAttachment takes the attachment's lock only if no ADD or DEL of it
// runs (GC): flock.ErrBusy otherwise.
func (s Store) TryLockAttachment(containerID, ifname string) (*flock.Removable, error) {
	return flock.TryAcquireRemovable(s.lockPath(containerID, ifname))
}

func (s Store) lockPath(containerID, ifname string) string {
	return filepath.Join(s.dir, "locks", containerID+":"+ifname+".lock")
}

// SweepTemp removes the temp files of atomic writes a killed process left:
// in the records' directory all of them (they are written under the
// network lock, which SweepTemp takes), elsewhere those older than age.
func (s Store) SweepTemp(age time.Duration) error {
	var errs []error
	if unlock, err := s.Lock(); err == nil {
		matches, _ := filepath.Glob(filepath.Join(s.endpointsDir(), ".tmp-*"))
		for _, m := range matches {
			if err := os.Remove(m); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
		}
		unlock()
	} else {
		errs = append(errs, err)
	}
	for _, dir := range []string{s.dir, filepath.Dir(s.dir)} {
		matches, _ := filepath.Glob(filepath.Join(dir, ".tmp-*"))
		for _, m := range matches {
			if fi, err := os.Stat(m); err == nil && time.Since(fi.ModTime()) >= age {
				if err := os.Remove(m); err != nil && !errors.Is(err, os.ErrNotExist) {
					errs = append(errs, err)
				}
			}
		}
	}
	return errors.Join(errs...)
}

// bootFile remembers the boot of the network's last previous-boot sweep.
func (s Store) bootFile() string { return filepath.Join(s.dir, "boot_id") }

// Any reports whether the network has a record, reading the directory only
// until the first one.
func (s Store) Any() (bool, error) {
	d, err := os.Open(s.endpointsDir())
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("list endpoint records: %w", err)
	}
	defer d.Close()
	for {
		names, err := d.Readdirnames(16)
		for _, n := range names {
			if isRecord(n) {
				return true, nil
			}
		}
		if err != nil {
			return false, nil // io.EOF: none
		}
	}
}

// Networks lists the networks that have records under stateDir.
func Networks(stateDir string) []string {
	entries, _ := os.ReadDir(stateDir)
	var out []string
	for _, e := range entries {
		if e.IsDir() {
			out = append(out, e.Name())
		}
	}
	return out
}
