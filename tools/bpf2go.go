// Package tools holds the go:generate entry that compiles bpf/ with bpf2go.
//
// `make generate` (or `go generate ./tools/`) rewrites internal/loader's
// datapath_bpfel.go and datapath_bpfel.o; both are committed so that
// `go build` needs no clang.
package tools

//go:generate go tool bpf2go -go-package loader -output-dir ../internal/loader -target bpfel -type endpoint_key -type endpoint_info -type device_info -type endpoint_stats -type flow_key -type flow_info -type lpm_key -type cluster_info -type tunnel_info -type guard_key -type node_stats -type ep_flags -type ep_family -type svc_key -type svc_info -type backend_info -type sock_key -type sock_info -type affinity_key -type affinity_info -type affinity_match -type nodeaddr_info -type snat_info -type nat_entry -type lb_stats -type svc_flags -type nat_flags -type lb_scope -type peer_info -type policy_key -type policy_entry -type ep_policy -type ct_entry -type policy_stats -type policy_event -type policy_identity -type policy_dir -type ep_policy_flags -type ct_flags -type drop_why Datapath ../bpf/datapath.c -- -I/usr/include/x86_64-linux-gnu -I../bpf -O2 -g -Wall -Werror
