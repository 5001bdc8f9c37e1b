// Package config is ebpf-cni's network configuration: the JSON a runtime
// passes on stdin, decoded once, validated, with defaults filled in and the
// IPAM (built-in or delegated) chosen. The installer writes the same types
// into the conflist it installs.
//
// Every refusal names the field it is about: a *FieldError (CNI code 7)
// for a value the plugin will not take, a *DecodeError (code 6) for stdin
// that is not the JSON expected.
package config

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
	DefaultPinRoot  = "/sys/fs/bpf/ebpf-cni"
	DefaultStateDir = "/var/lib/ebpf-cni"
	DefaultDataDir  = "/var/lib/ebpf-cni/ipam"
	// BuiltinIPAM is the ipam.type of the built-in IPAM (an empty type too).
	BuiltinIPAM = "ebpf-cni"
	// UsePodCIDR as a range subnet takes the node's podCIDRs from the
	// agent's node file (as Calico's "usePodCidr" does).
	UsePodCIDR = "usePodCidr"
	// PluginType is the "type" runtimes find the plugin by.
	PluginType = "ebpf-cni"
)

// SupportedVersions are the CNI spec versions the plugin speaks.
var SupportedVersions = version.PluginSupports("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

// validName is libcni's rule for network names; the name becomes a path.
var validName = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`)

// Options are ebpf-cni's own keys of the plugin's config, shared by what the
// plugin reads (NetConf) and what the installer writes (Plugin).
type Options struct {
	MTU        int    `json:"mtu,omitempty"`
	PinRoot    string `json:"pinRoot,omitempty"`
	StateDir   string `json:"stateDir,omitempty"`
	Masquerade *bool  `json:"masquerade,omitempty"`
	LogFile    string `json:"logFile,omitempty"`
	Attach     string `json:"attach,omitempty"`
	// ClusterCIDRs are the cluster's pod ranges: traffic to them (pods on
	// other nodes) is never masqueraded, and takes the fast path across
	// nodes.
	ClusterCIDRs []string `json:"clusterCIDRs,omitempty"`
	// Devices names the node's uplinks for the cross-node fast path
	// instead of choosing them from the routes.
	Devices []string `json:"devices,omitempty"`
}

// IPAM is the ipam section: host-local's shape for the built-in IPAM, or
// any plugin's type (its own keys are passed on untouched).
type IPAM struct {
	Type    string    `json:"type,omitempty"`
	Ranges  [][]Range `json:"ranges,omitempty"`
	Routes  []Route   `json:"routes,omitempty"`
	DataDir string    `json:"dataDir,omitempty"`
}

// Range is one range of a range set, as host-local spells it.
type Range struct {
	Subnet     string `json:"subnet"`
	RangeStart string `json:"rangeStart,omitempty"`
	RangeEnd   string `json:"rangeEnd,omitempty"`
	Gateway    string `json:"gateway,omitempty"`
}

// Route is a destination the pod routes via its gateway.
type Route struct {
	Dst string `json:"dst"`
	GW  string `json:"gw,omitempty"`
}

// Plugin is the ebpf-cni entry of a conflist, as the installer writes it.
type Plugin struct {
	Type         string          `json:"type"`
	Capabilities map[string]bool `json:"capabilities,omitempty"`
	Options
	// IPAM is an *IPAM for the built-in IPAM, or any JSON object a
	// delegated IPAM plugin reads.
	IPAM any `json:"ipam,omitempty"`
}

// Conflist is a network configuration list.
type Conflist struct {
	CNIVersion string `json:"cniVersion"`
	Name       string `json:"name"`
	Plugins    []any  `json:"plugins"`
}

// Bandwidth is the "bandwidth" capability (rates in bit/s), as the
// bandwidth plugin reads it.
type Bandwidth struct {
	IngressRate  uint64 `json:"ingressRate"`
	IngressBurst uint64 `json:"ingressBurst"`
	EgressRate   uint64 `json:"egressRate"`
	EgressBurst  uint64 `json:"egressBurst"`
}

// NetConf is the plugin's network configuration as a runtime passes it.
type NetConf struct {
	types.NetConf
	Options
	// IPAM shadows types.NetConf's (which keeps only the type).
	IPAM IPAM `json:"ipam"`
	// LegacyAttachments is GC's older spelling of ValidAttachments (libcni
	// sends both).
	LegacyAttachments []types.GCAttachment `json:"cni.dev/attachments,omitempty"`

	// RuntimeConfig carries the capabilities the conflist declares for us.
	// Keys match case-insensitively (containerd sends Go field names).
	RuntimeConfig struct {
		Bandwidth *Bandwidth `json:"bandwidth,omitempty"`
	} `json:"runtimeConfig,omitempty"`

	// Filled by Parse.
	ClusterPrefixes []netip.Prefix // parsed ClusterCIDRs
	Addresses       ipam.Manager   // the IPAM that serves this network, chosen once
}

// FieldError is a config the plugin refuses (CNI code 7); it names the field.
type FieldError struct {
	Field string
	Err   error
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Err.Error() }
func (e *FieldError) Unwrap() error { return e.Err }

// Invalid returns a *FieldError for field.
func Invalid(field, format string, a ...any) error {
	return &FieldError{Field: field, Err: fmt.Errorf(format, a...)}
}

// DecodeError is stdin that is not the JSON expected (CNI code 6).
type DecodeError struct{ Err error }

func (e *DecodeError) Error() string { return "decode network config: " + e.Err.Error() }
func (e *DecodeError) Unwrap() error { return e.Err }

// Parse decodes stdin once and validates it, filling defaults and choosing
// the IPAM. It reads the agent's node file for "usePodCidr" ranges and
// changes nothing on the node. When stdin decodes but does not validate,
// the decoded config comes back with the error (its logFile still tells
// where to log the refusal); only a nil error makes it usable.
func Parse(stdin []byte) (*NetConf, error) {
	conf := &NetConf{}
	if err := json.Unmarshal(stdin, conf); err != nil {
		return nil, &DecodeError{err}
	}
	if err := conf.validate(stdin); err != nil {
		return conf, err
	}
	if conf.RawPrevResult != nil {
		if err := version.ParsePrevResult(&conf.NetConf); err != nil {
			return conf, &DecodeError{fmt.Errorf("prevResult: %w", err)}
		}
	}
	return conf, nil
}

// Shaped reports whether the attachment is rate-limited: its traffic must
// then pass the host veth's qdiscs, where the bandwidth plugin shapes.
func (c *NetConf) Shaped() bool {
	b := c.RuntimeConfig.Bandwidth
	return b != nil && (b.IngressRate > 0 || b.EgressRate > 0)
}

// FastPath reports whether the network takes part in the cross-node fast
// path (it knows the cluster's pod ranges, or names its uplinks).
func (c *NetConf) FastPath() bool { return len(c.ClusterPrefixes) > 0 || len(c.Devices) > 0 }

// Valid reports whether GC must keep the attachment (containerID, ifname).
func (c *NetConf) Valid(containerID, ifname string) bool {
	a := types.GCAttachment{ContainerID: containerID, IfName: ifname}
	return slices.Contains(c.ValidAttachments, a) || slices.Contains(c.LegacyAttachments, a)
}

func (c *NetConf) validate(stdin []byte) error {
	if c.CNIVersion == "" {
		return Invalid("cniVersion", "missing")
	}
	if !slices.Contains(SupportedVersions.SupportedVersions(), c.CNIVersion) {
		return Invalid("cniVersion", "%q is not supported (want one of %s)", c.CNIVersion, strings.Join(SupportedVersions.SupportedVersions(), ", "))
	}
	if c.Name == "" {
		return Invalid("name", "missing")
	}
	if len(c.Name) > 128 {
		return Invalid("name", "is %d characters long, at most 128", len(c.Name))
	}
	if !validName.MatchString(c.Name) {
		return Invalid("name", "%q may only hold letters, digits, '_', '.' and '-', starting with a letter or digit", c.Name)
	}
	if c.MTU != 0 && (c.MTU < 68 || c.MTU > 65535) {
		return Invalid("mtu", "%d is outside 68..65535", c.MTU)
	}
	var err error
	if c.PinRoot, err = absPath("pinRoot", c.PinRoot, DefaultPinRoot); err != nil {
		return err
	}
	if c.StateDir, err = absPath("stateDir", c.StateDir, DefaultStateDir); err != nil {
		return err
	}
	if c.LogFile != "" && !filepath.IsAbs(c.LogFile) {
		return Invalid("logFile", "%q is not an absolute path", c.LogFile)
	}
	if c.Masquerade == nil {
		t := true
		c.Masquerade = &t
	}
	for i, s := range c.ClusterCIDRs {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return Invalid(fmt.Sprintf("clusterCIDRs[%d]", i), "%q is not a CIDR", s)
		}
		c.ClusterPrefixes = append(c.ClusterPrefixes, p.Masked())
	}
	for i, d := range c.Devices {
		if d == "" || len(d) > 15 || strings.ContainsAny(d, "/ \x00") {
			return Invalid(fmt.Sprintf("devices[%d]", i), "%q is not an interface name", d)
		}
	}
	switch loader.Mode(c.Attach) {
	case "":
		c.Attach = string(loader.ModeAuto)
	case loader.ModeAuto, loader.ModeTCX, loader.ModeTC:
	default:
		return Invalid("attach", "%q is not one of auto, tcx, tc", c.Attach)
	}
	return c.validateIPAM(stdin)
}

// absPath cleans an absolute path, or returns def when it is empty.
func absPath(field, p, def string) (string, error) {
	if p == "" {
		return def, nil
	}
	if !filepath.IsAbs(p) {
		return "", Invalid(field, "%q is not an absolute path", p)
	}
	return filepath.Clean(p), nil
}

func (c *NetConf) validateIPAM(stdin []byte) error {
	ic := &c.IPAM
	switch ic.Type {
	case "", BuiltinIPAM:
	default:
		if strings.ContainsAny(ic.Type, "/\\") || ic.Type == "." || ic.Type == ".." {
			return Invalid("ipam.type", "%q is not a plugin name", ic.Type)
		}
		// The delegated plugin validates its own section.
		c.Addresses = ipam.NewDelegate(ic.Type, stdin)
		return nil
	}
	if len(ic.Ranges) == 0 {
		return Invalid("ipam.ranges", "missing: the built-in IPAM needs at least one range set")
	}
	if ic.DataDir == "" {
		ic.DataDir = DefaultDataDir
	}
	if !filepath.IsAbs(ic.DataDir) {
		return Invalid("ipam.dataDir", "%q is not an absolute path", ic.DataDir)
	}
	store := ipam.NewDiskStore(filepath.Join(ic.DataDir, c.Name))
	if len(ic.Ranges) == 1 && len(ic.Ranges[0]) == 1 && ic.Ranges[0][0].Subnet == UsePodCIDR {
		// The node's own podCIDRs, as ebpf-cni-agent wrote them. Without
		// them ADD must wait (11); DEL and GC release by owner and need none.
		info, err := node.Read(c.StateDir)
		if err != nil {
			c.Addresses = ipam.NewBuiltin(store, nil, nil, err)
			return nil
		}
		ic.Ranges = nil
		for _, p := range info.PodCIDRs {
			ic.Ranges = append(ic.Ranges, []Range{{Subnet: p.String()}})
		}
		c.MTU = cmp.Or(c.MTU, info.MTU)
	}
	sets, err := rangeSets(ic.Ranges)
	if err != nil {
		return err
	}
	var routes []netip.Prefix
	for i, r := range ic.Routes {
		p, err := netip.ParsePrefix(r.Dst)
		if err != nil {
			return Invalid(fmt.Sprintf("ipam.routes[%d].dst", i), "%q is not a CIDR", r.Dst)
		}
		if r.GW != "" {
			if _, err := netip.ParseAddr(r.GW); err != nil {
				return Invalid(fmt.Sprintf("ipam.routes[%d].gw", i), "%q is not an IP address", r.GW)
			}
		}
		// Pods always route via the link-local gateway; a gw is accepted
		// for host-local compatibility and not used.
		routes = append(routes, p.Masked())
	}
	c.Addresses = ipam.NewBuiltin(store, sets, routes, nil)
	return nil
}

// rangeSets parses and validates host-local-shaped ranges: one IPv4 and one
// IPv6 set at most (a pod has one interface, and a second address of a
// family would be dropped as spoofed).
func rangeSets(in [][]Range) ([]ipam.RangeSet, error) {
	sets := make([]ipam.RangeSet, len(in))
	for i, set := range in {
		for j, r := range set {
			field := fmt.Sprintf("ipam.ranges[%d][%d]", i, j)
			var rg ipam.Range
			var err error
			if r.Subnet == "" {
				return nil, Invalid(field+".subnet", "missing")
			}
			if rg.Subnet, err = netip.ParsePrefix(r.Subnet); err != nil {
				return nil, Invalid(field+".subnet", "%q is not a CIDR", r.Subnet)
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
					return nil, Invalid(field+"."+a.name, "%q is not an IP address", a.s)
				}
			}
			sets[i] = append(sets[i], rg)
		}
	}
	valid, err := ipam.Validate(sets)
	if err != nil {
		var fe *ipam.FieldError
		if errors.As(err, &fe) {
			return nil, &FieldError{Field: fe.Field, Err: fe.Err}
		}
		return nil, Invalid("ipam.ranges", "%w", err)
	}
	seen := map[bool]int{}
	for i, set := range valid {
		is4 := set[0].Subnet.Addr().Is4()
		if j, dup := seen[is4]; dup {
			return nil, Invalid(fmt.Sprintf("ipam.ranges[%d]", i), "a second range set of the same family as ipam.ranges[%d]: one IPv4 and one IPv6 set at most", j)
		}
		seen[is4] = i
	}
	return valid, nil
}

// PodArgs are the Kubernetes keys of CNI_ARGS the plugin records.
type PodArgs struct {
	types.CommonArgs
	K8S_POD_NAMESPACE          types.UnmarshallableString //nolint:revive // CNI_ARGS key
	K8S_POD_NAME               types.UnmarshallableString //nolint:revive
	K8S_POD_UID                types.UnmarshallableString //nolint:revive
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString //nolint:revive
}

// ArgsError is CNI_ARGS the plugin cannot read (CNI code 4).
type ArgsError struct{ Err error }

func (e *ArgsError) Error() string { return "CNI_ARGS: " + e.Err.Error() }
func (e *ArgsError) Unwrap() error { return e.Err }

// ParseArgs reads CNI_ARGS ("K=V;K=V") with the CNI library. Keys the plugin
// does not know are ignored whatever IgnoreUnknown says: every runtime sends
// some, and none of them changes what the plugin does. Empty pairs (a
// trailing ';') are skipped.
func ParseArgs(s string) (PodArgs, error) {
	var a PodArgs
	var pairs []string
	for _, kv := range strings.Split(s, ";") {
		if kv != "" {
			pairs = append(pairs, kv)
		}
	}
	if len(pairs) == 0 {
		return a, nil
	}
	if err := types.LoadArgs(strings.Join(append(pairs, "IgnoreUnknown=1"), ";"), &a); err != nil {
		return a, &ArgsError{err}
	}
	return a, nil
}

// Owner is the IPAM owner of an attachment, with the pod it belongs to.
func (a PodArgs) Owner(containerID, ifname string) ipam.Owner {
	return ipam.Owner{
		ContainerID: containerID, IfName: ifname,
		PodNamespace: string(a.K8S_POD_NAMESPACE), PodName: string(a.K8S_POD_NAME),
	}
}
