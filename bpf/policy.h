/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * NetworkPolicy verdicts, shared by the tc programs (part of datapath.c).
 *
 * Enforced where a packet is last seen before it enters a pod or first seen
 * after it leaves one: from_pod (egress of the sender; ingress of a pod of
 * this node before bpf_redirect_peer), from_node (ingress, before the peer
 * redirect from another node), to_pod (ingress, what the host stack
 * delivers), and the NodePort path (ingress of a local backend, decided
 * with the flow's translation). Only pods with an ep_policy_v1 entry pay
 * anything; a flow is judged on its first packet and tracked in ct_v1
 * (both directions pass from then on: replies of allowed connections).
 * The node itself is always allowed (ID_HOST: its addresses, and packets a
 * host socket sends), and so are IPv6 neighbour discovery and ICMP errors.
 * Included by datapath.c after the packet helpers it uses.
 */
#pragma once

#include "datapath.h"
#include "lb.h"

#define CT_TCP_TIMEOUT (6 * 3600 * NSEC_PER_SEC)
#define CT_CLOSING_TIMEOUT (10 * NSEC_PER_SEC)
#define CT_OTHER_TIMEOUT (60 * NSEC_PER_SEC)

/* 1 when fk belongs to a live tracked flow, in either direction; the
 * entry is refreshed (and marked closing on a FIN or RST). */
static __always_inline int ct_known(const struct flow_key *fk, __u8 tcp_flags)
{
	struct ct_entry *e = bpf_map_lookup_elem(&ct_v1, fk);
	__u64 now, limit;
	int reply = 0;

	if (!e) {
		struct flow_key rev = {};

		reverse(&rev, fk);
		e = bpf_map_lookup_elem(&ct_v1, &rev);
		reply = 1;
	}
	if (!e)
		return 0;
	now = bpf_ktime_get_ns();
	limit = CT_OTHER_TIMEOUT;
	if (fk->proto == IPPROTO_TCP)
		limit = (e->flags & CT_CLOSING) ? CT_CLOSING_TIMEOUT : CT_TCP_TIMEOUT;
	if (now - e->seen_ns > limit)
		return 0; /* expired: judged anew (and tracked again if allowed) */
	if (now - e->seen_ns > NSEC_PER_SEC)
		e->seen_ns = now;
	if (reply && !(e->flags & CT_REPLY))
		e->flags |= CT_REPLY;
	if (fk->proto == IPPROTO_TCP && (tcp_flags & 0x05) && !(e->flags & CT_CLOSING))
		e->flags |= CT_CLOSING; /* FIN or RST */
	return 1;
}

static __always_inline void ct_track(const struct flow_key *fk)
{
	struct ct_entry e = {.seen_ns = bpf_ktime_get_ns()};

	bpf_map_update_elem(&ct_v1, fk, &e, BPF_ANY);
}

static __always_inline void policy_count(__u32 ifindex, __u8 dir, int denied)
{
	struct policy_stats *s = bpf_map_lookup_elem(&policy_stats_v1, &ifindex);

	if (!s)
		return;
	if (dir == POLICY_INGRESS) {
		if (denied)
			s->ingress_denied++;
		else
			s->ingress_allowed++;
	} else {
		if (denied)
			s->egress_denied++;
		else
			s->egress_allowed++;
	}
}

/*
 * Judges a new flow fk for the pod pol belongs to, in one direction: 0
 * allowed, else why not (enum drop_why). peer_id receives the peer's
 * identity. Not inlined: the callers' stacks are deep already.
 */
static __attribute__((noinline)) int policy_judge(const struct ep_policy *pol, __u8 dir, const struct flow_key *fk,
						 __u32 *peer_id)
{
	struct policy_key k = {};
	struct lpm_key lk = {};
	struct peer_info *pi;
	__u32 id = ID_WORLD, cls = 0;

	lpm_of(&lk, fk->family, dir == POLICY_INGRESS ? fk->saddr : fk->daddr);
	pi = bpf_map_lookup_elem(&ipcache_v1, &lk);
	if (pi) {
		id = pi->identity;
		cls = pi->cidr_class;
	}
	*peer_id = id;
	if (id == ID_HOST)
		return 0;
	if (pol->flags & POL_PENDING)
		return WHY_PENDING;
	if (!(pol->flags & (dir == POLICY_INGRESS ? POL_INGRESS : POL_EGRESS)))
		return 0;
	k.prefixlen = 96;
	k.set = dir == POLICY_INGRESS ? pol->set_in : pol->set_out;
	k.dir = dir;
	k.proto = fk->proto;
	k.dport = fk->dport;
	k.peer = id;
	if (bpf_map_lookup_elem(&policy_v1, &k))
		return 0;
	if (cls) {
		k.peer = cls;
		if (bpf_map_lookup_elem(&policy_v1, &k))
			return 0;
	}
	k.peer = ID_ANY;
	if (bpf_map_lookup_elem(&policy_v1, &k))
		return 0;
	return WHY_POLICY;
}

/* Fills a drop event (a function of its own so the record's type is in
 * the object's BTF, for bpf2go). */
static __attribute__((noinline)) void policy_event_fill(struct policy_event *ev, const struct flow_key *fk)
{
	__builtin_memcpy(ev->saddr, fk->saddr, 16);
	__builtin_memcpy(ev->daddr, fk->daddr, 16);
	ev->sport = fk->sport;
	ev->dport = fk->dport;
	ev->proto = fk->proto;
	ev->family = fk->family;
}

/* Reports a denied packet (when anyone reads the ring buffer, it holds
 * room; else the record is dropped: the counters keep counting). */
static __always_inline void policy_report(__u32 ifindex, __u8 dir, __u8 why, __u32 peer, const struct flow_key *fk)
{
	struct policy_event *ev = bpf_ringbuf_reserve(&policy_events_v1, sizeof(*ev), 0);

	if (!ev)
		return;
	policy_event_fill(ev, fk);
	ev->ts_ns = bpf_ktime_get_ns();
	ev->ifindex = ifindex;
	ev->identity = peer;
	ev->dir = dir;
	ev->why = why;
	bpf_ringbuf_submit(ev, 0);
}

/* Neighbour discovery (router/neighbour solicitation and advertisement,
 * redirect) is never filtered, nor are ICMP errors: they belong to a flow
 * (PMTU discovery, a refused UDP port of an allowed flow). */
static __always_inline int policy_exempt(const struct flow_key *fk, const struct parsed *p)
{
	return p->icmp_error || (fk->proto == IPPROTO_ICMPV6_ && p->icmp_type >= 133 && p->icmp_type <= 137);
}

/*
 * Judges a packet between src (the sender's host veth, 0 when it is not a
 * pod of this node) and dst (the receiver's, 0 likewise): 0 to let it go,
 * -1 to drop it. A tracked flow passes; a new one needs the sender's
 * egress and the receiver's ingress policy, and is tracked when allowed.
 * Not inlined: one copy serves every program.
 */
static __attribute__((noinline)) int policy_check(const struct flow_key *fk, const struct parsed *p, __u32 src, __u32 dst)
{
	struct ep_policy *out = src ? bpf_map_lookup_elem(&ep_policy_v1, &src) : NULL;
	struct ep_policy *in = dst ? bpf_map_lookup_elem(&ep_policy_v1, &dst) : NULL;
	__u32 peer = 0;
	int why;

	int isolated = 0;

	/* Tested one by one behind a barrier: clang would OR the maybe-NULL
	 * pointers, which the verifier refuses. */
	if (out)
		isolated = 1;
	asm volatile("" : "+r"(isolated));
	if (in)
		isolated = 1;
	if (!isolated || policy_exempt(fk, p) || (src && src == dst))
		return 0; /* nobody isolated; ND and ICMP errors; a pod to itself */
	if (ct_known(fk, p->tcp_flags))
		return 0;
	if (out) {
		why = policy_judge(out, POLICY_EGRESS, fk, &peer);
		if (why) {
			policy_count(src, POLICY_EGRESS, 1);
			policy_report(src, POLICY_EGRESS, why, peer, fk);
			return -1;
		}
	}
	if (in) {
		why = policy_judge(in, POLICY_INGRESS, fk, &peer);
		if (why) {
			policy_count(dst, POLICY_INGRESS, 1);
			policy_report(dst, POLICY_INGRESS, why, peer, fk);
			return -1;
		}
	}
	if (out)
		policy_count(src, POLICY_EGRESS, 0);
	if (in)
		policy_count(dst, POLICY_INGRESS, 0);
	ct_track(fk);
	return 0;
}

/* A packet a host socket sends to a pod: allowed (its node), and tracked
 * when the pod is isolated, so the pod's replies pass its egress policy. */
static __always_inline void policy_from_host(const struct flow_key *fk, const struct parsed *p, __u32 dst)
{
	if (bpf_map_lookup_elem(&ep_policy_v1, &dst) && !ct_known(fk, p->tcp_flags))
		ct_track(fk);
}
