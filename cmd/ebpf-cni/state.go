package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/ebpf-cni/ebpf-cni/internal/atomicfile"
	"github.com/ebpf-cni/ebpf-cni/internal/flock"
)

// endpointState is what ADD remembers of an attachment, so DEL and GC can
// undo it after the pod's namespace (and with it the veth) is gone.
// One file per attachment: <stateDir>/<network>/endpoints/<containerID>:<ifname>.json
// (':' can appear in neither a container ID nor an interface name).
type endpointState struct {
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
}

func (s *endpointState) addrs() []netip.Addr {
	out := make([]netip.Addr, len(s.IPs))
	for i, p := range s.IPs {
		out[i] = p.Addr()
	}
	return out
}

func (s *endpointState) macs() (pod, host net.HardwareAddr) {
	pod, _ = net.ParseMAC(s.PodMAC)
	host, _ = net.ParseMAC(s.HostMAC)
	return pod, host
}

// netDir is the network's state directory.
func netDir(stateDir, network string) string { return filepath.Join(stateDir, network) }

func endpointsDir(stateDir, network string) string {
	return filepath.Join(netDir(stateDir, network), "endpoints")
}

func statePath(stateDir, network, containerID, ifname string) string {
	return filepath.Join(endpointsDir(stateDir, network), containerID+":"+ifname+".json")
}

// lockNetwork serialises the network's endpoint records with its
// masquerade rules (the last DEL removes them, a concurrent ADD re-adds).
func lockNetwork(stateDir, network string) (func(), error) {
	dir := netDir(stateDir, network)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state dir %s: %w", dir, err)
	}
	return flock.Acquire(filepath.Join(dir, "lock"), flock.DefaultWait)
}

func writeState(stateDir, network string, s *endpointState) error {
	data, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return fmt.Errorf("encode endpoint state: %w", err)
	}
	return atomicfile.Write(statePath(stateDir, network, s.ContainerID, s.IfName), data, 0o600)
}

// readState returns nil, nil when the attachment has no record.
func readState(stateDir, network, containerID, ifname string) (*endpointState, error) {
	return readStateFile(statePath(stateDir, network, containerID, ifname))
}

func readStateFile(path string) (*endpointState, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read endpoint state: %w", err)
	}
	var s endpointState
	if err := json.Unmarshal(data, &s); err != nil {
		return nil, fmt.Errorf("decode endpoint state %s: %w", path, err)
	}
	return &s, nil
}

func removeState(stateDir, network, containerID, ifname string) error {
	err := os.Remove(statePath(stateDir, network, containerID, ifname))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove endpoint state: %w", err)
	}
	return nil
}

// listStates returns every endpoint record of the network.
func listStates(stateDir, network string) ([]*endpointState, error) {
	entries, err := os.ReadDir(endpointsDir(stateDir, network))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list endpoint states: %w", err)
	}
	var out []*endpointState
	for _, e := range entries {
		if e.IsDir() || !strings.HasSuffix(e.Name(), ".json") || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		s, err := readStateFile(filepath.Join(endpointsDir(stateDir, network), e.Name()))
		if err != nil {
			return nil, err
		}
		if s != nil {
			out = append(out, s)
		}
	}
	return out, nil
}

// hasStates reports whether the network has any endpoint record, reading
// the directory only until the first one.
func hasStates(stateDir, network string) (bool, error) {
	d, err := os.Open(endpointsDir(stateDir, network))
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("list endpoint states: %w", err)
	}
	defer d.Close()
	for {
		names, err := d.Readdirnames(16)
		for _, n := range names {
			if strings.HasSuffix(n, ".json") && !strings.HasPrefix(n, ".") {
				return true, nil
			}
		}
		if err != nil {
			return false, nil // io.EOF: none
		}
	}
}
