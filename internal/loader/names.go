package loader

// Names of maps and programs in bpf/datapath.c, as pinned, for callers that
// need one by name (the full lists come from the generated DatapathMaps and
// DatapathPrograms). A map whose key or value layout changes gets a new name
// (endpoints_v1 -> _v2).
const (
	MapEndpoints  = "endpoints_v1"
	MapDevices    = "devices_v1"
	MapStats      = "ep_stats_v2"
	MapHostFlows  = "host_flows_v1"
	MapCluster    = "cluster_v1"
	MapTunnel     = "tunnel_v1"
	MapNatGuard   = "nat_guard_v1"
	MapNodeStats  = "node_stats_v1"
	ProgFromPod   = "from_pod"
	ProgToPod     = "to_pod"
	ProgFromNode  = "from_node"
	ProgToOverlay = "to_overlay"
)
