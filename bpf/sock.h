/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Socket-level Service load balancing: cgroup sock_addr programs, attached
 * by ebpf-cni-agent to a cgroup v2 directory holding every process of the
 * node (the hierarchy's root in production), so pods and host processes
 * alike are covered. A connect() or sendto() to a Service address is sent
 * to a backend before any packet exists: the kernel builds packets for the
 * backend, so the pod-to-pod fast path (same node and across nodes) carries
 * them unchanged, fragments and ICMP errors included. recvmsg() and
 * getpeername() report the Service address back. No backend: the call
 * fails at once with ECONNREFUSED.
 *
 * Part of datapath.c (one object); included at its end.
 */
#pragma once

#include "lb.h"

#define ECONNREFUSED 111
#define SOCK_PASS 1
#define SOCK_REFUSE 0

/* v4-mapped IPv6 (::ffff:a.b.c.d): an AF_INET6 socket talking IPv4. */
static __always_inline int v4mapped(const __u32 *w)
{
	return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0xffff);
}

/* Remembers which Service address a socket asked for, so replies and
 * getpeername report it. Written only when it changed (the LRU keeps hot
 * entries without churn). */
static __always_inline void sock_remember(__u64 cookie, const struct backend_info *be, __u8 family,
					  const __u8 *addr, __be16 port, __u32 id)
{
	struct sock_key k = {.cookie = cookie, .port = be->port, .family = family};
	struct sock_info v = {.port = port, .family = family, .id = id};
	struct sock_info *old;

	__builtin_memcpy(k.addr, be->addr, 16);
	__builtin_memcpy(v.addr, addr, 16);
	old = bpf_map_lookup_elem(&lb_sock_v1, &k);
	if (old && old->port == port && old->id == id && addr16_equal(old->addr, addr))
		return;
	bpf_map_update_elem(&lb_sock_v1, &k, &v, BPF_ANY);
}

/*
 * Translates a connect or sendmsg destination in place (addr: 16 bytes,
 * IPv4 in the first 4). Returns 1 when translated, 0 when not a Service,
 * -1 to refuse.
 */
static __always_inline int sock_xlate(struct bpf_sock_addr *ctx, __u8 family, __u8 *addr, __be16 *port, __u8 proto)
{
	struct lb_pick pick;
	struct affinity_key aff = {};
	__u64 cookie;
	__u32 hash;

	int rc;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 0;
	rc = lb_frontend(&pick, family, addr, *port, proto, LB_SCOPE_INT, 1);
	if (rc < 0)
		return 0;
	if (rc > 0) {
		lb_count(1);
		return -1;
	}
	cookie = bpf_get_socket_cookie(ctx);
	/* A UDP socket keeps one backend for all its datagrams; a TCP
	 * connection is placed at random. */
	hash = proto == IPPROTO_UDP ? (__u32)((cookie * 0x9E3779B97F4A7C15ULL) >> 32) : bpf_get_prandom_u32();
	aff.netns = bpf_get_netns_cookie(ctx);
	aff.family = family;
	lb_backend(&pick, hash, &aff);
	if (!pick.be || pick.be->family != family) {
		lb_count(1);
		return -1;
	}
	sock_remember(cookie, pick.be, family, addr, *port, pick.svc->id);
	__builtin_memcpy(addr, pick.be->addr, 16);
	*port = pick.be->port;
	lb_count(0);
	return 1;
}

static __always_inline int sock4_xlate(struct bpf_sock_addr *ctx, __u8 proto)
{
	__u8 addr[16] = {};
	__u32 ip = ctx->user_ip4;
	__be16 port = (__be16)ctx->user_port;
	int rc;

	__builtin_memcpy(addr, &ip, 4);
	rc = sock_xlate(ctx, EP_FAMILY_IPV4, addr, &port, proto);
	if (rc < 0) {
		bpf_set_retval(-ECONNREFUSED);
		return SOCK_REFUSE;
	}
	if (rc > 0) {
		__builtin_memcpy(&ip, addr, 4);
		ctx->user_ip4 = ip;
		ctx->user_port = (__u32)port;
	}
	return SOCK_PASS;
}

static __always_inline int sock6_xlate(struct bpf_sock_addr *ctx, __u8 proto)
{
	__u32 w[4];
	__u8 addr[16] = {};
	__be16 port = (__be16)ctx->user_port;
	__u8 family = EP_FAMILY_IPV6;
	int rc;

	w[0] = ctx->user_ip6[0];
	w[1] = ctx->user_ip6[1];
	w[2] = ctx->user_ip6[2];
	w[3] = ctx->user_ip6[3];
	if (v4mapped(w)) {
		family = EP_FAMILY_IPV4;
		__builtin_memcpy(addr, &w[3], 4);
	} else {
		__builtin_memcpy(addr, w, 16);
	}
	rc = sock_xlate(ctx, family, addr, &port, proto);
	if (rc < 0) {
		bpf_set_retval(-ECONNREFUSED);
		return SOCK_REFUSE;
	}
	if (rc > 0) {
		if (family == EP_FAMILY_IPV4) {
			__builtin_memcpy(&w[3], addr, 4);
		} else {
			__builtin_memcpy(w, addr, 16);
		}
		ctx->user_ip6[0] = w[0];
		ctx->user_ip6[1] = w[1];
		ctx->user_ip6[2] = w[2];
		ctx->user_ip6[3] = w[3];
		ctx->user_port = (__u32)port;
	}
	return SOCK_PASS;
}

/* Replaces a backend's address the socket reports (a datagram's source,
 * the peer) by the Service address it asked for. */
static __always_inline void sock_reverse(struct bpf_sock_addr *ctx, __u8 family, __u8 *addr, __be16 *port)
{
	struct sock_key k = {.cookie = bpf_get_socket_cookie(ctx), .port = *port, .family = family};
	struct sock_info *v;

	__builtin_memcpy(k.addr, addr, 16);
	v = bpf_map_lookup_elem(&lb_sock_v1, &k);
	if (!v)
		return;
	__builtin_memcpy(addr, v->addr, 16);
	*port = v->port;
}

static __always_inline int sock4_reverse(struct bpf_sock_addr *ctx)
{
	__u8 addr[16] = {};
	__u32 ip = ctx->user_ip4;
	__be16 port = (__be16)ctx->user_port;

	__builtin_memcpy(addr, &ip, 4);
	sock_reverse(ctx, EP_FAMILY_IPV4, addr, &port);
	__builtin_memcpy(&ip, addr, 4);
	ctx->user_ip4 = ip;
	ctx->user_port = (__u32)port;
	return SOCK_PASS;
}

static __always_inline int sock6_reverse(struct bpf_sock_addr *ctx)
{
	__u32 w[4];
	__u8 addr[16] = {};
	__be16 port = (__be16)ctx->user_port;

	w[0] = ctx->user_ip6[0];
	w[1] = ctx->user_ip6[1];
	w[2] = ctx->user_ip6[2];
	w[3] = ctx->user_ip6[3];
	if (v4mapped(w)) {
		__builtin_memcpy(addr, &w[3], 4);
		sock_reverse(ctx, EP_FAMILY_IPV4, addr, &port);
		__builtin_memcpy(&w[3], addr, 4);
	} else {
		__builtin_memcpy(addr, w, 16);
		sock_reverse(ctx, EP_FAMILY_IPV6, addr, &port);
		__builtin_memcpy(w, addr, 16);
	}
	ctx->user_ip6[0] = w[0];
	ctx->user_ip6[1] = w[1];
	ctx->user_ip6[2] = w[2];
	ctx->user_ip6[3] = w[3];
	ctx->user_port = (__u32)port;
	return SOCK_PASS;
}

SEC("cgroup/connect4")
int sock_connect4(struct bpf_sock_addr *ctx)
{
	return sock4_xlate(ctx, ctx->protocol);
}

SEC("cgroup/connect6")
int sock_connect6(struct bpf_sock_addr *ctx)
{
	return sock6_xlate(ctx, ctx->protocol);
}

SEC("cgroup/sendmsg4")
int sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_xlate(ctx, IPPROTO_UDP);
}

SEC("cgroup/sendmsg6")
int sock_sendmsg6(struct bpf_sock_addr *ctx)
{
	return sock6_xlate(ctx, IPPROTO_UDP);
}

SEC("cgroup/recvmsg4")
int sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_reverse(ctx);
}

SEC("cgroup/recvmsg6")
int sock_recvmsg6(struct bpf_sock_addr *ctx)
{
	return sock6_reverse(ctx);
}

SEC("cgroup/getpeername4")
int sock_getpeer4(struct bpf_sock_addr *ctx)
{
	return sock4_reverse(ctx);
}

SEC("cgroup/getpeername6")
int sock_getpeer6(struct bpf_sock_addr *ctx)
{
	return sock6_reverse(ctx);
}
