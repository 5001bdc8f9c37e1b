package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/netip"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// setup is a pair of "pods" joined one way or another.
type setup struct {
	key, label string
	a, b       string     // namespaces
	bIP        netip.Addr // where b listens
}

// metrics of one setup in one round.
type metrics struct {
	tps, p50, p99     float64 // TCP_RR
	gbps1, gbps4, rtt float64 // iperf3 1 and 4 streams (Gbit/s), ping RTT (ms)
	pps               float64 // UDP 64-byte datagrams received per second (cross-node)
}

const mtu = 1500 // the same on every setup: throughput depends on it

// Client and server are pinned to CPUs: left to the scheduler, TCP_RR on two
// cores came out bimodal (22k or 32k trans/s for the same setup) depending
// on whether both ends shared a CPU.
const (
	clientCPU = "0"
	serverCPU = "1"
)

func vethSetup(e *env) (*setup, error) {
	s := &setup{key: "veth", label: "bare veth pair", a: prefix + "veth-a", b: prefix + "veth-b", bIP: netip.MustParseAddr("10.200.0.2")}
	for _, ns := range []string{s.a, s.b} {
		if err := e.newNS(ns); err != nil {
			return nil, err
		}
	}
	for _, args := range [][]string{
		{"ip", "link", "add", prefix + "va", "mtu", strconv.Itoa(mtu), "type", "veth", "peer", "name", prefix + "vb", "mtu", strconv.Itoa(mtu)},
		{"ip", "link", "set", prefix + "va", "netns", s.a, "name", "eth0"},
		{"ip", "link", "set", prefix + "vb", "netns", s.b, "name", "eth0"},
		{"ip", "-n", s.a, "addr", "add", "10.200.0.1/24", "dev", "eth0"},
		{"ip", "-n", s.b, "addr", "add", "10.200.0.2/24", "dev", "eth0"},
		{"ip", "-n", s.a, "link", "set", "eth0", "up"},
		{"ip", "-n", s.b, "link", "set", "eth0", "up"},
		{"ip", "-n", s.a, "link", "set", "lo", "up"},
		{"ip", "-n", s.b, "link", "set", "lo", "up"},
	} {
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("%v: %v: %s", args, err, out)
		}
	}
	return s, nil
}

// pluginNetworks are the CNI setups, each with its own subnet; /16 so the
// churn phase can put 1000+ pods on them.
func pluginNetworks(e *env, tag string, octet int) ([]*network, error) {
	subnet := func(i int) string { return fmt.Sprintf("10.%d.0.0/16", octet+i) }
	hostLocal := func(i int) map[string]any {
		return map[string]any{"type": "host-local", "ranges": [][]map[string]string{{{"subnet": subnet(i)}}}, "dataDir": e.dir + "/host-local"}
	}
	defs := []struct {
		short, label string
		conf         map[string]any
	}{
		{"ebpf" + tag, "ebpf-cni", map[string]any{"type": "ebpf-cni", "mtu": mtu, "pinRoot": pinRoot, "stateDir": e.dir + "/ebpf-state",
			"ipam": map[string]any{"ranges": [][]map[string]string{{{"subnet": subnet(0)}}}, "dataDir": e.dir + "/ebpf-ipam"}}},
		{"bridge" + tag, "bridge + host-local", map[string]any{"type": "bridge", "bridge": bridge + tag, "isGateway": true, "ipMasq": true, "mtu": mtu, "ipam": hostLocal(1)}},
		{"ptp" + tag, "ptp + host-local", map[string]any{"type": "ptp", "ipMasq": true, "mtu": mtu, "ipam": hostLocal(2)}},
	}
	var out []*network
	for _, d := range defs {
		n, err := e.network(d.short, d.label, d.conf)
		if err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	return out, nil
}

func pluginSetup(e *env, n *network) (*setup, error) {
	s := &setup{key: strings.TrimPrefix(n.name, prefix), label: n.label, a: n.name + "-a", b: n.name + "-b"}
	for _, ns := range []string{s.a, s.b} {
		if err := e.newNS(ns); err != nil {
			return nil, err
		}
		p, _, err := e.add(n, ns)
		if err != nil {
			return nil, err
		}
		exec.Command("ip", "-n", ns, "link", "set", "lo", "up").Run()
		s.bIP = p.ip
	}
	return s, nil
}

func runDatapath(e *env, rep *report) error {
	fmt.Println("bench: datapath setups")
	nets, err := pluginNetworks(e, "", 210)
	if err != nil {
		return err
	}
	veth, err := vethSetup(e)
	if err != nil {
		return err
	}
	setups := []*setup{veth}
	for _, n := range nets {
		s, err := pluginSetup(e, n)
		if err != nil {
			return err
		}
		setups = append(setups, s)
	}
	rep.setups = setups
	// Start one rr and one iperf3 server in each b.
	for _, s := range setups {
		srv := inNS(s.b, "taskset", "-c", serverCPU, *rrBin, "-listen", netip.AddrPortFrom(s.bIP, 7000).String())
		if err := srv.Start(); err != nil {
			return err
		}
		defer srv.Process.Kill()
		ip := inNS(s.b, "iperf3", "-s", "-A", serverCPU, "-B", s.bIP.String(), "-p", "5201")
		if err := ip.Start(); err != nil {
			return err
		}
		defer ip.Process.Kill()
	}
	time.Sleep(500 * time.Millisecond)
	// One discarded pass first: the very first measurement of a run came out
	// up to 30% low (cold caches, CPU frequency), whichever setup had it.
	fmt.Println("bench: warm-up pass (discarded)")
	for _, s := range setups {
		if _, err := inNS(s.a, "taskset", "-c", clientCPU, *rrBin, "-connect", netip.AddrPortFrom(s.bIP, 7000).String(), "-d", "1s").Output(); err != nil {
			return fmt.Errorf("warm-up %s: %w", s.label, err)
		}
	}
	rep.rounds = make([]map[string]metrics, *rounds)
	for r := 0; r < *rounds; r++ {
		rep.rounds[r] = map[string]metrics{}
		for i := range setups {
			s := setups[(i+r)%len(setups)] // rotate the order every round
			m, err := measureSetup(s)
			if err != nil {
				return fmt.Errorf("round %d, %s: %w", r+1, s.label, err)
			}
			rep.rounds[r][s.key] = m
			fmt.Printf("bench: round %d/%d %-22s rr %8.0f/s p50 %5.1fus  iperf3 %5.1f / %5.1f Gbit/s  ping %.3f ms\n",
				r+1, *rounds, s.label, m.tps, m.p50, m.gbps1, m.gbps4, m.rtt)
		}
	}
	return nil
}

func measureSetup(s *setup) (metrics, error) {
	var m metrics
	out, err := inNS(s.a, "taskset", "-c", clientCPU, *rrBin, "-connect", netip.AddrPortFrom(s.bIP, 7000).String(), "-d", measure.String()).Output()
	if err != nil {
		return m, fmt.Errorf("rr: %w", err)
	}
	var rr struct {
		TPS   float64 `json:"tps"`
		P50us float64 `json:"p50_us"`
		P99us float64 `json:"p99_us"`
	}
	if err := json.Unmarshal(out, &rr); err != nil {
		return m, err
	}
	m.tps, m.p50, m.p99 = rr.TPS, rr.P50us, rr.P99us
	if m.gbps1, err = iperf(s, 1); err != nil {
		return m, err
	}
	if m.gbps4, err = iperf(s, 4); err != nil {
		return m, err
	}
	m.rtt, err = ping(s)
	return m, err
}

func iperf(s *setup, streams int) (float64, error) {
	secs := strconv.Itoa(int(measure.Seconds()))
	out, err := inNS(s.a, "iperf3", "-A", clientCPU, "-C", *congestion, "-c", s.bIP.String(), "-p", "5201", "-t", secs, "-P", strconv.Itoa(streams), "-J").Output()
	if err != nil {
		return 0, fmt.Errorf("iperf3 -P %d: %w: %s", streams, err, out)
	}
	var res struct {
		End struct {
			SumReceived struct {
				BPS float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		return 0, err
	}
	return res.End.SumReceived.BPS / 1e9, nil
}

var rttRe = regexp.MustCompile(`= [0-9.]+/([0-9.]+)/`)

func ping(s *setup) (float64, error) {
	out, err := inNS(s.a, "ping", "-q", "-c", "100", "-i", "0.01", s.bIP.String()).Output()
	if err != nil {
		return 0, fmt.Errorf("ping: %w: %s", err, out)
	}
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		if m := rttRe.FindStringSubmatch(sc.Text()); m != nil {
			return strconv.ParseFloat(m[1], 64)
		}
	}
	return 0, fmt.Errorf("no rtt in ping output: %s", out)
}
