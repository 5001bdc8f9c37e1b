package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/ebpf-cni/ebpf-cni/internal/atomicfile"
	"github.com/ebpf-cni/ebpf-cni/internal/config"
)

// install is the DaemonSet's init step: it copies the plugin into the CNI
// bin dir and writes the conflist inside the conf dir, each through a temp
// file renamed into place (a runtime never sees half a file, and the
// conflist is written in place: containerd missed files moved in), then
// runs the installed plugin's `upgrade`, so a new build reaches the pods
// already running (their attachments move onto its programs in place).
func install(args []string) error {
	fs := flag.NewFlagSet("install", flag.ContinueOnError)
	src := fs.String("plugin", "/usr/local/bin/ebpf-cni", "plugin binary to install")
	binDir := fs.String("cni-bin-dir", "/host/opt/cni/bin", "CNI bin dir (host's /opt/cni/bin)")
	confDir := fs.String("cni-conf-dir", "/host/etc/cni/net.d", "CNI conf dir (host's /etc/cni/net.d)")
	name := fs.String("network", "ebpf-cni", "network name")
	version := fs.String("cni-version", "1.0.0", "conflist cniVersion (containerd 1.6 refuses 1.1.0)")
	cluster := fs.String("cluster-cidrs", "10.244.0.0/16", "comma-separated pod ranges of the cluster (never masqueraded)")
	upgrade := fs.Bool("upgrade", true, "run the installed plugin's upgrade (moves running pods onto the new build)")
	pinRoot := fs.String("pin-root", config.DefaultPinRoot, "the plugin's pin root (for -upgrade)")
	stateDir := fs.String("state-dir", config.DefaultStateDir, "the plugin's state directory (for -upgrade)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	data, err := os.ReadFile(*src)
	if err != nil {
		return fmt.Errorf("read plugin: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(*binDir, "ebpf-cni"), data, 0o755); err != nil {
		return err
	}
	conflist := config.Conflist{
		CNIVersion: *version,
		Name:       *name,
		Plugins: []any{
			config.Plugin{
				Type:         config.PluginType,
				Capabilities: map[string]bool{"bandwidth": true},
				Options:      config.Options{ClusterCIDRs: splitList(*cluster)},
				IPAM:         &config.IPAM{Ranges: [][]config.Range{{{Subnet: config.UsePodCIDR}}}},
			},
			map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}},
		},
	}
	b, err := json.MarshalIndent(conflist, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.Write(filepath.Join(*confDir, "10-ebpf-cni.conflist"), b, 0o644); err != nil {
		return err
	}
	fmt.Printf("installed %s and %s\n", filepath.Join(*binDir, "ebpf-cni"), filepath.Join(*confDir, "10-ebpf-cni.conflist"))
	if !*upgrade {
		return nil
	}
	cmd := exec.Command(filepath.Join(*binDir, "ebpf-cni"), "upgrade", "-pin-root", *pinRoot, "-state-dir", *stateDir)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("ebpf-cni upgrade: %w", err)
	}
	return nil
}

// splitList splits a comma-separated flag, trimming blanks and empty items.
func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}
