// SPDX-License-Identifier: (MIT OR GPL-2.0)
/*
 * mplslb kernel offload: the label switching fast path as an XDP program.
 *
 * One hash map, label -> entry, mirrors the rows of mplslb.switching.LabelSwitchingTable that may be switched
 * in the kernel. For a frame whose top label stack entry names an entry, and only when every check the userspace
 * fast path makes passes (ingress port, source MAC, IP source of the bottom-of-stack entry, bottom of stack,
 * the session's flow: the client's port and, on S2C labels, its address as the destination, TTL > 1) and the frame
 * is not a TCP FIN or RST the session manager must see, the program rewrites the Ethernet addresses (next hop,
 * output port), decrements the TTL, drops an 802.1Q tag as userspace does, counts the frame in the entry (with a
 * TCP segment's acknowledgment number, as userspace records it; a FIN's too, which goes up) and redirects it to the
 * output port. While a session's response time is measured (F_RT), the frames that tell it are recorded in its C2S
 * entry on the way (measure() below). Everything else is XDP_PASS: the daemon's packet socket gets it
 * and the userspace path forwards, reports or drops and counts it exactly as without the offload. One exception:
 * unlabelled TCP SYNs beyond a configured rate are shed here (syn_gate), before they cost the slow path anything.
 *
 * No kernel or libbpf headers: built with `clang -O2 -target bpf -c`, a generated header, mplslb_layout.h,
 * which holds every frame offset, bit and bound and struct entry, made from mplslb.switching.layout (the layout the
 * userspace paths read) by mplslb.offload.build, and mplslb_bpf.h (the BPF interface both programs share). The loader (mplslb.offload.bpf) creates the map and patches each
 * reference to it.
 */

#include "mplslb_layout.h" /* generated from mplslb.switching.layout: offsets, bits, struct entry */
#include "mplslb_bpf.h"    /* the BPF interface the programs share */

#define XDP_REDIRECT 4

struct map_ref labels SEC("maps");
struct map_ref syn_buckets SEC("maps"); /* per CPU, one struct syn_bucket */

static long (*bpf_redirect)(__u32 ifindex, __u64 flags) = (void *)23;

/*
 * F_RT: a session's response time is being measured, and the frames that tell it are recorded here instead of
 * going up to the session manager. The record is the C2S entry's (an S2C frame finds it under label - 1), and it
 * follows mplslb.sessions.SessionTable.observe frame by frame: each watched frame spends one of `rt_left`; the
 * server's first answer (TCP: a SYN-ACK; else any frame), the client's first payload (the request) and the
 * server's first payload after it (the response) are timed once; the client's pure ACK is timed whatever the
 * budget, the latest kept (one after the answer completes the handshake). The daemon folds the record into the
 * session table at its polls and before it handles any other frame of the session. A frame this cannot read as
 * one TCP or UDP packet under its IP header (a later fragment, an ICMP error, lengths that disagree) goes up, as
 * does, with F_L7, the request (L7 analysis reads it), after being timed. Returns XDP_PASS or XDP_REDIRECT.
 */
static __attribute__((always_inline)) int measure(struct entry *e, __u32 label, __u8 *ip, __u8 *end)
{
	__u32 l4, total;
	__u8 proto;
	if (e->flags & F_V6) {
		if (ip + IPV6_HLEN > end)
			return XDP_PASS;
		proto = ip[IPV6_NEXT_HEADER];
		l4 = IPV6_HLEN;
		total = IPV6_HLEN + ((ip[IPV6_PAYLOAD_LEN] << 8) | ip[IPV6_PAYLOAD_LEN + 1]);
	} else {
		if (ip + IPV4_HLEN > end)
			return XDP_PASS;
		if (((ip[IPV4_FRAG_AT] << 8) | ip[IPV4_FRAG_AT + 1]) & FRAG_OFFSET_MASK)
			return XDP_PASS;
		proto = ip[IPV4_PROTO];
		l4 = (ip[0] & IPV4_IHL_MASK) * IPV4_IHL_UNIT;
		total = (ip[IPV4_TOTAL_LEN] << 8) | ip[IPV4_TOTAL_LEN + 1];
	}
	if ((__u64)(end - ip) < total || l4 > total)
		return XDP_PASS;
	__u8 *l4p = ip + l4;
	__u32 payload;
	__u8 flags = 0;
	int segment = proto == IPPROTO_TCP;
	if (segment) {
		if (l4p + TCP_HLEN > end)
			return XDP_PASS;
		__u32 doff = (l4p[TCP_DOFF] >> DATA_OFFSET_SHIFT) * DATA_OFFSET_UNIT;
		if (doff < TCP_HLEN || l4 + doff > total)
			return XDP_PASS;
		payload = total - l4 - doff;
		flags = l4p[TCP_FLAGS];
	} else if (proto == IPPROTO_UDP) {
		if (l4p + UDP_HLEN > end)
			return XDP_PASS;
		__u32 length = (l4p[UDP_LEN] << 8) | l4p[UDP_LEN + 1];
		if (length < UDP_HLEN || l4 + length > total)
			return XDP_PASS;
		payload = length - UDP_HLEN;
	} else {
		return XDP_PASS;
	}
	__u64 now = bpf_ktime_get_ns();
	if ((label & 1) == (C2S_MIN & 1)) {
		if (segment && (flags & TCP_PURE_ACK_MASK) == TCP_ACK)
			e->ack_ns = now;
		if (e->rt_left) {
			if (payload && !e->request_ns) {
				e->request_ns = now;
				if (e->flags & F_L7)
					return XDP_PASS; /* the session manager reads it (and spends its own budget on it) */
			}
			e->rt_left -= 1;
		}
		if (e->answer_ns && e->ack_ns > e->answer_ns && (e->request_ns || !e->rt_left))
			e->flags &= ~F_RT; /* nothing more is wanted of the client's frames */
		return XDP_REDIRECT;
	}
	__u32 c2s = label - 1;
	struct entry *c = bpf_map_lookup_elem(&labels, &c2s);
	if (!c)
		return XDP_PASS; /* the record's entry is not in the kernel: the session manager watches */
	if (c->rt_left) {
		c->rt_left -= 1;
		if (!c->answer_ns) {
			if (!(e->flags & F_TCP_END) || (segment && (flags & TCP_SYN_ACK) == TCP_SYN_ACK)) {
				c->answer_ns = now;
				if (!(e->flags & F_TCP_END))
					c->rt_left = 0; /* a UDP (or other) flow's first reply times its request: done */
			}
		} else if (payload && c->request_ns && !c->response_ns) {
			c->response_ns = now;
			c->rt_left = 0;
		}
	}
	if (!c->rt_left)
		e->flags &= ~F_RT;
	return XDP_REDIRECT;
}

/*
 * An unlabelled TCP SYN (no ACK) costs the slow path a session's setup: this CPU's token bucket lets `rate` of
 * them a second through (bursts of up to `rate`) and drops the rest, counted as shed. Everything else passes.
 */
static __attribute__((always_inline)) int syn_gate(__u8 *ip, __u8 *end, __u16 ethertype)
{
	__u8 *tcp;
	if (ethertype == ETH_P_IP) {
		if (ip + IPV4_HLEN > end || ip[IPV4_PROTO] != IPPROTO_TCP)
			return XDP_PASS;
		if (((ip[IPV4_FRAG_AT] << 8) | ip[IPV4_FRAG_AT + 1]) & FRAG_OFFSET_MASK)
			return XDP_PASS;
		tcp = ip + (ip[0] & IPV4_IHL_MASK) * IPV4_IHL_UNIT;
	} else if (ethertype == ETH_P_IPV6) {
		if (ip + IPV6_HLEN > end || ip[IPV6_NEXT_HEADER] != IPPROTO_TCP)
			return XDP_PASS;
		tcp = ip + IPV6_HLEN;
	} else {
		return XDP_PASS;
	}
	if (tcp + TCP_FLAGS + 1 > end || (tcp[TCP_FLAGS] & SYN_MASK) != SYN_ONLY)
		return XDP_PASS;
	__u32 zero = 0;
	struct syn_bucket *b = bpf_map_lookup_elem(&syn_buckets, &zero);
	if (!b || !b->rate)
		return XDP_PASS;
	__u64 now = bpf_ktime_get_ns();
	__u64 full = b->rate * NS_PER_S;
	__u64 elapsed = now - b->last_ns;
	b->last_ns = now;
	if (elapsed >= NS_PER_S)
		b->credit = full; /* a second or more since the last SYN: the bucket is full (and no product overflows) */
	else if (b->credit + elapsed * b->rate > full)
		b->credit = full;
	else
		b->credit += elapsed * b->rate;
	if (b->credit >= NS_PER_S) {
		b->credit -= NS_PER_S;
		b->passed += 1;
		return XDP_PASS;
	}
	b->shed += 1;
	return XDP_DROP;
}

SEC("xdp")
int mplslb_xdp(struct xdp_md *ctx)
{
	__u8 *data = (__u8 *)(long)ctx->data;
	__u8 *end = (__u8 *)(long)ctx->data_end;
	__u64 len = end - data;
	__u32 off = LSE_AT;

	if (data + LABELLED_MIN > end)
		return XDP_PASS;
	__u16 ethertype = (data[ETH_TYPE] << 8) | data[ETH_TYPE + 1];
	if (ethertype == ETH_P_8021Q) {
		if (data + LABELLED_MIN + VLAN_HLEN > end)
			return XDP_PASS;
		ethertype = (data[VLAN_TYPE] << 8) | data[VLAN_TYPE + 1];
		off = LSE_AT + VLAN_HLEN;
	}
	if (ethertype != ETH_P_MPLS_UC)
		return syn_gate(data + off, end, ethertype);
	__u8 *lse = data + off;
	if (lse + LSE_LEN > end)
		return XDP_PASS;
	__u32 stack_entry = ((__u32)lse[0] << 24) | ((__u32)lse[1] << 16) | ((__u32)lse[2] << 8) | lse[3];
	__u32 label = stack_entry >> LABEL_SHIFT;
	struct entry *e = bpf_map_lookup_elem(&labels, &label);
	if (!e)
		return XDP_PASS;
	if (e->in_ifindex != ctx->ingress_ifindex)
		return XDP_PASS;
	for (int i = 0; i < ETH_ALEN; i++)
		if (data[ETH_SRC + i] != e->peer[i])
			return XDP_PASS;
	if (!(stack_entry & MPLS_BOS))
		return XDP_PASS;
	__u8 *ip = lse + LSE_LEN;
	if (e->ip_len) {
		__u8 *at = ip + ((e->flags & F_V6) ? IPV6_SRC : IPV4_SRC);
		if (e->ip_len == IPV6_ADDR_LEN) {
			if (at + IPV6_ADDR_LEN > end)
				return XDP_PASS;
			for (int i = 0; i < IPV6_ADDR_LEN; i++)
				if (at[i] != e->peer_ip[i])
					return XDP_PASS;
		} else {
			if (at + IPV4_ADDR_LEN > end)
				return XDP_PASS;
			for (int i = 0; i < IPV4_ADDR_LEN; i++)
				if (at[i] != e->peer_ip[i])
					return XDP_PASS;
		}
	}
	if (e->flags & F_FLOW) {
		/* the session's flow, as mplslb.switching.scalar.in_flow: a failing frame goes up to be dropped there */
		__u8 proto;
		__u32 l4;
		if (e->flags & F_V6) {
			if (ip + IPV6_HLEN > end)
				return XDP_PASS;
			for (int i = 0; i < IPV6_ADDR_LEN; i++)
				if (ip[IPV6_DST + i] != e->dst_ip[i])
					return XDP_PASS;
			proto = ip[IPV6_NEXT_HEADER];
			if (proto == IPPROTO_HOPOPTS || proto == IPPROTO_ROUTING || proto == IPPROTO_FRAGMENT ||
			    proto == IPPROTO_DSTOPTS || proto == IPPROTO_AH)
				return XDP_PASS; /* extension headers: userspace walks them */
			l4 = IPV6_HLEN;
		} else {
			if (ip + IPV4_HLEN > end)
				return XDP_PASS;
			for (int i = 0; i < IPV4_ADDR_LEN; i++)
				if (ip[IPV4_DST + i] != e->dst_ip[i])
					return XDP_PASS;
			if (((ip[IPV4_FRAG_AT] << 8) | ip[IPV4_FRAG_AT + 1]) & FRAG_OFFSET_MASK)
				goto flow_done; /* a fragment past the first carries no ports */
			proto = ip[IPV4_PROTO];
			l4 = (ip[0] & IPV4_IHL_MASK) * IPV4_IHL_UNIT;
		}
		if (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
			__u8 *ports = ip + l4;
			if (ports + L4_PORTS_LEN > end)
				return XDP_PASS;
			for (int i = 0; i < L4_PORTS_LEN; i++)
				if (ports[i] != e->ports[i])
					return XDP_PASS;
		}
	}
flow_done:
	if ((stack_entry & MPLS_TTL_MASK) <= 1)
		return XDP_PASS;
	__u64 ack = 0;
	if (e->flags & F_TCP_END) {
		__u32 tcp;
		if (e->flags & F_V6) {
			/* the flags only right after the fixed header; extension headers: userspace reads the frame */
			if (ip + IPV6_NEXT_HEADER + 1 > end)
				goto forward;
			if (ip[IPV6_NEXT_HEADER] != IPPROTO_TCP)
				return XDP_PASS;
			tcp = IPV6_HLEN;
		} else {
			if (ip + 1 > end)
				goto forward;
			tcp = (ip[0] & IPV4_IHL_MASK) * IPV4_IHL_UNIT;
		}
		/* past any frame XDP sees in one buffer: userspace would not find the flags in the frame either */
		if (tcp > MAX_TCP_OFFSET)
			goto forward;
		__u8 *th = ip + tcp;
		if (th + TCP_FLAGS + 1 <= end) {
			__u8 f = th[TCP_FLAGS];
			/* the segment's acknowledgment number, as mplslb.switching.scalar records it: ACK set, RST clear,
			 * and in IPv4 only TCP, no fragment past the first */
			if ((f & (TCP_ACK | TCP_RST)) == TCP_ACK &&
			    ((e->flags & F_V6) ||
			     (ip + IPV4_PROTO + 1 <= end && ip[IPV4_PROTO] == IPPROTO_TCP &&
			      !(((ip[IPV4_FRAG_AT] << 8) | ip[IPV4_FRAG_AT + 1]) & FRAG_OFFSET_MASK))))
				ack = ACK_KNOWN | ((__u64)th[TCP_ACK_AT] << 24) | ((__u64)th[TCP_ACK_AT + 1] << 16) |
				      ((__u64)th[TCP_ACK_AT + 2] << 8) | th[TCP_ACK_AT + 3];
			if (f & TCP_END) {
				/* userspace forwards it (every check passed) and records the same number: the entry
				 * keeps the label's last one either way */
				if (ack)
					e->ack = ack;
				return XDP_PASS;
			}
		}
	}
forward:
	if ((e->flags & F_RT) && measure(e, label, ip, end) != XDP_REDIRECT) {
		/* userspace forwards it and records the same number, as for a FIN above */
		if (ack)
			e->ack = ack;
		return XDP_PASS;
	}
	__sync_fetch_and_add(&e->packets, 1);
	__sync_fetch_and_add(&e->bytes, len);
	e->last_ns = bpf_ktime_get_ns();
	if (ack)
		e->ack = ack;
	__u32 out = e->out_ifindex;
	lse[LSE_TTL] -= 1; /* TTL > 1 here: the decrement stays in the TTL octet */
	if (off != LSE_AT) {
		/* userspace forwards a tagged frame untagged: drop the tag's octets in front of the MAC addresses */
		if (bpf_xdp_adjust_head(ctx, VLAN_HLEN))
			return XDP_PASS;
		data = (__u8 *)(long)ctx->data;
		end = (__u8 *)(long)ctx->data_end;
		if (data + ETH_HLEN > end)
			return XDP_PASS;
		data[ETH_TYPE] = ETH_P_MPLS_UC >> 8;
		data[ETH_TYPE + 1] = ETH_P_MPLS_UC & 0xff;
	}
	__builtin_memcpy(data + ETH_DST, e->rewrite, ETH_ADDRS);
	return bpf_redirect(out, 0);
}

char _license[] SEC("license") = "Dual MIT/GPL";
