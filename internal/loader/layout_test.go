package loader

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
)

var update = flag.Bool("update", false, "rewrite testdata/maps/*.golden from the object (only for a new map name)")

// describe renders a map key or value type: its size, and for a struct
// every member with offset, size and type.
func describe(t btf.Type) string {
	if t == nil {
		return "none\n" // a ring buffer's records are not typed by the map
	}
	var b strings.Builder
	size, _ := btf.Sizeof(t)
	st, ok := btf.UnderlyingType(t).(*btf.Struct)
	if !ok {
		fmt.Fprintf(&b, "%s (%d bytes)\n", t.TypeName(), size)
		if t.TypeName() == "" {
			fmt.Fprintf(&b, "%T (%d bytes)\n", btf.UnderlyingType(t), size)
		}
		return b.String()
	}
	fmt.Fprintf(&b, "struct %s (%d bytes)\n", st.Name, size)
	for _, m := range st.Members {
		ms, _ := btf.Sizeof(m.Type)
		name := m.Type.TypeName()
		if name == "" {
			name = fmt.Sprintf("%T", btf.UnderlyingType(m.Type))
			if a, ok := btf.UnderlyingType(m.Type).(*btf.Array); ok {
				name = fmt.Sprintf("%s[%d]", a.Type.TypeName(), a.Nelems)
			}
		}
		fmt.Fprintf(&b, "  %-20s @%-3d %3d bytes  %s\n", m.Name, m.Offset.Bytes(), ms, name)
	}
	return b.String()
}

// A map's key and value layout is part of the node's state: pins outlive
// builds, and a new build reads what the old one wrote. Each pinned map has
// a golden description; a layout change fails here until the map gets a new
// name (endpoints_v1 -> endpoints_v2), whose new golden file is written with
// -update. The loader then migrates the old version's entries by field name
// (upgrade.go), which needs the struct to keep its C name.
func TestMapLayoutsGolden(t *testing.T) {
	spec, err := LoadDatapath()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for name, m := range spec.Maps {
		if m.Pinning == ebpf.PinByName {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	for _, name := range names {
		t.Run(name, func(t *testing.T) {
			m := spec.Maps[name]
			if _, _, ok := splitVersion(name); !ok {
				t.Fatalf("pinned map %s has no _vN suffix: its layout could never change", name)
			}
			got := fmt.Sprintf("map %s: %s, max %d entries, flags %#x\nkey: %svalue: %s", name, m.Type, m.MaxEntries, m.Flags,
				describe(m.Key), describe(m.Value))
			path := filepath.Join("testdata", "maps", name+".golden")
			want, err := os.ReadFile(path)
			if os.IsNotExist(err) && *update {
				if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				t.Logf("wrote %s", path)
				return
			}
			if err != nil {
				t.Fatalf("no golden layout for %s: a new map? run go test ./internal/loader -run Golden -update", name)
			}
			if string(want) != got {
				t.Errorf("the layout of %s changed:\n--- golden\n%s--- object\n%s"+
					"A pinned map never changes layout under the same name: rename it (_vN+1) and write its golden file with -update.",
					name, want, got)
			}
		})
	}
	// A golden file without a map: a map was removed or renamed; its
	// file goes too, so the directory lists exactly the live layouts.
	files, _ := filepath.Glob(filepath.Join("testdata", "maps", "*.golden"))
	for _, f := range files {
		name := strings.TrimSuffix(filepath.Base(f), ".golden")
		if _, ok := spec.Maps[name]; !ok {
			t.Errorf("%s describes no map of the object (renamed or removed: delete the file)", f)
		}
	}
}
