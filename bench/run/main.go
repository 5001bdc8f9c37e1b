// Command run is `make bench`: ebpf-cni against a bare veth pair and the
// reference bridge and ptp plugins, on this machine, in one run.
//
// Datapath: two namespaces per setup, all setups alive at once and measured
// interleaved in rounds, each ratio taken against the bare veth pair of the
// same round. Churn: ADD/DEL latency through cnitool with 0, 200 and 1000
// pods already on the node, and 50 parallel ADDs. Footprint: pinned map
// memory and the plugin's max RSS per call. Services: pod → ClusterIP →
// pod through kube-proxy (iptables, nftables) and ebpf-cni's BPF Services
// at 10, 1,000 and 10,000 Services, on a real kube-apiserver. Everything
// it creates is named ebb-* and removed at the end, also on SIGINT/SIGTERM.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

var (
	plugin       = flag.String("plugin", "bin/ebpf-cni", "ebpf-cni binary")
	rrBin        = flag.String("rr", "bin/rr", "TCP_RR benchmark binary")
	out          = flag.String("out", "BENCHMARKS.md", "report to write")
	notes        = flag.String("notes", "bench/NOTES.md", "hand-written findings appended to the report")
	rounds       = flag.Int("rounds", 5, "datapath rounds")
	measure      = flag.Duration("d", 3*time.Second, "duration of each throughput/RR measurement")
	samples      = flag.Int("samples", 20, "ADD/DEL samples per churn level")
	levels       = flag.String("levels", "0,200,1000", "pods already on the node for the churn measurements")
	only         = flag.String("sections", "startup,datapath,crossnode,churn,soak,services,policy", "sections to run, comma-separated (the report holds those run)")
	soakCycles   = flag.Int("soak-cycles", 1000, "soak: ADD/DEL cycles")
	soakParallel = flag.Int("soak-parallel", 50, "soak: cycles at once")
	xnOnly       = flag.String("crossnode", "n2n,native,hostpath,vxlan,ptp,kvxlan", "cross-node setups to run (n2n is required)")
	congestion   = flag.String("cc", "cubic", "TCP congestion control of the iperf3 streams (BBR's pacing holds sub-100 µs paths below what they carry: compare setups with the Linux default)")
	hold         = flag.Bool("hold", false, "cross-node, services: set up, print the namespaces and wait for SIGINT instead of measuring (profiling by hand)")
	agentBin     = flag.String("agent", "bin/ebpf-cni-agent", "services: ebpf-cni-agent binary (the BPF Services setup)")
	kubeBinDir   = flag.String("kube-bin", "", "services: directory holding kube-apiserver and kube-proxy (default: scripts/kube-build.sh --print-dir)")
	cgroupRoot   = flag.String("cgroup-root", "/sys/fs/cgroup/unified", "services: cgroup2 mount under which each emulated node gets a cgroup")
	svcLevels    = flag.String("svc-levels", "10,1000,10000", "services: Services programmed at each level, increasing")
	svcSetups    = flag.String("svc-setups", "direct,iptables,nftables,ebpf", "services: setups to run (direct is required)")
	svcRounds    = flag.Int("svc-rounds", 3, "services: TCP_RR/TCP_CRR rounds per level")
	svcDur       = flag.Duration("svc-d", time.Second, "services: duration of each TCP_RR and TCP_CRR measurement")
	svcTimeout   = flag.Duration("svc-timeout", 3*time.Minute, "services: longest wait for a Service to answer")
	svcFreeze    = flag.Bool("svc-freeze", true, "services: SIGSTOP kube-proxy and the agent while TCP_RR/TCP_CRR run (rules and maps stay)")
	svcWorkers   = flag.Int("svc-workers", 32, "services: parallel API requests when creating Services")
)

func main() {
	flag.Parse()
	if os.Geteuid() != 0 {
		fatal(fmt.Errorf("make bench needs root (namespaces, veths, BPF)"))
	}
	var err error
	if *plugin, err = filepath.Abs(*plugin); err != nil {
		fatal(err)
	}
	if *rrBin, err = filepath.Abs(*rrBin); err != nil {
		fatal(err)
	}
	if *agentBin, err = filepath.Abs(*agentBin); err != nil {
		fatal(err)
	}
	env, err := newEnv()
	if err != nil {
		fatal(err)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		s := <-sig
		fmt.Fprintf(os.Stderr, "\nbench: %s, cleaning up\n", s)
		env.cleanup()
		os.Exit(130)
	}()
	defer env.cleanup()

	rep := &report{started: time.Now(), load: []string{loadavg()}}
	sections := []struct {
		name string
		run  func() error
	}{
		{"startup", func() error { return runStartup(rep) }},
		{"datapath", func() error { return runDatapath(env, rep) }},
		{"crossnode", func() error { return runCrossNode(env, rep) }},
		{"churn", func() error { return runChurn(env, rep) }},
		{"soak", func() error { return runSoak(env, rep) }},
		{"services", func() error { return runServices(env, rep) }},
		{"policy", func() error { return runPolicy(env, rep) }},
	}
	want := map[string]bool{}
	for _, s := range strings.Split(*only, ",") {
		want[strings.TrimSpace(s)] = true
	}
	for _, s := range sections {
		if !want[s.name] {
			continue
		}
		fmt.Printf("bench: section %s\n", s.name)
		if err := s.run(); err != nil {
			env.cleanup()
			fatal(fmt.Errorf("%s: %w", s.name, err))
		}
		rep.load = append(rep.load, loadavg())
	}
	rep.finished = time.Now()
	if err := rep.write(*out, *notes); err != nil {
		env.cleanup()
		fatal(err)
	}
	fmt.Printf("\nbench: wrote %s\n", *out)
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "bench:", err)
	os.Exit(1)
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	var a, b5, c float64
	fmt.Sscanf(string(b), "%f %f %f", &a, &b5, &c)
	return fmt.Sprintf("%.2f %.2f %.2f", a, b5, c)
}
