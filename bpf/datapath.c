//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * tc programs on the host side of every pod veth.
 *
 * from_pod (ingress of the host veth, i.e. frames the pod sent):
 *   anti-spoofing on source MAC and source IP (only IPv4, IPv6 and ARP get
 *   through at all), then a lookup of the destination IP in endpoints_v1; a
 *   local pod is reached by rewriting the MACs and bpf_redirect_peer()
 *   straight into its namespace, so same-node traffic never crosses a bridge
 *   or the host's forwarding path. Anything else, and replies of flows the
 *   host stack delivered (host_flows_v1), continue to the host stack.
 * to_pod (egress of the host veth): counts what the host stack delivers and
 *   remembers flows from local pods it delivered (NATed Service traffic).
 *
 * "Pass" is TC_ACT_UNSPEC (TCX_NEXT): programs attached after ours still run.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>

#include "datapath.h"

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

#define IP_FRAG_OFFSET 0x1fff

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

/* Fills the ports of a flow key from the L4 header at l4 (TCP and UDP;
 * other protocols keep ports 0). Returns the TCP flags byte, 0 otherwise. */
static __always_inline __u8 l4_ports(struct flow_key *fk, void *l4, void *data_end)
{
	if (fk->proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > data_end)
			return 0;
		fk->sport = th->source;
		fk->dport = th->dest;
		return ((__u8 *)th)[13];
	}
	if (fk->proto == IPPROTO_UDP) {
		__be16 *ports = l4;

		if ((void *)(ports + 2) > data_end)
			return 0;
		fk->sport = ports[0];
		fk->dport = ports[1];
	}
	return 0;
}

#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10

/* Parses the IP header at l3 into a flow key (addresses, protocol, ports).
 * Returns -1 when the header is truncated, else the TCP flags (0 if none). */
static __always_inline int parse_flow(__be16 proto, void *l3, void *data_end, struct flow_key *fk)
{
	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = l3;

		if ((void *)(ip + 1) > data_end)
			return -1;
		fk->family = EP_FAMILY_IPV4;
		__builtin_memcpy(fk->saddr, &ip->saddr, 4);
		__builtin_memcpy(fk->daddr, &ip->daddr, 4);
		fk->proto = ip->protocol;
		if (ip->frag_off & bpf_htons(IP_FRAG_OFFSET))
			return 0; /* not the first fragment: no L4 header */
		return l4_ports(fk, (void *)ip + ip->ihl * 4, data_end);
	}
	if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = l3;

		if ((void *)(ip6 + 1) > data_end)
			return -1;
		fk->family = EP_FAMILY_IPV6;
		__builtin_memcpy(fk->saddr, ip6->saddr.in6_u.u6_addr8, 16);
		__builtin_memcpy(fk->daddr, ip6->daddr.in6_u.u6_addr8, 16);
		fk->proto = ip6->nexthdr;
		return l4_ports(fk, ip6 + 1, data_end);
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

/* Sends the frame into the namespace of the pod that owns the destination,
 * if that pod lives on this node and the flow is not one the host stack
 * must see. Returns TC_ACT_UNSPEC when the host stack should take it. */
static __always_inline int redirect_local(struct __sk_buff *skb, __be16 proto, void *l3,
					  const struct device_info *src, struct endpoint_stats *st)
{
	void *data_end = (void *)(long)skb->data_end;
	struct endpoint_key key = {};
	struct flow_key fk = {};
	struct endpoint_info *ep;
	struct endpoint_stats *dst;
	struct ethhdr *eth;
	__u32 ifindex;
	int flags;

	flags = parse_flow(proto, l3, data_end, &fk);
	if (flags < 0)
		return TC_ACT_UNSPEC;
	key.family = fk.family;
	__builtin_memcpy(key.addr, fk.daddr, 16);
	ep = bpf_map_lookup_elem(&endpoints_v1, &key);
	if (!ep)
		return TC_ACT_UNSPEC;

	if ((src->flags | ep->flags) & EP_FLAG_SHAPED) {
		/* A rate limit sits on the host veths' qdiscs, which a peer
		 * redirect would skip: take the host path through them. */
		if (st)
			st->host_path_packets++;
		return TC_ACT_UNSPEC;
	}
	if ((src->flags & EP_FLAG_HOST_FLOWS) && bpf_map_lookup_elem(&host_flows_v1, &fk)) {
		/* A reply of a flow the host delivered (NAT): back through it. */
		if (st)
			st->host_path_packets++;
		return TC_ACT_UNSPEC;
	}
	if ((ep->flags & EP_FLAG_HOST_FLOWS) && (flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN) {
		/* A new direct connection: forget a host-path flow that had the
		 * same ports, or its replies would go the wrong way. */
		struct flow_key rev = {};

		reverse(&rev, &fk);
		bpf_map_delete_elem(&host_flows_v1, &rev);
	}

	ifindex = ep->ifindex;
	eth = (void *)(long)skb->data;
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_UNSPEC;
	mac_copy(eth->h_dest, ep->pod_mac);
	mac_copy(eth->h_source, ep->host_mac);

	if (st) {
		st->redirect_packets++;
		st->redirect_bytes += skb->len;
	}
	dst = bpf_map_lookup_elem(&ep_stats_v1, &ifindex);
	if (dst) {
		dst->to_pod_packets++;
		dst->to_pod_bytes += skb->len;
	}
	return bpf_redirect_peer(ifindex, 0);
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

	st = bpf_map_lookup_elem(&ep_stats_v1, &ifindex);
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
		return redirect_local(skb, eth->h_proto, ip, dev, st);
	}
	case bpf_htons(ETH_P_IPV6): {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return drop(st, DROP_MALFORMED);
		if (ipv6_link_scope(&ip6->saddr))
			return TC_ACT_UNSPEC;
		if (!(dev->flags & EP_FLAG_IPV6) || !ipv6_equal(&ip6->saddr, dev->ipv6))
			return drop(st, DROP_SPOOFED_IP);
		return redirect_local(skb, eth->h_proto, ip6, dev, st);
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
	struct endpoint_stats *st = bpf_map_lookup_elem(&ep_stats_v1, &ifindex);
	struct ethhdr *eth = data;
	struct endpoint_key key = {};
	struct flow_key fk = {};

	if (st) {
		st->to_pod_packets++;
		st->to_pod_bytes += skb->len;
	}
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_UNSPEC;
	if (parse_flow(eth->h_proto, eth + 1, data_end, &fk) < 0)
		return TC_ACT_UNSPEC;
	/* From a local pod, yet delivered by the host stack rather than
	 * redirected: the host rewrote the flow (a Service). Its replies must
	 * take the host path back. */
	key.family = fk.family;
	__builtin_memcpy(key.addr, fk.saddr, 16);
	if (bpf_map_lookup_elem(&endpoints_v1, &key)) {
		struct flow_key rev = {};
		struct flow_info fi = {.seen_ns = bpf_ktime_get_ns()};
		struct device_info *dev = bpf_map_lookup_elem(&devices_v1, &ifindex);
		struct endpoint_info *self;

		reverse(&rev, &fk);
		bpf_map_update_elem(&host_flows_v1, &rev, &fi, BPF_ANY);
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
