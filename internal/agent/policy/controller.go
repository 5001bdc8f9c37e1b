// Package policy is the agent's NetworkPolicy controller: Kubernetes
// NetworkPolicies (networking.k8s.io/v1) enforced in BPF.
//
// From Pods, Namespaces and NetworkPolicies (client-go informers) and the
// plugin's endpoint records (which local pod sits behind which host veth,
// known before the API server hears of the pod's address), it compiles the
// whole desired state (Compile, pure) and writes the differences to the
// policy maps of the plugin's pin root: identities of every pod's address
// and the CIDR classes of every ipBlock (ipcache_v1), the policy sets
// (policy_v1) and each local pod's isolation (ep_policy_v1). bpf/policy.h
// enforces them. It also hands the plugin the namespaces that have
// policies (<stateDir>/policy.json): ADD isolates a new pod of those
// namespaces (pending: only its node may talk to it) until its policy is
// in place.
package policy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listers "k8s.io/client-go/listers/core/v1"
	netlisters "k8s.io/client-go/listers/networking/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/ebpf-cni/ebpf-cni/internal/agent"
	"github.com/ebpf-cni/ebpf-cni/internal/endpoint"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
	"github.com/ebpf-cni/ebpf-cni/internal/nl"
	"github.com/ebpf-cni/ebpf-cni/internal/node"
	"github.com/ebpf-cni/ebpf-cni/internal/veth"
)

// Config configures the controller.
type Config struct {
	PinRoot  string // the plugin's pin root
	StateDir string // the plugin's state directory (endpoint records, policy.json)
	// Tick is how often new endpoint records and node addresses are looked
	// for (informer events trigger a compile at once).
	Tick time.Duration
}

// ctTimeouts: idle times of tracked flows (Cilium's: TCP 6 h, closing
// 10 s, others 60 s; the datapath ignores older entries already).
var ctTimeouts = maps.NATTimeouts{TCP: 6 * time.Hour, Closing: 10 * time.Second, UDP: time.Minute}

// Controller programs one node's policy maps.
type Controller struct {
	log     *slog.Logger
	cfg     Config
	factory informers.SharedInformerFactory
	pods    listers.PodLister
	nss     listers.NamespaceLister
	pols    netlisters.NetworkPolicyLister
	synced  []cache.InformerSynced
	kick    agent.Kick
	m       metrics

	*agent.Health // ready: the policies programmed once

	// Owned by the reconcile loop.
	dp        *maps.Maps
	comp      *Compiler
	ap        *Applier
	handed    string // policy.json as last written
	lastSweep time.Time
}

type metrics struct {
	syncs, syncErrors, writes, ctExpired prometheus.Counter
	policies, identities, sets, isolated prometheus.Gauge
	duration                             prometheus.Histogram
	invalid                              prometheus.Counter
}

// New wires the controller's informers to client.
func New(log *slog.Logger, client kubernetes.Interface, cfg Config, reg prometheus.Registerer) (*Controller, error) {
	if cfg.Tick <= 0 {
		cfg.Tick = time.Second
	}
	f := informers.NewSharedInformerFactory(client, 0)
	pods, nss, pols := f.Core().V1().Pods(), f.Core().V1().Namespaces(), f.Networking().V1().NetworkPolicies()
	c := &Controller{log: log.With("controller", "policy"), cfg: cfg, factory: f, pods: pods.Lister(), nss: nss.Lister(),
		pols: pols.Lister(), kick: agent.NewKick(), comp: NewCompiler(), Health: agent.NewHealth("policies not programmed yet"),
		synced: []cache.InformerSynced{pods.Informer().HasSynced, nss.Informer().HasSynced, pols.Informer().HasSynced}}
	poke := func(any) { c.kick.Poke() }
	h := cache.ResourceEventHandlerFuncs{AddFunc: poke, UpdateFunc: func(_, n any) { poke(n) }, DeleteFunc: poke}
	for _, inf := range []cache.SharedIndexInformer{pods.Informer(), nss.Informer(), pols.Informer()} {
		if _, err := inf.AddEventHandler(h); err != nil {
			return nil, fmt.Errorf("watch: %w", err)
		}
	}
	g := func(name, help string) prometheus.Gauge {
		return prometheus.NewGauge(prometheus.GaugeOpts{Name: name, Help: help})
	}
	c.m = metrics{
		syncs:      prometheus.NewCounter(prometheus.CounterOpts{Name: "ebpf_cni_agent_policy_syncs_total", Help: "Policy compiles applied."}),
		syncErrors: prometheus.NewCounter(prometheus.CounterOpts{Name: "ebpf_cni_agent_policy_sync_errors_total", Help: "Policy compiles that failed."}),
		writes:     prometheus.NewCounter(prometheus.CounterOpts{Name: "ebpf_cni_agent_policy_map_writes_total", Help: "Writes to the policy maps."}),
		ctExpired:  prometheus.NewCounter(prometheus.CounterOpts{Name: "ebpf_cni_agent_policy_ct_expired_total", Help: "Tracked flows removed when idle."}),
		invalid:    prometheus.NewCounter(prometheus.CounterOpts{Name: "ebpf_cni_agent_policy_invalid_total", Help: "Policy parts that could not be compiled (each logged)."}),
		policies:   g("ebpf_cni_agent_policies", "NetworkPolicies known."),
		identities: g("ebpf_cni_agent_policy_peers", "Entries of the address -> identity map."),
		sets:       g("ebpf_cni_agent_policy_sets", "Distinct policy sets programmed."),
		isolated:   g("ebpf_cni_agent_policy_isolated_pods", "Local pods isolated by a policy (or pending)."),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "ebpf_cni_agent_policy_sync_seconds",
			Help: "Duration of a policy compile and apply.", Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10)}),
	}
	return c, agent.Register(reg, "policy", c.m.syncs, c.m.syncErrors, c.m.writes, c.m.ctExpired, c.m.invalid, c.m.policies,
		c.m.identities, c.m.sets, c.m.isolated, c.m.duration)
}

// Name implements agent.Controller.
func (c *Controller) Name() string { return "policy" }

// Run implements agent.Controller.
func (c *Controller) Run(ctx context.Context) {
	c.factory.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), c.synced...) {
		return
	}
	c.log.Info("started", "pin_root", c.cfg.PinRoot)
	c.kick.Loop(ctx, c.cfg.Tick, c.reconcile)
	if c.dp != nil {
		c.dp.Close()
	}
	c.log.Info("stopping; the policy maps stay in place")
}

// open loads the datapath if no ADD did yet and reads back what the policy
// maps hold (a restart: no flush, no window without policy).
func (c *Controller) open() error {
	progs, dp, err := maps.Ensure(c.cfg.PinRoot)
	if err != nil {
		return err
	}
	progs.Close() // the policy maps are all it needs
	peers, err := dp.Peers()
	if err != nil {
		dp.Close()
		return err
	}
	rules, err := dp.Rules()
	if err != nil {
		dp.Close()
		return err
	}
	eps, err := dp.EPPolicies()
	if err != nil {
		dp.Close()
		return err
	}
	c.ap = NewApplier(dp)
	c.ap.Restore(peers, rules, eps)
	c.comp.Restore(rules)
	c.dp = dp
	return nil
}

func (c *Controller) reconcile() {
	start := time.Now()
	err := c.sync()
	c.m.syncs.Inc()
	c.m.duration.Observe(time.Since(start).Seconds())
	first := c.Record(err, true)
	if err != nil {
		c.m.syncErrors.Inc()
		c.log.Error("reconcile", "err", err)
		return
	}
	if first {
		c.log.Info("policies programmed", "took", time.Since(start).Round(time.Millisecond))
	}
}

func (c *Controller) sync() error {
	if c.dp != nil && !c.dp.Current(c.cfg.PinRoot) {
		// The datapath was re-created (pins lost, then repaired): its
		// maps are empty, program everything again.
		c.log.Warn("the datapath's maps were re-created; programming them anew")
		c.dp.Close()
		c.dp, c.ap, c.comp = nil, nil, NewCompiler()
	}
	if c.dp == nil {
		if err := c.open(); err != nil {
			return err
		}
	}
	var in Input
	var err error
	if in.Pods, err = c.pods.List(labels.Everything()); err != nil {
		return err
	}
	if in.Namespaces, err = c.nss.List(labels.Everything()); err != nil {
		return err
	}
	if in.Policies, err = c.pols.List(labels.Everything()); err != nil {
		return err
	}
	if in.Locals, err = Locals(c.cfg.StateDir); err != nil {
		return err
	}
	if in.NodeAddrs, err = NodeAddrs(); err != nil {
		return err
	}
	st, invalid := c.comp.Compile(in)
	for _, e := range invalid {
		if e != nil {
			c.m.invalid.Inc()
			c.log.Warn("policy not compiled", "err", e)
		}
	}
	var local []int
	for _, l := range in.Locals {
		local = append(local, l.Ifindex)
	}
	// The hand-off first: a pod added from now on in a namespace that just
	// got its first policy starts pending.
	if err := c.handOff(st); err != nil {
		return err
	}
	before := c.ap.Writes()
	err = c.ap.Apply(st, local)
	c.m.writes.Add(float64(c.ap.Writes() - before))
	c.m.policies.Set(float64(len(in.Policies)))
	c.m.identities.Set(float64(len(st.Peers)))
	c.m.sets.Set(float64(len(st.Sets)))
	c.m.isolated.Set(float64(len(st.Endpoints)))
	if time.Since(c.lastSweep) > 30*time.Second {
		var ts unix.Timespec
		if unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts) == nil {
			n, serr := c.dp.SweepCT(time.Duration(ts.Nano()), ctTimeouts)
			c.m.ctExpired.Add(float64(n))
			err = errors.Join(err, serr)
		}
		c.lastSweep = time.Now()
	}
	return err
}

// handOff writes policy.json when it changed.
func (c *Controller) handOff(st State) error {
	p := node.Policy{Namespaces: st.Namespaces, Selecting: st.Selecting}
	key := fmt.Sprint(p.Namespaces, p.Selecting)
	if key == c.handed {
		return nil
	}
	if err := node.WritePolicy(c.cfg.StateDir, p); err != nil {
		return err
	}
	c.handed = key
	return nil
}

// Locals are this node's pods from the plugin's endpoint records (of this
// boot, with their host veth in place).
func Locals(stateDir string) ([]Local, error) {
	var out []Local
	var errs []error
	for _, n := range endpoint.Networks(stateDir) {
		recs, _, err := endpoint.NewStore(stateDir, n).List()
		errs = append(errs, err)
		for _, r := range recs {
			if r.PodName == "" || r.HostIndex == 0 || veth.HostIndex(r.HostVeth) != r.HostIndex {
				continue
			}
			out = append(out, Local{Namespace: r.PodNamespace, Name: r.PodName, Ifindex: r.HostIndex, IPs: r.Addrs()})
		}
	}
	return out, errors.Join(errs...)
}

// NodeAddrs are the node's own addresses (its identity is the host's).
func NodeAddrs() ([]netip.Addr, error) {
	all, err := nl.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	var out []netip.Addr
	for _, a := range all {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && !slices.Contains(out, ip.Unmap()) {
			out = append(out, ip.Unmap())
		}
	}
	return out, nil
}
