// Command ebpf-cni-agent runs once per node (the DaemonSet's main
// container). It wires the agent's controllers (internal/agent/...) to a
// Kubernetes client and serves /healthz and /metrics; subcommands are the
// DaemonSet's install step and a connectivity probe.
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
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/ebpf-cni/ebpf-cni/internal/agent"
	"github.com/ebpf-cni/ebpf-cni/internal/agent/datapath"
	"github.com/ebpf-cni/ebpf-cni/internal/agent/policy"
	"github.com/ebpf-cni/ebpf-cni/internal/agent/routes"
	"github.com/ebpf-cni/ebpf-cni/internal/agent/services"
	"github.com/ebpf-cni/ebpf-cni/internal/loader"
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
	resync := flag.Duration("resync", 30*time.Second, "reconcile period from the informer caches (repairs state removed by hand)")
	pinRoot := flag.String("pin-root", "/sys/fs/bpf/ebpf-cni", "the plugin's pin root (VXLAN mode keeps its tunnel map there; repairs use it)")
	which := flag.String("controllers", "routes,datapath", "controllers to run: routes (Node objects: needs the API server), "+
		"datapath (repairs pods' datapath from their records), services (Kubernetes Services in BPF, replacing kube-proxy: needs the API server), "+
		"policy (NetworkPolicies in BPF: needs the API server)")
	repairEvery := flag.Duration("repair-interval", 2*time.Second, "how often the datapath controller checks the pods' datapath")
	var serviceCIDRs prefixList
	flag.Var(&serviceCIDRs, "service-cidrs", "services: the cluster's Service ranges, comma-separated (added to those of ServiceCIDR objects): addresses in them no Service has are refused")
	cgroupRoot := flag.String("cgroup-root", "", "services: the cgroup v2 directory whose processes get socket load balancing; a relative path is below the node's hierarchy root (empty: that root, mounted at "+loader.CgroupMount+" if the node has none)")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	cfg := routes.Config{NodeName: *nodeName, Mode: routes.Mode(*mode), StateDir: *stateDir, Resync: *resync}
	dp := datapath.Config{StateDir: *stateDir, PinRoot: *pinRoot, Interval: *repairEvery}
	sc := services.Config{NodeName: *nodeName, PinRoot: *pinRoot, CgroupRoot: *cgroupRoot, ServiceCIDRs: serviceCIDRs}
	if err := run(log, *kubeconfig, *metricsAddr, *pinRoot, strings.Split(*which, ","), cfg, dp, sc); err != nil {
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

func run(log *slog.Logger, kubeconfig, metricsAddr, pinRoot string, which []string, rc routes.Config, dc datapath.Config, sc services.Config) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if rc.NodeName == "" {
		h, err := os.Hostname()
		if err != nil {
			return fmt.Errorf("node name: %w", err)
		}
		rc.NodeName, sc.NodeName = h, h
	}
	var client kubernetes.Interface
	kube := func() (kubernetes.Interface, error) {
		if client != nil {
			return client, nil
		}
		cfg, err := restConfig(kubeconfig)
		if err != nil {
			return nil, err
		}
		c, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			return nil, fmt.Errorf("kubernetes client: %w", err)
		}
		client = c
		return c, nil
	}
	var controllers []agent.Controller
	if !slices.ContainsFunc(which, func(s string) bool { return strings.TrimSpace(s) == "services" }) {
		// The switch: without the services controller, a Service datapath
		// an earlier run left in place goes (kube-proxy serves alone).
		if err := services.Off(pinRoot); err != nil {
			log.Error("turn the Service datapath off", "err", err)
		}
	}
	for _, name := range which {
		switch strings.TrimSpace(name) {
		case "services":
			client, err := kube()
			if err != nil {
				return err
			}
			svc, err := services.New(log, client, sc, reg)
			if err != nil {
				return err
			}
			controllers = append(controllers, svc)
		case "policy":
			client, err := kube()
			if err != nil {
				return err
			}
			pc, err := policy.New(log, client, policy.Config{PinRoot: pinRoot, StateDir: dc.StateDir}, reg)
			if err != nil {
				return err
			}
			controllers = append(controllers, pc)
		case "routes":
			client, err := kube()
			if err != nil {
				return err
			}
			factory := informers.NewSharedInformerFactory(client, 0)
			rt, err := routes.New(log, factory, routes.Netlink{PinRoot: pinRoot}, rc, reg)
			if err != nil {
				return err
			}
			controllers = append(controllers, rt)
			factory.Start(ctx.Done())
		case "datapath":
			dp, err := datapath.New(log, dc, reg)
			if err != nil {
				return err
			}
			controllers = append(controllers, dp)
		default:
			return fmt.Errorf("-controllers: unknown controller %q (routes, datapath, services, policy)", name)
		}
	}

	if metricsAddr != "" {
		srv := &http.Server{Addr: metricsAddr, Handler: agent.Handler(reg, controllers...), ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("metrics server", "err", err)
			}
		}()
		defer srv.Close()
	}
	done := make(chan struct{})
	for _, c := range controllers {
		go func() {
			c.Run(ctx)
			done <- struct{}{}
		}()
	}
	for range controllers {
		<-done
	}
	return nil
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

// prefixList is a comma-separated list of CIDRs as a flag.
type prefixList []netip.Prefix

func (l *prefixList) String() string {
	var s []string
	for _, p := range *l {
		s = append(s, p.String())
	}
	return strings.Join(s, ",")
}

func (l *prefixList) Set(v string) error {
	for _, f := range strings.Split(v, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		p, err := netip.ParsePrefix(f)
		if err != nil {
			return err
		}
		*l = append(*l, p.Masked())
	}
	return nil
}
