// Package nat owns ebpf-cni's masquerade rules: one nftables table
// (inet ebpf-cni, chain postrouting) with, per network and pod prefix, the
// rule `meta nfproto X <family> saddr P <family> daddr != P masquerade`.
//
// Rules carry a comment naming their network, so Ensure adds only what is
// missing (never a duplicate) and Remove deletes only its network's rules,
// and the table when it is empty. Callers serialise Ensure and Remove of one
// network with the network lock.
package nat

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/ebpf-cni/ebpf-cni/internal/flock"
)

// Table is the name of the nftables table ebpf-cni owns.
const Table = "ebpf-cni"

const chainName = "postrouting"

var table = &nftables.Table{Name: Table, Family: nftables.TableFamilyINet}

func comment(network string, p netip.Prefix, except []netip.Prefix) string {
	c := "ebpf-cni " + network + " " + p.String()
	for _, e := range except {
		c += " !" + e.String()
	}
	return c
}

// userdata encodes s as an nftables rule comment (NFTNL_UDATA_RULE_COMMENT),
// so `nft list ruleset` prints it.
func userdata(s string) []byte {
	if len(s) > 250 {
		s = s[:250] // the length is one byte; a long comment stays deterministic
	}
	return append([]byte{0, byte(len(s) + 1)}, append([]byte(s), 0)...)
}

// stored is a comment as it reads back from the kernel (truncated).
func stored(s string) string { return commentOf(&nftables.Rule{UserData: userdata(s)}) }

func commentOf(r *nftables.Rule) string {
	ud := r.UserData
	if len(ud) < 2 || ud[0] != 0 || int(ud[1])+2 > len(ud) {
		return ""
	}
	return string(bytes.TrimRight(ud[2:2+int(ud[1])], "\x00"))
}

func conn() (*nftables.Conn, error) {
	c, err := nftables.New()
	if err != nil {
		return nil, fmt.Errorf("open nftables: %w", err)
	}
	return c, nil
}

// rules lists our postrouting rules; none when the table does not exist.
func rules(c *nftables.Conn) ([]*nftables.Rule, error) {
	rs, err := c.GetRules(table, &nftables.Chain{Name: chainName, Table: table})
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ENOENT) {
			return nil, nil
		}
		return nil, fmt.Errorf("list nftables rules of %s: %w", Table, err)
	}
	return rs, nil
}

// lockPath serialises changes to the table across networks: one network's
// last DEL deletes the table only if no other network's rule is in it.
const lockPath = "/run/ebpf-cni/nat.lock"

func lock() (func(), error) {
	if err := os.MkdirAll(filepath.Dir(lockPath), 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", filepath.Dir(lockPath), err)
	}
	return flock.Acquire(lockPath, flock.DefaultWait)
}

// Ensure makes traffic from each prefix masqueraded unless it goes to the
// prefix itself or to one of except (the cluster's pod ranges). A rule of the
// same network and prefix with other exceptions (a changed config) is replaced.
func Ensure(network string, prefixes []netip.Prefix, except []netip.Prefix) error {
	unlock, err := lock()
	if err != nil {
		return err
	}
	defer unlock()
	c, err := conn()
	if err != nil {
		return err
	}
	have := map[string]*nftables.Rule{}
	existing, err := rules(c)
	if err != nil {
		return err
	}
	for _, r := range existing {
		have[commentOf(r)] = r
	}
	var missing []netip.Prefix
	for _, p := range prefixes {
		p = p.Masked()
		want := stored(comment(network, p, except))
		if have[want] != nil {
			continue
		}
		missing = append(missing, p)
		base := comment(network, p, nil)
		for cm, r := range have {
			if cm == base || strings.HasPrefix(cm, base+" ") {
				if err := c.DelRule(r); err != nil {
					return fmt.Errorf("replace masquerade rule %q: %w", cm, err)
				}
			}
		}
	}
	if len(missing) == 0 {
		return nil
	}
	c.AddTable(table)
	ch := c.AddChain(&nftables.Chain{
		Name:     chainName,
		Table:    table,
		Type:     nftables.ChainTypeNAT,
		Hooknum:  nftables.ChainHookPostrouting,
		Priority: nftables.ChainPriorityNATSource,
	})
	for _, p := range missing {
		c.AddRule(&nftables.Rule{Table: table, Chain: ch, Exprs: masquerade(p, except), UserData: userdata(comment(network, p, except))})
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("add masquerade rules for %s: %w", network, err)
	}
	return nil
}

func masquerade(p netip.Prefix, except []netip.Prefix) []expr.Any {
	proto, addrLen, srcOff := byte(unix.NFPROTO_IPV4), uint32(4), uint32(12)
	if p.Addr().Is6() {
		proto, addrLen, srcOff = unix.NFPROTO_IPV6, 16, 8
	}
	match := func(q netip.Prefix, off uint32, op expr.CmpOp) []expr.Any {
		return []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: addrLen},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: addrLen, Mask: net.CIDRMask(q.Bits(), q.Addr().BitLen()), Xor: make([]byte, addrLen)},
			&expr.Cmp{Op: op, Register: 1, Data: q.Addr().AsSlice()},
		}
	}
	out := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
	}
	out = append(out, match(p, srcOff, expr.CmpOpEq)...)
	out = append(out, match(p, srcOff+addrLen, expr.CmpOpNeq)...)
	for _, e := range except {
		if e.Addr().Is4() == p.Addr().Is4() {
			out = append(out, match(e, srcOff+addrLen, expr.CmpOpNeq)...)
		}
	}
	return append(out, &expr.Masq{})
}

// Remove deletes the network's rules, and the table once no rule is left.
func Remove(network string) error {
	unlock, err := lock()
	if err != nil {
		return err
	}
	defer unlock()
	c, err := conn()
	if err != nil {
		return err
	}
	existing, err := rules(c)
	if err != nil || len(existing) == 0 {
		return err
	}
	left := 0
	for _, r := range existing {
		if strings.HasPrefix(commentOf(r), "ebpf-cni "+network+" ") {
			if err := c.DelRule(r); err != nil {
				return fmt.Errorf("delete masquerade rule of %s: %w", network, err)
			}
		} else {
			left++
		}
	}
	if left == 0 {
		c.DelTable(table)
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("delete masquerade rules of %s: %w", network, err)
	}
	return nil
}
