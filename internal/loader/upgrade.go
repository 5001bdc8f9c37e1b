package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	"github.com/ebpf-cni/ebpf-cni/internal/nl"
)

// A new build reaching a node (its first ADD, or `ebpf-cni upgrade`) takes
// over from the programs already there, under the pin root lock:
//
//  1. it refuses to run over maps of a newer build (a downgrade would read
//     a newer layout, or start empty beside it): ErrNewerPins says what to do;
//  2. it loads its object, reusing every pinned map of the same name and
//     creating the renamed ones (endpoints_v1 -> endpoints_v2);
//  3. it copies the entries of each older version it finds into the new
//     map, field by field by name (the struct keeps its C name across
//     versions; a new field starts at zero);
//  4. it moves every attachment onto its programs in place: link.Update for
//     TCX links (the program changes, the link and its position do not), a
//     filter replace for legacy tc: traffic never meets a detached hook;
//  5. it copies again what older programs wrote meanwhile, then removes the
//     older maps' and programs' pins.

// ErrNewerPins means the pin root holds maps of a newer build.
var ErrNewerPins = errors.New("the pin root holds maps of a newer ebpf-cni build")

var versioned = regexp.MustCompile(`^(.+)_v([0-9]+)$`)

// splitVersion splits "endpoints_v2" into "endpoints", 2.
func splitVersion(name string) (string, int, bool) {
	m := versioned.FindStringSubmatch(name)
	if m == nil {
		return "", 0, false
	}
	v, err := strconv.Atoi(m[2])
	return m[1], v, err == nil
}

// pinnedVersions lists the versions of base pinned under root.
func pinnedVersions(root, base string) []int {
	entries, _ := os.ReadDir(root)
	var out []int
	for _, e := range entries {
		if b, v, ok := splitVersion(e.Name()); ok && b == base && !e.IsDir() {
			out = append(out, v)
		}
	}
	return out
}

// checkNewer refuses pins of a newer build than spec's.
func checkNewer(root string, spec *ebpf.CollectionSpec) error {
	for name := range spec.Maps {
		base, v, ok := splitVersion(name)
		if !ok {
			continue
		}
		for _, have := range pinnedVersions(root, base) {
			if have > v {
				return fmt.Errorf("%w: %s/%s_v%d, while this build (datapath %s) knows %s. Keep the newer plugin "+
					"installed, or, to go back, run the newer build's `ebpf-cni uninstall` once no pod is left "+
					"(this build would otherwise start without the node's pod entries)",
					ErrNewerPins, root, base, have, Tag(), name)
			}
		}
	}
	return nil
}

// migrate copies every older version of spec's maps pinned under root into
// the new pinned map, and, when remove is set, unpins the older versions.
func migrate(root string, spec *ebpf.CollectionSpec, remove bool) error {
	var errs []error
	for name, ms := range spec.Maps {
		base, v, ok := splitVersion(name)
		if !ok || ms.Pinning != ebpf.PinByName {
			continue
		}
		for _, old := range pinnedVersions(root, base) {
			if old >= v {
				continue
			}
			oldPath := filepath.Join(root, fmt.Sprintf("%s_v%d", base, old))
			if err := copyMap(oldPath, filepath.Join(root, name), ms); err != nil {
				errs = append(errs, fmt.Errorf("migrate %s to %s: %w", filepath.Base(oldPath), name, err))
				continue
			}
			if remove {
				errs = append(errs, os.Remove(oldPath))
			}
		}
	}
	return errors.Join(errs...)
}

// copyMap copies the entries of the pinned map at from into the pinned map
// at to, converting keys and values from from's BTF to ms's types.
func copyMap(from, to string, ms *ebpf.MapSpec) error {
	src, err := ebpf.LoadPinnedMap(from, nil)
	if err != nil {
		return err
	}
	defer src.Close()
	dst, err := ebpf.LoadPinnedMap(to, nil)
	if err != nil {
		return err
	}
	defer dst.Close()
	info, err := src.Info()
	if err != nil {
		return err
	}
	id, ok := info.BTFID()
	if !ok {
		return errors.New("old map carries no BTF")
	}
	h, err := btf.NewHandleFromID(id)
	if err != nil {
		return err
	}
	defer h.Close()
	oldSpec, err := h.Spec(nil)
	if err != nil {
		return err
	}
	convKey, err := converter(ms.Key, oldSpec, info.KeySize)
	if err != nil {
		return fmt.Errorf("key: %w", err)
	}
	convVal, err := converter(ms.Value, oldSpec, info.ValueSize)
	if err != nil {
		return fmt.Errorf("value: %w", err)
	}
	perCPU := ms.Type == ebpf.PerCPUHash || ms.Type == ebpf.PerCPUArray || ms.Type == ebpf.LRUCPUHash
	keyT := reflect.ArrayOf(int(info.KeySize), reflect.TypeFor[byte]())
	valT := reflect.ArrayOf(int(info.ValueSize), reflect.TypeFor[byte]())
	k := reflect.New(keyT)
	var v reflect.Value
	if perCPU {
		v = reflect.New(reflect.SliceOf(valT))
	} else {
		v = reflect.New(valT)
	}
	var errs []error
	it := src.Iterate()
	for it.Next(k.Interface(), v.Interface()) {
		nk := convKey(bytesOf(k.Elem()))
		var nv any
		if perCPU {
			var vals [][]byte
			for i := range v.Elem().Len() {
				vals = append(vals, convVal(bytesOf(v.Elem().Index(i))))
			}
			nv = vals
		} else {
			nv = convVal(bytesOf(v.Elem()))
		}
		if err := dst.Put(nk, nv); err != nil {
			errs = append(errs, err)
		}
	}
	errs = append(errs, it.Err())
	return errors.Join(errs...)
}

func bytesOf(arr reflect.Value) []byte {
	out := make([]byte, arr.Len())
	reflect.Copy(reflect.ValueOf(out), arr)
	return out
}

// converter maps bytes of the old layout of typ (found by name in old) to
// typ's layout: struct members by name (same size, else zero), anything
// else byte for byte when the size is unchanged.
func converter(typ btf.Type, old *btf.Spec, oldSize uint32) (func([]byte) []byte, error) {
	size, err := btf.Sizeof(typ)
	if err != nil {
		return nil, err
	}
	st, isStruct := btf.UnderlyingType(typ).(*btf.Struct)
	if !isStruct || st.Name == "" {
		if uint32(size) != oldSize {
			return nil, fmt.Errorf("%s changed size (%d -> %d) and is not a struct to map by field", typ, oldSize, size)
		}
		return func(b []byte) []byte { return b }, nil
	}
	var prev *btf.Struct
	if err := old.TypeByName(st.Name, &prev); err != nil {
		return nil, fmt.Errorf("no struct %s in the old map's BTF: %w", st.Name, err)
	}
	type move struct{ from, to, n int }
	var plan []move
	for _, m := range st.Members {
		for _, o := range prev.Members {
			if o.Name != m.Name {
				continue
			}
			ms, err1 := btf.Sizeof(m.Type)
			os, err2 := btf.Sizeof(o.Type)
			if err1 == nil && err2 == nil && ms == os {
				plan = append(plan, move{from: int(o.Offset.Bytes()), to: int(m.Offset.Bytes()), n: ms})
			}
		}
	}
	return func(b []byte) []byte {
		out := make([]byte, size)
		for _, mv := range plan {
			if mv.from+mv.n <= len(b) {
				copy(out[mv.to:mv.to+mv.n], b[mv.from:mv.from+mv.n])
			}
		}
		return out
	}, nil
}

// takeOver moves every attachment under root (TCX links pinned there, and
// legacy tc filters of ours on any device) onto p's programs, matched by
// program name, and returns how many it moved.
func (p *Programs) takeOver() (int, error) {
	byName := map[string]*ebpf.Program{}
	programFields(&p.DatapathPrograms, func(name string, field **ebpf.Program) error {
		byName[name] = *field
		return nil
	})
	current := func(id ebpf.ProgramID) (*ebpf.Program, bool) {
		old, err := ebpf.NewProgramFromID(id)
		if err != nil {
			return nil, false
		}
		defer old.Close()
		info, err := old.Info()
		if err != nil {
			return nil, false
		}
		np, ok := byName[info.Name]
		if !ok {
			return nil, false
		}
		if ni, err := np.Info(); err == nil {
			if nid, _ := ni.ID(); nid == id {
				return nil, false // already ours
			}
		}
		return np, true
	}
	var errs []error
	moved := 0
	pins, _ := os.ReadDir(LinkDir(p.root))
	for _, e := range pins {
		pin := filepath.Join(LinkDir(p.root), e.Name())
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			continue // defunct: GC's
		}
		info, err := l.Info()
		if err == nil {
			if np, ok := current(info.Program); ok {
				if err := l.Update(np); err != nil {
					errs = append(errs, fmt.Errorf("update %s: %w", e.Name(), err))
				} else {
					moved++
				}
			}
		}
		l.Close()
	}
	links, err := nl.LinkList()
	errs = append(errs, err)
	for _, lnk := range links {
		for _, h := range hooks {
			filters, err := nl.FilterList(lnk, h.parent)
			if err != nil {
				continue
			}
			for _, f := range filters {
				bf, ok := f.(*netlink.BpfFilter)
				if !ok || !strings.HasPrefix(bf.Name, filterPrefix) {
					continue
				}
				np, ok := current(ebpf.ProgramID(bf.Id))
				if !ok {
					continue
				}
				nf := *bf
				nf.Fd = np.FD()
				if err := netlink.FilterReplace(&nf); err != nil {
					errs = append(errs, fmt.Errorf("replace tc %s filter on %s: %w", h.dir, lnk.Attrs().Name, err))
				} else {
					moved++
				}
			}
		}
	}
	return moved, errors.Join(errs...)
}

// removeOldPrograms unpins the programs of other builds (attachments that
// still use one keep it alive until they move).
func removeOldPrograms(root string) error {
	entries, err := os.ReadDir(filepath.Join(root, "progs"))
	if err != nil {
		return nil
	}
	var errs []error
	for _, e := range entries {
		if e.Name() != Tag() {
			errs = append(errs, os.RemoveAll(filepath.Join(root, "progs", e.Name())))
		}
	}
	return errors.Join(errs...)
}
