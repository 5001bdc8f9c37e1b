package ipam

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/ebpf-cni/ebpf-cni/internal/flock"
)

var (
	// ErrExhausted is returned (wrapped with the range set) when a range set
	// has no free address.
	ErrExhausted = errors.New("no free addresses")
	// ErrLockTimeout is returned (wrapped) when a Store's lock could not be
	// taken in time. Another ADD or DEL holds it; try again later.
	ErrLockTimeout = flock.ErrTimeout
	// ErrInvalidOwner is returned when an owner lacks a container ID or an
	// interface name.
	ErrInvalidOwner = errors.New("container id and interface name are required")
	// ErrInvalidRecord is returned by a Store for a record or range ID it
	// cannot keep.
	ErrInvalidRecord = errors.New("invalid reservation")
	// ErrDamaged is a reservation file that does not decode.
	ErrDamaged = errors.New("damaged reservation file")
)

// Owner identifies an attachment.
type Owner struct {
	ContainerID  string
	IfName       string
	PodNamespace string
	PodName      string
	BootID       string // recorded with each reservation
}

// Record is one reservation.
type Record struct {
	IP           netip.Addr `json:"ip"`
	ContainerID  string     `json:"containerID"`
	IfName       string     `json:"ifName"`
	PodNamespace string     `json:"podNamespace"`
	PodName      string     `json:"podName"`
	// BootID is the kernel's boot ID when the reservation was made: one of
	// a previous boot belongs to no live pod.
	BootID string `json:"bootID,omitempty"`
}

// Store persists reservations. Callers that mutate hold the lock from Lock;
// implementations still keep each single call consistent on its own.
type Store interface {
	// Lock takes the store's exclusive lock, waiting at most timeout; it
	// returns an error wrapping ErrLockTimeout when it cannot. The returned
	// unlock func may be called more than once.
	Lock(timeout time.Duration) (unlock func(), err error)
	// Reserve records rec for rec.IP; it returns false (nil error) if that IP
	// is already reserved. rangeID identifies the range set whose
	// LastReserved it updates.
	Reserve(rec Record, rangeID string) (bool, error)
	// LastReserved returns the last IP reserved for rangeID; the zero Addr
	// when there is none.
	LastReserved(rangeID string) (netip.Addr, error)
	// ReleaseOwner removes every reservation of (containerID, ifName) and
	// returns what it removed. Nothing found is not an error.
	ReleaseOwner(containerID, ifName string) ([]Record, error)
	// Owned returns the reservations of (containerID, ifName), sorted by IP,
	// without reading every record: ADD and DEL stay O(1) in the number of pods.
	Owned(containerID, ifName string) ([]Record, error)
	// List returns all reservations, sorted by IP, skipping damaged ones.
	List() ([]Record, error)
	// Damaged lists the IPs whose reservation cannot be read.
	Damaged() ([]netip.Addr, error)
	// Owners maps every IP an owner index names to that owner.
	Owners() (map[netip.Addr]Owner, error)
	// SweepTemp removes temp files older than age (crash leftovers).
	SweepTemp(age time.Duration) error
	// Release removes the reservation of a single IP. Nothing found is not an
	// error.
	Release(ip netip.Addr) error
}

// checkReserve rejects what no Store can keep: an invalid or zoned IP, and a
// range ID that cannot be part of a file name.
func checkReserve(rec Record, rangeID string) error {
	if !rec.IP.IsValid() {
		return fmt.Errorf("ip is missing: %w", ErrInvalidRecord)
	}
	if rec.IP.Zone() != "" {
		return fmt.Errorf("ip %s has a zone: %w", rec.IP, ErrInvalidRecord)
	}
	if rangeID == "" || rangeID == "." || rangeID == ".." || strings.ContainsAny(rangeID, "/\x00") {
		return fmt.Errorf("range id %q: %w", rangeID, ErrInvalidRecord)
	}
	return nil
}
