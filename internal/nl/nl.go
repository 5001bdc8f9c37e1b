// Package nl is where ebpf-cni dumps kernel tables in the host namespace.
// A dump that the kernel interrupts (the table changed while it was read:
// netlink.ErrDumpInterrupted) is read again, a few times, instead of being
// used half-read or failing the call. Dumps inside a pod's namespace go
// through the plugins repo's netlinksafe handles, which do the same.
package nl

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
)

// attempts bounds how often an interrupted dump is read again.
const attempts = 5

// Retry runs dump until it completes without ErrDumpInterrupted, at most
// attempts times; the last interrupted result is an error.
func Retry[T any](what string, dump func() (T, error)) (T, error) {
	var out T
	var err error
	for range attempts {
		out, err = dump()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return out, err
		}
	}
	return out, fmt.Errorf("dump %s: interrupted %d times: %w", what, attempts, err)
}

// RouteListFiltered is netlink.RouteListFiltered, retried.
func RouteListFiltered(family int, filter *netlink.Route, mask uint64) ([]netlink.Route, error) {
	return Retry("routes", func() ([]netlink.Route, error) { return netlink.RouteListFiltered(family, filter, mask) })
}

// FilterList is netlink.FilterList, retried.
func FilterList(link netlink.Link, parent uint32) ([]netlink.Filter, error) {
	return Retry("tc filters", func() ([]netlink.Filter, error) { return netlink.FilterList(link, parent) })
}

// NeighList is netlink.NeighList, retried.
func NeighList(ifindex, family int) ([]netlink.Neigh, error) {
	return Retry("neighbours", func() ([]netlink.Neigh, error) { return netlink.NeighList(ifindex, family) })
}

// LinkList is netlink.LinkList, retried.
func LinkList() ([]netlink.Link, error) {
	return Retry("links", netlink.LinkList)
}

// AddrList is netlink.AddrList, retried.
func AddrList(link netlink.Link, family int) ([]netlink.Addr, error) {
	return Retry("addresses", func() ([]netlink.Addr, error) { return netlink.AddrList(link, family) })
}
