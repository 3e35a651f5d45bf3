// SPDX-License-Identifier: (MIT OR GPL-2.0)
/*
 * mplslb endpoints' kernel datapath: the label handling of mplslb.endpoint (ServerEndpoint, ClientEndpoint) as
 * an XDP program on the wire interface's ingress and a SCHED_CLS program on its egress.
 *
 * Ingress ("xdp/server", "xdp/client", generic XDP): a labelled frame's stack is taken off and the IP packet goes
 * to the host's stack; the flow it belongs to is remembered, keyed as the host will send its replies, with the
 * label to answer with (server: L + 1, client: M - 1) and the MAC address to send them to. Frames without a label
 * (ARP, ND, health checks, a client's unlabelled refusals) pass untouched.
 *
 * Egress ("tc/server", "tc/client", direct action): a packet of a remembered flow gets the label pushed and leaves
 * for the balancer's MAC address. Server: packets not from a virtual IP pass untouched, packets from one without a
 * flow are dropped (no_session_label). Client: packets not to a virtual IP pass untouched, a flow's first packet
 * goes unlabelled to the balancer, a pure SYN forgets the flow.
 *
 * ICMP errors go with the flow of the datagram they quote, as in the Python endpoint.
 *
 * What the programs drop is counted under the reason the Python endpoint gives it (counters map, indexes EP_*).
 * The maps are created by the loader (mplslb.offload.endpoint), which patches every reference to them. No kernel
 * or libbpf headers: built with clang, the header generated from mplslb.switching.layout (mplslb_layout.h) and
 * mplslb_bpf.h (the BPF interface both programs share).
 */

#include "mplslb_layout.h" /* generated from mplslb.switching.layout: offsets, bits, structs */
#include "mplslb_bpf.h"    /* the BPF interface the programs share */

#define INLINE static inline __attribute__((always_inline))

#define XDP_DROP 1
#define OK EP_COUNTERS /* analyze(): no reason to drop */

struct map_ref flows SEC("maps");    /* LRU hash: struct flow_key -> struct flow */
struct map_ref vips SEC("maps");     /* hash: struct vip_key -> __u32 */
struct map_ref config SEC("maps");   /* array of one struct endpoint_config */
struct map_ref counters SEC("maps"); /* per-CPU array of EP_COUNTERS __u64 */
struct map_ref scratch SEC("maps");  /* per-CPU array of one __u64: where an ICMP error's quote lies */

static long (*bpf_map_update_elem)(void *map, const void *key, const void *value, __u64 flags) = (void *)2;
static long (*bpf_map_delete_elem)(void *map, const void *key) = (void *)3;
static long (*bpf_skb_change_head)(struct __sk_buff *skb, __u32 len, __u64 flags) = (void *)43;

/* Each CPU counts in its own slot (both programs run with bottom halves off, so one CPU's counts never interleave):
 * no atomic operation on a cache line every CPU writes, for every frame through. The agent sums the slots. */
INLINE void count(__u32 what)
{
	__u64 *c = bpf_map_lookup_elem(&counters, &what);
	if (c)
		*c += 1;
}

INLINE int same_mac(const __u8 *a, const __u8 *b)
{
	__u8 diff = 0;
#pragma unroll
	for (int i = 0; i < ETH_ALEN; i++)
		diff |= a[i] ^ b[i];
	return diff == 0;
}

INLINE __u32 be16(const __u8 *p)
{
	return ((__u32)p[0] << 8) | p[1];
}

INLINE int is_ext(__u32 proto)
{
	return proto == IPPROTO_HOPOPTS || proto == IPPROTO_ROUTING || proto == IPPROTO_DSTOPTS ||
	       proto == IPPROTO_FRAGMENT || proto == IPPROTO_AH;
}

INLINE int is_vip(const __u8 *addr, __u32 family)
{
	struct vip_key k = {};
	if (family == FAMILY_V4)
		__builtin_memcpy(k.addr, addr, IPV4_ADDR_LEN);
	else
		__builtin_memcpy(k.addr, addr, IPV6_ADDR_LEN);
	k.vfamily = family;
	return bpf_map_lookup_elem(&vips, &k) != 0;
}

/* v as a number the verifier knows nothing of, by way of the per-CPU scratch map: a loop's exits leave as many
 * states as it has iterations (each knowing a different range of what the loop narrowed), and everything after the
 * loop would be verified once per exit; after this they meet in one. The caller bounds the result again. */
INLINE __u32 forget(__u32 v)
{
	__u32 zero = 0;
	volatile __u32 *slot = bpf_map_lookup_elem(&scratch, &zero);
	if (!slot)
		return v;
	slot[0] = v;
	return slot[0];
}

/* Walk the IPv6 extension headers of the packet at ip (its fixed header readable) up to end (bytes from ip), as
 * mplslb.wire.ipv6.parse_ipv6 does, at most IPV6_EXT_MAX of them; *proto and *pos (from ip): the upper layer. */
INLINE __u32 walk_ext(__u8 *ip, __u8 *dend, __u32 end, __u32 *proto_out, __u32 *pos_out)
{
	__u32 proto = ip[IPV6_NEXT_HEADER];
	__u32 pos = IPV6_HLEN, frag = 0;
	for (int i = 0; i < IPV6_EXT_MAX; i++) {
		if (!is_ext(proto))
			break;
		if (pos > MAX_TCP_OFFSET || end < pos + EXT_MIN_LEN)
			return EP_IPV6_EXT_TRUNCATED;
		__u8 *h = ip + pos;
		if (h + EXT_MIN_LEN > dend)
			return EP_IPV6_EXT_TRUNCATED;
		if (proto == IPPROTO_FRAGMENT) {
			proto = h[0];
			frag = be16(h + 2) >> IPV6_FRAG_OFFSET_SHIFT;
			pos += FRAGMENT_HLEN;
			if (frag)
				break;
			continue;
		}
		__u32 size = proto == IPPROTO_AH ? (h[1] + AH_LEN_BIAS) * AH_UNIT : (h[1] + 1) * EXT_UNIT;
		if (end - pos < size)
			return EP_IPV6_EXT_TRUNCATED;
		proto = h[0];
		pos += size;
	}
	if (frag)
		return EP_IP_FRAGMENT;
	if (is_ext(proto))
		return EP_IPV6_EXT_TOO_MANY; /* the userspace endpoint walks on; the kernel's walk is bounded */
	*proto_out = proto;
	*pos_out = pos;
	return OK;
}

/* The datagram an ICMP error quotes, at q with qlen bytes of the message left: its flow key as its sender sent
 * it, as mplslb.analyzer.PacketAnalyzer.analyze_quoted reads it (the quote may be cut short anywhere after the
 * ports; its IPv4 header checksum is not checked). */
INLINE __u32 analyze_quoted(__u8 *ip, __u8 *dend, __u32 at, __u32 qlen, struct flow_key *key)
{
	/* The offsets go through a per-CPU map and come back as numbers the verifier knows nothing of: every path
	 * through analyze() then meets one state here, instead of multiplying this walk by their number. */
	__u32 zero = 0;
	volatile __u32 *slot = bpf_map_lookup_elem(&scratch, &zero); /* two __u32: the offset, the length */
	if (!slot)
		return EP_ICMP_QUOTE_TRUNCATED;
	slot[0] = at;
	slot[1] = qlen;
	at = slot[0] & QUOTE_MASK;
	qlen = slot[1];
	if (qlen > QUOTE_MASK)
		qlen = QUOTE_MASK; /* a quote is read within its first QUOTE_MASK bytes: past any frame's end */
	__u8 *q = ip + at;
	if (qlen < 1 || q + 1 > dend)
		return EP_ICMP_QUOTE_TRUNCATED;
	__u32 version = q[0] >> IP_VERSION_SHIFT;
	__u32 l4, end, proto;
	if (version == FAMILY_V4) {
		if (qlen < IPV4_HLEN || q + IPV4_HLEN > dend)
			return EP_IPV4_TRUNCATED;
		__u32 hlen = (q[0] & IPV4_IHL_MASK) * IPV4_IHL_UNIT;
		if (hlen < IHL_MIN * IPV4_IHL_UNIT)
			return EP_IPV4_BAD_IHL;
		if (hlen > qlen)
			return EP_IPV4_TRUNCATED;
		end = be16(q + IPV4_TOTAL_LEN);
		if (end < hlen)
			return EP_IPV4_BAD_TOTAL_LENGTH;
		if (end > qlen)
			end = qlen;
		if (be16(q + IPV4_FRAG_AT) & FRAG_OFFSET_MASK)
			return EP_IP_FRAGMENT;
		proto = q[IPV4_PROTO];
		l4 = hlen;
		key->family = FAMILY_V4;
		__builtin_memcpy(key->src, q + IPV4_SRC, IPV4_ADDR_LEN);
		__builtin_memcpy(key->dst, q + IPV4_DST, IPV4_ADDR_LEN);
	} else if (version == FAMILY_V6) {
		if (qlen < IPV6_HLEN || q + IPV6_HLEN > dend)
			return EP_IPV6_TRUNCATED;
		end = IPV6_HLEN + be16(q + IPV6_PAYLOAD_LEN);
		if (end > qlen)
			end = qlen;
		__u32 why = walk_ext(q, dend, end, &proto, &l4);
		if (why != OK)
			return why;
		l4 = forget(l4) & QUOTE_MASK; /* as in analyze() */
		key->family = FAMILY_V6;
		__builtin_memcpy(key->src, q + IPV6_SRC, IPV6_ADDR_LEN);
		__builtin_memcpy(key->dst, q + IPV6_DST, IPV6_ADDR_LEN);
	} else {
		return EP_ICMP_QUOTE_TRUNCATED;
	}
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return EP_UNSUPPORTED_PROTOCOL;
	if (l4 > MAX_TCP_OFFSET || end < l4 + L4_PORTS_LEN)
		return EP_ICMP_QUOTE_TRUNCATED;
	__u8 *t = q + l4;
	if (t + L4_PORTS_LEN > dend)
		return EP_ICMP_QUOTE_TRUNCATED;
	key->proto = proto;
	key->sport = be16(t + L4_SPORT);
	key->dport = be16(t + L4_DPORT);
	return OK;
}

INLINE int is_icmp_error(__u32 proto, __u32 type)
{
	if (proto == IPPROTO_ICMPV6)
		return type < ICMP6_INFO_MIN;
	return type == ICMP_DEST_UNREACH || type == ICMP_SOURCE_QUENCH || type == ICMP_REDIRECT ||
	       type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETER_PROBLEM;
}

/* The flow key and TCP flags of the IP packet at ip, as mplslb.analyzer.PacketAnalyzer.analyze_ip reads them
 * (without layer 7, without TCP options); returns OK or the reason to drop the packet. avail: the packet's length
 * from ip (dend - ip, but for a super-packet whose headers alone are readable: its whole length). An ICMP error sets
 * *quote (where its quote starts, from ip) and *quote_len: the caller reads the quote with analyze_quoted, from
 * pointers taken afresh, so the verifier meets one state there instead of one per path through this function. */
INLINE __u32 analyze(__u8 *ip, __u8 *dend, __u32 avail, struct flow_key *key, int *tcp_flags, __u32 *quote,
		     __u32 *quote_len)
{
	if (ip + 1 > dend)
		return EP_IP_TRUNCATED;
	__u32 version = ip[0] >> IP_VERSION_SHIFT;
	__u32 l4, end, proto;
	if (version == FAMILY_V4) {
		if (ip + IPV4_HLEN > dend)
			return EP_IPV4_TRUNCATED;
		__u32 hlen = (ip[0] & IPV4_IHL_MASK) * IPV4_IHL_UNIT;
		if (hlen < IHL_MIN * IPV4_IHL_UNIT)
			return EP_IPV4_BAD_IHL;
		if (hlen > avail)
			return EP_IPV4_TRUNCATED;
		end = be16(ip + IPV4_TOTAL_LEN);
		if (end < hlen || end > avail)
			return EP_IPV4_BAD_TOTAL_LENGTH;
		__u32 sum = 0;
		for (int i = 0; i < IPV4_IHL_MASK * IPV4_IHL_UNIT / 2; i++) {
			if (i * 2 >= hlen)
				break;
			__u8 *w = ip + i * 2;
			if (w + 2 > dend)
				return EP_IPV4_TRUNCATED;
			sum += be16(w);
		}
		sum = (sum & ((1 << 16) - 1)) + (sum >> 16);
		sum = (sum & ((1 << 16) - 1)) + (sum >> 16);
		if (sum != (1 << 16) - 1)
			return EP_IPV4_BAD_CHECKSUM;
		hlen = forget(hlen) & (IPV4_IHL_MASK * IPV4_IHL_UNIT); /* 20 to 60, as checked above */
		if (be16(ip + IPV4_FRAG_AT) & FRAG_OFFSET_MASK)
			return EP_IP_FRAGMENT;
		proto = ip[IPV4_PROTO];
		l4 = hlen;
		key->family = FAMILY_V4;
		__builtin_memcpy(key->src, ip + IPV4_SRC, IPV4_ADDR_LEN);
		__builtin_memcpy(key->dst, ip + IPV4_DST, IPV4_ADDR_LEN);
	} else if (version == FAMILY_V6) {
		if (ip + IPV6_HLEN > dend)
			return EP_IPV6_TRUNCATED;
		end = IPV6_HLEN + be16(ip + IPV6_PAYLOAD_LEN);
		if (end > avail)
			return EP_IPV6_BAD_PAYLOAD_LENGTH;
		__u32 why = walk_ext(ip, dend, end, &proto, &l4);
		if (why != OK)
			return why;
		l4 = forget(l4) & QUOTE_MASK; /* at most MAX_TCP_OFFSET and one extension header past it */
		key->family = FAMILY_V6;
		__builtin_memcpy(key->src, ip + IPV6_SRC, IPV6_ADDR_LEN);
		__builtin_memcpy(key->dst, ip + IPV6_DST, IPV6_ADDR_LEN);
	} else {
		return EP_IP_BAD_VERSION;
	}
	key->proto = proto;
	__u32 l4len = end - l4;
	if (l4 > MAX_TCP_OFFSET)
		return proto == IPPROTO_UDP ? EP_UDP_TRUNCATED : EP_TCP_TRUNCATED;
	__u8 *t = ip + l4;
	if (proto == IPPROTO_TCP) {
		if (l4len < TCP_HLEN || t + TCP_HLEN > dend)
			return EP_TCP_TRUNCATED;
		__u32 doff = t[TCP_DOFF] >> DATA_OFFSET_SHIFT;
		if (doff < DATA_OFFSET_MIN)
			return EP_TCP_BAD_DATA_OFFSET;
		if (doff * DATA_OFFSET_UNIT > l4len)
			return EP_TCP_TRUNCATED;
		*tcp_flags = t[TCP_FLAGS];
	} else if (proto == IPPROTO_UDP) {
		if (l4len < UDP_HLEN || t + UDP_HLEN > dend)
			return EP_UDP_TRUNCATED;
		__u32 length = be16(t + UDP_LEN);
		if (length < UDP_HLEN || length > l4len)
			return EP_UDP_BAD_LENGTH;
		*tcp_flags = -1;
	} else if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
		if (l4len < ICMP_HLEN || t + ICMP_HLEN > dend)
			return EP_ICMP_TRUNCATED;
		if (!is_icmp_error(proto, t[0]))
			return EP_ICMP_NOT_ERROR;
		*tcp_flags = -1;
		*quote = l4 + ICMP_HLEN;
		*quote_len = l4len - ICMP_HLEN;
		return OK;
	} else {
		return EP_UNSUPPORTED_PROTOCOL;
	}
	key->sport = be16(t + L4_SPORT);
	key->dport = be16(t + L4_DPORT);
	return OK;
}

INLINE void reverse(const struct flow_key *k, struct flow_key *r)
{
	r->proto = k->proto;
	r->family = k->family;
	r->sport = k->dport;
	r->dport = k->sport;
	__builtin_memcpy(r->src, k->dst, IPV6_ADDR_LEN);
	__builtin_memcpy(r->dst, k->src, IPV6_ADDR_LEN);
}

/* A labelled frame from the wire: pop its stack, learn its flow; server when serving, else client. */
INLINE int from_wire(struct xdp_md *ctx, int serving)
{
	__u8 *data = (__u8 *)(long)ctx->data;
	__u8 *end = (__u8 *)(long)ctx->data_end;
	if (data + ETH_HLEN > end || be16(data + ETH_TYPE) != ETH_P_MPLS_UC) {
		count(EP_PASSED);
		return XDP_PASS;
	}
	__u8 *p = data + LSE_AT;
	if (p + LSE_LEN > end) {
		count(EP_MPLS_TRUNCATED);
		return XDP_DROP;
	}
	__u32 label = ((__u32)p[0] << 16 | (__u32)p[1] << 8 | p[2]) >> (LABEL_SHIFT - 8);
	int bottom = 0;
	for (int i = 0; i < MAX_STACK_DEPTH; i++) {
		if (p == end) {
			count(EP_MPLS_NO_BOTTOM);
			return XDP_DROP;
		}
		if (p + LSE_LEN > end) {
			count(EP_MPLS_TRUNCATED);
			return XDP_DROP;
		}
		bottom = p[LSE_LEN - 2] & (MPLS_BOS >> 8);
		p += LSE_LEN;
		if (bottom)
			break;
	}
	if (!bottom) {
		count(EP_MPLS_TOO_DEEP);
		return XDP_DROP;
	}
	if (serving ? (label < C2S_MIN || label > C2S_MAX || !(label & 1))
		    : (label < S2C_MIN || label > S2C_MAX || (label & 1))) {
		count(serving ? EP_NOT_C2S_LABEL : EP_NOT_S2C_LABEL);
		return XDP_DROP;
	}
	/* Take the stack off first: the packet then starts at one offset, whatever the depth of the stack was. */
	__u8 macs[ETH_ADDRS];
	__builtin_memcpy(macs, data, ETH_ADDRS);
	if (bpf_xdp_adjust_head(ctx, p - data - ETH_HLEN)) {
		count(EP_ROOM_FAILED);
		return XDP_DROP;
	}
	data = (__u8 *)(long)ctx->data;
	end = (__u8 *)(long)ctx->data_end;
	if (data + ETH_HLEN > end)
		return XDP_DROP;
	struct flow_key key = {}, reply = {};
	int tcp_flags = -1;
	__u32 quote = 0, quote_len = 0;
	__u32 why = analyze(data + ETH_HLEN, end, end - data - ETH_HLEN, &key, &tcp_flags, &quote, &quote_len);
	int icmp = quote != 0;
	if (why == OK && icmp) {
		data = (__u8 *)(long)ctx->data;
		end = (__u8 *)(long)ctx->data_end;
		why = analyze_quoted(data + ETH_HLEN, end, quote, quote_len, &key);
		if (data + ETH_HLEN > end)
			return XDP_DROP;
	}
	if (why != OK) {
		count(why);
		return XDP_DROP;
	}
	struct flow f = {};
	f.last_ns = bpf_ktime_get_ns();
	f.heard_ns = f.last_ns;
	if (serving) {
		if (!icmp && !is_vip(key.dst, key.family)) {
			count(EP_NOT_FOR_VIP);
			return XDP_DROP;
		}
		f.label = label + 1; /* the pair's S2C label: nothing is signalled */
		__builtin_memcpy(f.peer, macs + ETH_SRC, ETH_ALEN);
	} else {
		__u32 zero = 0;
		struct endpoint_config *cfg = bpf_map_lookup_elem(&config, &zero);
		if (!cfg)
			return XDP_DROP;
		f.label = label - 1; /* the pair's C2S label */
		__builtin_memcpy(f.peer, cfg->gateway, ETH_ALEN);
	}
	/* keyed as this host sends the flow: a packet's key reversed; an error's quote is already one of ours */
	if (icmp)
		reply = key;
	else
		reverse(&key, &reply);
	/* A flow already mapped to this label and peer is refreshed in place: an update of an LRU hash allocates a
	 * new element and swaps it in under the map's lock, several times the cost of the two stores. */
	struct flow *known = bpf_map_lookup_elem(&flows, &reply);
	if (known && known->label == f.label && same_mac(known->peer, f.peer)) {
		known->last_ns = f.last_ns;
		known->heard_ns = f.heard_ns;
	} else {
		bpf_map_update_elem(&flows, &reply, &f, 0);
	}
	__builtin_memcpy(data, macs, ETH_ADDRS);
	__u32 type = key.family == FAMILY_V4 ? ETH_P_IP : ETH_P_IPV6;
	data[ETH_TYPE] = type >> 8;
	data[ETH_TYPE + 1] = type & 0xff;
	count(EP_FROM_WIRE);
	return XDP_PASS;
}

/* Put the label in front of the packet and address the frame: dst, src, MPLS ethertype, one bottom entry.
 *
 * The frame grows at its head (bpf_skb_change_head) and all 18 bytes up to the network header are written anew:
 * the entry then belongs to the link-layer header, the network header stays on the IP header and a super-packet's
 * GSO state is untouched, so the stack can segment a labelled super-packet after this program, copying the 18
 * bytes into every segment (the wire interface offloads no segmentation: its TX checksumming is off). Growing the
 * room at the MAC (bpf_skb_adjust_room) instead would point the network header at the entry and mark the skb
 * dodgy, and segmenting it fails. */
INLINE int push(struct __sk_buff *skb, __u32 label, const __u8 *dst, const struct endpoint_config *cfg)
{
	__u8 to[ETH_ALEN];
	__builtin_memcpy(to, dst, ETH_ALEN); /* dst may live in the frame's own flow entry: copy before the move */
	int gso = skb->gso_segs > 1;
	if (bpf_skb_change_head(skb, LSE_LEN, 0)) {
		count(EP_ROOM_FAILED);
		return TC_ACT_SHOT;
	}
	__u8 *data = (__u8 *)(long)skb->data;
	__u8 *end = (__u8 *)(long)skb->data_end;
	if (data + IP_AT > end) {
		count(EP_ROOM_FAILED);
		return TC_ACT_SHOT;
	}
	__builtin_memcpy(data + ETH_DST, to, ETH_ALEN);
	__builtin_memcpy(data + ETH_SRC, cfg->mac, ETH_ALEN);
	data[ETH_TYPE] = ETH_P_MPLS_UC >> 8;
	data[ETH_TYPE + 1] = ETH_P_MPLS_UC & 0xff;
	__u32 entry = (label << LABEL_SHIFT) | MPLS_BOS | (cfg->ttl & MPLS_TTL_MASK);
	data[LSE_AT] = entry >> 24;
	data[LSE_AT + 1] = (entry >> 16) & 0xff;
	data[LSE_AT + 2] = (entry >> 8) & 0xff;
	data[LSE_AT + 3] = entry & 0xff;
	if (gso)
		count(EP_FROM_HOST_GSO);
	return TC_ACT_OK;
}

/* A packet the host sends: label it if it is the datapath's; server when serving, else client. */
INLINE int from_host(struct __sk_buff *skb, int serving)
{
	/* The stack hands over TCP payload in page fragments: make the whole packet readable, as the codecs read it;
	 * of a super-packet (segmented after this program, see push) only the headers, its length checked whole. */
	__u32 len = skb->len;
	if (skb->gso_segs > 1 && len > GSO_HEADERS)
		len = GSO_HEADERS;
	if (skb->data_end - skb->data < len && bpf_skb_pull_data(skb, len)) {
		count(EP_ROOM_FAILED);
		return TC_ACT_SHOT;
	}
	__u8 *data = (__u8 *)(long)skb->data;
	__u8 *end = (__u8 *)(long)skb->data_end;
	if (data + ETH_HLEN > end)
		return TC_ACT_OK;
	__u32 type = be16(data + ETH_TYPE);
	__u8 *ip = data + ETH_HLEN;
	if (!(type == ETH_P_IP || type == ETH_P_IPV6) || ip + IPV4_HLEN > end) {
		count(EP_PASSED);
		return TC_ACT_OK;
	}
	/* the address the datapath keys on: the source of a server's replies, the destination of a client's */
	__u32 version = ip[0] >> IP_VERSION_SHIFT;
	__u8 *addr;
	if (version == FAMILY_V4) {
		addr = ip + (serving ? IPV4_SRC : IPV4_DST);
	} else if (version == FAMILY_V6 && ip + IPV6_HLEN <= end) {
		addr = ip + (serving ? IPV6_SRC : IPV6_DST);
	} else {
		count(EP_PASSED);
		return TC_ACT_OK;
	}
	if (!is_vip(addr, version)) {
		count(EP_PASSED);
		return TC_ACT_OK;
	}
	__u32 zero = 0;
	struct endpoint_config *cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg)
		return TC_ACT_SHOT;
	struct flow_key key = {}, quoted = {};
	int tcp_flags = -1;
	__u32 quote = 0, quote_len = 0;
	__u32 why = analyze(ip, end, skb->len - ETH_HLEN, &key, &tcp_flags, &quote, &quote_len);
	int icmp = quote != 0;
	if (why == OK && icmp) {
		data = (__u8 *)(long)skb->data;
		end = (__u8 *)(long)skb->data_end;
		why = analyze_quoted(data + ETH_HLEN, end, quote, quote_len, &key);
		if (data + ETH_HLEN > end)
			return TC_ACT_SHOT;
	}
	if (why != OK) {
		count(why);
		return TC_ACT_SHOT;
	}
	if (icmp && serving) {
		/* an error the server's host sends about a client's datagram belongs to that datagram's flow */
		quoted = key;
		reverse(&quoted, &key);
		if (!is_vip(key.src, key.family)) {
			count(EP_NOT_FROM_VIP);
			return TC_ACT_SHOT;
		}
	}
	if (!serving && tcp_flags >= 0 && (tcp_flags & SYN_MASK) == SYN_ONLY)
		bpf_map_delete_elem(&flows, &key); /* a new connection, perhaps on a reused port: it starts unlabelled */
	struct flow *f = bpf_map_lookup_elem(&flows, &key);
	if (!f) {
		if (serving) {
			count(EP_NO_SESSION_LABEL);
			return TC_ACT_SHOT;
		}
		__builtin_memcpy(data + ETH_DST, cfg->gateway, ETH_ALEN);
		__builtin_memcpy(data + ETH_SRC, cfg->mac, ETH_ALEN);
		count(EP_FROM_HOST_UNLABELLED);
		return TC_ACT_OK;
	}
	__u64 now = bpf_ktime_get_ns();
	if (!serving && cfg->fallback_ms && now - f->heard_ns > (__u64)cfg->fallback_ms * NS_PER_MS) {
		/* nothing heard back for a while: the label may have died at the balancer; start unlabelled again */
		bpf_map_delete_elem(&flows, &key);
		__builtin_memcpy(data + ETH_DST, cfg->gateway, ETH_ALEN);
		__builtin_memcpy(data + ETH_SRC, cfg->mac, ETH_ALEN);
		count(EP_FALLBACK_UNLABELLED);
		return TC_ACT_OK;
	}
	f->last_ns = now;
	int verdict = push(skb, f->label, f->peer, cfg);
	if (verdict == TC_ACT_OK)
		count(EP_FROM_HOST);
	return verdict;
}

SEC("xdp/server")
int mplslb_srv_in(struct xdp_md *ctx)
{
	return from_wire(ctx, 1);
}

SEC("xdp/client")
int mplslb_cli_in(struct xdp_md *ctx)
{
	return from_wire(ctx, 0);
}

SEC("tc/server")
int mplslb_srv_out(struct __sk_buff *skb)
{
	return from_host(skb, 1);
}

SEC("tc/client")
int mplslb_cli_out(struct __sk_buff *skb)
{
	return from_host(skb, 0);
}

char _license[] SEC("license") = "Dual MIT/GPL";
