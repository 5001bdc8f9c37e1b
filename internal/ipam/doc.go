// Package ipam is ebpf-cni's built-in address allocator. It accepts the
// "ranges" shape of the reference host-local plugin (a list of range sets,
// each a list of ranges) and hands out one address per range set for every
// attachment, identified by container ID and interface name.
//
// The Allocator works over a Store. DiskStore is the real one: one directory
// per network on the node, shared by every plugin process. MemStore is an
// in-memory fake with the same semantics for unit tests.
//
// Invariants:
//   - Every mutation made through an Allocator happens with the Store's
//     exclusive lock held. For a DiskStore that lock is a flock on <dir>/lock,
//     so separate plugin processes (parallel ADD/DEL) are serialised, and the
//     kernel drops it when the holding process dies. Waits are bounded: Lock
//     gives up with ErrLockTimeout.
//   - A DiskStore reservation is the file <dir>/<ip>. It appears by hard-linking
//     a fully written, fsynced temp file, so a reader sees a whole record or
//     none, and two writers can never both own one address, lock or not.
//   - Reservations outlive the process: they are the node's allocation state
//     and disappear only through Release/ReleaseOwner (CNI DEL and GC).
//   - The allocator never hands out a subnet's network address, an IPv4
//     broadcast address, or any gateway of the range set. Validate guarantees
//     that ranges do not overlap, so an address belongs to at most one range.
//   - Allocate reserves one address for every range set or nothing at all.
package ipam
