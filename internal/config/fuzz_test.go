package config

import (
	"strings"
	"testing"
)

// Parse never panics, and a config it accepts is usable: a name, a pin
// root, an IPAM.
func FuzzParse(f *testing.F) {
	for _, seed := range []string{
		`{"cniVersion":"1.0.0","name":"n","ipam":{"ranges":[[{"subnet":"10.0.0.0/24"}]]}}`,
		`{"cniVersion":"1.1.0","name":"d","ipam":{"ranges":[[{"subnet":"10.0.0.0/24","rangeStart":"10.0.0.5","gateway":"10.0.0.1"}],[{"subnet":"fd00::/120"}]],"routes":[{"dst":"0.0.0.0/0"}]}}`,
		`{"cniVersion":"0.3.1","name":"h","ipam":{"type":"host-local","subnet":"10.0.0.0/24"}}`,
		`{"cniVersion":"1.0.0","name":"p","mtu":1400,"clusterCIDRs":["10.244.0.0/16"],"devices":["eth0"],"ipam":{"ranges":[[{"subnet":"usePodCidr"}]]}}`,
		`{"cniVersion":"1.0.0","name":"x","prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.2/32"}]},"ipam":{"ranges":[[{"subnet":"10.0.0.0/30"}]]}}`,
		`{"cniVersion":`, `null`, `[]`, `{"ipam":null}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, stdin []byte) {
		c, err := Parse(stdin)
		if err != nil {
			return
		}
		if c.Name == "" || c.PinRoot == "" || c.StateDir == "" || c.Addresses == nil || c.Masquerade == nil {
			t.Fatalf("accepted a config it cannot use: %+v", c)
		}
		if len(c.ClusterPrefixes) != len(c.ClusterCIDRs) {
			t.Fatalf("clusterCIDRs %v parsed into %v", c.ClusterCIDRs, c.ClusterPrefixes)
		}
	})
}

// ParseArgs never panics and keeps the Kubernetes keys it was given.
func FuzzParseArgs(f *testing.F) {
	for _, seed := range []string{
		"IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_INFRA_CONTAINER_ID=x;K8S_POD_UID=u",
		"K8S_POD_NAME=web", "", ";;", "a", "=", "K8S_POD_NAME=a=b", "IgnoreUnknown=0;X=1", "K8S_POD_NAME=a;K8S_POD_NAME=b",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, s string) {
		a, err := ParseArgs(s)
		if err != nil {
			return
		}
		last, seen := "", false
		for _, kv := range strings.Split(s, ";") {
			if v, ok := strings.CutPrefix(kv, "K8S_POD_NAME="); ok {
				last, seen = v, true
			}
		}
		if seen && string(a.K8S_POD_NAME) != last {
			t.Fatalf("K8S_POD_NAME %q read as %q", last, a.K8S_POD_NAME)
		}
	})
}
