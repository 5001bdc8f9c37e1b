package main

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ebpf-cni/ebpf-cni/internal/agent/policy"
	"github.com/ebpf-cni/ebpf-cni/internal/maps"
)

// The cost of NetworkPolicy on the fast path: three client/server pairs on
// one node (one ebpf-cni network): no policy; the server isolated by a
// policy allowing the client among 10 rules; among 1,000 rules (1,000
// policies) with 1,000 other pods known. The maps are programmed by the
// agent's policy compiler and applier (the policy controller's own code,
// fed the objects directly instead of through informers); its time for the
// 1,000 policies is the programming time. TCP_RR and TCP_CRR in
// interleaved rounds, ratios against "no policy" of the same round.

type polSetup struct {
	key, label     string
	client, server string // namespaces
	clientIP       netip.Addr
	serverIP       netip.Addr
}

type polCell struct{ rr, crr rrOut }

type polReport struct {
	setups   []*polSetup
	rounds   []map[string]polCell
	compile  time.Duration // 1,000 policies: compile and apply, first time
	update   time.Duration // one more policy
	writes   int
	rules    int
	memlock  string
	statsOut string // the policy counters after the runs, allowed and denied
}

const polPort = 7000

func runPolicy(e *env, rep *report) error {
	fmt.Println("bench: policy setups")
	state := filepath.Join(e.dir, "pol-state")
	n, err := e.network("pol", "ebpf-cni", map[string]any{"type": "ebpf-cni", "mtu": mtu, "pinRoot": pinRoot, "stateDir": state,
		"ipam": map[string]any{"ranges": [][]map[string]string{{{"subnet": "10.230.0.0/16"}}}, "dataDir": e.dir + "/pol-ipam"}})
	if err != nil {
		return err
	}
	pr := &polReport{}
	rep.pol = pr
	for i, s := range []struct{ key, label string }{{"none", "no policy"}, {"p10", "allowed among 10 rules"},
		{"p1000", "allowed among 1,000 rules, 1,000 other pods"}} {
		ps := &polSetup{key: s.key, label: s.label, client: fmt.Sprintf("%spol%d-a", prefix, i), server: fmt.Sprintf("%spol%d-b", prefix, i)}
		for j, ns := range []string{ps.client, ps.server} {
			if err := e.newNS(ns); err != nil {
				return err
			}
			p, _, err := e.addAs(n, ns, "bench", fmt.Sprintf("%s-%d", s.key, j))
			if err != nil {
				return err
			}
			exec.Command("ip", "-n", ns, "link", "set", "lo", "up").Run()
			if j == 0 {
				ps.clientIP = p.ip
			} else {
				ps.serverIP = p.ip
			}
		}
		pr.setups = append(pr.setups, ps)
	}
	m, err := maps.Open(pinRoot)
	if err != nil {
		return err
	}
	defer m.Close()
	input, extra := policyObjects(pr.setups)
	locals, err := policy.Locals(state)
	if err != nil {
		return err
	}
	input.Locals = locals
	if input.NodeAddrs, err = policy.NodeAddrs(); err != nil {
		return err
	}
	var local []int
	for _, l := range locals {
		local = append(local, l.Ifindex)
	}
	comp, ap := policy.NewCompiler(), policy.NewApplier(m)
	start := time.Now()
	st, errs := comp.Compile(input)
	if len(errs) > 0 {
		return fmt.Errorf("compile: %v", errs)
	}
	if err := ap.Apply(st, local); err != nil {
		return err
	}
	pr.compile = time.Since(start)
	pr.writes = ap.Writes()
	for _, rules := range st.Sets {
		pr.rules += len(rules)
	}
	input.Policies = append(input.Policies, extra)
	start = time.Now()
	st, _ = comp.Compile(input)
	if err := ap.Apply(st, local); err != nil {
		return err
	}
	pr.update = time.Since(start)
	fmt.Printf("bench: policy: 1,000 policies compiled and programmed in %s (%d map writes, %d rules); one more in %s\n",
		pr.compile.Round(time.Millisecond), pr.writes, pr.rules, pr.update.Round(100*time.Microsecond))
	if out, err := exec.Command("bash", "-c", "bpftool -j map show pinned "+pinRoot+"/policy_v1").Output(); err == nil {
		var mi struct {
			Bytes int `json:"bytes_memlock"`
		}
		if json.Unmarshal(out, &mi) == nil {
			pr.memlock = fmt.Sprintf("%d KiB", mi.Bytes/1024)
		}
	}

	for _, s := range pr.setups {
		srv := inNS(s.server, "taskset", "-c", serverCPU, *rrBin, "-listen", netip.AddrPortFrom(s.serverIP, polPort).String())
		if err := srv.Start(); err != nil {
			return err
		}
		defer srv.Process.Kill()
	}
	time.Sleep(500 * time.Millisecond)
	rr := func(s *polSetup, crr bool, d time.Duration) (rrOut, error) {
		args := []string{"taskset", "-c", clientCPU, *rrBin, "-connect", netip.AddrPortFrom(s.serverIP, polPort).String(), "-d", d.String()}
		if crr {
			args = append(args, "-crr", "-cpu", clientCPU)
		}
		return parseRR(inNS(s.client, args...))
	}
	fmt.Println("bench: policy warm-up pass (discarded)")
	for _, s := range pr.setups {
		if _, err := rr(s, false, time.Second); err != nil {
			return fmt.Errorf("warm-up %s: %w", s.label, err)
		}
	}
	for r := 0; r < *rounds; r++ {
		round := map[string]polCell{}
		for i := range pr.setups {
			s := pr.setups[(i+r)%len(pr.setups)]
			var c polCell
			if c.rr, err = rr(s, false, *measure); err != nil {
				return fmt.Errorf("round %d, %s: %w", r+1, s.label, err)
			}
			if c.crr, err = rr(s, true, *measure); err != nil {
				return fmt.Errorf("round %d, %s: %w", r+1, s.label, err)
			}
			round[s.key] = c
			fmt.Printf("bench: policy round %d/%d %-46s rr %8.0f/s p50 %5.1fus  crr %7.0f/s p50 %5.1fus%s\n", r+1, *rounds, s.label,
				c.rr.tps, c.rr.p50, c.crr.tps, c.crr.p50, errNote(c.crr.errors))
		}
		pr.rounds = append(pr.rounds, round)
	}
	var parts []string
	for _, s := range pr.setups[1:] {
		idx, err := ifindexOf(locals, s.key+"-1")
		if err != nil {
			continue
		}
		ps, err := m.PolicyStats(idx)
		if err == nil {
			parts = append(parts, fmt.Sprintf("%s: %d flows allowed, %d packets denied", s.label, ps.IngressAllowed, ps.IngressDenied))
		}
	}
	pr.statsOut = strings.Join(parts, "; ")
	return nil
}

func ifindexOf(locals []policy.Local, name string) (int, error) {
	for _, l := range locals {
		if l.Namespace == "bench" && l.Name == name {
			return l.Ifindex, nil
		}
	}
	return 0, fmt.Errorf("no local pod bench/%s", name)
}

// policyObjects: the server of p10 admits 9 other pods and its client, one
// rule each; the server of p1000 is selected by 1,000 policies, one rule
// each (999 for other pods of the 1,000, one for its client). The extra
// policy is the "one more" of the programming time.
func policyObjects(setups []*polSetup) (policy.Input, *networkingv1.NetworkPolicy) {
	in := policy.Input{Namespaces: []*corev1.Namespace{{ObjectMeta: metav1.ObjectMeta{Name: "bench"}}}}
	pod := func(name string, ip netip.Addr) *corev1.Pod {
		return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "bench", Name: name, Labels: map[string]string{"app": name}},
			Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIPs: []corev1.PodIP{{IP: ip.String()}}}}
	}
	for _, s := range setups {
		in.Pods = append(in.Pods, pod(s.key+"-0", s.clientIP), pod(s.key+"-1", s.serverIP))
	}
	for i := range 1000 {
		in.Pods = append(in.Pods, pod(fmt.Sprintf("other-%d", i), netip.AddrFrom4([4]byte{10, 231, byte(i / 250), byte(i%250 + 1)})))
	}
	allow := func(name, server, from string, port int) *networkingv1.NetworkPolicy {
		p := intstr.FromInt32(int32(port))
		return &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "bench", Name: name},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": server}},
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{
					From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": from}}}},
					Ports: []networkingv1.NetworkPolicyPort{{Port: &p}}}}}}
	}
	for i := range 9 {
		in.Policies = append(in.Policies, allow(fmt.Sprintf("p10-%d", i), "p10-1", fmt.Sprintf("other-%d", i), polPort+1+i))
	}
	in.Policies = append(in.Policies, allow("p10-client", "p10-1", "p10-0", polPort))
	for i := range 999 {
		in.Policies = append(in.Policies, allow(fmt.Sprintf("p1000-%d", i), "p1000-1", fmt.Sprintf("other-%d", i), polPort+1+i))
	}
	in.Policies = append(in.Policies, allow("p1000-client", "p1000-1", "p1000-0", polPort))
	return in, allow("one-more", "p1000-1", "other-999", polPort+1000)
}

func (r *report) writePolicy(w func(string, ...any)) {
	p := r.pol
	if p == nil || len(p.rounds) == 0 {
		return
	}
	w("\n## NetworkPolicy on the fast path\n\n")
	w("Three client/server pairs on one node (ebpf-cni, same-node redirect): no policy; the server isolated by "+
		"policies that allow the client among 10 rules; among 1,000 rules (1,000 policies) with 1,000 other pods in "+
		"the ipcache. Programmed by the agent's policy compiler and applier (the controller's code, fed the objects "+
		"directly). %d interleaved rounds, the order rotating; ratios are medians of per-round ratios against no "+
		"policy of the same round. TCP_RR and TCP_CRR as in the Services section, %s each; clients on CPU %s, servers "+
		"on CPU %s.\n\n", len(p.rounds), *measure, clientCPU, serverCPU)
	w("| setup | TCP_RR trans/s | × no policy | RR p50 µs | TCP_CRR conn/s | × no policy | CRR p50 µs | CRR failed |\n")
	w("|---|---|---|---|---|---|---|---|\n")
	for _, s := range p.setups {
		var rr, rrRatio, p50, crr, crrRatio, cp50 []float64
		failed := 0
		for _, round := range p.rounds {
			c, base := round[s.key], round["none"]
			rr = append(rr, c.rr.tps)
			p50 = append(p50, c.rr.p50)
			crr = append(crr, c.crr.tps)
			cp50 = append(cp50, c.crr.p50)
			rrRatio = append(rrRatio, c.rr.tps/base.rr.tps)
			crrRatio = append(crrRatio, c.crr.tps/base.crr.tps)
			failed += c.crr.errors
		}
		w("| %s | %.0f | %s | %.1f | %.0f | %s | %.1f | %d |\n", s.label, median(rr), ratio(rrRatio), median(p50),
			median(crr), ratio(crrRatio), median(cp50), failed)
	}
	w("\nProgramming: 1,000 policies (%d rules in the maps, %d map writes) compiled and written in **%s**; one more "+
		"policy afterwards in %s. `policy_v1` memlock: %s (an LPM trie without preallocation: it grows with the "+
		"rules). Counters after the runs: %s.\n", p.rules, p.writes, p.compile.Round(time.Millisecond),
		p.update.Round(100*time.Microsecond), dash(p.memlock), dash(p.statsOut))
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// parseRR runs an rr client command and decodes its result.
func parseRR(cmd *exec.Cmd) (rrOut, error) {
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return rrOut{}, fmt.Errorf("rr: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	var r struct {
		TPS    float64 `json:"tps"`
		P50us  float64 `json:"p50_us"`
		P99us  float64 `json:"p99_us"`
		Errors int     `json:"errors"`
	}
	if err := json.Unmarshal(out, &r); err != nil {
		return rrOut{}, fmt.Errorf("rr output %q: %w", out, err)
	}
	if r.Errors > 0 {
		fmt.Fprintf(os.Stderr, "bench: rr: %s\n", strings.TrimSpace(stderr.String()))
	}
	return rrOut{tps: r.TPS, p50: r.P50us, p99: r.P99us, errors: r.Errors}, nil
}
