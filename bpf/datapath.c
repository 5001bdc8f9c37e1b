//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * tc programs of the ebpf-cni datapath.
 *
 * from_pod (ingress of a pod's host veth, i.e. frames the pod sent):
 *   anti-spoofing on source MAC and source IP (only IPv4, IPv6 and ARP get
 *   through at all), then by destination:
 *   - a pod on this node: MACs rewritten, TTL decremented, bpf_redirect_peer
 *     straight into its namespace;
 *   - a pod on another node (inside cluster_v1): looked up in the node's own
 *     FIB and sent to the egress device (bpf_redirect with the FIB's MACs, or
 *     bpf_redirect_neigh while the neighbour is unresolved), TTL decremented:
 *     no FORWARD chain, no second pass through the host stack;
 *   - anything else, and whatever the fast path cannot take (no route, MTU
 *     exceeded, TTL expiring, replies of flows the host NATed), continues to
 *     the host stack, which answers with the ICMP errors a router would.
 * to_pod (egress of the host veth): counts what the host stack delivers and
 *   remembers flows it delivered from pods (NATed Service traffic), so their
 *   replies take the host path back.
 * from_node (ingress of the node's uplinks and of the VXLAN device): a
 *   packet from a pod on another node (source inside cluster_v1) for a pod
 *   here is redirected into it with bpf_redirect_peer, with the same TTL and
 *   counting rules; anything else continues to the host stack.
 * to_overlay (egress of the metadata-mode VXLAN device): gives every packet
 *   the host stack routes into it the tunnel key towards the node that owns
 *   its destination (tunnel_v1); from_pod sets it itself on the fast path.
 *
 * "Pass" is TC_ACT_UNSPEC (TCX_NEXT): programs attached after ours still run.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>

#include "datapath.h"
#include "lb.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/* ARP for Ethernet/IPv4 (linux/if_arp.h pulls in libc headers). */
struct arp_eth_ipv4 {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 op;
	__u8 sha[ETH_ALEN];
	__u8 sip[4];
	__u8 tha[ETH_ALEN];
	__u8 tip[4];
} __attribute__((packed));

enum drop_reason {
	DROP_SPOOFED_MAC,
	DROP_SPOOFED_IP,
	DROP_MALFORMED,
	DROP_PROTOCOL,
};

#define AF_INET 2
#define AF_INET6 10
#define IP_MF 0x2000
#define IP_FRAG_OFFSET 0x1fff
#define NEXTHDR_FRAGMENT 44
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10
#define TUNNEL_VNI 0xeb
#define TUNNEL_TTL 64
#define ARPOP_REQUEST 1
#define ARPOP_REPLY 2
#define IPPROTO_ICMPV6_ 58
#define ND_NEIGHBOR_SOLICIT 135
#define ND_NEIGHBOR_ADVERT 136
#define ND_OPT_SOURCE_LL 1
#define ND_OPT_TARGET_LL 2

/* The gateways every pod routes through (internal/veth): 169.254.1.1 and
 * fe80::1. from_pod answers ARP and neighbour solicitations for them, so a
 * pod that lost its permanent neighbour entries (a MAC change flushes them)
 * still reaches its gateway, with nothing on the host answering. */
#define GATEWAY_V4 bpf_htonl(0xa9fe0101)
static const __u8 gateway_v6[16] = {0xfe, 0x80, [15] = 1};

/* An ICMPv6 neighbour solicitation or advertisement with one link-layer
 * address option, as Linux sends them. */
struct nd_msg_ll {
	__u8 type;
	__u8 code;
	__sum16 csum;
	__be32 flags; /* NA: router, solicited, override */
	__u8 target[16];
	__u8 opt_type;
	__u8 opt_len; /* in 8-byte units: 1 */
	__u8 opt_mac[ETH_ALEN];
};

static __always_inline int mac_equal(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] &&
	       a[3] == b[3] && a[4] == b[4] && a[5] == b[5];
}

static __always_inline void mac_copy(__u8 *dst, const __u8 *src)
{
	__builtin_memcpy(dst, src, ETH_ALEN);
}

static __always_inline int ipv6_equal(const struct in6_addr *a, const __u8 *b)
{
	const __u32 *x = (const __u32 *)a->in6_u.u6_addr8;
	__u32 y[4];

	__builtin_memcpy(y, b, 16);
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

/* Link-local (fe80::/10) and unspecified (::) sources are the pod's own
 * neighbour discovery; they never match an endpoint and stay on the link. */
static __always_inline int ipv6_link_scope(const struct in6_addr *a)
{
	const __u8 *b = a->in6_u.u6_addr8;
	const __u32 *w = (const __u32 *)b;

	if (b[0] == 0xfe && (b[1] & 0xc0) == 0x80)
		return 1;
	return w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == 0;
}

static __always_inline int drop(struct endpoint_stats *st, enum drop_reason why)
{
	if (st) {
		switch (why) {
		case DROP_SPOOFED_MAC:
			st->drop_spoofed_mac++;
			break;
		case DROP_SPOOFED_IP:
			st->drop_spoofed_ip++;
			break;
		case DROP_MALFORMED:
			st->drop_malformed++;
			break;
		case DROP_PROTOCOL:
			st->drop_protocol++;
			break;
		}
	}
	return TC_ACT_SHOT;
}

/* What parse_flow found besides the flow key. */
struct parsed {
	__u8 tcp_flags;
	__u8 fragment;   /* an IP fragment: ports unknown or unreliable */
	__u8 icmp_error; /* an ICMP(v6) error: it belongs to the flow it quotes */
	__u8 icmp_type;
	__u8 ttl;      /* TTL or hop limit */
	__u8 tos;
	__u16 l3_len;  /* IPv4 total length, IPv6 payload length + 40 */
};

/* Fills the ports of a flow key from the L4 header at l4 (TCP and UDP;
 * other protocols keep ports 0). */
static __always_inline void l4_ports(struct flow_key *fk, struct parsed *p, void *l4, void *data_end)
{
	if (fk->proto == IPPROTO_ICMP || fk->proto == IPPROTO_ICMPV6_) {
		__u8 *type = l4;

		if ((void *)(type + 1) > data_end)
			return;
		p->icmp_type = *type;
		/* unreachable, source quench, redirect, time exceeded,
		 * parameter problem; ICMPv6: types below 128 */
		if (fk->proto == IPPROTO_ICMP)
			p->icmp_error = *type == 3 || *type == 4 || *type == 5 || *type == 11 || *type == 12;
		else
			p->icmp_error = *type < 128;
		return;
	}
	if (fk->proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > data_end)
			return;
		fk->sport = th->source;
		fk->dport = th->dest;
		p->tcp_flags = ((__u8 *)th)[13];
		return;
	}
	if (fk->proto == IPPROTO_UDP || fk->proto == IPPROTO_SCTP) {
		__be16 *ports = l4;

		if ((void *)(ports + 2) > data_end)
			return;
		fk->sport = ports[0];
		fk->dport = ports[1];
	}
}

/* Parses the IP header at l3 into a flow key (addresses, protocol, ports).
 * Returns -1 when the header is truncated or not IP. */
static __always_inline int parse_flow(__be16 proto, void *l3, void *data_end, struct flow_key *fk, struct parsed *p)
{
	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = l3;

		if ((void *)(ip + 1) > data_end)
			return -1;
		fk->family = EP_FAMILY_IPV4;
		__builtin_memcpy(fk->saddr, &ip->saddr, 4);
		__builtin_memcpy(fk->daddr, &ip->daddr, 4);
		fk->proto = ip->protocol;
		p->ttl = ip->ttl;
		p->tos = ip->tos;
		p->l3_len = bpf_ntohs(ip->tot_len);
		if (ip->frag_off & bpf_htons(IP_MF | IP_FRAG_OFFSET)) {
			p->fragment = 1;
			if (ip->frag_off & bpf_htons(IP_FRAG_OFFSET))
				return 0; /* not the first fragment: no L4 header */
		}
		l4_ports(fk, p, (void *)ip + ip->ihl * 4, data_end);
		return 0;
	}
	if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = l3;

		if ((void *)(ip6 + 1) > data_end)
			return -1;
		fk->family = EP_FAMILY_IPV6;
		__builtin_memcpy(fk->saddr, ip6->saddr.in6_u.u6_addr8, 16);
		__builtin_memcpy(fk->daddr, ip6->daddr.in6_u.u6_addr8, 16);
		fk->proto = ip6->nexthdr;
		p->ttl = ip6->hop_limit;
		p->l3_len = bpf_ntohs(ip6->payload_len) + sizeof(*ip6);
		if (ip6->nexthdr == NEXTHDR_FRAGMENT) {
			p->fragment = 1;
			return 0;
		}
		l4_ports(fk, p, ip6 + 1, data_end);
		return 0;
	}
	return -1;
}

static __always_inline void reverse(struct flow_key *out, const struct flow_key *in)
{
	__builtin_memcpy(out->saddr, in->daddr, 16);
	__builtin_memcpy(out->daddr, in->saddr, 16);
	out->sport = in->dport;
	out->dport = in->sport;
	out->proto = in->proto;
	out->family = in->family;
}

static __always_inline void lpm_of(struct lpm_key *k, __u8 family, const __u8 *addr)
{
	k->family = family;
	__builtin_memcpy(k->addr, addr, 16);
	k->prefixlen = 32 + (family == EP_FAMILY_IPV4 ? 32 : 128);
}

/* in_cluster reports whether addr lies in one of the cluster's pod ranges. */
static __always_inline int in_cluster(__u8 family, const __u8 *addr)
{
	struct lpm_key k = {};

	lpm_of(&k, family, addr);
	return bpf_map_lookup_elem(&cluster_v1, &k) != NULL;
}

static __always_inline void guard_key_of(struct guard_key *g, __u8 family, const __u8 *addr, __be16 port, __u8 proto)
{
	__builtin_memcpy(g->addr, addr, 16);
	g->port = port;
	g->proto = proto;
	g->family = family;
}

/*
 * The guard key of the packet an ICMP error quotes (its source end: the
 * local pod's address and port). -1 when the quote is cut short.
 */
static __always_inline int quoted_guard(struct __sk_buff *skb, struct guard_key *g, __be16 proto)
{
	__u32 off = sizeof(struct ethhdr);
	__be16 sport;

	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr in;
		__u8 vihl;

		if (bpf_skb_load_bytes(skb, off, &vihl, 1) < 0)
			return -1;
		off += (vihl & 0xf) * 4 + 8; /* the ICMP header */
		if (bpf_skb_load_bytes(skb, off, &in, sizeof(in)) < 0)
			return -1;
		if (bpf_skb_load_bytes(skb, off + (in.ihl & 0xf) * 4, &sport, 2) < 0)
			return -1;
		guard_key_of(g, EP_FAMILY_IPV4, (__u8 *)&in.saddr, sport, in.protocol);
		return 0;
	}
	{
		struct ipv6hdr in;

		off += sizeof(struct ipv6hdr) + 8;
		if (bpf_skb_load_bytes(skb, off, &in, sizeof(in)) < 0 ||
		    bpf_skb_load_bytes(skb, off + sizeof(in), &sport, 2) < 0)
			return -1;
		guard_key_of(g, EP_FAMILY_IPV6, in.saddr.in6_u.u6_addr8, sport, in.nexthdr);
		return 0;
	}
}

/* Conntrack lookups (kfuncs; nf_conntrack built in or loaded). The types
 * carry the kernel's names: kfunc prototypes are checked against its BTF. */
struct nf_conn {
	unsigned long status;
};
struct bpf_ct_opts {
	__s32 netns_id;
	__s32 error;
	__u8 l4proto;
	__u8 dir;
	__u16 ct_zone_id;
	__u8 ct_zone_dir;
	__u8 reserved[3];
};
extern struct nf_conn *bpf_skb_ct_lookup(struct __sk_buff *skb, struct bpf_sock_tuple *tuple, __u32 tuple__sz,
					 struct bpf_ct_opts *opts, __u32 opts__sz) __ksym;
extern void bpf_ct_release(struct nf_conn *ct) __ksym;

/*
 * Whether the host's conntrack tracks the flow of fk: a flow the host
 * handled (and may have NATed, the port included, which nat_guard_v1
 * cannot know) must keep going through it. Not inlined: its tuple and
 * options stay off the callers' stacks.
 */
static __attribute__((noinline)) int host_tracked(struct __sk_buff *skb, const struct flow_key *fk)
{
	struct bpf_ct_opts opts = {.netns_id = -1, .l4proto = fk->proto};
	struct bpf_sock_tuple t = {};
	struct nf_conn *ct;
	__u32 len;

	if (fk->proto != IPPROTO_TCP && fk->proto != IPPROTO_UDP)
		return 0;
	if (fk->family == EP_FAMILY_IPV4) {
		__builtin_memcpy(&t.ipv4.saddr, fk->saddr, 4);
		__builtin_memcpy(&t.ipv4.daddr, fk->daddr, 4);
		t.ipv4.sport = fk->sport;
		t.ipv4.dport = fk->dport;
		len = sizeof(t.ipv4);
	} else {
		__builtin_memcpy(t.ipv6.saddr, fk->saddr, 16);
		__builtin_memcpy(t.ipv6.daddr, fk->daddr, 16);
		t.ipv6.sport = fk->sport;
		t.ipv6.dport = fk->dport;
		len = sizeof(t.ipv6);
	}
	ct = bpf_skb_ct_lookup(skb, &t, len, &opts, sizeof(opts));
	if (!ct)
		return 0;
	bpf_ct_release(ct);
	return 1;
}

#include "policy.h"

/*
 * Decrements the TTL (hop limit) of the IP header at l3off, as a router does.
 * The packet must have been checked to carry more than 1. IPv4 updates the
 * header checksum incrementally (RFC 1624), which leaves a CHECKSUM_COMPLETE
 * sum valid; IPv6 has no header checksum, so its byte is written through the
 * helper that keeps skb->csum right. Invalidates packet pointers.
 */
static __always_inline int ttl_dec(struct __sk_buff *skb, __be16 proto, __u8 ttl)
{
	__u32 off = sizeof(struct ethhdr);

	if (proto == bpf_htons(ETH_P_IP)) {
		__u16 old = bpf_htons((__u16)ttl << 8), new = bpf_htons((__u16)(ttl - 1) << 8);
		__u8 t = ttl - 1;

		if (bpf_l3_csum_replace(skb, off + __builtin_offsetof(struct iphdr, check), old, new, 2) < 0)
			return -1;
		return bpf_skb_store_bytes(skb, off + __builtin_offsetof(struct iphdr, ttl), &t, 1, 0);
	}
	__u8 hl = ttl - 1;

	return bpf_skb_store_bytes(skb, off + __builtin_offsetof(struct ipv6hdr, hop_limit), &hl, 1, BPF_F_RECOMPUTE_CSUM);
}

/* Rewrites the Ethernet addresses; 0 on success. */
static __always_inline int set_macs(struct __sk_buff *skb, const __u8 *dst, const __u8 *src)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return -1;
	mac_copy(eth->h_dest, dst);
	mac_copy(eth->h_source, src);
	return 0;
}

static __always_inline void count_to_pod(__u32 ifindex, __u32 len, int from_node)
{
	struct endpoint_stats *dst = bpf_map_lookup_elem(&ep_stats_v2, &ifindex);

	if (!dst)
		return;
	dst->to_pod_packets++;
	dst->to_pod_bytes += len;
	if (from_node) {
		dst->from_node_packets++;
		dst->from_node_bytes += len;
	}
}

/*
 * Whether what a pod sent must go through the host stack rather than a
 * redirect, because the host may have translated its flow (a kube-proxy
 * Service, a hostPort): a reply of a flow the host delivered; any fragment
 * from a pod that has such flows (a fragment after the first carries no
 * ports, so all fragments of a datagram take one path, and the host
 * reassembles them for conntrack); and ICMP errors, which conntrack
 * matches to the flow they quote and translates back.
 */
static __always_inline int host_path(const struct device_info *src, const struct flow_key *fk, const struct parsed *p)
{
	if (!(src->flags & EP_FLAG_HOST_FLOWS))
		return 0;
	return p->fragment || p->icmp_error || bpf_map_lookup_elem(&host_flows_v1, fk) != NULL;
}

/* Sends the frame into the namespace of the local pod ep, as one routed hop.
 * Returns TC_ACT_UNSPEC when the host stack should take it. */
static __always_inline int redirect_local(struct __sk_buff *skb, __be16 proto, const struct flow_key *fk,
					  const struct parsed *p, const struct device_info *src,
					  struct endpoint_info *ep, struct endpoint_stats *st)
{
	__u32 ifindex = ep->ifindex;
	__u8 pod_mac[ETH_ALEN], host_mac[ETH_ALEN];

	if ((src->flags | ep->flags) & EP_FLAG_SHAPED) {
		/* A rate limit sits on the host veths' qdiscs, which a peer
		 * redirect would skip: take the host path through them. */
		if (st)
			st->host_path_packets++;
		return TC_ACT_UNSPEC;
	}
	if (host_path(src, fk, p)) {
		/* A reply of a flow the host delivered (NAT): back through it. */
		if (st)
			st->host_path_packets++;
		return TC_ACT_UNSPEC;
	}
	if ((ep->flags & EP_FLAG_HOST_FLOWS) && (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN) {
		/* A new direct connection: forget a host-path flow that had the
		 * same ports, or its replies would go the wrong way. */
		struct flow_key rev = {};

		reverse(&rev, fk);
		bpf_map_delete_elem(&host_flows_v1, &rev);
	}
	if (p->ttl <= 1) {
		if (st)
			st->host_path_packets++;
		return TC_ACT_UNSPEC; /* the host sends Time Exceeded */
	}
	mac_copy(pod_mac, ep->pod_mac);
	mac_copy(host_mac, ep->host_mac);
	if (ttl_dec(skb, proto, p->ttl) < 0 || set_macs(skb, pod_mac, host_mac) < 0)
		return TC_ACT_UNSPEC;
	if (st) {
		st->redirect_packets++;
		st->redirect_bytes += skb->len;
	}
	count_to_pod(ifindex, skb->len, 0);
	return bpf_redirect_peer(ifindex, 0);
}

/*
 * Routes a frame for a pod on another node itself: FIB lookup in this
 * node's tables, then straight to the egress device. Returns TC_ACT_UNSPEC
 * whenever the host stack must decide (it also sends the ICMP errors: frag
 * needed, time exceeded, unreachable).
 */
static __always_inline int forward_remote(struct __sk_buff *skb, __be16 proto, const struct flow_key *fk,
					  const struct parsed *p, int hairpin)
{
	struct bpf_redir_neigh nh = {};
	struct bpf_fib_lookup *f;
	struct scratch *sc;
	__u32 mtu_len = 0, zero = 0;
	long rc;

	sc = bpf_map_lookup_elem(&scratch, &zero);
	if (!sc)
		return TC_ACT_UNSPEC;
	f = &sc->fib;
	__builtin_memset(f, 0, sizeof(*f));
#define fib (*f)

	if (p->ttl <= 1)
		return TC_ACT_UNSPEC;
	if (fk->family == EP_FAMILY_IPV4) {
		fib.family = AF_INET;
		fib.tos = p->tos;
		__builtin_memcpy(&fib.ipv4_src, fk->saddr, 4);
		__builtin_memcpy(&fib.ipv4_dst, fk->daddr, 4);
	} else {
		fib.family = AF_INET6;
		__builtin_memcpy(fib.ipv6_src, fk->saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, fk->daddr, 16);
	}
	fib.l4_protocol = fk->proto;
	fib.sport = fk->sport;
	fib.dport = fk->dport;
	/* A GSO super-packet is checked segment by segment below; its total
	 * length would fail the route MTU. */
	fib.tot_len = skb->gso_size ? 0 : p->l3_len;
	fib.ifindex = skb->ifindex;

	rc = bpf_fib_lookup(skb, f, sizeof(*f), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return TC_ACT_UNSPEC; /* no route, frag needed (non-GSO), forwarding off, ... */
	if ((fib.ifindex == skb->ifindex && !hairpin) || bpf_map_lookup_elem(&devices_v1, &fib.ifindex))
		return TC_ACT_UNSPEC; /* back out, or to a pod veth this node does not map */
	if (skb->gso_size) {
		if (bpf_check_mtu(skb, fib.ifindex, &mtu_len, 0, BPF_MTU_CHK_SEGS))
			return TC_ACT_UNSPEC;
	} else if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		/* The FIB checked the route MTU already; the device MTU too. */
		if (bpf_check_mtu(skb, fib.ifindex, &mtu_len, 0, 0))
			return TC_ACT_UNSPEC;
	}
	if (ttl_dec(skb, proto, p->ttl) < 0)
		return TC_ACT_UNSPEC;
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (set_macs(skb, fib.dmac, fib.smac) < 0)
			return TC_ACT_SHOT; /* TTL already spent: cannot hand it back */
		return bpf_redirect(fib.ifindex, 0);
	}
	/* The neighbour is not resolved yet: let the kernel resolve it for the
	 * nexthop the FIB chose (the gateway, or the destination on-link). */
	nh.nh_family = fib.family;
	__builtin_memcpy(nh.ipv6_nh, fib.ipv6_dst, 16);
	return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
#undef fib
}

static __always_inline int tunnel_key_set(struct __sk_buff *skb, const struct tunnel_info *ti)
{
	struct bpf_tunnel_key tk = {};
	__u64 flags;

	tk.tunnel_id = TUNNEL_VNI;
	tk.tunnel_ttl = TUNNEL_TTL;
	if (ti->family == EP_FAMILY_IPV4) {
		__u32 a;

		__builtin_memcpy(&a, ti->addr, 4);
		tk.remote_ipv4 = bpf_ntohl(a);
		flags = BPF_F_ZERO_CSUM_TX;
	} else {
		__builtin_memcpy(tk.remote_ipv6, ti->addr, 16);
		flags = BPF_F_TUNINFO_IPV6; /* UDP over IPv6 keeps its checksum */
	}
	return bpf_skb_set_tunnel_key(skb, &tk, sizeof(tk), flags);
}

/*
 * Sends a frame for another node's pod into the VXLAN device with its
 * tunnel key already set (to_overlay then lets it through): one lookup in
 * tunnel_v1 instead of the FIB's and to_overlay's. Returns TC_ACT_UNSPEC
 * for the host path (frag needed, TTL).
 */
static __always_inline int encap_remote(struct __sk_buff *skb, __be16 proto, const struct parsed *p,
					const struct tunnel_info *ti, const __u8 *src_mac)
{
	__u32 ifindex = ti->ifindex, mtu_len = 0;
	__u8 vtep[ETH_ALEN], smac[ETH_ALEN];

	if (p->ttl <= 1)
		return TC_ACT_UNSPEC;
	if (skb->gso_size) {
		if (bpf_check_mtu(skb, ifindex, &mtu_len, 0, BPF_MTU_CHK_SEGS))
			return TC_ACT_UNSPEC;
	} else if (p->l3_len > ti->mtu) {
		return TC_ACT_UNSPEC; /* the host routes it into the device and answers frag needed */
	}
	mac_copy(vtep, ti->vtep_mac);
	mac_copy(smac, src_mac);
	if (tunnel_key_set(skb, ti) < 0)
		return TC_ACT_UNSPEC;
	if (ttl_dec(skb, proto, p->ttl) < 0 || set_macs(skb, vtep, smac) < 0)
		return TC_ACT_SHOT; /* the key is set: the host cannot take it back */
	return bpf_redirect(ifindex, 0);
}

/*
 * NodePorts and external IPs for clients outside the node (sockets of this
 * node are translated by the cgroup programs, sock.h). A new flow arriving
 * on an uplink for a Service is translated per packet: the destination to
 * a backend and, with externalTrafficPolicy Cluster, the source to this
 * node (as kube-proxy masquerades it), with a port of its own. lb_nat_v1
 * holds both directions; replies are translated back where they appear:
 * from_pod for a backend on this node, from_node for one on another node
 * (they return to this node's address). Translated packets never meet the
 * host's netfilter: they are redirected into the pod or out of a device.
 * Fragments and ICMP errors of these flows go to the host stack, which
 * knows nothing of them (documented limitation).
 */
#define NAT_PORT_MIN 61000   /* 61000..65535: clear of Linux's default ephemeral range */
#define NAT_PORT_RANGE 4536
#define NAT_TRIES 8
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_RST 0x04

struct l4_off {
	__u32 l4;   /* offset of the TCP/UDP header */
	__u32 csum; /* offset of its checksum */
	__u8 udp;
};

static __always_inline int l4_off_of(struct __sk_buff *skb, __u8 family, __u8 proto, struct l4_off *o)
{
	__u32 l3 = sizeof(struct ethhdr);

	if (family == EP_FAMILY_IPV4) {
		__u8 vihl;

		if (bpf_skb_load_bytes(skb, l3, &vihl, 1) < 0)
			return -1;
		o->l4 = l3 + (vihl & 0xf) * 4;
	} else {
		o->l4 = l3 + sizeof(struct ipv6hdr);
	}
	o->udp = proto == IPPROTO_UDP;
	o->csum = o->l4 + (o->udp ? 6 : 16);
	return 0;
}

/* Rewrites the source (dst 0) or destination address, checksums included. */
static __always_inline int nat_addr(struct __sk_buff *skb, __u8 family, const struct l4_off *o, int dst,
				    const __u8 *from, const __u8 *to)
{
	__u32 l3 = sizeof(struct ethhdr);
	__u64 flags = BPF_F_PSEUDO_HDR | (o->udp ? BPF_F_MARK_MANGLED_0 : 0);

	if (family == EP_FAMILY_IPV4) {
		__be32 a, b;

		__builtin_memcpy(&a, from, 4);
		__builtin_memcpy(&b, to, 4);
		if (a == b)
			return 0;
		if (bpf_l4_csum_replace(skb, o->csum, a, b, flags | 4) < 0 ||
		    bpf_l3_csum_replace(skb, l3 + __builtin_offsetof(struct iphdr, check), a, b, 4) < 0)
			return -1;
		return bpf_skb_store_bytes(skb, l3 + (dst ? __builtin_offsetof(struct iphdr, daddr) : __builtin_offsetof(struct iphdr, saddr)),
					   &b, 4, 0);
	}
	{
		__be32 a[4], b[4];
		__s64 diff;

		__builtin_memcpy(a, from, 16);
		__builtin_memcpy(b, to, 16);
		if (addr16_equal((__u8 *)a, (__u8 *)b))
			return 0;
		diff = bpf_csum_diff(a, 16, b, 16, 0);
		if (diff < 0 || bpf_l4_csum_replace(skb, o->csum, 0, diff, flags) < 0)
			return -1;
		return bpf_skb_store_bytes(skb, l3 + (dst ? __builtin_offsetof(struct ipv6hdr, daddr) : __builtin_offsetof(struct ipv6hdr, saddr)),
					   b, 16, 0);
	}
}

static __always_inline int nat_port(struct __sk_buff *skb, const struct l4_off *o, int dst, __be16 from, __be16 to)
{
	if (from == to)
		return 0;
	if (bpf_l4_csum_replace(skb, o->csum, from, to, (o->udp ? BPF_F_MARK_MANGLED_0 : 0) | 2) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, o->l4 + (dst ? 2 : 0), &to, 2, 0);
}

/* Rewrites the packet's tuple fk into e's. Invalidates packet pointers. */
static __always_inline int nat_apply(struct __sk_buff *skb, const struct flow_key *fk, const struct nat_entry *e)
{
	struct l4_off o;

	if (l4_off_of(skb, fk->family, fk->proto, &o) < 0)
		return -1;
	if (nat_addr(skb, fk->family, &o, 0, fk->saddr, e->saddr) < 0 ||
	    nat_addr(skb, fk->family, &o, 1, fk->daddr, e->daddr) < 0 ||
	    nat_port(skb, &o, 0, fk->sport, e->sport) < 0 ||
	    nat_port(skb, &o, 1, fk->dport, e->dport) < 0)
		return -1;
	return 0;
}

static __always_inline void lb_stat(int what)
{
	__u32 zero = 0;
	struct lb_stats *s = bpf_map_lookup_elem(&lb_stats_v1, &zero);

	if (!s)
		return;
	switch (what) {
	case 0:
		s->nodeport_new++;
		break;
	case 1:
		s->nodeport_packets++;
		break;
	case 2:
		s->nodeport_no_port++;
		break;
	case 3:
		s->nodeport_dropped++;
		break;
	}
}

/*
 * Sends a translated packet on: into the local pod on host veth local (one
 * routed hop, as redirect_local), else routed by the FIB (or into the
 * VXLAN tunnel) towards nfk's destination, back out of the device it came
 * from if need be. The host stack cannot take a translated packet (it
 * would see its own address as a source): what cannot be sent is dropped.
 */
static __always_inline int nat_forward(struct __sk_buff *skb, __be16 proto, const struct flow_key *nfk,
				       const struct parsed *p, __u32 local)
{
	struct lpm_key k = {};
	struct tunnel_info *ti;
	int rc;

	if (local) {
		struct endpoint_key ek = {.family = nfk->family};
		struct endpoint_info *ep;
		__u8 pod_mac[ETH_ALEN], host_mac[ETH_ALEN];

		__builtin_memcpy(ek.addr, nfk->daddr, 16);
		ep = bpf_map_lookup_elem(&endpoints_v1, &ek);
		if (!ep || ep->ifindex != local || p->ttl <= 1)
			return TC_ACT_SHOT;
		mac_copy(pod_mac, ep->pod_mac);
		mac_copy(host_mac, ep->host_mac);
		if (ttl_dec(skb, proto, p->ttl) < 0 || set_macs(skb, pod_mac, host_mac) < 0)
			return TC_ACT_SHOT;
		count_to_pod(local, skb->len, 0);
		return bpf_redirect_peer(local, 0);
	}
	lpm_of(&k, nfk->family, nfk->daddr);
	ti = bpf_map_lookup_elem(&tunnel_v1, &k);
	if (ti && ti->ifindex) {
		__u8 smac[ETH_ALEN] = {};

		rc = encap_remote(skb, proto, p, ti, smac);
	} else {
		rc = forward_remote(skb, proto, nfk, p, 1);
	}
	return rc == TC_ACT_UNSPEC ? TC_ACT_SHOT : rc;
}

/* Translates a packet of a known flow (either direction) and sends it on. */
static __attribute__((noinline)) int nat_continue(struct __sk_buff *skb, __be16 proto, const struct flow_key *fk,
					const struct parsed *p, struct nat_entry *e)
{
	__u64 now = bpf_ktime_get_ns();
	__u32 local = 0, zero = 0;
	struct scratch *sc = bpf_map_lookup_elem(&scratch, &zero);

	if (!sc)
		return TC_ACT_SHOT;
#define nfk (sc->nfk)
	if (now - e->seen_ns > NSEC_PER_SEC)
		e->seen_ns = now;
	if (fk->proto == IPPROTO_TCP && (p->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)) && !(e->flags & NAT_CLOSING))
		e->flags |= NAT_CLOSING;
	__builtin_memcpy(nfk.saddr, e->saddr, 16);
	__builtin_memcpy(nfk.daddr, e->daddr, 16);
	nfk.sport = e->sport;
	nfk.dport = e->dport;
	nfk.proto = fk->proto;
	nfk.family = fk->family;
	if ((e->flags & (NAT_REPLY | NAT_LOCAL)) == NAT_LOCAL)
		local = e->ifindex;
	if (nat_apply(skb, fk, e) < 0)
		return TC_ACT_SHOT;
	lb_stat(1);
	return nat_forward(skb, proto, &nfk, p, local);
#undef nfk
}

/* What nodeport decided. */
enum np_verdict {
	NP_PASS,      /* not ours: the host stack */
	NP_DROP,
	NP_TRANSLATE, /* lb_nat_v1 holds the packet's flow: nat_continue */
	NP_NEW_LOCAL, /* likewise, a new flow to a pod of this node: its
			 ingress policy first (scratch nfk: the translated
			 tuple, orig.ifindex: the pod, rk: the reply's key) */
};

/*
 * A packet from outside for an address of this node or an external IP: a
 * known flow is translated; a new one to a NodePort or external IP gets a
 * backend and its two lb_nat_v1 entries. Anything else continues to the
 * host stack. (Not inlined: the call chain must fit the BPF stack.)
 */
static __attribute__((noinline)) int nodeport(const struct flow_key *fk, const struct parsed *p, int node_addr)
{
	struct affinity_key aff = {};
	struct endpoint_key ek = {};
	struct endpoint_info *ep;
	struct scratch *sc;
	struct lb_pick pick;
	__u32 hash, i, zero = 0;
	int snat;

	if (fk->proto != IPPROTO_TCP && fk->proto != IPPROTO_UDP)
		return NP_PASS;
	if (bpf_map_lookup_elem(&lb_nat_v1, fk))
		return NP_TRANSLATE;
	if (lb_frontend(&pick, fk->family, fk->daddr, fk->dport, fk->proto, LB_SCOPE_EXT, 0) < 0)
		return NP_PASS;
	if (fk->proto == IPPROTO_TCP && (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN)
		return NP_PASS; /* not a flow of ours: the host answers with a reset */
	if (pick.svc->count == 0) {
		if (pick.svc->flags & SVC_LOCAL) {
			lb_stat(3);
			return NP_DROP; /* endpoints elsewhere only: kube-proxy drops too */
		}
		return NP_PASS; /* no endpoint at all: the host refuses (reset, port unreachable) */
	}
	hash = bpf_get_prandom_u32();
	aff.family = fk->family;
	__builtin_memcpy(aff.client, fk->saddr, 16);
	lb_backend(&pick, hash, &aff);
	if (!pick.be || pick.be->family != fk->family)
		return NP_PASS;
	snat = !(pick.svc->flags & SVC_LOCAL);
	sc = bpf_map_lookup_elem(&scratch, &zero);
	if (!sc)
		return NP_DROP;
	__builtin_memset(&sc->orig, 0, sizeof(sc->orig));
	__builtin_memset(&sc->rep, 0, sizeof(sc->rep));
	__builtin_memset(&sc->rk, 0, sizeof(sc->rk));
#define orig (sc->orig)
#define rep (sc->rep)
#define rk (sc->rk)

	__builtin_memcpy(orig.daddr, pick.be->addr, 16);
	orig.dport = pick.be->port;
	if (snat) {
		__u32 idx = fk->family == EP_FAMILY_IPV4 ? 0 : 1;
		struct snat_info *sn = bpf_map_lookup_elem(&lb_snat_v1, &idx);

		if (sn && sn->set)
			__builtin_memcpy(orig.saddr, sn->addr, 16);
		else if (node_addr)
			__builtin_memcpy(orig.saddr, fk->daddr, 16);
		else
			return NP_PASS;
		orig.flags = NAT_SNAT;
	} else {
		__builtin_memcpy(orig.saddr, fk->saddr, 16);
		orig.sport = fk->sport;
	}
	ek.family = fk->family;
	__builtin_memcpy(ek.addr, pick.be->addr, 16);
	ep = bpf_map_lookup_elem(&endpoints_v1, &ek);
	if (ep) {
		orig.ifindex = ep->ifindex;
		orig.flags |= NAT_LOCAL;
	}
	orig.seen_ns = bpf_ktime_get_ns();
	orig.id = pick.svc->id;

	/* The reply, as the backend sends it. */
	__builtin_memcpy(rk.saddr, orig.daddr, 16);
	__builtin_memcpy(rk.daddr, orig.saddr, 16);
	rk.sport = orig.dport;
	rk.proto = fk->proto;
	rk.family = fk->family;
	__builtin_memcpy(rep.saddr, fk->daddr, 16);
	__builtin_memcpy(rep.daddr, fk->saddr, 16);
	rep.sport = fk->dport;
	rep.dport = fk->sport;
	rep.seen_ns = orig.seen_ns;
	rep.id = orig.id;
	rep.flags = NAT_REPLY | (orig.flags & ~NAT_LOCAL);

	for (i = 0; i < NAT_TRIES; i++) {
		if (snat)
			orig.sport = bpf_htons(NAT_PORT_MIN + (hash + i * 7919) % NAT_PORT_RANGE);
		rk.dport = orig.sport;
		if (bpf_map_update_elem(&lb_nat_v1, &rk, &rep, BPF_NOEXIST) == 0)
			break;
		if (!snat) {
			/* the client's own earlier flow with the same port */
			bpf_map_update_elem(&lb_nat_v1, &rk, &rep, BPF_ANY);
			break;
		}
	}
	if (i == NAT_TRIES) {
		lb_stat(2);
		return NP_DROP;
	}
	if (bpf_map_update_elem(&lb_nat_v1, fk, &orig, BPF_ANY) < 0) {
		bpf_map_delete_elem(&lb_nat_v1, &rk);
		return NP_DROP;
	}
	if (ep) {
		__u32 idx = ep->ifindex;
		struct device_info *dev = bpf_map_lookup_elem(&devices_v1, &idx);

		if (dev && !(dev->flags & EP_FLAG_LB_BACKEND))
			dev->flags |= EP_FLAG_LB_BACKEND; /* only ever set: no atomic needed */
	}
	lb_stat(0);
	if (ep) {
		__builtin_memcpy(sc->nfk.saddr, orig.saddr, 16);
		__builtin_memcpy(sc->nfk.daddr, orig.daddr, 16);
		sc->nfk.sport = orig.sport;
		sc->nfk.dport = orig.dport;
		sc->nfk.proto = fk->proto;
		sc->nfk.family = fk->family;
		return NP_NEW_LOCAL;
	}
	return NP_TRANSLATE;
#undef orig
#undef rep
#undef rk
}

/* Routes what a pod sent, after anti-spoofing. */
static __always_inline int route_pod(struct __sk_buff *skb, __be16 proto, void *l3,
				     struct device_info *src, struct endpoint_stats *st)
{
	void *data_end = (void *)(long)skb->data_end;
	struct endpoint_key key = {};
	struct flow_key fk = {};
	struct parsed p = {};
	struct endpoint_info *ep;
	struct guard_key g = {};
	int rc;

	if (parse_flow(proto, l3, data_end, &fk, &p) < 0)
		return TC_ACT_UNSPEC;
	if (src->flags & EP_FLAG_LB_BACKEND) {
		/* a reply to a client outside the node (NodePort, external IP) */
		struct nat_entry *e = bpf_map_lookup_elem(&lb_nat_v1, &fk);

		if (e && (e->flags & NAT_REPLY))
			return nat_continue(skb, proto, &fk, &p, e);
	}
	key.family = fk.family;
	__builtin_memcpy(key.addr, fk.daddr, 16);
	ep = bpf_map_lookup_elem(&endpoints_v1, &key);
	/* NetworkPolicy: the sender's egress, and a local receiver's ingress,
	 * before anything leaves (the redirect skips the receiver's to_pod). */
	if (policy_check(&fk, &p, skb->ifindex, ep ? ep->ifindex : 0) < 0)
		return TC_ACT_SHOT;
	if (ep)
		return redirect_local(skb, proto, &fk, &p, src, ep, st);

	guard_key_of(&g, fk.family, fk.saddr, fk.sport, fk.proto);
	if (!in_cluster(fk.family, fk.daddr)) {
		/* Outside the cluster's pod ranges: the host stack routes it and
		 * may NAT it (masquerade, a kube-proxy Service, a hostPort on
		 * another node). Remember the pod's end of a new connection, so
		 * replies arriving from another node are not redirected past
		 * the host's conntrack. */
		int fresh = (fk.proto == IPPROTO_TCP && (p.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN) ||
			    fk.proto == IPPROTO_UDP;

		if (fresh && fk.sport && !bpf_map_lookup_elem(&nat_guard_v1, &g)) {
			struct flow_info fi = {.seen_ns = bpf_ktime_get_ns()};
			struct endpoint_info *self;

			bpf_map_update_elem(&nat_guard_v1, &g, &fi, BPF_ANY);
			__builtin_memcpy(key.addr, fk.saddr, 16);
			self = bpf_map_lookup_elem(&endpoints_v1, &key);
			if (self && !(self->flags & EP_FLAG_HOST_NAT))
				self->flags |= EP_FLAG_HOST_NAT; /* only ever set: no atomic needed */
		}
		return TC_ACT_UNSPEC;
	}
	if (fk.proto == IPPROTO_TCP && (p.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN)
		bpf_map_delete_elem(&nat_guard_v1, &g); /* this port now talks to the cluster directly */
	if ((src->flags & EP_FLAG_SHAPED) || host_path(src, &fk, &p)) {
		if (st)
			st->to_node_fallback++;
		return TC_ACT_UNSPEC;
	}
	{
		struct lpm_key k = {};
		struct tunnel_info *ti;

		lpm_of(&k, fk.family, fk.daddr);
		ti = bpf_map_lookup_elem(&tunnel_v1, &k);
		if (ti && ti->ifindex)
			rc = encap_remote(skb, proto, &p, ti, src->host_mac);
		else
			rc = forward_remote(skb, proto, &fk, &p, 0);
	}
	if (st) {
		if (rc == TC_ACT_REDIRECT) {
			st->to_node_packets++;
			st->to_node_bytes += skb->len;
		} else {
			st->to_node_fallback++;
		}
	}
	return rc;
}

/* Answers the pod's ARP request for its IPv4 gateway: the frame becomes the
 * reply (host veth MAC for 169.254.1.1) and goes back out to the pod. */
static __always_inline int arp_reply(struct __sk_buff *skb, const struct device_info *dev)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct arp_eth_ipv4 *arp = (void *)(eth + 1);
	__u32 gw = GATEWAY_V4;

	if ((void *)(arp + 1) > data_end)
		return TC_ACT_SHOT;
	mac_copy(eth->h_dest, dev->pod_mac);
	mac_copy(eth->h_source, dev->host_mac);
	arp->op = bpf_htons(ARPOP_REPLY);
	mac_copy(arp->tha, dev->pod_mac);
	__builtin_memcpy(arp->tip, arp->sip, 4);
	mac_copy(arp->sha, dev->host_mac);
	__builtin_memcpy(arp->sip, &gw, 4);
	return bpf_redirect(skb->ifindex, 0);
}

/* The ICMPv6 checksum of an ND message of sizeof(struct nd_msg_ll) bytes. */
static __always_inline __sum16 nd_csum(const struct ipv6hdr *ip6, const struct nd_msg_ll *nd)
{
	struct {
		__u8 saddr[16];
		__u8 daddr[16];
		__be32 len;
		__be32 next;
		struct nd_msg_ll msg;
	} pseudo = {};
	__u32 sum;

	__builtin_memcpy(pseudo.saddr, ip6->saddr.in6_u.u6_addr8, 16);
	__builtin_memcpy(pseudo.daddr, ip6->daddr.in6_u.u6_addr8, 16);
	pseudo.len = bpf_htonl(sizeof(*nd));
	pseudo.next = bpf_htonl(IPPROTO_ICMPV6_);
	__builtin_memcpy(&pseudo.msg, nd, sizeof(*nd));
	pseudo.msg.csum = 0;
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&pseudo, sizeof(pseudo), 0);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__sum16)~sum;
}

/*
 * Neighbour discovery from the pod: a solicitation for fe80::1 is answered
 * with an advertisement of the host veth's MAC (the frame turned around); an
 * advertisement claiming an address that is not the pod's (nor link-local)
 * is dropped, so no pod can make the host send another pod's traffic its
 * way. Everything else continues (TC_ACT_UNSPEC).
 */
static __always_inline int neighbour_discovery(struct __sk_buff *skb, struct ipv6hdr *ip6,
					       const struct device_info *dev, struct endpoint_stats *st)
{
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = (void *)(long)skb->data;
	struct nd_msg_ll *nd = (void *)(ip6 + 1);

	if ((void *)(eth + 1) > data_end || (void *)(&nd->flags) > data_end)
		return TC_ACT_UNSPEC;
	if (nd->type == ND_NEIGHBOR_ADVERT) {
		if ((void *)(nd->target + 16) > data_end)
			return drop(st, DROP_MALFORMED);
		if (ipv6_link_scope((struct in6_addr *)nd->target))
			return TC_ACT_UNSPEC;
		if (!(dev->flags & EP_FLAG_IPV6) || !ipv6_equal((struct in6_addr *)nd->target, dev->ipv6))
			return drop(st, DROP_SPOOFED_IP);
		return TC_ACT_UNSPEC;
	}
	if (nd->type != ND_NEIGHBOR_SOLICIT || (void *)(nd + 1) > data_end)
		return TC_ACT_UNSPEC;
	if (ip6->payload_len != bpf_htons(sizeof(*nd)) || nd->opt_type != ND_OPT_SOURCE_LL || nd->opt_len != 1 ||
	    !ipv6_equal((struct in6_addr *)nd->target, gateway_v6))
		return TC_ACT_UNSPEC;
	{
		const __u32 *w = (const __u32 *)ip6->saddr.in6_u.u6_addr8;
		int own = (dev->flags & EP_FLAG_IPV6) && ipv6_equal(&ip6->saddr, dev->ipv6);

		if (w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == 0)
			return TC_ACT_UNSPEC; /* duplicate address detection of fe80::1: not ours to answer */
		if (!own && !ipv6_link_scope(&ip6->saddr))
			return drop(st, DROP_SPOOFED_IP);
	}
	/* The solicitation becomes the advertisement, in place (same size). */
	mac_copy(eth->h_dest, dev->pod_mac);
	mac_copy(eth->h_source, dev->host_mac);
	__builtin_memcpy(ip6->daddr.in6_u.u6_addr8, ip6->saddr.in6_u.u6_addr8, 16);
	__builtin_memcpy(ip6->saddr.in6_u.u6_addr8, gateway_v6, 16);
	ip6->hop_limit = 255;
	nd->type = ND_NEIGHBOR_ADVERT;
	nd->code = 0;
	nd->flags = bpf_htonl(0xe0000000); /* router, solicited, override */
	nd->opt_type = ND_OPT_TARGET_LL;
	mac_copy(nd->opt_mac, dev->host_mac);
	nd->csum = nd_csum(ip6, nd);
	return bpf_redirect(skb->ifindex, 0);
}

SEC("tc")
int from_pod(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct endpoint_stats *st;
	struct device_info *dev;
	struct ethhdr *eth = data;
	__u32 ifindex = skb->ifindex;

	st = bpf_map_lookup_elem(&ep_stats_v2, &ifindex);
	dev = bpf_map_lookup_elem(&devices_v1, &ifindex);
	if (!dev)
		return TC_ACT_SHOT; /* ours is only ever attached to endpoints: fail closed */
	if (st) {
		st->from_pod_packets++;
		st->from_pod_bytes += skb->len;
	}

	if ((void *)(eth + 1) > data_end)
		return drop(st, DROP_MALFORMED);
	if (!mac_equal(eth->h_source, dev->pod_mac))
		return drop(st, DROP_SPOOFED_MAC);
	if (skb->vlan_present)
		return drop(st, DROP_PROTOCOL); /* a tag the kernel already took off */

	switch (eth->h_proto) {
	case bpf_htons(ETH_P_IP): {
		struct iphdr *ip = (void *)(eth + 1);
		__u32 want;

		if ((void *)(ip + 1) > data_end)
			return drop(st, DROP_MALFORMED);
		__builtin_memcpy(&want, dev->ipv4, 4);
		if (!(dev->flags & EP_FLAG_IPV4) || ip->saddr != want)
			return drop(st, DROP_SPOOFED_IP);
		return route_pod(skb, eth->h_proto, ip, dev, st);
	}
	case bpf_htons(ETH_P_IPV6): {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return drop(st, DROP_MALFORMED);
		if (ip6->nexthdr == IPPROTO_ICMPV6_) {
			int rc = neighbour_discovery(skb, ip6, dev, st);

			if (rc != TC_ACT_UNSPEC)
				return rc;
		}
		if (ipv6_link_scope(&ip6->saddr))
			return TC_ACT_UNSPEC;
		if (!(dev->flags & EP_FLAG_IPV6) || !ipv6_equal(&ip6->saddr, dev->ipv6))
			return drop(st, DROP_SPOOFED_IP);
		return route_pod(skb, eth->h_proto, ip6, dev, st);
	}
	case bpf_htons(ETH_P_ARP): {
		struct arp_eth_ipv4 *body = (void *)(eth + 1);
		__u32 sip, want;

		if ((void *)(body + 1) > data_end)
			return drop(st, DROP_MALFORMED);
		__builtin_memcpy(&sip, body->sip, 4);
		__builtin_memcpy(&want, dev->ipv4, 4);
		if (!mac_equal(body->sha, dev->pod_mac))
			return drop(st, DROP_SPOOFED_MAC);
		/* sip 0.0.0.0 is an address conflict probe (RFC 5227). */
		if (sip != 0 && (!(dev->flags & EP_FLAG_IPV4) || sip != want))
			return drop(st, DROP_SPOOFED_IP);
		if (body->op == bpf_htons(ARPOP_REQUEST) && sip != 0) {
			__u32 tip;

			__builtin_memcpy(&tip, body->tip, 4);
			if (tip == GATEWAY_V4)
				return arp_reply(skb, dev);
		}
		return TC_ACT_UNSPEC;
	}
	}
	/* VLAN-tagged (a second tag would be stripped after tc, unchecked),
	 * and everything else a pod has no business sending. */
	return drop(st, DROP_PROTOCOL);
}

SEC("tc")
int to_pod(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 ifindex = skb->ifindex;
	struct endpoint_stats *st = bpf_map_lookup_elem(&ep_stats_v2, &ifindex);
	struct ethhdr *eth = data;
	struct endpoint_key key = {};
	struct flow_key fk = {};
	struct parsed p = {};

	if (st) {
		st->to_pod_packets++;
		st->to_pod_bytes += skb->len;
	}
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_UNSPEC;
	if (parse_flow(eth->h_proto, eth + 1, data_end, &fk, &p) < 0)
		return TC_ACT_UNSPEC;
	/* NetworkPolicy: the pod's ingress for what the host stack delivers,
	 * but for what a socket of the host sends (the node is allowed). */
	if (skb->sk)
		policy_from_host(&fk, &p, ifindex);
	else if (policy_check(&fk, &p, 0, ifindex) < 0)
		return TC_ACT_SHOT;
	/* From a pod (here or on another node), yet delivered by the host
	 * stack rather than redirected: the host may have rewritten the flow
	 * (a Service, a hostPort). Its replies must take the host path back. */
	key.family = fk.family;
	__builtin_memcpy(key.addr, fk.saddr, 16);
	struct endpoint_info *srcep = bpf_map_lookup_elem(&endpoints_v1, &key);

	if (srcep || in_cluster(fk.family, fk.saddr)) {
		struct flow_key rev = {};
		struct flow_info fi = {.seen_ns = bpf_ktime_get_ns()};
		struct device_info *dev = bpf_map_lookup_elem(&devices_v1, &ifindex);
		struct endpoint_info *self;

		/* A fragment without its ports (after the first; IPv6's) is not
		 * recorded: the flag below sends all of this pod's fragments
		 * through the host, which reassembles them for conntrack. */
		if (!p.fragment || fk.sport || fk.dport) {
			reverse(&rev, &fk);
			bpf_map_update_elem(&host_flows_v1, &rev, &fi, BPF_ANY);
		}
		/* Flag this pod, so from_pod looks its flows up from now on (as
		 * the sender of replies, and as the target of new SYNs). */
		if (dev && !(dev->flags & EP_FLAG_HOST_FLOWS))
			dev->flags |= EP_FLAG_HOST_FLOWS; /* only ever set: no atomic needed */
		__builtin_memcpy(key.addr, fk.daddr, 16);
		self = bpf_map_lookup_elem(&endpoints_v1, &key);
		if (self && !(self->flags & EP_FLAG_HOST_FLOWS))
			self->flags |= EP_FLAG_HOST_FLOWS;
	}
	return TC_ACT_UNSPEC;
}

SEC("tc")
int from_node(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct endpoint_key key = {};
	struct flow_key fk = {};
	struct parsed p = {};
	struct guard_key g = {};
	struct endpoint_info *ep;
	struct node_stats *ns;
	__u8 pod_mac[ETH_ALEN], host_mac[ETH_ALEN];
	__u32 ifindex = skb->ifindex, target, len;
	__be16 proto;

	/* Frames for other hosts (a promiscuous or bridged uplink) and VLANs
	 * (a subdevice sees them untagged) are not ours to take. */
	if (skb->pkt_type != PACKET_HOST || skb->vlan_present)
		return TC_ACT_UNSPEC;
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_UNSPEC;
	proto = eth->h_proto;
	if (parse_flow(proto, eth + 1, data_end, &fk, &p) < 0)
		return TC_ACT_UNSPEC;
	if (p.fragment)
		return TC_ACT_UNSPEC; /* conntrack reassembles: ports decide below */
	key.family = fk.family;
	__builtin_memcpy(key.addr, fk.daddr, 16);
	ep = bpf_map_lookup_elem(&endpoints_v1, &key);
	if (!ep) {
		/* For this node itself (a NodePort, a translated flow's reply),
		 * or an external IP of a Service? */
		int node_addr = bpf_map_lookup_elem(&lb_nodeaddr_v1, &key) != NULL;
		struct nat_entry *e;

		if (!node_addr && in_cluster(fk.family, fk.daddr))
			return TC_ACT_UNSPEC;
		switch (nodeport(&fk, &p, node_addr)) {
		case NP_PASS:
			return TC_ACT_UNSPEC;
		case NP_NEW_LOCAL: {
			__u32 zero = 0;
			struct scratch *sc = bpf_map_lookup_elem(&scratch, &zero);

			if (!sc)
				return TC_ACT_SHOT;
			if (policy_check(&sc->nfk, &p, 0, sc->orig.ifindex) < 0) {
				bpf_map_delete_elem(&lb_nat_v1, &sc->rk);
				bpf_map_delete_elem(&lb_nat_v1, &fk);
				return TC_ACT_SHOT; /* the backend's ingress policy */
			}
		}
			/* fall through */
		case NP_TRANSLATE:
			e = bpf_map_lookup_elem(&lb_nat_v1, &fk);
			if (e)
				return nat_continue(skb, proto, &fk, &p, e);
		}
		return TC_ACT_SHOT;
	}
	if (ep->flags & EP_FLAG_SHAPED)
		return TC_ACT_UNSPEC;
	/* Only pod-to-pod traffic: anything else may be a flow the host's
	 * conntrack must see both ways (masquerade of the reply). */
	if (!in_cluster(fk.family, fk.saddr))
		return TC_ACT_UNSPEC;
	if (p.icmp_error) {
		/* An error about a packet the pod sent: the host's if that
		 * packet's flow is one the host may have translated. */
		if (quoted_guard(skb, &g, proto) < 0 || bpf_map_lookup_elem(&nat_guard_v1, &g))
			return TC_ACT_UNSPEC;
	} else {
		guard_key_of(&g, fk.family, fk.daddr, fk.dport, fk.proto);
		if (bpf_map_lookup_elem(&nat_guard_v1, &g))
			return TC_ACT_UNSPEC; /* a reply the host must un-NAT */
		/* The host may have moved the pod's port too (conntrack picks
		 * another source port when a NATed tuple is taken): ask it. */
		if ((ep->flags & EP_FLAG_HOST_NAT) && host_tracked(skb, &fk))
			return TC_ACT_UNSPEC;
	}
	if (p.ttl <= 1)
		return TC_ACT_UNSPEC;
	if (policy_check(&fk, &p, 0, ep->ifindex) < 0)
		return TC_ACT_SHOT; /* the pod's ingress policy */
	target = ep->ifindex;
	mac_copy(pod_mac, ep->pod_mac);
	mac_copy(host_mac, ep->host_mac);
	if (ttl_dec(skb, proto, p.ttl) < 0 || set_macs(skb, pod_mac, host_mac) < 0)
		return TC_ACT_UNSPEC;
	len = skb->len;
	count_to_pod(target, len, 1);
	ns = bpf_map_lookup_elem(&node_stats_v1, &ifindex);
	if (ns) {
		ns->redirect_packets++;
		ns->redirect_bytes += len;
	}
	return bpf_redirect_peer(target, 0);
}

SEC("tc")
int to_overlay(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct bpf_tunnel_key tk = {};
	struct tunnel_info *ti;
	struct node_stats *ns;
	struct lpm_key k = {};
	__u32 ifindex = skb->ifindex;

	ns = bpf_map_lookup_elem(&node_stats_v1, &ifindex);
	if (bpf_skb_get_tunnel_key(skb, &tk, sizeof(tk), 0) == 0) {
		/* from_pod set the key already (a fast-path packet) */
		if (ns) {
			ns->encap_packets++;
			ns->encap_bytes += skb->len;
		}
		return TC_ACT_UNSPEC;
	}
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_SHOT;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end)
			return TC_ACT_SHOT;
		k.family = EP_FAMILY_IPV4;
		k.prefixlen = 32 + 32;
		__builtin_memcpy(k.addr, &ip->daddr, 4);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return TC_ACT_SHOT;
		k.family = EP_FAMILY_IPV6;
		k.prefixlen = 32 + 128;
		__builtin_memcpy(k.addr, ip6->daddr.in6_u.u6_addr8, 16);
	} else {
		return TC_ACT_SHOT; /* the device is NOARP: nothing else belongs here */
	}
	ti = bpf_map_lookup_elem(&tunnel_v1, &k);
	if (!ti) {
		if (ns)
			ns->drop_no_tunnel++;
		return TC_ACT_SHOT;
	}
	mac_copy(eth->h_dest, ti->vtep_mac);
	if (tunnel_key_set(skb, ti) < 0)
		return TC_ACT_SHOT;
	if (ns) {
		ns->encap_packets++;
		ns->encap_bytes += skb->len;
	}
	return TC_ACT_UNSPEC;
}

#include "sock.h"
