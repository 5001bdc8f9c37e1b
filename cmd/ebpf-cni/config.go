package main

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"regexp"
	"slices"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/ebpf-cni/ebpf-cni/internal/ipam"
	"github.com/ebpf-cni/ebpf-cni/internal/loader"
	"github.com/ebpf-cni/ebpf-cni/internal/node"
)

// Defaults of the network config; README documents each field.
const (
	defaultPinRoot  = "/sys/fs/bpf/ebpf-cni"
	defaultStateDir = "/var/lib/ebpf-cni"
	defaultDataDir  = "/var/lib/ebpf-cni/ipam"
	builtinIPAM     = "ebpf-cni"
	// usePodCIDR as a range subnet takes the node's podCIDRs from the
	// agent's node file (as Calico's "usePodCidr" does).
	usePodCIDR = "usePodCidr"
)

// validName is libcni's rule for network names; the name becomes a path.
var validName = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`)

// NetConf is the plugin's network configuration.
type NetConf struct {
	types.NetConf
	MTU        int    `json:"mtu,omitempty"`
	PinRoot    string `json:"pinRoot,omitempty"`
	StateDir   string `json:"stateDir,omitempty"`
	Masquerade *bool  `json:"masquerade,omitempty"`
	LogFile    string `json:"logFile,omitempty"`
	Attach     string `json:"attach,omitempty"`
	// ClusterCIDRs are the cluster's pod ranges: traffic to them (pods on
	// other nodes) is never masqueraded.
	ClusterCIDRs []string `json:"clusterCIDRs,omitempty"`

	// RuntimeConfig carries the capabilities the conflist declares for us.
	// Keys match case-insensitively (containerd sends Go field names).
	RuntimeConfig struct {
		Bandwidth *bandwidth `json:"bandwidth,omitempty"`
	} `json:"runtimeConfig,omitempty"`

	IPAMConf IPAMConf `json:"-"`

	builtin      bool            // the built-in IPAM serves this network
	podCIDRErr   error           // "usePodCidr" ranges whose node file is missing
	clusterCIDRs []netip.Prefix  // parsed ClusterCIDRs
	sets         []ipam.RangeSet // validated ranges of the built-in IPAM
	routes       []netip.Prefix  // pod routes of the built-in IPAM
}

// bandwidth is the "bandwidth" capability (rates in bit/s), as the
// bandwidth plugin reads it.
type bandwidth struct {
	IngressRate  uint64 `json:"ingressRate"`
	IngressBurst uint64 `json:"ingressBurst"`
	EgressRate   uint64 `json:"egressRate"`
	EgressBurst  uint64 `json:"egressBurst"`
}

// shaped reports whether the attachment is rate-limited: its traffic must
// then pass the host veth's qdiscs, where the bandwidth plugin shapes.
func (c *NetConf) shaped() bool {
	b := c.RuntimeConfig.Bandwidth
	return b != nil && (b.IngressRate > 0 || b.EgressRate > 0)
}

// IPAMConf is the host-local-shaped ipam section the built-in IPAM reads.
type IPAMConf struct {
	Type    string        `json:"type"`
	Ranges  [][]rangeConf `json:"ranges"`
	Routes  []routeConf   `json:"routes"`
	DataDir string        `json:"dataDir"`
}

type rangeConf struct {
	Subnet     string `json:"subnet"`
	RangeStart string `json:"rangeStart"`
	RangeEnd   string `json:"rangeEnd"`
	Gateway    string `json:"gateway"`
}

type routeConf struct {
	Dst string `json:"dst"`
	GW  string `json:"gw"`
}

// configError is a config the plugin refuses (CNI code 7); it names the field.
type configError struct {
	field string
	err   error
}

func (e *configError) Error() string { return e.field + ": " + e.err.Error() }
func (e *configError) Unwrap() error { return e.err }

func invalid(field, format string, a ...any) error {
	return &configError{field: field, err: fmt.Errorf(format, a...)}
}

// decodeError is stdin that is not the JSON we expect (CNI code 6).
type decodeError struct{ err error }

func (e *decodeError) Error() string { return "decode network config: " + e.err.Error() }
func (e *decodeError) Unwrap() error { return e.err }

// parseConfig decodes and validates stdin, filling defaults.
func parseConfig(stdin []byte) (*NetConf, error) {
	conf := &NetConf{}
	if err := json.Unmarshal(stdin, conf); err != nil {
		return nil, &decodeError{err}
	}
	var raw struct {
		IPAM json.RawMessage `json:"ipam"`
	}
	if err := json.Unmarshal(stdin, &raw); err != nil {
		return nil, &decodeError{err}
	}
	if len(raw.IPAM) > 0 && string(raw.IPAM) != "null" {
		if err := json.Unmarshal(raw.IPAM, &conf.IPAMConf); err != nil {
			return nil, &decodeError{fmt.Errorf("ipam: %w", err)}
		}
	}
	if err := conf.validate(); err != nil {
		return nil, err
	}
	if conf.RawPrevResult != nil {
		if err := version.ParsePrevResult(&conf.NetConf); err != nil {
			return nil, &decodeError{fmt.Errorf("prevResult: %w", err)}
		}
	}
	return conf, nil
}

func (c *NetConf) validate() error {
	if c.CNIVersion == "" {
		return invalid("cniVersion", "missing")
	}
	if !slices.Contains(supportedVersions.SupportedVersions(), c.CNIVersion) {
		return invalid("cniVersion", "%q is not supported (want one of %s)", c.CNIVersion, strings.Join(supportedVersions.SupportedVersions(), ", "))
	}
	if c.Name == "" {
		return invalid("name", "missing")
	}
	if len(c.Name) > 128 {
		return invalid("name", "is %d characters long, at most 128", len(c.Name))
	}
	if !validName.MatchString(c.Name) {
		return invalid("name", "%q may only hold letters, digits, '_', '.' and '-', starting with a letter or digit", c.Name)
	}
	if c.MTU != 0 && (c.MTU < 68 || c.MTU > 65535) {
		return invalid("mtu", "%d is outside 68..65535", c.MTU)
	}
	if c.PinRoot == "" {
		c.PinRoot = defaultPinRoot
	}
	if !filepath.IsAbs(c.PinRoot) {
		return invalid("pinRoot", "%q is not an absolute path", c.PinRoot)
	}
	c.PinRoot = filepath.Clean(c.PinRoot)
	if c.StateDir == "" {
		c.StateDir = defaultStateDir
	}
	if !filepath.IsAbs(c.StateDir) {
		return invalid("stateDir", "%q is not an absolute path", c.StateDir)
	}
	if c.LogFile != "" && !filepath.IsAbs(c.LogFile) {
		return invalid("logFile", "%q is not an absolute path", c.LogFile)
	}
	if c.Masquerade == nil {
		t := true
		c.Masquerade = &t
	}
	for i, s := range c.ClusterCIDRs {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return invalid(fmt.Sprintf("clusterCIDRs[%d]", i), "%q is not a CIDR", s)
		}
		c.clusterCIDRs = append(c.clusterCIDRs, p.Masked())
	}
	switch loader.Mode(c.Attach) {
	case "":
		c.Attach = string(loader.ModeAuto)
	case loader.ModeAuto, loader.ModeTCX, loader.ModeTC:
	default:
		return invalid("attach", "%q is not one of auto, tcx, tc", c.Attach)
	}
	return c.validateIPAM()
}

func (c *NetConf) validateIPAM() error {
	ic := &c.IPAMConf
	switch ic.Type {
	case "", builtinIPAM:
		c.builtin = true
	default:
		if strings.ContainsAny(ic.Type, "/\\") || ic.Type == "." || ic.Type == ".." {
			return invalid("ipam.type", "%q is not a plugin name", ic.Type)
		}
		return nil // the delegated plugin validates its own section
	}
	if len(ic.Ranges) == 0 {
		return invalid("ipam.ranges", "missing: the built-in IPAM needs at least one range set")
	}
	if len(ic.Ranges) == 1 && len(ic.Ranges[0]) == 1 && ic.Ranges[0][0].Subnet == usePodCIDR {
		// The node's own podCIDRs, as ebpf-cni-agent wrote them. Without
		// them ADD must wait (11); DEL and GC release by owner and need none.
		info, err := node.Read(c.StateDir)
		if err != nil {
			c.podCIDRErr = err
			c.builtin = true
			ic.DataDir = cmp.Or(ic.DataDir, defaultDataDir)
			return nil
		}
		ic.Ranges = nil
		for _, p := range info.PodCIDRs {
			ic.Ranges = append(ic.Ranges, []rangeConf{{Subnet: p.String()}})
		}
		if c.MTU == 0 {
			c.MTU = info.MTU
		}
	}
	sets := make([]ipam.RangeSet, len(ic.Ranges))
	for i, set := range ic.Ranges {
		for j, r := range set {
			field := fmt.Sprintf("ipam.ranges[%d][%d]", i, j)
			var rg ipam.Range
			var err error
			if r.Subnet == "" {
				return invalid(field+".subnet", "missing")
			}
			if rg.Subnet, err = netip.ParsePrefix(r.Subnet); err != nil {
				return invalid(field+".subnet", "%q is not a CIDR", r.Subnet)
			}
			for _, a := range []struct {
				name string
				s    string
				dst  *netip.Addr
			}{{"rangeStart", r.RangeStart, &rg.RangeStart}, {"rangeEnd", r.RangeEnd, &rg.RangeEnd}, {"gateway", r.Gateway, &rg.Gateway}} {
				if a.s == "" {
					continue
				}
				if *a.dst, err = netip.ParseAddr(a.s); err != nil {
					return invalid(field+"."+a.name, "%q is not an IP address", a.s)
				}
			}
			sets[i] = append(sets[i], rg)
		}
	}
	valid, err := ipam.Validate(sets)
	if err != nil {
		var fe *ipam.FieldError
		if errors.As(err, &fe) {
			return &configError{field: fe.Field, err: fe.Err}
		}
		return invalid("ipam.ranges", "%w", err)
	}
	// A pod has one interface: one IPv4 and one IPv6 address at most, or
	// its second address of a family would be dropped as spoofed.
	seen := map[bool]int{}
	for i, set := range valid {
		is4 := set[0].Subnet.Addr().Is4()
		if j, dup := seen[is4]; dup {
			return invalid(fmt.Sprintf("ipam.ranges[%d]", i), "a second range set of the same family as ipam.ranges[%d]: one IPv4 and one IPv6 set at most", j)
		}
		seen[is4] = i
	}
	c.sets = valid
	for i, r := range ic.Routes {
		p, err := netip.ParsePrefix(r.Dst)
		if err != nil {
			return invalid(fmt.Sprintf("ipam.routes[%d].dst", i), "%q is not a CIDR", r.Dst)
		}
		if r.GW != "" {
			if _, err := netip.ParseAddr(r.GW); err != nil {
				return invalid(fmt.Sprintf("ipam.routes[%d].gw", i), "%q is not an IP address", r.GW)
			}
		}
		// Pods always route via the link-local gateway; a gw is accepted
		// for host-local compatibility and not used.
		c.routes = append(c.routes, p.Masked())
	}
	if ic.DataDir == "" {
		ic.DataDir = defaultDataDir
	}
	if !filepath.IsAbs(ic.DataDir) {
		return invalid("ipam.dataDir", "%q is not an absolute path", ic.DataDir)
	}
	return nil
}

// podArgs are the Kubernetes keys of CNI_ARGS the plugin records.
type podArgs struct {
	Namespace, Name, UID string
}

// parseArgs reads CNI_ARGS ("K=V;K=V"); unknown keys are ignored, as every
// runtime sends some (IgnoreUnknown, K8S_POD_INFRA_CONTAINER_ID, ...).
func parseArgs(s string) (podArgs, error) {
	var a podArgs
	if s == "" {
		return a, nil
	}
	for _, kv := range strings.Split(s, ";") {
		if kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return a, types.NewError(types.ErrInvalidEnvironmentVariables, "CNI_ARGS: "+fmt.Sprintf("%q is not KEY=VALUE", kv), "")
		}
		switch k {
		case "K8S_POD_NAMESPACE":
			a.Namespace = v
		case "K8S_POD_NAME":
			a.Name = v
		case "K8S_POD_UID":
			a.UID = v
		}
	}
	return a, nil
}
