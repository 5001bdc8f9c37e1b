// Package routes is the agent's route controller. From the Node objects (a
// client-go informer) it keeps this node's routes to every other node's
// podCIDRs (native routing or VXLAN) and writes this node's podCIDRs and pod
// MTU to the file the plugin reads for "usePodCidr" ranges (internal/node).
//
// One reconcile loop: on start (routes of nodes that are gone are removed),
// on every Node event and every resync period, the desired state is
// computed from the informer cache alone (Desired, pure) and applied by a
// Dataplane (netlink in production, a recorder in unit tests).
package routes

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	listers "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/ebpf-cni/ebpf-cni/internal/agent"
	"github.com/ebpf-cni/ebpf-cni/internal/node"
)

// Plan is the desired state of one reconcile.
type Plan struct {
	Mode    Mode
	LocalIP netip.Addr     // this node's InternalIP
	Local   []netip.Prefix // this node's podCIDRs
	// PodCIDRs are the ranges the plugin may hand out here.
	PodCIDRs []netip.Prefix
	Peers    []Peer // sorted by name
}

// Dataplane applies a Plan to the node.
type Dataplane interface {
	// Apply makes the node's routes exactly the plan's and returns how
	// many routes it added and removed.
	Apply(p Plan) (added, removed int, err error)
	// PodMTU is the pod MTU the plan's mode allows on this node.
	PodMTU(p Plan) (int, error)
}

// Netlink is the real Dataplane.
type Netlink struct {
	// PinRoot is the plugin's pin root (VXLAN mode keeps tunnel_v1 there
	// and attaches the overlay programs).
	PinRoot string
}

// Apply implements Dataplane.
func (n Netlink) Apply(p Plan) (int, int, error) {
	r := &Router{Mode: p.Mode, LocalIP: p.LocalIP, Local: p.Local, PinRoot: n.PinRoot}
	return r.Sync(p.Peers)
}

// PodMTU implements Dataplane.
func (Netlink) PodMTU(p Plan) (int, error) {
	under, err := UnderlayMTU(p.LocalIP)
	if err != nil {
		return 0, err
	}
	r := &Router{Mode: p.Mode, LocalIP: p.LocalIP}
	return r.MTU(under), nil
}

// Config configures the controller.
type Config struct {
	NodeName string
	Mode     Mode
	StateDir string // where the plugin reads the node file
	Resync   time.Duration
}

// Controller keeps the routes of one node.
type Controller struct {
	log    *slog.Logger
	cfg    Config
	nodes  listers.NodeLister
	synced cache.InformerSynced
	dp     Dataplane
	kick   agent.Kick
	m      metrics

	*agent.Health
	mu      sync.Mutex
	written node.Info // the node file as last written (rewritten only on change)
}

type metrics struct {
	syncs, syncErrors, added, removed prometheus.Counter
	lastSync                          prometheus.Gauge
	peerCIDRs                         *prometheus.GaugeVec
}

// New registers the controller's Node informer with factory and its
// metrics with reg. Start the factory, then Run.
func New(log *slog.Logger, factory informers.SharedInformerFactory, dp Dataplane, cfg Config, reg prometheus.Registerer) (*Controller, error) {
	if cfg.Mode != Native && cfg.Mode != VXLAN {
		return nil, fmt.Errorf("mode %q: want native or vxlan", cfg.Mode)
	}
	inf := factory.Core().V1().Nodes()
	c := &Controller{log: log.With("controller", "routes"), cfg: cfg, nodes: inf.Lister(), synced: inf.Informer().HasSynced, dp: dp,
		kick: agent.NewKick(), Health: agent.NewHealth("no reconcile yet")}
	if _, err := inf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { c.kick.Poke() },
		UpdateFunc: func(any, any) { c.kick.Poke() },
		DeleteFunc: func(any) { c.kick.Poke() },
	}); err != nil {
		return nil, fmt.Errorf("watch nodes: %w", err)
	}
	f := prometheus.NewCounter
	c.m = metrics{
		syncs:      f(prometheus.CounterOpts{Name: "ebpf_cni_agent_syncs_total", Help: "Route reconciles run."}),
		syncErrors: f(prometheus.CounterOpts{Name: "ebpf_cni_agent_sync_errors_total", Help: "Route reconciles that failed."}),
		added:      f(prometheus.CounterOpts{Name: "ebpf_cni_agent_routes_added_total", Help: "Routes added."}),
		removed:    f(prometheus.CounterOpts{Name: "ebpf_cni_agent_routes_removed_total", Help: "Routes removed."}),
		lastSync:   prometheus.NewGauge(prometheus.GaugeOpts{Name: "ebpf_cni_agent_last_sync_timestamp_seconds", Help: "Time of the last route reconcile."}),
		peerCIDRs: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "ebpf_cni_agent_peer_pod_cidrs", Help: "Pod CIDRs routed to each other node."},
			[]string{"node", "node_ip", "mode"}),
	}
	return c, agent.Register(reg, "route", c.m.syncs, c.m.syncErrors, c.m.added, c.m.removed, c.m.lastSync, c.m.peerCIDRs)
}

// Name implements agent.Controller.
func (c *Controller) Name() string { return "routes" }

// Run implements agent.Controller.
func (c *Controller) Run(ctx context.Context) {
	if !cache.WaitForCacheSync(ctx.Done(), c.synced) {
		return
	}
	c.log.Info("started", "node", c.cfg.NodeName, "mode", c.cfg.Mode)
	c.kick.Loop(ctx, c.cfg.Resync, func() { c.Reconcile() })
	c.log.Info("stopping; routes stay in place")
}

// Reconcile runs one reconcile from the informer cache and returns its error.
func (c *Controller) Reconcile() error {
	all, err := c.nodes.List(labels.Everything())
	var plan Plan
	if err == nil {
		plan, err = Desired(all, c.cfg.NodeName, c.cfg.Mode)
	}
	var added, removed int
	if err == nil || plan.LocalIP.IsValid() {
		// Routes to peers are kept even while this node lacks a podCIDR.
		var errs []error
		errs = append(errs, err, c.writeNode(plan))
		var aerr error
		added, removed, aerr = c.dp.Apply(plan)
		err = errors.Join(append(errs, aerr)...)
	}
	c.record(plan, added, removed, err)
	return err
}

// writeNode writes the plugin's node file when the plan has pod ranges and
// they (or the MTU) changed.
func (c *Controller) writeNode(p Plan) error {
	if len(p.PodCIDRs) == 0 {
		return nil
	}
	mtu, err := c.dp.PodMTU(p)
	if err != nil {
		mtu = 0 // the plugin falls back to its own default
	}
	info := node.Info{Name: c.cfg.NodeName, PodCIDRs: p.PodCIDRs, MTU: mtu}
	c.mu.Lock()
	same := slices.Equal(info.PodCIDRs, c.written.PodCIDRs) && info.MTU == c.written.MTU
	c.mu.Unlock()
	if same {
		return nil
	}
	if err := node.Write(c.cfg.StateDir, info); err != nil {
		return err
	}
	c.mu.Lock()
	c.written = info
	c.mu.Unlock()
	return nil
}

func (c *Controller) record(p Plan, added, removed int, err error) {
	c.Record(err, true)
	c.m.syncs.Inc()
	c.m.lastSync.SetToCurrentTime()
	c.m.added.Add(float64(added))
	c.m.removed.Add(float64(removed))
	c.m.peerCIDRs.Reset()
	for _, peer := range p.Peers {
		c.m.peerCIDRs.WithLabelValues(peer.Name, peer.NodeIP.String(), string(c.cfg.Mode)).Add(float64(len(peer.PodCIDRs)))
	}
	if err != nil {
		c.m.syncErrors.Inc()
		c.log.Error("reconcile", "err", err)
		return
	}
	if added > 0 || removed > 0 {
		c.log.Info("routes changed", "added", added, "removed", removed, "peers", len(p.Peers))
	}
}

// Desired computes the plan from the Node objects: one peer per other node
// and family with podCIDRs (native: via the node address of that family;
// VXLAN: via any node address), a stale Node claiming this node's range
// ignored. The error says why this node cannot be served yet (not found, no
// InternalIP, no podCIDR); the peers are filled all the same.
func Desired(all []*corev1.Node, self string, mode Mode) (Plan, error) {
	p := Plan{Mode: mode}
	var me *corev1.Node
	for _, n := range all {
		if n.Name == self {
			me = n
		}
	}
	if me != nil {
		p.Local = podCIDRs(me)
	}
	for _, n := range all {
		if n.Name == self {
			continue
		}
		for _, fam := range []int{4, 6} {
			ip, ok := internalIP(n, fam)
			if mode == VXLAN {
				ip, ok = internalIP(n, 0)
			}
			var cidrs []netip.Prefix
			for _, c := range podCIDRs(n) {
				if c.Addr().Is4() == (fam == 4) && !overlaps(c, p.Local) {
					cidrs = append(cidrs, c)
				}
			}
			if ok && len(cidrs) > 0 {
				p.Peers = append(p.Peers, Peer{Name: n.Name, NodeIP: ip, PodCIDRs: cidrs})
			}
		}
	}
	slices.SortStableFunc(p.Peers, func(x, y Peer) int { return strings.Compare(x.Name, y.Name) })
	if me == nil {
		return p, fmt.Errorf("node %s not found in the API", self)
	}
	ip, ok := internalIP(me, 0)
	if !ok {
		return p, fmt.Errorf("node %s has no InternalIP yet", self)
	}
	p.LocalIP = ip
	p.PodCIDRs = p.Local
	if len(p.PodCIDRs) == 0 {
		// Pods cannot be wired yet: stay unready rather than let every ADD
		// answer "try again later" behind a Ready node.
		return p, fmt.Errorf("node %s has no podCIDR yet (is the controller-manager allocating node CIDRs?)", self)
	}
	return p, nil
}

func overlaps(p netip.Prefix, list []netip.Prefix) bool {
	for _, q := range list {
		if p.Overlaps(q) {
			return true
		}
	}
	return false
}

// internalIP returns the node's first InternalIP of a family (any family
// when fam is 0, IPv4 or IPv6 when 4 or 6).
func internalIP(n *corev1.Node, fam int) (netip.Addr, bool) {
	for _, a := range n.Status.Addresses {
		if a.Type != corev1.NodeInternalIP {
			continue
		}
		ip, err := netip.ParseAddr(a.Address)
		if err == nil && (fam == 0 || (fam == 4) == ip.Is4()) {
			return ip, true
		}
	}
	return netip.Addr{}, false
}

func podCIDRs(n *corev1.Node) []netip.Prefix {
	raw := n.Spec.PodCIDRs
	if len(raw) == 0 && n.Spec.PodCIDR != "" {
		raw = []string{n.Spec.PodCIDR}
	}
	var out []netip.Prefix
	for _, s := range raw {
		if p, err := netip.ParsePrefix(s); err == nil {
			out = append(out, p.Masked())
		}
	}
	return out
}
