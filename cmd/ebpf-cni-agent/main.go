// Command ebpf-cni-agent runs once per node (the DaemonSet's main
// container). It watches Node objects through a client-go informer and keeps
// this node's routes to every other node's podCIDRs (native routing or
// VXLAN), and writes this node's podCIDRs and pod MTU to the file the plugin
// reads for "usePodCidr" ranges. It is not on the pod-creation path: ADD and
// DEL work while it is down; it only keeps routes.
//
// It reconciles on start (routes of nodes that are gone are removed), on
// every Node event, and every resync period from its informer cache, and
// serves /healthz and /metrics (Prometheus text format).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listers "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/ebpf-cni/ebpf-cni/internal/node"
	"github.com/ebpf-cni/ebpf-cni/internal/routes"
)

func main() {
	if sub, ok := subcommands[firstArg()]; ok {
		if err := sub(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "ebpf-cni-agent:", err)
			os.Exit(1)
		}
		return
	}
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig file (empty: in-cluster config)")
	nodeName := flag.String("node-name", os.Getenv("NODE_NAME"), "this node's name (default $NODE_NAME, else the hostname)")
	mode := flag.String("mode", string(routes.Native), "routing mode to other nodes: native or vxlan")
	stateDir := flag.String("state-dir", "/var/lib/ebpf-cni", "where the plugin reads the node file (its stateDir)")
	metricsAddr := flag.String("metrics-addr", ":9610", "address of /healthz and /metrics (empty: off)")
	resync := flag.Duration("resync", 30*time.Second, "reconcile period from the informer cache (repairs routes removed by hand)")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if err := run(log, *kubeconfig, *nodeName, routes.Mode(*mode), *stateDir, *metricsAddr, *resync); err != nil {
		log.Error("agent stopped", "err", err)
		os.Exit(1)
	}
}

// subcommands are the agent binary's helpers, run instead of the agent.
var subcommands = map[string]func([]string) error{
	"install": install, // the DaemonSet's init step
	"probe":   probe,   // the shared connectivity check
}

func firstArg() string {
	if len(os.Args) > 1 {
		return os.Args[1]
	}
	return ""
}

func run(log *slog.Logger, kubeconfig, nodeName string, mode routes.Mode, stateDir, metricsAddr string, resync time.Duration) error {
	if mode != routes.Native && mode != routes.VXLAN {
		return fmt.Errorf("-mode %q: want native or vxlan", mode)
	}
	if nodeName == "" {
		h, err := os.Hostname()
		if err != nil {
			return fmt.Errorf("node name: %w", err)
		}
		nodeName = h
	}
	cfg, err := restConfig(kubeconfig)
	if err != nil {
		return err
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	factory := informers.NewSharedInformerFactory(client, 0)
	nodes := factory.Core().V1().Nodes()
	kick := make(chan struct{}, 1)
	poke := func() {
		select {
		case kick <- struct{}{}:
		default:
		}
	}
	if _, err := nodes.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { poke() },
		UpdateFunc: func(any, any) { poke() },
		DeleteFunc: func(any) { poke() },
	}); err != nil {
		return fmt.Errorf("watch nodes: %w", err)
	}
	factory.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), nodes.Informer().HasSynced) {
		return errors.New("node cache did not sync")
	}

	a := &agent{log: log, name: nodeName, mode: mode, stateDir: stateDir, lister: nodes.Lister()}
	if metricsAddr != "" {
		srv := &http.Server{Addr: metricsAddr, Handler: a.handler(), ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("metrics server", "err", err)
			}
		}()
		defer srv.Close()
	}
	log.Info("agent started", "node", nodeName, "mode", mode)
	ticker := time.NewTicker(resync)
	defer ticker.Stop()
	poke() // reconcile on start: stale routes of deleted nodes go away
	for {
		select {
		case <-ctx.Done():
			log.Info("agent stopping; routes stay in place")
			return nil
		case <-kick:
		case <-ticker.C:
		}
		a.sync()
	}
}

func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig == "" {
		cfg, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("in-cluster config (or pass -kubeconfig): %w", err)
		}
		return cfg, nil
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", kubeconfig, err)
	}
	return cfg, nil
}

type agent struct {
	log      *slog.Logger
	name     string
	mode     routes.Mode
	stateDir string
	lister   listers.NodeLister

	mu         sync.Mutex
	synced     bool
	syncs      int
	syncErrors int
	lastSync   time.Time
	added      int
	removed    int
	peers      []routes.Peer
	written    node.Info // the node file as last written (rewritten only on change)
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

// sync reconciles routes and the node file with the informer cache.
func (a *agent) sync() {
	all, err := a.lister.List(labels.Everything())
	if err != nil {
		a.record(nil, 0, 0, fmt.Errorf("list nodes: %w", err))
		return
	}
	var self *corev1.Node
	for _, n := range all {
		if n.Name == a.name {
			self = n
		}
	}
	var local []netip.Prefix
	if self != nil {
		local = podCIDRs(self)
	}
	var peers []routes.Peer
	for _, n := range all {
		if n.Name == a.name {
			continue
		}
		// One route per podCIDR via the node address of the same family
		// (native); a stale Node claiming our own range is ignored.
		for _, fam := range []int{4, 6} {
			ip, ok := internalIP(n, fam)
			if a.mode == routes.VXLAN {
				ip, ok = internalIP(n, 0)
			}
			var cidrs []netip.Prefix
			for _, c := range podCIDRs(n) {
				if c.Addr().Is4() == (fam == 4) && !overlaps(c, local) {
					cidrs = append(cidrs, c)
				}
			}
			if ok && len(cidrs) > 0 {
				peers = append(peers, routes.Peer{Name: n.Name, NodeIP: ip, PodCIDRs: cidrs})
			}
		}
	}
	slices.SortFunc(peers, func(x, y routes.Peer) int { return cmpString(x.Name, y.Name) })
	if self == nil {
		a.record(peers, 0, 0, fmt.Errorf("node %s not found in the API", a.name))
		return
	}
	localIP, ok := internalIP(self, 0)
	if !ok {
		a.record(peers, 0, 0, fmt.Errorf("node %s has no InternalIP yet", a.name))
		return
	}
	r := &routes.Router{Mode: a.mode, LocalIP: localIP, Local: local}
	var errs []error
	podCIDRs := local
	if a.mode == routes.VXLAN {
		podCIDRs = nil // the overlay carries IPv4 only: no IPv6 pod addresses
		for _, p := range local {
			if p.Addr().Is4() {
				podCIDRs = append(podCIDRs, p)
			}
		}
	}
	if len(podCIDRs) == 0 {
		// Pods cannot be wired yet: stay unready rather than let every ADD
		// answer "try again later" behind a Ready node.
		errs = append(errs, fmt.Errorf("node %s has no podCIDR yet (is the controller-manager allocating node CIDRs?)", a.name))
	} else {
		mtu := 0
		if under, err := routes.UnderlayMTU(localIP); err == nil {
			mtu = r.MTU(under)
		}
		info := node.Info{Name: a.name, PodCIDRs: podCIDRs, MTU: mtu}
		if !slices.Equal(info.PodCIDRs, a.written.PodCIDRs) || info.MTU != a.written.MTU {
			err := node.Write(a.stateDir, info)
			if err == nil {
				a.written = info
			}
			errs = append(errs, err)
		}
	}
	added, removed, err := r.Sync(peers)
	a.record(peers, added, removed, errors.Join(append(errs, err)...))
}

func cmpString(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func (a *agent) record(peers []routes.Peer, added, removed int, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.syncs++
	a.lastSync = time.Now()
	a.added += added
	a.removed += removed
	a.peers = peers
	a.synced = err == nil // healthy only while the last reconcile succeeded
	if err != nil {
		a.syncErrors++
		a.log.Error("sync", "err", err)
		return
	}
	if added > 0 || removed > 0 {
		a.log.Info("routes changed", "added", added, "removed", removed, "peers", len(peers))
	}
}

// handler serves /healthz (200 once a sync succeeded) and /metrics.
func (a *agent) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		a.mu.Lock()
		ok := a.synced
		a.mu.Unlock()
		if !ok {
			http.Error(w, "last reconcile failed (or none yet)", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, _ *http.Request) {
		a.mu.Lock()
		defer a.mu.Unlock()
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		fmt.Fprintf(w, "# HELP ebpf_cni_agent_syncs_total Reconciles run.\n# TYPE ebpf_cni_agent_syncs_total counter\nebpf_cni_agent_syncs_total %d\n", a.syncs)
		fmt.Fprintf(w, "# HELP ebpf_cni_agent_sync_errors_total Reconciles that failed.\n# TYPE ebpf_cni_agent_sync_errors_total counter\nebpf_cni_agent_sync_errors_total %d\n", a.syncErrors)
		fmt.Fprintf(w, "# HELP ebpf_cni_agent_routes_added_total Routes added.\n# TYPE ebpf_cni_agent_routes_added_total counter\nebpf_cni_agent_routes_added_total %d\n", a.added)
		fmt.Fprintf(w, "# HELP ebpf_cni_agent_routes_removed_total Routes removed.\n# TYPE ebpf_cni_agent_routes_removed_total counter\nebpf_cni_agent_routes_removed_total %d\n", a.removed)
		fmt.Fprintf(w, "# HELP ebpf_cni_agent_last_sync_timestamp_seconds Time of the last reconcile.\n# TYPE ebpf_cni_agent_last_sync_timestamp_seconds gauge\nebpf_cni_agent_last_sync_timestamp_seconds %d\n", a.lastSync.Unix())
		fmt.Fprintf(w, "# HELP ebpf_cni_agent_peer_pod_cidrs Pod CIDRs routed to each other node.\n# TYPE ebpf_cni_agent_peer_pod_cidrs gauge\n")
		for _, p := range a.peers {
			fmt.Fprintf(w, "ebpf_cni_agent_peer_pod_cidrs{node=%q,node_ip=%q,mode=%q} %d\n", p.Name, p.NodeIP, a.mode, len(p.PodCIDRs))
		}
	})
	return mux
}
