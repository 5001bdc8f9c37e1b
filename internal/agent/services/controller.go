// Package services is the agent's Service controller: Kubernetes Services
// in BPF, so a node runs without kube-proxy.
//
// From Services, EndpointSlices (client-go informers, with kube-proxy's
// label selector) and this node's Node object it programs the Service maps
// of the plugin's pin root (bpf/datapath.h) and keeps the datapath's
// Service hooks attached: the socket programs on the cgroup v2 hierarchy
// (every connection of a pod or host process to a Service goes straight to
// a backend) and from_node on the devices holding the node's addresses
// (NodePorts and external IPs for clients outside the node). One reconcile
// loop, fed by a set of changed Services: each change costs the writes of
// that Service alone, whatever the number of Services.
package services

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listers "k8s.io/client-go/listers/core/v1"
	netlisters "k8s.io/client-go/listers/networking/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/ebpf-cni/ebpf-cni/internal/agent"
	"github.com/ebpf-cni/ebpf-cni/internal/loader"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
	"github.com/ebpf-cni/ebpf-cni/internal/uplink"
)

// proxySelector is kube-proxy's: Services (and their slices) another proxy
// serves, and headless ones, are not ours.
const proxySelector = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"

// Config configures the controller.
type Config struct {
	NodeName string
	PinRoot  string // the plugin's pin root
	// CgroupRoot is the cgroup v2 directory the socket programs attach to;
	// a relative path is below the node's hierarchy root (loader.CgroupRoot),
	// empty is that root.
	CgroupRoot string
	Resync     time.Duration
	// NATSweep is how often idle translated flows of NodePorts are removed.
	NATSweep time.Duration
	// ServiceCIDRs are Service ranges given by hand; those of the
	// ServiceCIDR objects (Kubernetes >= 1.33) are added to them.
	ServiceCIDRs []netip.Prefix
}

// natTimeouts: idle times of translated flows from outside (Cilium's and
// conntrack's orders of magnitude).
var natTimeouts = maps.NATTimeouts{TCP: 6 * time.Hour, Closing: 10 * time.Second, UDP: 2 * time.Minute}

// Controller programs one node's Service maps.
type Controller struct {
	log       *slog.Logger
	cfg       Config
	factories []informers.SharedInformerFactory
	svcs      listers.ServiceLister
	eps       cache.Indexer
	nodes     listers.NodeLister
	cidrs     netlisters.ServiceCIDRLister // nil: the API has no ServiceCIDRs
	synced    []cache.InformerSynced
	kick      agent.Kick
	m         metrics

	*agent.Health // ready: every Service programmed once

	mu        sync.Mutex
	dirty     map[string]bool
	nodeDirty bool

	// Owned by the reconcile loop.
	dp       *maps.Maps
	progs    *loader.Programs
	ap       *Applier
	cgroup   string
	nodeIPs  []netip.Addr
	lastFull time.Time
}

type metrics struct {
	syncs, syncErrors, writes, natExpired prometheus.Counter
	skipped                               *prometheus.CounterVec
	services, frontends, backends         prometheus.Gauge
	duration                              prometheus.Histogram
}

const byService = "service"

// New wires the controller's informers to client. Run starts them.
func New(log *slog.Logger, client kubernetes.Interface, cfg Config, reg prometheus.Registerer) (*Controller, error) {
	if cfg.NodeName == "" {
		return nil, errors.New("services: no node name")
	}
	if cfg.Resync <= 0 {
		cfg.Resync = 5 * time.Minute
	}
	if cfg.NATSweep <= 0 {
		cfg.NATSweep = 10 * time.Second
	}
	proxied := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.LabelSelector = proxySelector
	}))
	own := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermEqualSelector("metadata.name", cfg.NodeName).String()
	}))
	svcInf := proxied.Core().V1().Services()
	epInf := proxied.Discovery().V1().EndpointSlices()
	nodeInf := own.Core().V1().Nodes()
	c := &Controller{log: log.With("controller", "services"), cfg: cfg, factories: []informers.SharedInformerFactory{proxied, own},
		svcs: svcInf.Lister(), eps: epInf.Informer().GetIndexer(), nodes: nodeInf.Lister(), kick: agent.NewKick(),
		synced: []cache.InformerSynced{svcInf.Informer().HasSynced, epInf.Informer().HasSynced, nodeInf.Informer().HasSynced},
		dirty:  map[string]bool{}, Health: agent.NewHealth("Services not programmed yet")}
	if err := epInf.Informer().AddIndexers(cache.Indexers{byService: func(obj any) ([]string, error) {
		s, ok := obj.(*discoveryv1.EndpointSlice)
		if !ok {
			return nil, nil
		}
		name := s.Labels[discoveryv1.LabelServiceName]
		if name == "" {
			return nil, nil
		}
		return []string{s.Namespace + "/" + name}, nil
	}}); err != nil {
		return nil, fmt.Errorf("index endpoint slices: %w", err)
	}
	mark := func(obj any) {
		if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = d.Obj
		}
		key := ""
		switch o := obj.(type) {
		case *corev1.Service:
			key = o.Namespace + "/" + o.Name
		case *discoveryv1.EndpointSlice:
			if name := o.Labels[discoveryv1.LabelServiceName]; name != "" {
				key = o.Namespace + "/" + name
			}
		case *corev1.Node, *networkingv1.ServiceCIDR:
			c.mu.Lock()
			c.nodeDirty = true
			c.mu.Unlock()
			c.kick.Poke()
			return
		}
		if key == "" {
			return
		}
		c.mu.Lock()
		c.dirty[key] = true
		c.mu.Unlock()
		c.kick.Poke()
	}
	handler := cache.ResourceEventHandlerFuncs{AddFunc: mark, UpdateFunc: func(_, n any) { mark(n) }, DeleteFunc: mark}
	infs := []cache.SharedIndexInformer{svcInf.Informer(), epInf.Informer(), nodeInf.Informer()}
	if hasServiceCIDRs(client) {
		all := informers.NewSharedInformerFactory(client, 0)
		inf := all.Networking().V1().ServiceCIDRs()
		c.cidrs = inf.Lister()
		c.factories = append(c.factories, all)
		c.synced = append(c.synced, inf.Informer().HasSynced)
		infs = append(infs, inf.Informer())
	}
	for _, inf := range infs {
		if _, err := inf.AddEventHandler(handler); err != nil {
			return nil, fmt.Errorf("watch: %w", err)
		}
	}
	c.m = metrics{
		syncs:      prometheus.NewCounter(prometheus.CounterOpts{Name: "ebpf_cni_agent_services_syncs_total", Help: "Service reconciles run."}),
		syncErrors: prometheus.NewCounter(prometheus.CounterOpts{Name: "ebpf_cni_agent_services_sync_errors_total", Help: "Service reconciles that failed."}),
		writes:     prometheus.NewCounter(prometheus.CounterOpts{Name: "ebpf_cni_agent_services_map_writes_total", Help: "Writes to the Service maps."}),
		natExpired: prometheus.NewCounter(prometheus.CounterOpts{Name: "ebpf_cni_agent_services_nat_expired_total", Help: "Translated NodePort flows removed when idle."}),
		skipped: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ebpf_cni_agent_services_skipped_ports_total",
			Help: "Service ports the datapath does not serve, by protocol."}, []string{"protocol"}),
		services:  prometheus.NewGauge(prometheus.GaugeOpts{Name: "ebpf_cni_agent_services", Help: "Services programmed."}),
		frontends: prometheus.NewGauge(prometheus.GaugeOpts{Name: "ebpf_cni_agent_services_frontends", Help: "Frontends programmed (addresses, ports, scopes)."}),
		backends:  prometheus.NewGauge(prometheus.GaugeOpts{Name: "ebpf_cni_agent_services_backends", Help: "Distinct backends programmed."}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "ebpf_cni_agent_services_sync_seconds",
			Help: "Duration of a Service reconcile.", Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10)}),
	}
	stats := func(name, help string, get func(maps.LBStats) uint64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, func() float64 {
			c.mu.Lock()
			dp := c.dp
			c.mu.Unlock()
			if dp == nil {
				return 0
			}
			s, err := dp.LBStats()
			if err != nil {
				return 0
			}
			return float64(get(s))
		})
	}
	return c, agent.Register(reg, "service", c.m.syncs, c.m.syncErrors, c.m.writes, c.m.natExpired, c.m.skipped, c.m.services,
		c.m.frontends, c.m.backends, c.m.duration,
		stats("ebpf_cni_datapath_service_connections_total", "Connections and datagrams of this node's sockets sent to a Service backend.",
			func(s maps.LBStats) uint64 { return s.SockTranslated }),
		stats("ebpf_cni_datapath_service_refused_total", "Connections to a Service without a backend, refused.",
			func(s maps.LBStats) uint64 { return s.SockRefused }),
		stats("ebpf_cni_datapath_nodeport_flows_total", "Flows from outside translated to a NodePort or external IP backend.",
			func(s maps.LBStats) uint64 { return s.NodeportNew }))
}

// Name implements agent.Controller.
func (c *Controller) Name() string { return "services" }

// Run implements agent.Controller.
func (c *Controller) Run(ctx context.Context) {
	for _, f := range c.factories {
		f.Start(ctx.Done())
	}
	if !cache.WaitForCacheSync(ctx.Done(), c.synced...) {
		return
	}
	c.log.Info("started", "node", c.cfg.NodeName, "pin_root", c.cfg.PinRoot)
	go c.sweepLoop(ctx)
	c.kick.Loop(ctx, time.Second, c.reconcile)
	c.mu.Lock()
	if c.progs != nil {
		c.progs.Close()
	}
	if c.dp != nil {
		c.dp.Close()
		c.dp = nil
	}
	c.mu.Unlock()
	c.log.Info("stopping; the Service maps and hooks stay in place")
}

// open loads the datapath if no ADD did yet, opens its maps and restores
// what they hold into a new applier.
func (c *Controller) open() error {
	progs, dp, err := maps.Ensure(c.cfg.PinRoot)
	if err != nil {
		return err
	}
	entries, err := dp.ServiceEntries()
	if err != nil {
		progs.Close()
		dp.Close()
		return err
	}
	backends, err := dp.Backends()
	if err != nil {
		progs.Close()
		dp.Close()
		return err
	}
	ap := NewApplier(dp)
	ap.Restore(entries, backends)
	c.mu.Lock()
	c.progs, c.dp, c.ap = progs, dp, ap
	c.mu.Unlock()
	c.log.Info("datapath opened", "restored_frontends", ap.Frontends(), "restored_backends", ap.Backends())
	return nil
}

// reconcile applies every changed Service (all of them on the first run
// and every resync), then the node's addresses and the hooks.
func (c *Controller) reconcile() {
	start := time.Now()
	var errs []error
	if c.dp != nil && !c.dp.Current(c.cfg.PinRoot) {
		// The datapath was re-created (pins lost, then repaired): its
		// maps are empty; open them and program every Service again.
		c.log.Warn("the datapath's maps were re-created; programming them anew")
		c.mu.Lock()
		c.progs.Close()
		c.dp.Close()
		c.dp, c.progs, c.ap = nil, nil, nil
		c.mu.Unlock()
		c.Reset()
	}
	if c.ap == nil {
		if err := c.open(); err != nil {
			c.finish(start, false, err)
			return
		}
	}
	c.mu.Lock()
	dirty, nodeDirty := c.dirty, c.nodeDirty
	c.dirty, c.nodeDirty = map[string]bool{}, false
	c.mu.Unlock()
	full := !c.Ready() || time.Since(c.lastFull) >= c.cfg.Resync
	if full {
		all, err := c.svcs.List(labels.Everything())
		errs = append(errs, err)
		for _, s := range all {
			dirty[s.Namespace+"/"+s.Name] = true
		}
		for key := range c.ap.owned {
			dirty[key] = true
		}
		nodeDirty = true
	}
	if nodeDirty {
		if err := errors.Join(c.syncNode(), c.syncRanges()); err != nil {
			errs = append(errs, err)
			c.mu.Lock()
			c.nodeDirty = true // retried on the next loop
			c.mu.Unlock()
		}
	}
	errs = append(errs, c.ensureHooks())
	before := c.ap.Writes()
	for key := range dirty {
		if err := c.applyService(key); err != nil {
			errs = append(errs, err)
			c.mu.Lock()
			c.dirty[key] = true // retried on the next loop
			c.mu.Unlock()
		}
	}
	c.m.writes.Add(float64(c.ap.Writes() - before))
	err := errors.Join(errs...)
	if full && err == nil {
		if n, perr := c.ap.Prune(); perr != nil {
			err = perr
		} else if n > 0 {
			c.log.Info("removed frontends of Services that are gone", "frontends", n)
		}
		c.lastFull = time.Now()
	}
	c.finish(start, full && err == nil, err)
}

func (c *Controller) finish(start time.Time, fullDone bool, err error) {
	c.m.syncs.Inc()
	c.m.duration.Observe(time.Since(start).Seconds())
	if c.ap != nil {
		c.m.services.Set(float64(c.ap.Services()))
		c.m.frontends.Set(float64(c.ap.Frontends()))
		c.m.backends.Set(float64(c.ap.Backends()))
	}
	first := c.Record(err, fullDone)
	if err != nil {
		c.m.syncErrors.Inc()
		// The loop's one-second tick retries what failed (Services and
		// node state stay dirty; hooks and open run every pass); an
		// immediate retry would spin on a lasting error.
		c.log.Error("reconcile", "err", err)
		return
	}
	if first {
		c.log.Info("every Service programmed", "services", c.ap.Services(), "frontends", c.ap.Frontends(),
			"backends", c.ap.Backends(), "took", time.Since(start).Round(time.Millisecond))
	}
}

// applyService programs one Service (gone from the cache: removed).
func (c *Controller) applyService(key string) error {
	ns, name, _ := cache.SplitMetaNamespaceKey(key)
	svc, err := c.svcs.Services(ns).Get(name)
	if err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	var want []Frontend
	if svc != nil {
		objs, err := c.eps.ByIndex(byService, key)
		if err != nil {
			return err
		}
		list := make([]*discoveryv1.EndpointSlice, 0, len(objs))
		for _, o := range objs {
			if s, ok := o.(*discoveryv1.EndpointSlice); ok {
				list = append(list, s)
			}
		}
		var skipped []Skipped
		want, skipped = Desired(svc, list, c.cfg.NodeName)
		for _, s := range skipped {
			c.log.Warn("Service port not served", "service", key, "port", s.Port, "reason", s.Reason)
			proto := "other"
			for _, p := range svc.Spec.Ports {
				if portName(p) == s.Port {
					proto = string(p.Protocol)
				}
			}
			c.m.skipped.WithLabelValues(proto).Inc()
		}
	}
	if err := c.ap.Apply(key, want); err != nil {
		return fmt.Errorf("service %s: %w", key, err)
	}
	return nil
}

// syncNode programs this node's addresses (NodePorts are served on its
// InternalIPs and ExternalIPs; external traffic is masqueraded to its first
// InternalIP of each family) and attaches from_node to the devices holding
// them.
func (c *Controller) syncNode() error {
	n, err := c.nodes.Get(c.cfg.NodeName)
	if err != nil {
		return fmt.Errorf("node %s: %w", c.cfg.NodeName, err)
	}
	var addrs []netip.Addr
	snat := map[bool]netip.Addr{}
	for _, a := range n.Status.Addresses {
		if a.Type != corev1.NodeInternalIP && a.Type != corev1.NodeExternalIP {
			continue
		}
		ip, err := netip.ParseAddr(a.Address)
		if err != nil {
			continue
		}
		ip = ip.Unmap()
		addrs = append(addrs, ip)
		if _, ok := snat[ip.Is6()]; !ok && a.Type == corev1.NodeInternalIP {
			snat[ip.Is6()] = ip
		}
	}
	have, err := c.dp.NodeAddrs()
	errs := []error{err, converge(have, addrs, c.dp.PutNodeAddr, c.dp.DeleteNodeAddr)}
	errs = append(errs, c.dp.SetSNAT(snat[false], false), c.dp.SetSNAT(snat[true], true))
	c.nodeIPs = addrs
	return errors.Join(errs...)
}

// hasServiceCIDRs reports whether the API serves ServiceCIDR objects.
func hasServiceCIDRs(client kubernetes.Interface) bool {
	res, err := client.Discovery().ServerResourcesForGroupVersion("networking.k8s.io/v1")
	if err != nil {
		return false
	}
	for _, r := range res.APIResources {
		if r.Name == "servicecidrs" {
			return true
		}
	}
	return false
}

// syncRanges programs the Service ranges: an address in them that no
// Service has is refused.
func (c *Controller) syncRanges() error {
	want := slices.Clone(c.cfg.ServiceCIDRs)
	if c.cidrs != nil {
		objs, err := c.cidrs.List(labels.Everything())
		if err != nil {
			return err
		}
		for _, o := range objs {
			for _, s := range o.Spec.CIDRs {
				if p, err := netip.ParsePrefix(s); err == nil && !slices.Contains(want, p.Masked()) {
					want = append(want, p.Masked())
				}
			}
		}
	}
	have, err := c.dp.ServiceCIDRs()
	if err != nil {
		return err
	}
	return converge(have, want, c.dp.PutServiceCIDR, c.dp.DeleteServiceCIDR)
}

// converge adds what want has and have lacks, and deletes the reverse.
func converge[T comparable](have, want []T, put, del func(T) error) error {
	var errs []error
	for _, x := range want {
		if !slices.Contains(have, x) {
			errs = append(errs, put(x))
		}
	}
	for _, x := range have {
		if !slices.Contains(want, x) {
			errs = append(errs, del(x))
		}
	}
	return errors.Join(errs...)
}

// ensureHooks keeps the socket programs on the cgroup and from_node on the
// devices of the node's addresses (both idempotent and cheap when in place).
func (c *Controller) ensureHooks() error {
	if c.cgroup == "" {
		dir := c.cfg.CgroupRoot
		if !filepath.IsAbs(dir) {
			root, err := loader.CgroupRoot()
			if err != nil {
				return err
			}
			dir = filepath.Join(root, dir)
		}
		c.cgroup = dir
	}
	var errs []error
	if !c.progs.CgroupAttached(c.cgroup) {
		if err := c.progs.AttachCgroup(c.cgroup); err != nil {
			errs = append(errs, err)
		} else {
			c.log.Info("socket load balancing attached", "cgroup", c.cgroup)
		}
	}
	devs, err := uplink.Holding(c.nodeIPs)
	errs = append(errs, err)
	for _, d := range devs {
		if c.progs.NodeAttached(d) {
			continue
		}
		errs = append(errs, c.dp.ResetNodeStats(d.Index), c.progs.AttachNode(d))
		c.log.Info("NodePorts served on", "device", d.Name)
	}
	return errors.Join(errs...)
}

// sweepLoop removes idle translated flows of the tc path.
func (c *Controller) sweepLoop(ctx context.Context) {
	t := time.NewTicker(c.cfg.NATSweep)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		c.mu.Lock()
		dp := c.dp
		c.mu.Unlock()
		if dp == nil {
			continue
		}
		var ts unix.Timespec
		if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
			continue
		}
		n, err := dp.SweepNAT(time.Duration(ts.Nano()), natTimeouts)
		if err != nil {
			c.log.Error("sweep translated flows", "err", err)
		}
		c.m.natExpired.Add(float64(n))
	}
}

// Off turns the Service datapath off on a node where the controller ran
// before (the agent started without it): the socket programs are detached
// and the Service maps emptied, so neither a socket nor a packet from
// outside is translated any more and kube-proxy (if any) serves alone.
func Off(pinRoot string) error {
	errs := []error{loader.DetachCgroup(pinRoot)}
	dp, err := maps.Open(pinRoot)
	if errors.Is(err, loader.ErrNotLoaded) {
		return errors.Join(errs...)
	}
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	defer dp.Close()
	entries, err := dp.ServiceEntries()
	errs = append(errs, err)
	for _, e := range entries {
		errs = append(errs, dp.DeleteSlot(e.Frontend, e.Slot))
	}
	backends, err := dp.Backends()
	errs = append(errs, err)
	for id := range backends {
		errs = append(errs, dp.DeleteBackend(id))
	}
	addrs, err := dp.NodeAddrs()
	errs = append(errs, err)
	for _, a := range addrs {
		errs = append(errs, dp.DeleteNodeAddr(a))
	}
	cidrs, err := dp.ServiceCIDRs()
	errs = append(errs, err)
	for _, p := range cidrs {
		errs = append(errs, dp.DeleteServiceCIDR(p))
	}
	return errors.Join(errs...)
}
