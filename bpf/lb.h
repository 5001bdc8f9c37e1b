/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Service load balancing shared by the socket programs (cgroup hooks:
 * translation once per connection) and the tc NodePort path (per packet,
 * for clients outside the node): frontend lookup, backend choice, session
 * affinity. Maps and their layout: datapath.h.
 */
#pragma once

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "datapath.h"

#define NSEC_PER_SEC 1000000000ULL

static __always_inline int addr16_equal(const __u8 *a, const __u8 *b)
{
	__u32 x[4], y[4];

	__builtin_memcpy(x, a, 16);
	__builtin_memcpy(y, b, 16);
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

/* What a frontend lookup found. */
struct lb_pick {
	struct svc_key key;        /* the frontend's key (slot 0) */
	struct svc_info *svc;      /* its value */
	struct backend_info *be;   /* the chosen backend (NULL: refuse) */
	__u32 backend;             /* its ID */
};

static __always_inline void lb_count(int refused)
{
	__u32 zero = 0;
	struct lb_stats *s = bpf_map_lookup_elem(&lb_stats_v1, &zero);

	if (!s)
		return;
	if (refused)
		s->sock_refused++;
	else
		s->sock_translated++;
}

/*
 * Finds the frontend for (family, addr, port, proto) in scope: the address
 * itself (ClusterIP, external IP), else the NodePort wildcard when addr is
 * one of this node's. Fills pick->key and pick->svc; returns 0 when found,
 * -1 when addr:port is no Service. With refuse_unknown, returns 1 (refuse)
 * for a Service address on a port it does not serve (SVC_ADDRESS) and for
 * an unallocated address of the Service ranges.
 */
static __always_inline int lb_frontend(struct lb_pick *pick, __u8 family, const __u8 *addr, __be16 port,
				       __u8 proto, __u8 scope, int refuse_unknown)
{
	struct svc_key *k = &pick->key;
	struct endpoint_key nk = {};

	__builtin_memset(k, 0, sizeof(*k));
	__builtin_memcpy(k->addr, addr, 16);
	k->port = port;
	k->proto = proto;
	k->family = family;
	k->scope = scope;
	pick->svc = bpf_map_lookup_elem(&lb_svc_v1, k);
	if (pick->svc)
		return 0;
	nk.family = family;
	__builtin_memcpy(nk.addr, addr, 16);
	if (bpf_map_lookup_elem(&lb_nodeaddr_v1, &nk)) {
		__builtin_memset(k->addr, 0, 16);
		pick->svc = bpf_map_lookup_elem(&lb_svc_v1, k);
		if (pick->svc)
			return 0;
		__builtin_memcpy(k->addr, addr, 16);
	}
	if (!refuse_unknown)
		return -1;
	k->port = 0;
	k->proto = 0;
	pick->svc = bpf_map_lookup_elem(&lb_svc_v1, k);
	if (pick->svc && (pick->svc->flags & SVC_ADDRESS))
		return 1;
	pick->svc = NULL;
	{
		struct lpm_key lk = {.family = family, .prefixlen = 32 + (family == EP_FAMILY_IPV4 ? 32 : 128)};

		__builtin_memcpy(lk.addr, addr, 16);
		if (bpf_map_lookup_elem(&lb_svc_cidr_v1, &lk))
			return 1;
	}
	return -1;
}

/*
 * Chooses a backend of pick's frontend: the client's affinity if it has a
 * live one, else slot (hash % count) + 1. aff is the client's affinity key
 * (its id is filled here). Leaves pick->be NULL when the frontend has no
 * backend (refuse).
 */
static __always_inline void lb_backend(struct lb_pick *pick, __u32 hash, struct affinity_key *aff)
{
	struct svc_info *svc = pick->svc;
	struct svc_key sk;
	struct svc_info *slot;
	__u32 id = 0, count = svc->count;
	__u64 now = 0;

	pick->be = NULL;
	if (count == 0 || (svc->flags & SVC_ADDRESS))
		return;
	if (svc->flags & SVC_AFFINITY) {
		struct affinity_info *ai;

		aff->id = svc->id;
		now = bpf_ktime_get_ns();
		ai = bpf_map_lookup_elem(&lb_affinity_v1, aff);
		if (ai && now - ai->seen_ns < (__u64)svc->affinity_timeout * NSEC_PER_SEC) {
			struct affinity_match m = {.id = svc->id, .backend = ai->backend};

			if (bpf_map_lookup_elem(&lb_affinity_match_v1, &m))
				id = ai->backend;
		}
	}
	if (!id) {
		sk = pick->key;
		sk.slot = (hash % count) + 1;
		slot = bpf_map_lookup_elem(&lb_svc_v1, &sk);
		if (!slot)
			return;
		id = slot->id;
	}
	pick->be = bpf_map_lookup_elem(&lb_backends_v1, &id);
	pick->backend = id;
	if (pick->be && (svc->flags & SVC_AFFINITY)) {
		struct affinity_info ai = {.seen_ns = now, .backend = id};

		bpf_map_update_elem(&lb_affinity_v1, aff, &ai, BPF_ANY);
	}
}
