package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/ebpf-cni/ebpf-cni/internal/endpoint"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
)

// monitor ("ebpf-cni monitor") prints why packets were dropped by a
// NetworkPolicy, as the datapath reports them (a ring buffer: one reader
// at a time), with the pod behind each host veth.
func monitor(argv []string, stdout, stderr io.Writer) error {
	fs, pinRoot, stateDir := nodeFlags("monitor", stderr)
	asJSON := fs.Bool("json", false, "one JSON object per drop")
	count := fs.Int("n", 0, "stop after this many drops (0: until interrupted)")
	wait := fs.Duration("timeout", 0, "stop after this long (0: until interrupted)")
	if err := fs.Parse(argv); err != nil {
		return err
	}
	ev, err := maps.OpenEvents(*pinRoot)
	if err != nil {
		return err
	}
	defer ev.Close()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sig
		ev.SetDeadline(time.Now()) // Read returns: done
	}()
	if *wait > 0 {
		ev.SetDeadline(time.Now().Add(*wait))
	}
	pods := podNames(*stateDir)
	enc := json.NewEncoder(stdout)
	for n := 0; *count == 0 || n < *count; n++ {
		e, err := ev.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return nil
		}
		if err != nil {
			return err
		}
		pod, ok := pods[e.Ifindex]
		if !ok {
			pods = podNames(*stateDir) // a pod added since
			pod = pods[e.Ifindex]
		}
		why := "policy"
		if e.Pending {
			why = "pending (policy not programmed yet)"
		}
		dir := map[uint8]string{maps.Ingress: "ingress", maps.Egress: "egress"}[e.Dir]
		if *asJSON {
			if err := enc.Encode(map[string]any{"pod": pod, "ifindex": e.Ifindex, "direction": dir, "reason": why,
				"src": e.Src.String(), "dst": e.Dst.String(), "proto": e.Proto, "peerIdentity": e.Identity}); err != nil {
				return err
			}
			continue
		}
		fmt.Fprintf(stdout, "DROP %s %s %s -> %s proto %d peer identity %d: %s\n", dash(pod), dir, e.Src, e.Dst, e.Proto, e.Identity, why)
	}
	return nil
}

// podNames maps host veth ifindexes to "namespace/name" from the records.
func podNames(stateDir string) map[int]string {
	out := map[int]string{}
	for _, n := range endpoint.Networks(stateDir) {
		recs, _, _ := endpoint.NewStore(stateDir, n).List()
		for _, r := range recs {
			name := r.PodNamespace + "/" + r.PodName
			if r.PodName == "" {
				name = r.ContainerID
			}
			out[r.HostIndex] = name
		}
	}
	return out
}
