// Package agent holds what ebpf-cni-agent's controllers share: the
// Controller shape (one informer-fed reconcile loop each, owning its own
// kernel state and BPF maps) and the HTTP endpoint serving /healthz and
// /metrics for all of them. Each controller lives in its own package below
// (routes; Services and policy sit beside it); cmd/ebpf-cni-agent only
// wires them. The agent is not on the pod-creation path: ADD and DEL work
// while it is down.
package agent

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Controller is one reconcile loop of the agent.
type Controller interface {
	// Name names the controller in logs and /healthz.
	Name() string
	// Run reconciles until ctx ends: on start, on every event of its
	// informers, and every resync period from their caches.
	Run(ctx context.Context)
	// Healthy is nil while the last reconcile succeeded.
	Healthy() error
}

// Handler serves /healthz (200 while every controller is healthy, else 503
// naming the failing ones) and /metrics from reg.
func Handler(reg *prometheus.Registry, controllers ...Controller) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		var errs []error
		for _, c := range controllers {
			if err := c.Healthy(); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", c.Name(), err))
			}
		}
		if err := errors.Join(errs...); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	return mux
}

// Kick is a coalescing wake-up: any number of Pokes before the loop reads
// C make one reconcile.
type Kick struct{ C chan struct{} }

// NewKick returns a Kick with one pending wake-up (reconcile on start).
func NewKick() Kick {
	k := Kick{C: make(chan struct{}, 1)}
	k.Poke()
	return k
}

// Poke asks for a reconcile.
func (k Kick) Poke() {
	select {
	case k.C <- struct{}{}:
	default:
	}
}

// Loop calls reconcile on every Poke and every resync until ctx ends.
func (k Kick) Loop(ctx context.Context, resync time.Duration, reconcile func()) {
	t := time.NewTicker(resync)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-k.C:
		case <-t.C:
		}
		reconcile()
	}
}

// Health is a controller's answer to /healthz: unready until a complete
// reconcile succeeded (the first one that covered everything), then the
// error of the last reconcile.
type Health struct {
	mu      sync.Mutex
	ready   bool
	err     error
	pending string // why it is not ready yet
}

// NewHealth returns an unready Health; pending says what it waits for.
func NewHealth(pending string) *Health { return &Health{pending: pending} }

// Healthy implements Controller.Healthy.
func (h *Health) Healthy() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.ready && h.err == nil {
		return errors.New(h.pending)
	}
	return h.err
}

// Record keeps the outcome of a reconcile; complete: it covered all there
// is (a successful one makes the controller ready). It reports whether
// this one did so for the first time.
func (h *Health) Record(err error, complete bool) (first bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.err = err
	if err == nil && complete && !h.ready {
		h.ready = true
		return true
	}
	return false
}

// Ready reports whether a complete reconcile succeeded since the start
// (or the last Reset).
func (h *Health) Ready() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.ready
}

// Reset makes the controller unready until its next complete reconcile
// (what it programmed is gone: the datapath was re-created).
func (h *Health) Reset() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.ready = false
}

// Register registers a controller's metrics with reg.
func Register(reg prometheus.Registerer, what string, cols ...prometheus.Collector) error {
	for _, col := range cols {
		if err := reg.Register(col); err != nil {
			return fmt.Errorf("register %s metrics: %w", what, err)
		}
	}
	return nil
}
