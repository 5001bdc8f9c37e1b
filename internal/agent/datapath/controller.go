// Package datapath is the agent's repair controller: every interval it
// holds the datapath of the node's live pods against their endpoint records
// (endpoint.Check) and restores what is missing (endpoint.Restore): pinned
// maps and programs loaded anew after the pin root was emptied (bpffs
// remounted, an operator's rm), device and endpoint entries, the programs
// on both hooks of each host veth, the cluster ranges and node devices.
// Without it pods keep working through the host path but lose their
// anti-spoofing, and STATUS answers 51.
//
// It needs no Kubernetes object: its input is the node's own state
// directory, so it runs alone too (ebpf-cni-agent -controllers=datapath).
package datapath

import (
	"context"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ebpf-cni/ebpf-cni/internal/agent"
	"github.com/ebpf-cni/ebpf-cni/internal/endpoint"
)

// Config configures the controller.
type Config struct {
	StateDir string // the plugin's stateDir (endpoint records)
	PinRoot  string // the pin root of records that name none
	Interval time.Duration
}

// Controller repairs the node's pod datapath.
type Controller struct {
	log *slog.Logger
	cfg Config

	repairs, errs prometheus.Counter
	broken        prometheus.Gauge
	*agent.Health
}

// New registers the controller's metrics with reg.
func New(log *slog.Logger, cfg Config, reg prometheus.Registerer) (*Controller, error) {
	c := &Controller{
		log:     log.With("controller", "datapath"),
		cfg:     cfg,
		repairs: prometheus.NewCounter(prometheus.CounterOpts{Name: "ebpf_cni_agent_datapath_repairs_total", Help: "Pod attachments whose datapath was restored from their records."}),
		errs:    prometheus.NewCounter(prometheus.CounterOpts{Name: "ebpf_cni_agent_datapath_errors_total", Help: "Repair passes that failed."}),
		broken:  prometheus.NewGauge(prometheus.GaugeOpts{Name: "ebpf_cni_agent_datapath_broken_pods", Help: "Live pods whose datapath was incomplete at the last check."}),
		Health:  agent.NewHealth("no check yet"),
	}
	return c, agent.Register(reg, "datapath", c.repairs, c.errs, c.broken)
}

// Name implements agent.Controller.
func (c *Controller) Name() string { return "datapath" }

// Run implements agent.Controller.
func (c *Controller) Run(ctx context.Context) {
	c.log.Info("started", "stateDir", c.cfg.StateDir, "interval", c.cfg.Interval)
	t := time.NewTicker(c.cfg.Interval)
	defer t.Stop()
	for {
		c.Reconcile()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Reconcile runs one check, and a repair when something is missing.
func (c *Controller) Reconcile() error {
	h, err := endpoint.Check(c.cfg.StateDir, c.cfg.PinRoot)
	c.broken.Set(float64(len(h.Missing)))
	if err == nil && len(h.Missing) > 0 {
		c.log.Warn("pods lost their datapath; restoring", "pods", len(h.Missing), "first", h.Missing[0])
		var n int
		n, err = endpoint.Restore(c.cfg.StateDir, c.cfg.PinRoot)
		c.repairs.Add(float64(n))
		if err == nil {
			c.log.Info("restored", "pods", n)
		}
	}
	if err != nil {
		c.errs.Inc()
		c.log.Error("repair", "err", err)
	}
	c.Record(err, true)
	return err
}
