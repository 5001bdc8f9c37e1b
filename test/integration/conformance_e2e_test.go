//go:build e2e

package integration

import (
	"context"
	"encoding/xml"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// conformanceFocus selects the upstream sig-network Conformance specs.
const conformanceFocus = `\[sig-network\].*\[Conformance\]`

// The upstream Kubernetes sig-network [Conformance] specs (e2e.test built
// from the module proxy by scripts/kube-build.sh) against a single-node
// cluster where ebpf-cni is installed by its DaemonSet and serves Services
// in BPF, as deploy/ ships it (E2E_KUBE_PROXY unset or "off"), or with
// kube-proxy serving them (E2E_KUBE_PROXY=iptables or nftables; the
// agent's services controller is left out), and CoreDNS as cluster DNS.
// Every sig-network Conformance spec of v1.34 is selected and must run and
// pass: a spec that skips itself at run time fails the test too.
// E2E_FOCUS (a ginkgo regexp, e.g. 'sig-network\] HostPort') replaces the
// focus, to chase one spec.
func TestKubeletConformance(t *testing.T) {
	runUpstream(t, upstreamRun{name: "conformance", focus: conformanceFocus, procs: 1, timeout: 30 * time.Minute})
}

// The upstream NetworkPolicy specs (`[sig-network] Netpol`) against the
// same cluster without kube-proxy: ebpf-cni serves Services and enforces
// NetworkPolicy. The SCTP specs run when this kernel has SCTP and are left
// out, with the reason in the log, when it has not. E2E_PROCS ginkgo
// processes (default 3) run the specs side by side. make e2e-netpol.
func TestKubeletNetpol(t *testing.T) {
	var skip []string
	if fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, unix.IPPROTO_SCTP); err != nil {
		t.Logf("this kernel has no SCTP (socket: %v): the SCTPConnectivity specs are left out", err)
		skip = append(skip, "SCTPConnectivity")
	} else {
		unix.Close(fd)
	}
	procs := 3
	if p, err := strconv.Atoi(os.Getenv("E2E_PROCS")); err == nil && p > 0 {
		procs = p
	}
	runUpstream(t, upstreamRun{name: "netpol", focus: `\[sig-network\] Netpol`, skip: skip, procs: procs,
		kubeProxy: "off", timeout: 3 * time.Hour})
}

// upstreamRun is one e2e.test run against the kubelet cluster.
type upstreamRun struct {
	name      string // bin/<name> keeps its log and junit report
	focus     string
	skip      []string
	procs     int           // ginkgo processes
	kubeProxy string        // "", off, iptables, nftables; "" reads E2E_KUBE_PROXY
	timeout   time.Duration // the whole suite
}

func runUpstream(t *testing.T, u upstreamRun) {
	mode := u.kubeProxy
	if mode == "" {
		mode = os.Getenv("E2E_KUBE_PROXY")
	}
	switch mode {
	case "", "off", "none":
		mode = ""
	case "iptables", "nftables":
	default:
		t.Fatalf("E2E_KUBE_PROXY=%q: want off, iptables or nftables", mode)
	}
	focus := u.focus
	if f := os.Getenv("E2E_FOCUS"); f != "" {
		focus = f
	}
	e2e := kubeBinary(t, "e2e.test")
	ginkgo := kubeBinary(t, "ginkgo")
	coredns := kubeBinary(t, "coredns")
	var stderr strings.Builder
	images := exec.Command("bash", "../../scripts/e2e-images.sh", filepath.Join(t.TempDir(), "images"))
	images.Stderr = &stderr
	out, err := images.Output()
	if err != nil {
		t.Fatalf("scripts/e2e-images.sh: %v: %s", err, tail([]byte(stderr.String()), 3000))
	}
	k := startKubeletCluster(t, kubeletClusterOpts{kubeProxy: mode, dns: true, images: strings.Fields(string(out))})
	deployCoreDNS(t, k, coredns)

	// The report stays in bin/<name> (replaced by every run) for a person
	// to read after a failure.
	art, err := filepath.Abs("../../bin/" + u.name)
	if err != nil {
		t.Fatal(err)
	}
	os.RemoveAll(art)
	if err := os.MkdirAll(art, 0o755); err != nil {
		t.Fatal(err)
	}
	gargs := []string{"--procs=" + strconv.Itoa(u.procs), "--focus=" + focus, "--timeout=" + u.timeout.String(),
		"--no-color", "-v"}
	if len(u.skip) > 0 {
		gargs = append(gargs, "--skip="+strings.Join(u.skip, "|"))
	}
	args := append(gargs, e2e, "--",
		"--provider=skeleton", "--num-nodes=1", "--kubeconfig="+k.kcfg, "--kubectl-path="+k.kubectl,
		"--report-dir="+art, "--e2e-output-dir="+art, "--disable-log-dump=true",
		"--system-pods-startup-timeout=2m")
	logPath := filepath.Join(art, "e2e.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(ginkgo, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), "KUBECONFIG="+k.kcfg, "PATH="+filepath.Dir(k.kubectl)+":"+os.Getenv("PATH"))
	if mode == "" {
		mode = "off (ebpf-cni serves Services)"
	}
	t.Logf("kube-proxy %s; ginkgo %s (log: %s)", mode, strings.Join(args, " "), logPath)
	start := time.Now()
	runErr := cmd.Run()
	t.Logf("e2e.test ran for %s: %v", time.Since(start).Round(time.Second), runErr)

	r, err := readJUnit(art)
	if err != nil {
		t.Fatalf("e2e.test left no junit report (%v): log tail:\n%s", err, tailFile(logPath, 4000))
	}
	t.Logf("%s: %d specs ran, %d passed, %d failed; %d skipped at run time; %d not selected",
		u.name, len(r.passed)+len(r.failed), len(r.passed), len(r.failed), len(r.skipped), r.filtered)
	for _, name := range r.passed {
		t.Logf("  passed  %s", name)
	}
	// Every selected spec runs on this node: one that skips itself (a
	// missing feature it probes for) would turn a pass into nothing.
	for _, s := range r.skipped {
		t.Errorf("  skipped %s: %s", s.name, s.reason)
	}
	for _, f := range r.failed {
		t.Errorf("  FAILED  %s\n%s", f.name, tail([]byte(f.reason), 3000))
	}
	if len(r.passed) == 0 && len(r.failed) == 0 {
		t.Errorf("no spec ran: the focus %q selected nothing or the suite did not start; log tail:\n%s",
			focus, tailFile(logPath, 4000))
	}
	if runErr != nil && len(r.failed) == 0 {
		t.Errorf("e2e.test: %v with no failed spec in the report; log tail:\n%s", runErr, tailFile(logPath, 4000))
	}
}

func tailFile(path string, max int) string {
	b, _ := os.ReadFile(path)
	return string(tail(b, max))
}

// junitReport is what the test needs of ginkgo's junit_01.xml.
type junitReport struct {
	passed   []string
	failed   []junitOutcome
	skipped  []junitOutcome // selected, then skipped by the spec itself
	filtered int            // not selected by focus/skip
}

type junitOutcome struct{ name, reason string }

func readJUnit(dir string) (*junitReport, error) {
	b, err := os.ReadFile(filepath.Join(dir, "junit_01.xml"))
	if err != nil {
		return nil, err
	}
	var doc struct {
		Suites []struct {
			Cases []struct {
				Name    string `xml:"name,attr"`
				Status  string `xml:"status,attr"`
				Skipped *struct {
					Message string `xml:"message,attr"`
				} `xml:"skipped"`
				Failure *struct {
					Message string `xml:"message,attr"`
					Text    string `xml:",chardata"`
				} `xml:"failure"`
				Error *struct {
					Message string `xml:"message,attr"`
					Text    string `xml:",chardata"`
				} `xml:"error"`
			} `xml:"testcase"`
		} `xml:"testsuite"`
	}
	if err := xml.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("junit_01.xml: %w", err)
	}
	r := &junitReport{}
	for _, s := range doc.Suites {
		for _, c := range s.Cases {
			switch {
			case c.Failure != nil:
				r.failed = append(r.failed, junitOutcome{c.Name, c.Failure.Message + "\n" + c.Failure.Text})
			case c.Error != nil:
				r.failed = append(r.failed, junitOutcome{c.Name, c.Error.Message + "\n" + c.Error.Text})
			case c.Status == "skipped" || c.Skipped != nil:
				// Ginkgo reports specs left out by focus/skip as "skipped"
				// with no reason; a spec that skipped itself says why.
				msg := ""
				if c.Skipped != nil {
					msg = strings.TrimSpace(strings.TrimPrefix(c.Skipped.Message, "skipped"))
					msg = strings.TrimSpace(strings.TrimPrefix(msg, "-"))
				}
				if msg == "" {
					r.filtered++
					continue
				}
				r.skipped = append(r.skipped, junitOutcome{c.Name, msg})
			case c.Status == "passed":
				if strings.HasPrefix(c.Name, "[It]") {
					r.passed = append(r.passed, c.Name)
				}
			default:
				r.failed = append(r.failed, junitOutcome{c.Name, "status " + c.Status})
			}
		}
	}
	sort.Strings(r.passed)
	return r, nil
}

// deployCoreDNS runs CoreDNS (binary at bin, image imported by
// e2e-images.sh) as kubeadm deploys it: kube-system/coredns, Service
// kube-dns on kubeDNSIP, kubeadm's Corefile; it waits until it answers
// ready.
func deployCoreDNS(t *testing.T, k *kubeletCluster, bin string) {
	t.Helper()
	out, err := exec.Command(bin, "-version").Output()
	v := regexp.MustCompile(`CoreDNS-([0-9.]+)`).FindSubmatch(out)
	if err != nil || v == nil {
		t.Fatalf("%s -version: %v %s", bin, err, out)
	}
	manifest := strings.NewReplacer("@IMAGE@", "registry.k8s.io/coredns/coredns:v"+string(v[1]), "@DNSIP@", kubeDNSIP).Replace(coreDNSManifest)
	mf := filepath.Join(k.dir, "coredns.yaml")
	os.WriteFile(mf, []byte(manifest), 0o644)
	if out, err := k.run("apply", "-f", mf); err != nil {
		t.Fatalf("kubectl apply coredns: %v: %s", err, out)
	}
	ctx := context.Background()
	waitFor(t, "CoreDNS to be available", 120*time.Second, func() bool {
		d, err := k.client.AppsV1().Deployments("kube-system").Get(ctx, "coredns", metav1.GetOptions{})
		return err == nil && d.Status.AvailableReplicas == 1
	})
}

// coreDNSManifest is kubeadm's CoreDNS add-on (cmd/kubeadm/app/phases/
// addons/dns/manifests.go of v1.34) with one replica on the single node.
const coreDNSManifest = `
apiVersion: v1
kind: ServiceAccount
metadata:
  name: coredns
  namespace: kube-system
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: system:coredns
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: system:coredns
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: system:coredns
subjects:
- kind: ServiceAccount
  name: coredns
  namespace: kube-system
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: coredns
  namespace: kube-system
data:
  Corefile: |
    .:53 {
        errors
        health {
           lameduck 5s
        }
        ready
        kubernetes cluster.local in-addr.arpa ip6.arpa {
           pods insecure
           fallthrough in-addr.arpa ip6.arpa
           ttl 30
        }
        prometheus :9153
        forward . /etc/resolv.conf {
           max_concurrent 1000
        }
        cache 30 {
           disable success cluster.local
           disable denial cluster.local
        }
        loop
        reload
        loadbalance
    }
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels:
    k8s-app: kube-dns
    kubernetes.io/cluster-service: "true"
    kubernetes.io/name: CoreDNS
spec:
  clusterIP: @DNSIP@
  selector:
    k8s-app: kube-dns
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 53}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
  - {name: metrics, port: 9153, protocol: TCP, targetPort: 9153}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: coredns
  namespace: kube-system
  labels:
    k8s-app: kube-dns
spec:
  replicas: 1
  selector:
    matchLabels:
      k8s-app: kube-dns
  template:
    metadata:
      labels:
        k8s-app: kube-dns
    spec:
      priorityClassName: system-cluster-critical
      serviceAccountName: coredns
      nodeSelector:
        kubernetes.io/os: linux
      containers:
      - name: coredns
        image: @IMAGE@
        imagePullPolicy: IfNotPresent
        resources:
          limits: {memory: 170Mi}
          requests: {cpu: 100m, memory: 70Mi}
        args: ["-conf", "/etc/coredns/Corefile"]
        volumeMounts:
        - {name: config-volume, mountPath: /etc/coredns, readOnly: true}
        ports:
        - {containerPort: 53, name: dns, protocol: UDP}
        - {containerPort: 53, name: dns-tcp, protocol: TCP}
        - {containerPort: 9153, name: metrics, protocol: TCP}
        - {containerPort: 8080, name: liveness-probe, protocol: TCP}
        - {containerPort: 8181, name: readiness-probe, protocol: TCP}
        livenessProbe:
          httpGet: {path: /health, port: liveness-probe, scheme: HTTP}
          initialDelaySeconds: 60
          timeoutSeconds: 5
          successThreshold: 1
          failureThreshold: 5
        readinessProbe:
          httpGet: {path: /ready, port: readiness-probe, scheme: HTTP}
        securityContext:
          allowPrivilegeEscalation: false
          capabilities:
            add: [NET_BIND_SERVICE]
            drop: [ALL]
          readOnlyRootFilesystem: true
      dnsPolicy: Default
      volumes:
      - name: config-volume
        configMap:
          name: coredns
          items:
          - {key: Corefile, path: Corefile}
`
