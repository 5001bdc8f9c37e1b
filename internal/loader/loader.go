// Package loader loads the datapath compiled by bpf2go, pins it once per
// node and attaches it to host veths.
//
// Pins under the pin root (default /sys/fs/bpf/ebpf-cni) outlive every plugin
// process (upgrade.go: how a new build takes over from an older one):
//
//	<root>/endpoints_v1, devices_v1, ep_stats_v1  maps, pinned by name
//	<root>/progs/<tag>/from_pod, to_pod          programs of one object build
//	<root>/links/<host veth>-ingress, -egress     TCX links (a TCX link whose
//	                                              last handle closes detaches)
//
// <tag> is derived from the embedded object, so a new build loads its own
// programs beside the old ones and endpoints attached by the old build keep
// working. First-time creation runs under an flock on the pin root directory,
// so any number of concurrent ADDs create the pins exactly once.
package loader

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sync"

	"github.com/cilium/ebpf"

	"github.com/ebpf-cni/ebpf-cni/internal/flock"
)

// ErrIncompatible means a pinned map has another layout than this build's.
var ErrIncompatible = errors.New("pinned map is incompatible with this build")

// ErrNotLoaded means the pin root holds no programs of this build yet.
var ErrNotLoaded = errors.New("datapath not loaded on this node")

// Tag names this build's object; it is the directory its programs are
// pinned in. Computed on first use, not at start-up: every CNI call starts
// the binary, and VERSION, DEL of a gone pod or STATUS need no hash.
var Tag = sync.OnceValue(func() string {
	sum := sha256.Sum256(_DatapathBytes)
	return hex.EncodeToString(sum[:6])
})

// Programs are the loaded tc programs of this build.
type Programs struct {
	DatapathPrograms
	root string
}

// Close releases the program handles; pins keep the programs loaded.
func (p *Programs) Close() error { return p.DatapathPrograms.Close() }

// programFields visits the generated DatapathPrograms' fields with their
// pin names (`ebpf` tags): the one list of programs.
func programFields(p *DatapathPrograms, fn func(name string, field *(*ebpf.Program)) error) error {
	v := reflect.ValueOf(p).Elem()
	for i := range v.NumField() {
		name := v.Type().Field(i).Tag.Get("ebpf")
		if err := fn(name, v.Field(i).Addr().Interface().(**ebpf.Program)); err != nil {
			return err
		}
	}
	return nil
}

func progDir(root string) string { return filepath.Join(root, "progs", Tag()) }

// LinkDir is where TCX links of attached host veths are pinned.
func LinkDir(root string) string { return filepath.Join(root, "links") }

// Ensure returns this build's programs, loading and pinning the datapath
// first if this node (pin root) has not got it yet. bpffs is mounted at
// /sys/fs/bpf when the pin root lives there and nothing is mounted.
func Ensure(root string) (*Programs, error) {
	if p, err := Open(root); err == nil && mapsPinned(root) {
		return p, nil
	} else if err == nil {
		p.Close()
	}
	if err := EnsureBPFFS(root); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("create pin root %s: %w", root, err)
	}
	unlock, err := flock.Acquire(root, flock.DefaultWait)
	if err != nil {
		return nil, fmt.Errorf("lock pin root: %w", err)
	}
	defer unlock()
	if p, err := Open(root); err == nil {
		if mapsPinned(root) {
			return p, nil // another ADD won the race
		}
		// Programs without their maps (pins removed by hand): the programs
		// point at maps no one can open, so load everything anew.
		p.Close()
		if err := os.RemoveAll(progDir(root)); err != nil {
			return nil, fmt.Errorf("remove programs pinned without their maps: %w", err)
		}
	}
	return create(root)
}

// mapsPinned reports whether every map of this build is pinned under root.
func mapsPinned(root string) bool {
	for _, name := range MapNames() {
		if _, err := os.Stat(filepath.Join(root, name)); err != nil {
			return false
		}
	}
	return true
}

// MapNames lists the pin names of this build's maps, read from the
// generated DatapathMaps (each field's `ebpf` tag), so a map added to
// bpf/datapath.h needs no hand-kept list. Pinned maps are exactly the
// versioned ones (endpoints_v1); an unversioned map (the per-CPU scratch)
// lives and dies with its programs.
func MapNames() []string {
	t := reflect.TypeFor[DatapathMaps]()
	out := make([]string, 0, t.NumField())
	for i := range t.NumField() {
		if name := t.Field(i).Tag.Get("ebpf"); versioned.MatchString(name) {
			out = append(out, name)
		}
	}
	return out
}

// Open loads this build's pinned programs; ErrNotLoaded when absent.
func Open(root string) (*Programs, error) {
	dir := progDir(root)
	p := &Programs{root: root}
	err := programFields(&p.DatapathPrograms, func(name string, field **ebpf.Program) error {
		prog, err := ebpf.LoadPinnedProgram(filepath.Join(dir, name), nil)
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("%s: %w", dir, ErrNotLoaded)
		}
		if err != nil {
			return fmt.Errorf("load pinned program %s: %w", name, err)
		}
		*field = prog
		return nil
	})
	if err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}

func create(root string) (*Programs, error) {
	spec, err := LoadDatapath()
	if err != nil {
		return nil, fmt.Errorf("parse embedded datapath: %w", err)
	}
	if err := checkNewer(root, spec); err != nil {
		return nil, err
	}
	var objs DatapathObjects
	opts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: root}}
	if err := spec.LoadAndAssign(&objs, opts); err != nil {
		if errors.Is(err, ebpf.ErrMapIncompatible) {
			return nil, fmt.Errorf("%w: %w (a map changed its layout without a new name: a build error)", ErrIncompatible, err)
		}
		return nil, fmt.Errorf("load datapath: %w", err)
	}
	objs.DatapathMaps.Close() // pinned by name; internal/maps reopens them
	p := &Programs{DatapathPrograms: objs.DatapathPrograms, root: root}
	// Move the node onto this build before its programs are pinned: if
	// that fails, the next call finds no pinned programs and tries again.
	if err := p.upgrade(spec); err != nil {
		p.Close()
		return nil, fmt.Errorf("upgrade the node to datapath %s: %w", Tag(), err)
	}
	dir := progDir(root)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		p.Close()
		return nil, fmt.Errorf("create %s: %w", dir, err)
	}
	err = programFields(&p.DatapathPrograms, func(name string, field **ebpf.Program) error {
		if err := (*field).Pin(filepath.Join(dir, name)); err != nil {
			return fmt.Errorf("pin program %s: %w", name, err)
		}
		return nil
	})
	if err != nil {
		p.Close()
		os.RemoveAll(dir)
		return nil, err
	}
	return p, removeOldPrograms(root)
}

// upgrade copies older map versions into this build's maps, moves every
// attachment onto p's programs, copies again what the older programs
// wrote meanwhile, and unpins the older maps (see upgrade.go).
func (p *Programs) upgrade(spec *ebpf.CollectionSpec) error {
	if err := migrate(p.root, spec, false); err != nil {
		return err
	}
	if _, err := p.takeOver(); err != nil {
		return err
	}
	return migrate(p.root, spec, true)
}

// Upgrade runs the takeover again for an already loaded build (ebpf-cni
// upgrade): attachments an older build made since, and its maps, move over.
func (p *Programs) Upgrade() error {
	spec, err := LoadDatapath()
	if err != nil {
		return err
	}
	unlock, err := flock.Acquire(p.root, flock.DefaultWait)
	if err != nil {
		return fmt.Errorf("lock pin root: %w", err)
	}
	defer unlock()
	if err := p.upgrade(spec); err != nil {
		return err
	}
	return removeOldPrograms(p.root)
}

// LoadUnpinned loads the datapath with private, unpinned maps: for tests
// that run the programs on crafted frames.
func LoadUnpinned() (*DatapathObjects, error) {
	spec, err := LoadDatapath()
	if err != nil {
		return nil, fmt.Errorf("parse embedded datapath: %w", err)
	}
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinNone
	}
	var objs DatapathObjects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		return nil, fmt.Errorf("load datapath: %w", err)
	}
	return &objs, nil
}

// CheckPins reports whether the maps pinned under root (if any) can be used
// by this build. Missing pins are fine: the first ADD creates them.
func CheckPins(root string) error {
	spec, err := LoadDatapath()
	if err != nil {
		return fmt.Errorf("parse embedded datapath: %w", err)
	}
	for name, ms := range spec.Maps {
		if ms.Pinning != ebpf.PinByName {
			continue
		}
		path := filepath.Join(root, name)
		m, err := ebpf.LoadPinnedMap(path, nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("open pinned map %s: %w", path, err)
		}
		err = ms.Compatible(m)
		m.Close()
		if err != nil {
			return fmt.Errorf("%s: %w: %w", path, ErrIncompatible, err)
		}
	}
	return nil
}
