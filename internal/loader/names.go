package loader

// Names of the maps and programs in bpf/datapath.c, as pinned. A map whose
// key or value layout changes gets a new name (endpoints_v1 -> _v2).
const (
	MapEndpoints = "endpoints_v1"
	MapDevices   = "devices_v1"
	MapStats     = "ep_stats_v1"
	MapHostFlows = "host_flows_v1"
	ProgFromPod  = "from_pod"
	ProgToPod    = "to_pod"
)
