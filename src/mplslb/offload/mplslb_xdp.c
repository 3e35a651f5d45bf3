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
 * unlabelled TCP SYNs beyond a configured rate are shed here (syn_gate), before they cost the slow path anything;
 * and, with tickets (offload_syn), a new TCP session's SYN is sent on here under a decision the daemon made ahead
 * (take_syn below).
 * The checks and the rewrite are one function, label_switch(), which the XDP entry point runs on every frame and,
 * built with -DGSO_FRAME_MAX (offload_gso), a tc ingress entry point on super-packets (see mplslb_tc below).
 * A TCP session's FIN the program can record for the daemon (F_FIN, take_fin() below) is forwarded too.
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
struct map_ref requests SEC("maps");    /* C2S label -> struct request, the slot of its first request (F_L7) */
struct map_ref tickets SEC("maps");      /* queue of C2S labels: the tickets ready to take (offload_syn) */
struct map_ref taken SEC("maps");        /* ring buffer (queue with TAKEN_QUEUE) of struct taken: the tickets taken, for the daemon */
struct map_ref syn_flows SEC("maps");    /* struct syn_flow -> C2S label: every live TCP session's flow */
struct map_ref services SEC("maps");     /* struct service_key -> 1: the (VIP, TCP port)s served */
struct map_ref client_ports SEC("maps"); /* ingress ifindex -> struct syn_port: the client ports */
struct map_ref ticket_counters SEC("maps"); /* per CPU, one __u64 per name of TICKET_COUNTERS */

static long (*bpf_redirect)(__u32 ifindex, __u64 flags) = (void *)23;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value, __u64 flags) = (void *)2;
static long (*bpf_map_delete_elem)(void *map, const void *key) = (void *)3;
static long (*bpf_xdp_adjust_tail)(struct xdp_md *ctx, int delta) = (void *)65;
static long (*bpf_map_push_elem)(void *map, const void *value, __u64 flags) = (void *)87;
static long (*bpf_map_pop_elem)(void *map, void *value) = (void *)88;
#ifdef TAKEN_QUEUE
#define taken_out(t) bpf_map_push_elem(&taken, (t), 0)
#else
static long (*bpf_ringbuf_output)(void *ringbuf, void *data, __u64 size, __u64 flags) = (void *)130;
#define BPF_RB_NO_WAKEUP 1 /* the daemon reads the ring when it folds, it does not wait on it */
#define taken_out(t) bpf_ringbuf_output(&taken, (t), sizeof(*(t)), BPF_RB_NO_WAKEUP)
#endif
#define BPF_NOEXIST 1

/*
 * F_L7: a session's first request, switched here, is copied into its label's slot of the request map (the daemon
 * created it with the entry, and reads it with the record): measure() finds the slot and notes where the payload
 * is, and the entry point, once the frame is switched, has the kernel copy its first REQUEST_COPY octets (a
 * truncated copy when the request is longer) there (bpf_xdp_load_bytes, bpf_skb_load_bytes: no loop for the
 * verifier to walk on every way through the switch), with its length, and then records the request's time, which
 * tells the daemon the copy is in place.
 */
struct request_copy {
	struct request *slot; /* the slot, or 0: nothing to copy */
	__u32 at;             /* where the request's payload starts, from the IP header */
	__u32 payload;        /* its length */
	__u64 now;            /* its time, for the record */
};

static long (*bpf_xdp_load_bytes)(struct xdp_md *ctx, __u32 offset, void *buf, __u32 len) = (void *)189;

/* How many octets of the request to copy (1 to REQUEST_COPY), and from where in the frame (its IP header at
 * `ip_at`); 0: none. */
static __attribute__((always_inline)) __u32 copy_length(struct request_copy *cp, __u32 ip_at, __u32 *from)
{
	__u32 n = cp->payload;
	if (n > REQUEST_COPY)
		n = REQUEST_COPY;
	*from = ip_at + cp->at;
	return n;
}

/* The copy is in place (`copied` octets; 0: the kernel could not copy them, and the slot says so): the request's
 * length, then its time into the record. */
static __attribute__((always_inline)) void request_copied(struct request_copy *cp, struct entry *e, long copied)
{
	cp->slot->len = cp->payload;
	cp->slot->copied = copied;
	e->request_ns = cp->now;
}

/*
 * F_RT: a session's response time is being measured, and the frames that tell it are recorded here instead of
 * going up to the session manager. The record is the C2S entry's (an S2C frame finds it under label - 1), and it
 * follows mplslb.sessions.SessionTable.observe frame by frame: each watched frame spends one of `rt_left`; the
 * server's first answer (TCP: a SYN-ACK; else any frame), the client's first payload (the request) and the
 * server's first payload after it (the response) are timed once; the client's pure ACK is timed whatever the
 * budget, the latest kept (one after the answer completes the handshake). The daemon folds the record into the
 * session table at its polls and before it handles any other frame of the session. A frame this cannot read as
 * one TCP or UDP packet under its IP header (a later fragment, an ICMP error, lengths that disagree) goes up, as
 * does, with F_L7, the request of a label without a request slot (L7 analysis reads it), after being timed; with
 * one, the request is noted in `cp` for the entry point to copy and time, and forwarded. Returns XDP_PASS or
 * XDP_REDIRECT.
 */
static __attribute__((always_inline)) int measure(struct entry *e, __u32 label, __u8 *ip, __u8 *end,
						  struct request_copy *cp)
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
	__u32 at; /* where the payload starts, from the IP header */
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
		at = l4 + doff;
		flags = l4p[TCP_FLAGS];
	} else if (proto == IPPROTO_UDP) {
		if (l4p + UDP_HLEN > end)
			return XDP_PASS;
		__u32 length = (l4p[UDP_LEN] << 8) | l4p[UDP_LEN + 1];
		if (length < UDP_HLEN || l4 + length > total)
			return XDP_PASS;
		payload = length - UDP_HLEN;
		at = l4 + UDP_HLEN;
	} else {
		return XDP_PASS;
	}
	__u64 now = bpf_ktime_get_ns();
	if ((label & 1) == (C2S_MIN & 1)) {
		if (segment && (flags & TCP_PURE_ACK_MASK) == TCP_ACK)
			e->ack_ns = now;
		if (e->rt_left) {
			if (payload && !e->request_ns) {
				if (e->flags & F_L7)
					cp->slot = bpf_map_lookup_elem(&requests, &label);
				if (!cp->slot) {
					e->request_ns = now;
					if (e->flags & F_L7) {
						if (e->answer_ns && e->ack_ns > e->answer_ns)
							e->flags &= ~F_RT; /* as below: the session manager stops watching there too */
						return XDP_PASS; /* the session manager reads it (and spends its own budget) */
					}
				} else {
					cp->at = at; /* copied, and timed, by the entry point once the frame is switched */
					cp->payload = payload;
					cp->now = now;
				}
			}
			e->rt_left -= 1;
		}
		if (e->answer_ns && e->ack_ns > e->answer_ns && (e->request_ns || cp->slot || !e->rt_left))
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

/* The IPv4 header without options at `ip` (IPV4_HLEN octets readable) sums to all ones: its checksum is right. */
static __attribute__((always_inline)) int ipv4_checksum_ok(__u8 *ip)
{
	__u32 sum = 0;
	for (int i = 0; i < IPV4_HLEN; i += 2)
		sum += (ip[i] << 8) | ip[i + 1];
	sum = (sum & CHECKSUM_OK) + (sum >> 16);
	sum = (sum & CHECKSUM_OK) + (sum >> 16);
	return sum == CHECKSUM_OK;
}

/*
 * F_FIN: the FIN of a TCP session (RST clear) under `label` (entry `e`), every check passed, arriving in the frame
 * as one TCP segment the session manager would read whole (IPv4 without options, its header checksum right, no
 * fragment past the first; IPv6 with TCP right after the fixed header; the lengths agreeing; no TCP options but
 * Linux's timestamps: mplslb.analyzer reads all these), is recorded in the label's entry and forwarded instead of
 * going up: its sequence number, the other label's last acknowledgment number as it passes (the session manager
 * judges a closing FIN by it; an S2C label is its C2S label + 1), and the time. Only the first FIN under the label,
 * and only once neither entry of the session has F_RT (the session manager watches none of the session's frames):
 * a second FIN, and any FIN the program cannot take, goes up as ever (the daemon folds the record first). Returns 1
 * when recorded (the caller forwards the frame), else 0 (it goes up).
 */
static __attribute__((always_inline)) int take_fin(struct entry *e, __u32 label, __u8 *ip, __u8 *end)
{
	if (e->fin_taken || (e->flags & F_RT))
		return 0;
	__u32 total, l4;
	if (e->flags & F_V6) {
		if (ip + IPV6_HLEN > end || (ip[0] >> IP_VERSION_SHIFT) != IP_VERSION_6)
			return 0;
		total = IPV6_HLEN + ((ip[IPV6_PAYLOAD_LEN] << 8) | ip[IPV6_PAYLOAD_LEN + 1]);
		l4 = IPV6_HLEN; /* the caller found TCP there */
	} else {
		if (ip + IPV4_HLEN > end || ip[0] != IPV4_PLAIN || ip[IPV4_PROTO] != IPPROTO_TCP)
			return 0;
		if (((ip[IPV4_FRAG_AT] << 8) | ip[IPV4_FRAG_AT + 1]) & FRAG_OFFSET_MASK)
			return 0;
		if (!ipv4_checksum_ok(ip))
			return 0;
		total = (ip[IPV4_TOTAL_LEN] << 8) | ip[IPV4_TOTAL_LEN + 1];
		l4 = IPV4_HLEN;
	}
	__u8 *th = ip + l4;
	if ((__u64)(end - ip) < total || l4 + TCP_HLEN > total || th + TCP_HLEN > end)
		return 0;
	__u32 doff = (th[TCP_DOFF] >> DATA_OFFSET_SHIFT) * DATA_OFFSET_UNIT;
	if (doff < TCP_HLEN || l4 + doff > total)
		return 0;
	/* no options, or the timestamps alone as Linux sends them (NOP, NOP, TS): well formed as mplslb.wire.tcp reads
	 * them; any other options go up */
	if (doff != TCP_HLEN) {
		if (doff != TCP_HLEN + TCP_TS_ALIGNED_LEN || th + TCP_HLEN + OPTION_HLEN + OPTION_HLEN > end)
			return 0;
		if (th[TCP_HLEN] != TCPOPT_NOP || th[TCP_HLEN + 1] != TCPOPT_NOP || th[TCP_HLEN + 2] != TCPOPT_TIMESTAMP ||
		    th[TCP_HLEN + 3] != TCPOLEN_TIMESTAMP)
			return 0;
	}
	__u32 other = (label & 1) == (C2S_MIN & 1) ? label + 1 : label - 1;
	struct entry *o = bpf_map_lookup_elem(&labels, &other);
	if (!o || (o->flags & F_RT))
		return 0;
	e->fin_seq = ((__u32)th[TCP_SEQ_AT] << 24) | ((__u32)th[TCP_SEQ_AT + 1] << 16) | ((__u32)th[TCP_SEQ_AT + 2] << 8) |
		     th[TCP_SEQ_AT + 3];
	e->fin_ack = o->ack;
	e->fin_ns = bpf_ktime_get_ns();
	e->fin_taken = 1; /* last: a record the daemon reads with fin_taken set is whole */
	return 1;
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

/*
 * Tickets (offload_syn): a new TCP session's SYN decided here instead of in the daemon. The daemon keeps label pairs
 * pre-decided (admission, server, labels: what it would decide for any SYN with an algorithm that does not read the
 * flow), their entries written with everything that does not depend on the client and flagged F_TICKET (every
 * frame under them goes up meanwhile), and their C2S labels in the ticket queue. A SYN the daemon would open a
 * session for and nothing else, read exactly as the analyzer reads it (take_syn), takes one: the client's fields
 * are filled into both entries, the frame leaves for the ticket's server under the C2S label as the userspace path
 * would send it, and the daemon learns of it from the taken ring. Anything else goes up untouched.
 */
static __attribute__((always_inline)) void ticket_count(__u32 what)
{
	__u64 *n = bpf_map_lookup_elem(&ticket_counters, &what);
	if (n)
		*n += 1;
}

/* The client's fields of a SYN taken (`t`, the frame's parts), into the ticket's two entries. */
static __attribute__((always_inline)) void fill_ticket(struct entry *c, struct entry *s, struct taken *t,
						       struct syn_port *port)
{
	__u8 v6 = t->t_family == FAMILY_V6 ? F_V6 : 0;
	__u8 len = v6 ? IPV6_ADDR_LEN : IPV4_ADDR_LEN;
	c->in_ifindex = t->t_ifindex;
	s->out_ifindex = t->t_ifindex;
	for (int i = 0; i < ETH_ALEN; i++) {
		c->peer[i] = t->t_mac[i];
		s->rewrite[i] = t->t_mac[i];
		s->rewrite[ETH_ALEN + i] = port->port_mac[i];
	}
	c->ip_len = len;
	s->ip_len = len;
	for (int i = 0; i < IPV6_ADDR_LEN; i++) {
		c->peer_ip[i] = t->t_src[i];
		c->dst_ip[i] = t->t_dst[i];
		s->peer_ip[i] = t->t_dst[i];
		s->dst_ip[i] = t->t_src[i];
	}
	c->ports[0] = t->t_ports[0];
	c->ports[1] = t->t_ports[1];
	c->ports[2] = t->t_ports[2];
	c->ports[3] = t->t_ports[3];
	s->ports[0] = t->t_ports[2];
	s->ports[1] = t->t_ports[3];
	s->ports[2] = t->t_ports[0];
	s->ports[3] = t->t_ports[1];
	c->flags |= v6;
	s->flags |= v6;
	c->packets = 1;
	c->bytes = t->t_len;
	c->last_ns = t->t_ns;
}

/*
 * A SYN on a flow still in the flow map whose session (C2S label `c2s`) the kernel saw close: both labels' FINs
 * taken here (take_fin()), the SYN from the session's client (its bound MAC, on its port). That is the client's
 * port used again before the daemon's poll took the flow out of the map; the SYN may take a ticket, the flow's
 * value becomes the new session's, and the fold ends the old session as a reused flow's, as the userspace path
 * does with such a SYN. Any other SYN on a flow in the map goes up.
 */
static __attribute__((always_inline)) int flow_closed(__u32 c2s, __u8 *mac, __u32 ifindex)
{
	__u32 s2c = c2s + 1;
	struct entry *c = bpf_map_lookup_elem(&labels, &c2s);
	struct entry *s = bpf_map_lookup_elem(&labels, &s2c);
	if (!c || !s || !c->fin_taken || !s->fin_taken || ((c->flags | s->flags) & F_TICKET) ||
	    c->in_ifindex != ifindex)
		return 0;
	for (int i = 0; i < ETH_ALEN; i++)
		if (c->peer[i] != mac[i])
			return 0;
	return 1;
}

/*
 * An unlabelled frame on a client port: XDP_REDIRECT when it is a SYN taken under a ticket (the frame rebuilt as
 * the labelled one for the server), else XDP_PASS, the frame untouched. Taken only: one 802.1Q tag at most; IPv4
 * without options, its header checksum right, no fragment (nor a first one), or IPv6 with TCP right after the fixed
 * header; the IP length within the frame; TCP with SYN among SYN, ACK, RST, FIN, no payload, options that
 * mplslb.wire.tcp reads (each kind's length whole within the header); to a (VIP, port) of the service map, on a
 * flow not in the flow map (the program adds it first: a retransmitted SYN of a session goes up to it), or on the
 * flow of a session closed in the kernel (flow_closed()).
 */
static __attribute__((always_inline)) int take_syn(struct xdp_md *ctx)
{
	__u8 *data = (__u8 *)(long)ctx->data;
	__u8 *end = (__u8 *)(long)ctx->data_end;
	__u32 ifindex = ctx->ingress_ifindex;
	struct syn_port *port = bpf_map_lookup_elem(&client_ports, &ifindex);
	if (!port)
		return XDP_PASS;
	__u32 off = ETH_HLEN;
	if (data + ETH_HLEN + VLAN_HLEN > end)
		return XDP_PASS;
	__u16 ethertype = (data[ETH_TYPE] << 8) | data[ETH_TYPE + 1];
	if (ethertype == ETH_P_8021Q) {
		ethertype = (data[VLAN_TYPE] << 8) | data[VLAN_TYPE + 1];
		off = ETH_HLEN + VLAN_HLEN;
	}
	__u8 *ip = data + off;
	struct taken t = {0};
	struct service_key svc = {0};
	__u32 total, l4;
	__u8 ttl, tos;
	if (ethertype == ETH_P_IP) {
		if (ip + IPV4_HLEN > end || ip[0] != IPV4_PLAIN || ip[IPV4_PROTO] != IPPROTO_TCP)
			return XDP_PASS;
		if (((ip[IPV4_FRAG_AT] << 8) | ip[IPV4_FRAG_AT + 1]) & (FRAG_OFFSET_MASK | IPV4_MORE_FRAGMENTS))
			return XDP_PASS;
		if (!ipv4_checksum_ok(ip))
			return XDP_PASS;
		total = (ip[IPV4_TOTAL_LEN] << 8) | ip[IPV4_TOTAL_LEN + 1];
		l4 = IPV4_HLEN;
		ttl = ip[IPV4_TTL_AT];
		tos = ip[IPV4_TOS_AT];
		t.t_family = FAMILY_V4;
		for (int i = 0; i < IPV4_ADDR_LEN; i++) {
			t.t_src[i] = ip[IPV4_SRC + i];
			t.t_dst[i] = ip[IPV4_DST + i];
		}
	} else if (ethertype == ETH_P_IPV6) {
		if (ip + IPV6_HLEN > end || (ip[0] >> IP_VERSION_SHIFT) != IP_VERSION_6 ||
		    ip[IPV6_NEXT_HEADER] != IPPROTO_TCP)
			return XDP_PASS;
		total = IPV6_HLEN + ((ip[IPV6_PAYLOAD_LEN] << 8) | ip[IPV6_PAYLOAD_LEN + 1]);
		l4 = IPV6_HLEN;
		ttl = ip[IPV6_HOP_LIMIT_AT];
		/* the traffic class straddles the version nibble's octet and the next (a __u8 keeps its 8 bits) */
		tos = (ip[0] << IP_VERSION_SHIFT) | (ip[1] >> IP_VERSION_SHIFT);
		t.t_family = FAMILY_V6;
		for (int i = 0; i < IPV6_ADDR_LEN; i++) {
			t.t_src[i] = ip[IPV6_SRC + i];
			t.t_dst[i] = ip[IPV6_DST + i];
		}
	} else {
		return XDP_PASS;
	}
	__u8 *th = ip + l4;
	if ((__u64)(end - ip) < total || l4 + TCP_HLEN > total || th + TCP_HLEN > end)
		return XDP_PASS;
	__u32 doff = (th[TCP_DOFF] >> DATA_OFFSET_SHIFT) * DATA_OFFSET_UNIT;
	if (doff < TCP_HLEN || l4 + doff != total)
		return XDP_PASS; /* a header longer than the segment, or payload */
	if ((th[TCP_FLAGS] & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN)) != TCP_SYN)
		return XDP_PASS;
	/* the options, as mplslb.wire.tcp reads them: a kind without its length, or a length out of the header,
	 * goes up (the analyzer drops it). Copied to the stack and walked octet by octet (`next`: where the next kind
	 * is), a walk the verifier follows position by position. */
	__u32 optlen = doff - TCP_HLEN;
	if (optlen) {
		__u8 opts[TCP_OPTIONS_MAX + 1] = {0};
		if (optlen > TCP_OPTIONS_MAX ||
		    bpf_xdp_load_bytes(ctx, off + l4 + TCP_HLEN, opts, optlen))
			return XDP_PASS;
		__u32 next = 0;
#pragma clang loop unroll(full)
		for (int i = 0; i < TCP_OPTIONS_MAX; i++) {
			if (i < optlen && i == next) {
				if (opts[i] == TCPOPT_EOL) {
					next = TCP_OPTIONS_MAX + 1;
				} else if (opts[i] == TCPOPT_NOP) {
					next = i + 1;
				} else {
					if (i + OPTION_HLEN > optlen || opts[i + 1] < OPTION_HLEN || i + opts[i + 1] > optlen)
						return XDP_PASS;
					next = i + opts[i + 1];
				}
			}
		}
	}
	for (int i = 0; i < L4_PORTS_LEN; i++)
		t.t_ports[i] = th[i];
	for (int i = 0; i < IPV6_ADDR_LEN; i++)
		svc.svc_addr[i] = t.t_dst[i];
	svc.svc_port[0] = th[L4_DPORT];
	svc.svc_port[1] = th[L4_DPORT + 1];
	svc.svc_family = t.t_family;
	if (!bpf_map_lookup_elem(&services, &svc))
		return XDP_PASS;
	struct syn_flow flow = {0};
	for (int i = 0; i < IPV6_ADDR_LEN; i++) {
		flow.fl_src[i] = t.t_src[i];
		flow.fl_dst[i] = t.t_dst[i];
	}
	for (int i = 0; i < L4_PORTS_LEN; i++)
		flow.fl_ports[i] = t.t_ports[i];
	flow.fl_family = t.t_family;
	__u32 none = 0;
	__u32 closed = 0; /* the C2S label of the closed session whose flow this is: its entry stays in the flow map */
	if (bpf_map_update_elem(&syn_flows, &flow, &none, BPF_NOEXIST)) {
		__u32 *live = bpf_map_lookup_elem(&syn_flows, &flow);
		if (!live || !*live || !flow_closed(*live, data + ETH_SRC, ifindex)) {
			ticket_count(SYN_FLOW_LIVE);
			return XDP_PASS;
		}
		closed = *live;
	}
	__u32 c2s;
	if (bpf_map_pop_elem(&tickets, &c2s)) {
		if (!closed)
			bpf_map_delete_elem(&syn_flows, &flow);
		ticket_count(SYN_NO_TICKET);
		return XDP_PASS;
	}
	__u32 s2c = c2s + 1;
	struct entry *c = bpf_map_lookup_elem(&labels, &c2s);
	struct entry *s = bpf_map_lookup_elem(&labels, &s2c);
	if (!c || !s || !(c->flags & F_TICKET) || !(s->flags & F_TICKET)) {
		if (!closed) /* a ticket revoked meanwhile: the daemon has let it go */
			bpf_map_delete_elem(&syn_flows, &flow);
		ticket_count(SYN_NO_TICKET);
		return XDP_PASS;
	}
	__u64 len = end - data;
	t.t_c2s = c2s;
	t.t_ifindex = ifindex;
	t.t_len = len;
	t.t_ns = bpf_ktime_get_ns();
	for (int i = 0; i < ETH_ALEN; i++)
		t.t_mac[i] = data[ETH_SRC + i];
	fill_ticket(c, s, &t, port);
	t.t_closed = closed != 0;
	__u32 *value = bpf_map_lookup_elem(&syn_flows, &flow);
	if (value)
		*value = c2s;
	if (taken_out(&t)) {
		/* never (the ring holds as many records as there are tickets): the ticket goes back, the SYN goes up */
		if (closed) {
			if (value)
				*value = closed;
		} else {
			bpf_map_delete_elem(&syn_flows, &flow);
		}
		bpf_map_push_elem(&tickets, &c2s, 0);
		ticket_count(SYN_NO_TICKET);
		return XDP_PASS;
	}
	s->flags &= ~F_TICKET;
	asm volatile("" ::: "memory");
	c->flags &= ~F_TICKET; /* last: the entries are whole */
	ticket_count(SYN_TAKEN);
	/* the frame as Balancer._to_server sends it: the entry's addresses, one label stack entry (the C2S label,
	 * TC from the TOS, bottom of stack, the IP TTL), the IP packet without a tag or Ethernet padding */
	__u32 stack_entry = (c2s << LABEL_SHIFT) | ((__u32)(tos >> TOS_TO_TC) << TC_SHIFT) | MPLS_BOS | ttl;
	__u32 out = c->out_ifindex;
	__u8 rewrite[ETH_ADDRS];
	__builtin_memcpy(rewrite, c->rewrite, ETH_ADDRS);
	if (off == ETH_HLEN && bpf_xdp_adjust_head(ctx, -(int)LSE_LEN))
		return XDP_DROP; /* taken: the daemon opens the session, the client sends its SYN again */
	data = (__u8 *)(long)ctx->data;
	end = (__u8 *)(long)ctx->data_end;
	__u64 want = IP_AT + total;
	if ((__u64)(end - data) > want && bpf_xdp_adjust_tail(ctx, -(int)((end - data) - want)))
		return XDP_DROP;
	data = (__u8 *)(long)ctx->data;
	end = (__u8 *)(long)ctx->data_end;
	if (data + IP_AT > end)
		return XDP_DROP;
	__builtin_memcpy(data + ETH_DST, rewrite, ETH_ADDRS);
	data[ETH_TYPE] = ETH_P_MPLS_UC >> 8;
	data[ETH_TYPE + 1] = ETH_P_MPLS_UC & 0xff;
	data[LSE_AT] = stack_entry >> 24;
	data[LSE_AT + 1] = stack_entry >> 16;
	data[LSE_AT + 2] = stack_entry >> 8;
	data[LSE_AT + 3] = stack_entry;
	return bpf_redirect(out, 0);
}

/*
 * A frame as the label switch below sees it, whichever hook it came through: its readable octets [data, end), its
 * whole length (a super-packet's goes past end), the port it came in on. The switch fills in the rest: for a frame
 * it switches, the entry and where the label stack entry sits; for one it passes up, how far it got (`why`, the
 * tc program's drop reason) and, for a TCP FIN or RST, the TCP header's offset.
 */
struct frame {
	__u8 *data;
	__u8 *end;
	__u64 len;
	__u32 ingress_ifindex;
	__u32 why;
	__u32 off;
	__u32 tcp;
	struct entry *e;
	__u32 take_fin; /* the XDP entry point: a FIN may be recorded and forwarded (take_fin) */
	struct request_copy copy; /* F_L7: a request to copy once the frame is switched */
};

/*
 * The label switch, shared by the XDP and the tc entry points: XDP_REDIRECT when every check passed (the entry
 * counted, the TTL decremented; the caller drops a VLAN tag, writes the addresses and redirects to
 * fr->e->out_ifindex), XDP_PASS when the session manager must see the frame, XDP_DROP for a shed SYN.
 */
static __attribute__((always_inline)) int label_switch(struct frame *fr)
{
	__u8 *data = fr->data;
	__u8 *end = fr->end;
	__u64 len = fr->len;
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
	fr->why = GSO_UNKNOWN_LABEL;
	__u8 *lse = data + off;
	if (lse + LSE_LEN > end)
		return XDP_PASS;
	__u32 stack_entry = ((__u32)lse[0] << 24) | ((__u32)lse[1] << 16) | ((__u32)lse[2] << 8) | lse[3];
	__u32 label = stack_entry >> LABEL_SHIFT;
	struct entry *e = bpf_map_lookup_elem(&labels, &label);
	if (!e)
		return XDP_PASS;
	fr->e = e;
	fr->why = GSO_CHECK_FAILED;
	if (e->flags & F_TICKET)
		return XDP_PASS; /* a ticket not taken yet: its fields are not the session's */
	if (e->in_ifindex != fr->ingress_ifindex)
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
	fr->why = GSO_TTL_EXPIRED;
	if ((stack_entry & MPLS_TTL_MASK) <= 1)
		return XDP_PASS;
	fr->why = GSO_WATCHED;
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
				fr->why = GSO_TCP_END;
				fr->tcp = off + LSE_LEN + tcp;
				/* userspace forwards it (every check passed) and records the same number: the entry
				 * keeps the label's last one either way */
				if (ack)
					e->ack = ack;
				if (fr->take_fin && (f & TCP_END) == TCP_FIN && (e->flags & F_FIN) &&
				    take_fin(e, label, ip, end))
					goto forward; /* F_RT is clear: nothing to measure */
				return XDP_PASS;
			}
		}
	}
forward:
	if ((e->flags & F_RT) && measure(e, label, ip, end, &fr->copy) != XDP_REDIRECT) {
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
	lse[LSE_TTL] -= 1; /* TTL > 1 here: the decrement stays in the TTL octet */
	fr->off = off;
	return XDP_REDIRECT;
}

SEC("xdp")
int mplslb_xdp(struct xdp_md *ctx)
{
	__u8 *data = (__u8 *)(long)ctx->data;
	__u8 *end = (__u8 *)(long)ctx->data_end;
#ifdef GSO_FRAME_MAX
	/* longer than one segment: a super-packet (GRO, or GSO from a veth), which a redirect from here would drop
	 * (longer than the output's MTU); it goes on to the tc program */
	if (end - data > GSO_FRAME_MAX)
		return XDP_PASS;
#endif
	struct frame fr = {data, end, end - data, ctx->ingress_ifindex, GSO_PASSED_UNLABELLED, LSE_AT, 0, 0, 1};
	int verdict = label_switch(&fr);
	if (verdict == XDP_PASS && fr.why == GSO_PASSED_UNLABELLED)
		return take_syn(ctx);
	if (verdict != XDP_REDIRECT)
		return verdict;
	struct entry *e = fr.e;
	if (fr.copy.slot) {
		__u32 from, n = copy_length(&fr.copy, fr.off + LSE_LEN, &from);
		int done = n && n <= REQUEST_COPY && !bpf_xdp_load_bytes(ctx, from, fr.copy.slot->data, n);
		request_copied(&fr.copy, e, done ? n : 0);
	}
	if (fr.off != LSE_AT) {
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
	return bpf_redirect(e->out_ifindex, 0);
}

#ifdef GSO_FRAME_MAX
/*
 * offload_gso: super-packets. On a veth, GRO and the sender's GSO deliver frames of many segments in one skb; the
 * XDP program above cannot redirect one (the redirect checks the output's MTU and drops it) and the daemon's packet
 * sockets do not take one (their filter stops at GSO_FRAME_MAX: a packet socket could not send it on either). They
 * meet this program at tc ingress instead, which runs the same label switch on the skb's headers and hands the skb,
 * its GSO state untouched, straight to the output port's peer (bpf_redirect_peer: another round of receive in the
 * peer's namespace, so the far end's XDP still sees it, which a plain redirect would skip), to be segmented, if at
 * all, where it leaves the last host. Shorter frames (the daemon's) and unlabelled ones (the host's) are left alone.
 *
 * Two things the session manager learns from frames are kept: a session's response time under measurement (F_RT)
 * is recorded from the whole packet, pulled into the skb's linear part first (a session's first frames only); and
 * a FIN, which must reach the session manager (or be recorded, take_fin: never a super-packet's, whose header's
 * sequence number is its first segment's) and which no packet socket can take on a super-packet, is cleared
 * from it (the segment's checksum follows): the data goes on, the receiver acknowledges it without the FIN, and the
 * sender sends the FIN again alone, a short frame the XDP program records or passes up. An RST, and every frame the
 * switch would pass up for another reason, is dropped and counted by reason (gso_counters, GSO_COUNTERS' order).
 */
struct map_ref gso_counters SEC("maps"); /* per CPU, one __u64 per name of GSO_COUNTERS */

static long (*bpf_l4_csum_replace)(struct __sk_buff *skb, __u32 offset, __u64 from, __u64 to, __u64 flags) = (void *)11;
static long (*bpf_skb_vlan_pop)(struct __sk_buff *skb) = (void *)19;
static long (*bpf_redirect_peer)(__u32 ifindex, __u64 flags) = (void *)155;
static long (*bpf_skb_load_bytes)(const void *skb, __u32 offset, void *to, __u32 len) = (void *)26;

static __attribute__((always_inline)) void gso_count(__u32 what)
{
	__u64 *n = bpf_map_lookup_elem(&gso_counters, &what);
	if (n)
		*n += 1;
}

/* Clear the FIN of the TCP header at `tcp` (not an RST's); 1 when done. The checksum follows the flags (a partial
 * one, as every super-packet's, covers only the pseudo-header and stays). */
static __attribute__((always_inline)) int clear_fin(struct __sk_buff *skb, struct frame *fr)
{
	if (fr->tcp > MAX_TCP_OFFSET)
		return 0;
	__u8 *th = fr->data + fr->tcp;
	if (th + TCP_CHECK_AT + 2 > fr->end || (th[TCP_FLAGS] & TCP_END) != TCP_FIN)
		return 0;
	__u16 old, new;
	__builtin_memcpy(&old, th + TCP_DOFF, 2); /* the 16-bit word of the data offset and the flags */
	th[TCP_FLAGS] &= ~TCP_FIN;
	__builtin_memcpy(&new, th + TCP_DOFF, 2);
	return !bpf_l4_csum_replace(skb, fr->tcp + TCP_CHECK_AT, old, new, sizeof(new));
}

SEC("tc")
int mplslb_tc(struct __sk_buff *skb)
{
	if (skb->len <= GSO_FRAME_MAX)
		return TC_ACT_OK; /* the daemon's packet socket has it */
	__u8 *data = (__u8 *)(long)skb->data;
	__u8 *end = (__u8 *)(long)skb->data_end;
	if (data + ETH_HLEN > end || data[ETH_TYPE] != ETH_P_MPLS_UC >> 8 || data[ETH_TYPE + 1] != (ETH_P_MPLS_UC & 0xff)) {
		gso_count(GSO_PASSED_UNLABELLED);
		return TC_ACT_OK; /* the host's own traffic */
	}
	/* the kernel took a tag off into the skb before this hook; userspace forwards a tagged frame untagged */
	if (skb->vlan_present && bpf_skb_vlan_pop(skb)) {
		gso_count(GSO_VLAN_POP_FAILED);
		return TC_ACT_SHOT;
	}
	struct frame fr = {0};
	int verdict = XDP_PASS, whole = 0, cleared = 0;
	for (int round = 0; round < 3; round++) {
		if (bpf_skb_pull_data(skb, whole ? skb->len : GSO_HEADERS)) {
			gso_count(GSO_PULL_FAILED);
			return TC_ACT_SHOT;
		}
		fr = (struct frame){(__u8 *)(long)skb->data, (__u8 *)(long)skb->data_end, skb->len, skb->ingress_ifindex,
				    GSO_UNKNOWN_LABEL, LSE_AT, 0, 0};
		verdict = label_switch(&fr);
		if (verdict == XDP_REDIRECT)
			break;
		if (fr.why == GSO_TCP_END && !cleared && clear_fin(skb, &fr))
			cleared = 1; /* and switched again, a segment without FIN */
		else if (fr.why == GSO_WATCHED && !whole && fr.e && (fr.e->flags & F_RT))
			whole = 1; /* and switched again, the whole packet readable for the measurement */
		else
			break;
	}
	if (verdict != XDP_REDIRECT || !fr.e) {
		gso_count(fr.why);
		return TC_ACT_SHOT;
	}
	if (fr.copy.slot) {
		__u32 from, n = copy_length(&fr.copy, fr.off + LSE_LEN, &from);
		int done = n && n <= REQUEST_COPY && !bpf_skb_load_bytes(skb, from, fr.copy.slot->data, n);
		request_copied(&fr.copy, fr.e, done ? n : 0);
	}
	__builtin_memcpy(fr.data + ETH_DST, fr.e->rewrite, ETH_ADDRS);
	__u32 out = fr.e->out_ifindex;
	gso_count(GSO_FORWARDED);
	if (cleared)
		gso_count(GSO_FIN_CLEARED);
	return bpf_redirect_peer(out, 0);
}
#endif

char _license[] SEC("license") = "Dual MIT/GPL";
