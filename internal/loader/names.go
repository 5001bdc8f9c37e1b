package loader

// Names of maps and programs in bpf/datapath.c, as pinned, for callers that
// need one by name (the full lists come from the generated DatapathMaps and
// DatapathPrograms). A map whose key or value layout changes gets a new name
// (endpoints_v1 -> _v2).
const (
	MapEndpoints = "endpoints_v1"
	MapDevices   = "devices_v1"
	MapStats     = "ep_stats_v2"
	MapHostFlows = "host_flows_v1"
	MapCluster   = "cluster_v1"
	MapTunnel    = "tunnel_v1"
	MapNatGuard  = "nat_guard_v1"
	MapNodeStats = "node_stats_v1"

	MapSvc           = "lb_svc_v1"
	MapBackends      = "lb_backends_v1"
	MapSock          = "lb_sock_v1"
	MapAffinity      = "lb_affinity_v1"
	MapAffinityMatch = "lb_affinity_match_v1"
	MapNodeAddr      = "lb_nodeaddr_v1"
	MapSNAT          = "lb_snat_v1"
	MapNAT           = "lb_nat_v1"
	MapLBStats       = "lb_stats_v1"
	MapSvcCIDR       = "lb_svc_cidr_v1"

	MapIPCache      = "ipcache_v1"
	MapPolicy       = "policy_v1"
	MapEPPolicy     = "ep_policy_v1"
	MapCT           = "ct_v1"
	MapPolicyStats  = "policy_stats_v1"
	MapPolicyEvents = "policy_events_v1"
	ProgFromPod     = "from_pod"
	ProgToPod       = "to_pod"
	ProgFromNode    = "from_node"
	ProgToOverlay   = "to_overlay"

	ProgConnect4 = "sock_connect4"
	ProgConnect6 = "sock_connect6"
	ProgSendmsg4 = "sock_sendmsg4"
	ProgSendmsg6 = "sock_sendmsg6"
	ProgRecvmsg4 = "sock_recvmsg4"
	ProgRecvmsg6 = "sock_recvmsg6"
	ProgGetpeer4 = "sock_getpeer4"
	ProgGetpeer6 = "sock_getpeer6"
)
