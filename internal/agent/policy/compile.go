package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ebpf-cni/ebpf-cni/internal/maps"
)

// Local is a pod of this node as the plugin wired it (its endpoint
// record): where its policy goes.
type Local struct {
	Namespace, Name string
	Ifindex         int
	IPs             []netip.Addr
}

// Input is everything a compile reads.
type Input struct {
	Pods       []*corev1.Pod // of the whole cluster (peers)
	Namespaces []*corev1.Namespace
	Policies   []*networkingv1.NetworkPolicy
	Locals     []Local
	NodeAddrs  []netip.Addr // this node's: always allowed
}

// State is the maps' desired content.
type State struct {
	Peers     map[netip.Prefix]maps.Peer
	Sets      map[uint32][]maps.Rule // by set ID (rules carry it)
	Endpoints map[int]maps.EPPolicy  // by host veth ifindex: only isolated pods
	// Selecting names the policies selecting each local pod
	// ("namespace/name" -> "namespace/policy"), for inspect.
	Selecting map[string][]string
	// Namespaces with at least one policy: a new pod there starts isolated
	// (pending) until its policy is programmed.
	Namespaces []string
}

// classBase starts the IDs of CIDR classes, apart from identities.
const classBase = 1 << 24

// Compiler keeps what must stay stable between compiles: identities
// (namespace + labels) and set IDs (by content).
type Compiler struct {
	ids     map[string]uint32
	nextID  uint32
	sets    map[string]uint32
	nextSet uint32
}

// NewCompiler returns a compiler with no identities yet.
func NewCompiler() *Compiler {
	return &Compiler{ids: map[string]uint32{}, nextID: maps.IDFirst, sets: map[string]uint32{}, nextSet: 1}
}

func identityKey(ns string, l map[string]string) string {
	keys := make([]string, 0, len(l))
	for k := range l {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	b.WriteString(ns)
	for _, k := range keys {
		fmt.Fprintf(&b, "\x00%s=%s", k, l[k])
	}
	return b.String()
}

func (c *Compiler) identity(ns string, l map[string]string) uint32 {
	k := identityKey(ns, l)
	if id, ok := c.ids[k]; ok {
		return id
	}
	id := c.nextID
	c.nextID++
	c.ids[k] = id
	return id
}

// peerPod is a pod as a peer: its identity, addresses, labels and ports.
type peerPod struct {
	pod *corev1.Pod
	id  uint32
	ips []netip.Addr
}

func podIPs(p *corev1.Pod) []netip.Addr {
	var out []netip.Addr
	raw := p.Status.PodIPs
	if len(raw) == 0 && p.Status.PodIP != "" {
		raw = []corev1.PodIP{{IP: p.Status.PodIP}}
	}
	for _, ip := range raw {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			out = append(out, a.Unmap())
		}
	}
	return out
}

// live: a pod that holds its addresses (not host-network, not finished).
func live(p *corev1.Pod) bool {
	return !p.Spec.HostNetwork && p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed
}

// ipBlock is one ipBlock of a rule.
type ipBlock struct {
	cidr   netip.Prefix
	except []netip.Prefix
}

func (b ipBlock) key() string { return fmt.Sprint(b.cidr, b.except) }

func (b ipBlock) containsPrefix(p netip.Prefix) bool {
	if !prefixContains(b.cidr, p) {
		return false
	}
	for _, e := range b.except {
		if prefixContains(e, p) {
			return false
		}
	}
	return true
}

// prefixContains: p lies within outer.
func prefixContains(outer, p netip.Prefix) bool {
	return outer.Addr().Is4() == p.Addr().Is4() && outer.Bits() <= p.Bits() && outer.Contains(p.Addr())
}

func parseBlock(b *networkingv1.IPBlock) (ipBlock, error) {
	c, err := netip.ParsePrefix(b.CIDR)
	if err != nil {
		return ipBlock{}, fmt.Errorf("ipBlock.cidr %q: %w", b.CIDR, err)
	}
	out := ipBlock{cidr: c.Masked()}
	for _, e := range b.Except {
		p, err := netip.ParsePrefix(e)
		if err != nil {
			return ipBlock{}, fmt.Errorf("ipBlock.except %q: %w", e, err)
		}
		out.except = append(out.except, p.Masked())
	}
	return out, nil
}

// classes: every ipBlock prefix (cidr and except) and the default routes
// get a class: the set of ipBlocks an address under that prefix (and no
// longer one) falls in. The LPM ipcache then answers "which ipBlocks" with
// the longest prefix, for pods too (their /32 carries its own class).
type classes struct {
	blocks   []ipBlock
	byMember map[string]uint32
	prefixes map[netip.Prefix]uint32
}

func newClasses(blocks []ipBlock) *classes {
	cl := &classes{blocks: blocks, byMember: map[string]uint32{}, prefixes: map[netip.Prefix]uint32{}}
	all := []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")}
	for _, b := range blocks {
		all = append(all, b.cidr)
		all = append(all, b.except...)
	}
	for _, p := range all {
		cl.prefixes[p] = cl.of(p)
	}
	return cl
}

// of is the class of prefix p (0: in no ipBlock).
func (cl *classes) of(p netip.Prefix) uint32 {
	var member []string
	for _, b := range cl.blocks {
		if b.containsPrefix(p) {
			member = append(member, b.key())
		}
	}
	if len(member) == 0 {
		return 0
	}
	sort.Strings(member)
	member = slices.Compact(member)
	k := strings.Join(member, "|")
	id, ok := cl.byMember[k]
	if !ok {
		id = classBase + uint32(len(cl.byMember)) + 1
		cl.byMember[k] = id
	}
	return id
}

// holding are the classes whose addresses fall in b.
func (cl *classes) holding(b ipBlock) []uint32 {
	var out []uint32
	for p, id := range cl.prefixes {
		if id != 0 && b.containsPrefix(p) && !slices.Contains(out, id) {
			out = append(out, id)
		}
	}
	for k, id := range cl.byMember {
		if slices.Contains(strings.Split(k, "|"), b.key()) && !slices.Contains(out, id) {
			out = append(out, id)
		}
	}
	slices.Sort(out)
	return out
}

// Compile computes the maps' content. Policies that do not parse are
// returned as errors and skipped (the others still apply).
func (c *Compiler) Compile(in Input) (State, []error) {
	var errs []error
	st := State{Peers: map[netip.Prefix]maps.Peer{}, Sets: map[uint32][]maps.Rule{}, Endpoints: map[int]maps.EPPolicy{},
		Selecting: map[string][]string{}}
	nsLabels := map[string]labels.Set{}
	for _, n := range in.Namespaces {
		nsLabels[n.Name] = labels.Set(n.Labels)
	}
	// Identities of every live pod with an address.
	var peers []peerPod
	byName := map[string]*peerPod{}
	for _, p := range in.Pods {
		if !live(p) {
			continue
		}
		pp := peerPod{pod: p, id: c.identity(p.Namespace, p.Labels), ips: podIPs(p)}
		peers = append(peers, pp)
		byName[p.Namespace+"/"+p.Name] = &peers[len(peers)-1]
	}
	// ipBlocks of every policy, and the classes they make.
	var blocks []ipBlock
	withNS := map[string]bool{}
	for _, pol := range in.Policies {
		withNS[pol.Namespace] = true
		visit := func(peers []networkingv1.NetworkPolicyPeer) {
			for _, pr := range peers {
				if pr.IPBlock == nil {
					continue
				}
				b, err := parseBlock(pr.IPBlock)
				if err != nil {
					errs = append(errs, fmt.Errorf("policy %s/%s: %w", pol.Namespace, pol.Name, err))
					continue
				}
				blocks = append(blocks, b)
			}
		}
		for _, r := range pol.Spec.Ingress {
			visit(r.From)
		}
		for _, r := range pol.Spec.Egress {
			visit(r.To)
		}
	}
	for ns := range withNS {
		st.Namespaces = append(st.Namespaces, ns)
	}
	sort.Strings(st.Namespaces)
	cl := newClasses(blocks)
	for p, id := range cl.prefixes {
		st.Peers[p] = maps.Peer{Identity: maps.IDWorld, Class: id}
	}
	for _, pp := range peers {
		for _, ip := range pp.ips {
			pfx := netip.PrefixFrom(ip, ip.BitLen())
			st.Peers[pfx] = maps.Peer{Identity: pp.id, Class: cl.of(pfx)}
		}
	}
	// The plugin's records may know a local pod's address before the API does.
	for _, l := range in.Locals {
		pp := byName[l.Namespace+"/"+l.Name]
		if pp == nil {
			continue
		}
		for _, ip := range l.IPs {
			pfx := netip.PrefixFrom(ip, ip.BitLen())
			st.Peers[pfx] = maps.Peer{Identity: pp.id, Class: cl.of(pfx)}
		}
	}
	for _, a := range in.NodeAddrs {
		pfx := netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen())
		st.Peers[pfx] = maps.Peer{Identity: maps.IDHost, Class: cl.of(pfx)}
	}

	for _, l := range in.Locals {
		pp := byName[l.Namespace+"/"+l.Name]
		if pp == nil {
			if withNS[l.Namespace] {
				// Not in the API yet (or gone): keep it pending.
				st.Endpoints[l.Ifindex] = maps.EPPolicy{Flags: maps.PolPending}
			}
			continue
		}
		ep := maps.EPPolicy{Identity: pp.id}
		var selecting []string
		for _, dir := range []uint8{maps.Ingress, maps.Egress} {
			var rules []maps.Rule
			isolated := false
			for _, pol := range in.Policies {
				if pol.Namespace != l.Namespace || !hasType(pol, dir) {
					continue
				}
				sel, err := metav1.LabelSelectorAsSelector(&pol.Spec.PodSelector)
				if err != nil {
					errs = append(errs, fmt.Errorf("policy %s/%s: podSelector: %w", pol.Namespace, pol.Name, err))
					continue
				}
				if !sel.Matches(labels.Set(pp.pod.Labels)) {
					continue
				}
				isolated = true
				if name := pol.Namespace + "/" + pol.Name; !slices.Contains(selecting, name) {
					selecting = append(selecting, name)
				}
				r, rerrs := c.rules(pol, dir, pp.pod, peers, nsLabels, cl)
				errs = append(errs, rerrs...)
				rules = append(rules, r...)
			}
			if !isolated {
				continue
			}
			set := c.set(rules)
			st.Sets[set] = withSet(rules, set)
			if dir == maps.Ingress {
				ep.Flags |= maps.PolIngress
				ep.SetIn = set
			} else {
				ep.Flags |= maps.PolEgress
				ep.SetOut = set
			}
		}
		if ep.Flags != 0 {
			st.Endpoints[l.Ifindex] = ep
			sort.Strings(selecting)
			st.Selecting[l.Namespace+"/"+l.Name] = selecting
		}
	}
	return st, errs
}

func hasType(pol *networkingv1.NetworkPolicy, dir uint8) bool {
	want := networkingv1.PolicyTypeIngress
	if dir == maps.Egress {
		want = networkingv1.PolicyTypeEgress
	}
	types := pol.Spec.PolicyTypes
	if len(types) == 0 { // the API server defaults it; objects built by hand may not
		types = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
		if len(pol.Spec.Egress) > 0 {
			types = append(types, networkingv1.PolicyTypeEgress)
		}
	}
	return slices.Contains(types, want)
}

// set returns the ID of the set with exactly these rules (sets are shared
// by pods with the same policy, and never change: a new content is a new
// set).
func (c *Compiler) set(rules []maps.Rule) uint32 {
	rules = withSet(rules, 0)
	slices.SortFunc(rules, cmpRule)
	rules = slices.Compact(rules)
	k := fmt.Sprint(rules)
	id, ok := c.sets[k]
	if !ok {
		id = c.nextSet
		c.nextSet++
		c.sets[k] = id
	}
	return id
}

func withSet(rules []maps.Rule, set uint32) []maps.Rule {
	out := make([]maps.Rule, 0, len(rules))
	for _, r := range rules {
		r.Set = set
		out = append(out, r)
	}
	slices.SortFunc(out, cmpRule)
	return slices.Compact(out)
}

func cmpRule(a, b maps.Rule) int {
	return strings.Compare(fmt.Sprint(a), fmt.Sprint(b))
}

// rules compiles the rules of one direction of pol for local pod self.
func (c *Compiler) rules(pol *networkingv1.NetworkPolicy, dir uint8, self *corev1.Pod, peers []peerPod,
	nsLabels map[string]labels.Set, cl *classes) ([]maps.Rule, []error) {
	var out []maps.Rule
	var errs []error
	type rule struct {
		peers []networkingv1.NetworkPolicyPeer
		ports []networkingv1.NetworkPolicyPort
	}
	var list []rule
	if dir == maps.Ingress {
		for _, r := range pol.Spec.Ingress {
			list = append(list, rule{r.From, r.Ports})
		}
	} else {
		for _, r := range pol.Spec.Egress {
			list = append(list, rule{r.To, r.Ports})
		}
	}
	for _, r := range list {
		// Peers: identities (with the pods behind them, for named ports)
		// and CIDR classes.
		var ids []uint32
		var classIDs []uint32
		podsOf := map[uint32][]*corev1.Pod{}
		anyPeer := len(r.peers) == 0
		for _, pr := range r.peers {
			if pr.IPBlock != nil {
				b, err := parseBlock(pr.IPBlock)
				if err != nil {
					continue // reported by Compile
				}
				classIDs = append(classIDs, cl.holding(b)...)
				continue
			}
			podSel := labels.Everything()
			if pr.PodSelector != nil {
				s, err := metav1.LabelSelectorAsSelector(pr.PodSelector)
				if err != nil {
					errs = append(errs, fmt.Errorf("policy %s/%s: podSelector: %w", pol.Namespace, pol.Name, err))
					continue
				}
				podSel = s
			}
			var nsSel labels.Selector // nil: the policy's namespace only
			if pr.NamespaceSelector != nil {
				s, err := metav1.LabelSelectorAsSelector(pr.NamespaceSelector)
				if err != nil {
					errs = append(errs, fmt.Errorf("policy %s/%s: namespaceSelector: %w", pol.Namespace, pol.Name, err))
					continue
				}
				nsSel = s
			}
			for _, pp := range peers {
				if nsSel == nil && pp.pod.Namespace != pol.Namespace {
					continue
				}
				if nsSel != nil && !nsSel.Matches(nsLabels[pp.pod.Namespace]) {
					continue
				}
				if !podSel.Matches(labels.Set(pp.pod.Labels)) {
					continue
				}
				if !slices.Contains(ids, pp.id) {
					ids = append(ids, pp.id)
				}
				podsOf[pp.id] = append(podsOf[pp.id], pp.pod)
			}
		}
		if anyPeer {
			for _, pp := range peers { // named egress ports resolve on any pod
				podsOf[pp.id] = append(podsOf[pp.id], pp.pod)
			}
		}
		allPeers := append(slices.Clone(ids), classIDs...)
		if anyPeer {
			allPeers = []uint32{maps.IDAny}
		}
		if len(r.ports) == 0 {
			for _, p := range allPeers {
				out = append(out, maps.Rule{Peer: p, Dir: dir})
			}
			continue
		}
		for _, port := range r.ports {
			proto := corev1.ProtocolTCP
			if port.Protocol != nil {
				proto = *port.Protocol
			}
			pn := protoNumber(proto)
			if pn == 0 {
				errs = append(errs, fmt.Errorf("policy %s/%s: protocol %q", pol.Namespace, pol.Name, proto))
				continue
			}
			switch {
			case port.Port == nil:
				for _, p := range allPeers {
					out = append(out, maps.Rule{Peer: p, Dir: dir, Proto: pn})
				}
			case port.Port.Type == intstr.String:
				name := port.Port.StrVal
				if dir == maps.Ingress {
					// Named for the pod the policy protects.
					for _, num := range namedPorts(self, name, proto) {
						for _, p := range allPeers {
							out = append(out, maps.Rule{Peer: p, Dir: dir, Proto: pn, Port: num, Bits: 16})
						}
					}
					continue
				}
				// Egress: named on each destination pod; only pods have names.
				for id, pods := range podsOf {
					if !anyPeer && !slices.Contains(ids, id) {
						continue
					}
					seen := map[uint16]bool{}
					for _, pod := range pods {
						for _, num := range namedPorts(pod, name, proto) {
							if !seen[num] {
								seen[num] = true
								out = append(out, maps.Rule{Peer: id, Dir: dir, Proto: pn, Port: num, Bits: 16})
							}
						}
					}
				}
			default:
				lo := port.Port.IntValue()
				hi := lo
				if port.EndPort != nil {
					hi = int(*port.EndPort)
				}
				if lo < 0 || lo > 65535 || hi < lo || hi > 65535 {
					errs = append(errs, fmt.Errorf("policy %s/%s: port range %d-%d", pol.Namespace, pol.Name, lo, hi))
					continue
				}
				for _, blk := range portBlocks(uint16(lo), uint16(hi)) {
					for _, p := range allPeers {
						out = append(out, maps.Rule{Peer: p, Dir: dir, Proto: pn, Port: blk.port, Bits: blk.bits})
					}
				}
			}
		}
	}
	return out, errs
}

func protoNumber(p corev1.Protocol) uint8 {
	switch p {
	case corev1.ProtocolTCP:
		return 6
	case corev1.ProtocolUDP:
		return 17
	case corev1.ProtocolSCTP:
		return 132
	}
	return 0
}

// namedPorts are the numbers of pod's container ports called name with
// protocol proto.
func namedPorts(pod *corev1.Pod, name string, proto corev1.Protocol) []uint16 {
	var out []uint16
	for _, c := range pod.Spec.Containers {
		for _, p := range c.Ports {
			pp := p.Protocol
			if pp == "" {
				pp = corev1.ProtocolTCP
			}
			if p.Name == name && pp == proto && p.ContainerPort > 0 && p.ContainerPort <= 65535 &&
				!slices.Contains(out, uint16(p.ContainerPort)) {
				out = append(out, uint16(p.ContainerPort))
			}
		}
	}
	return out
}

type block struct {
	port uint16
	bits uint8
}

// portBlocks covers lo..hi with aligned power-of-two blocks, as prefixes
// of the 16-bit port (at most 30).
func portBlocks(lo, hi uint16) []block {
	var out []block
	l, h := uint32(lo), uint32(hi)
	for l <= h {
		size := uint32(1)
		for size < 65536 && l%(size*2) == 0 && l+size*2-1 <= h {
			size *= 2
		}
		bits := uint8(16)
		for s := size; s > 1; s /= 2 {
			bits--
		}
		out = append(out, block{port: uint16(l), bits: bits})
		l += size
	}
	return out
}

// Restore seeds the set IDs with what the maps hold (an agent restart), so
// a restored set's ID is never given to other rules.
func (c *Compiler) Restore(rules []maps.Rule) {
	bySet := map[uint32][]maps.Rule{}
	for _, r := range rules {
		bySet[r.Set] = append(bySet[r.Set], r)
	}
	for id, rs := range bySet {
		c.sets[fmt.Sprint(withSet(rs, 0))] = id
		if id >= c.nextSet {
			c.nextSet = id + 1
		}
	}
}
