// Package node is the hand-off between ebpf-cni-agent and the plugin: the
// agent writes what it learns of its own Node (podCIDRs, the pod MTU the
// routing mode allows) to <stateDir>/node.json, atomically; the plugin reads
// it for `"subnet": "usePodCidr"` ranges. The plugin never talks to the API
// server, so ADD and DEL keep working while the agent is down.
package node

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/ebpf-cni/ebpf-cni/internal/atomicfile"
)

// FileName is the name of the hand-off file inside the state directory.
const FileName = "node.json"

// ErrUnknown means no agent has written the node file yet.
var ErrUnknown = errors.New("node podCIDR not known yet (is ebpf-cni-agent running on this node?)")

// Info is what the agent knows of its node.
type Info struct {
	Name     string         `json:"name"`
	PodCIDRs []netip.Prefix `json:"podCIDRs"`
	// MTU is the largest pod MTU the routing mode allows (the underlay's
	// minus the VXLAN overhead in overlay mode); 0 leaves the plugin's default.
	MTU int `json:"mtu,omitempty"`
}

// Path returns the node file path for a state directory.
func Path(stateDir string) string { return filepath.Join(stateDir, FileName) }

// Read loads the node file; ErrUnknown when it does not exist.
func Read(stateDir string) (Info, error) {
	var info Info
	data, err := os.ReadFile(Path(stateDir))
	if errors.Is(err, os.ErrNotExist) {
		return info, fmt.Errorf("%s: %w", Path(stateDir), ErrUnknown)
	}
	if err != nil {
		return info, fmt.Errorf("read node file: %w", err)
	}
	if err := json.Unmarshal(data, &info); err != nil {
		return info, fmt.Errorf("decode %s: %w", Path(stateDir), err)
	}
	if len(info.PodCIDRs) == 0 {
		return info, fmt.Errorf("%s lists no podCIDR: %w", Path(stateDir), ErrUnknown)
	}
	return info, nil
}

// Write replaces the node file atomically.
func Write(stateDir string, info Info) error {
	data, err := json.MarshalIndent(info, "", "  ")
	if err != nil {
		return fmt.Errorf("encode node file: %w", err)
	}
	return atomicfile.Write(Path(stateDir), data, 0o644)
}

// BootID is the kernel's boot ID (a new one at every boot), "" if unknown.
func BootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// PolicyFileName is the policy hand-off inside the state directory: which
// namespaces have NetworkPolicies (ebpf-cni-agent's policy controller
// writes it; ADD isolates a new pod of those namespaces until the agent
// programmed its policy), and which policies select each local pod (for
// `ebpf-cni inspect`).
const PolicyFileName = "policy.json"

// Policy is the policy hand-off.
type Policy struct {
	Namespaces []string            `json:"namespaces"`
	Selecting  map[string][]string `json:"selecting,omitempty"` // "ns/pod" -> "ns/policy"
}

// ReadPolicy loads the policy hand-off; an empty Policy when no policy
// controller ever ran.
func ReadPolicy(stateDir string) (Policy, error) {
	var p Policy
	data, err := os.ReadFile(filepath.Join(stateDir, PolicyFileName))
	if errors.Is(err, os.ErrNotExist) {
		return p, nil
	}
	if err != nil {
		return p, fmt.Errorf("read policy file: %w", err)
	}
	if err := json.Unmarshal(data, &p); err != nil {
		return p, fmt.Errorf("decode %s: %w", PolicyFileName, err)
	}
	return p, nil
}

// WritePolicy replaces the policy hand-off atomically.
func WritePolicy(stateDir string, p Policy) error {
	data, err := json.MarshalIndent(p, "", "  ")
	if err != nil {
		return fmt.Errorf("encode policy file: %w", err)
	}
	return atomicfile.Write(filepath.Join(stateDir, PolicyFileName), data, 0o644)
}
