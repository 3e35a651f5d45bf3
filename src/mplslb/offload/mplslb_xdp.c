// SPDX-License-Identifier: (MIT OR GPL-2.0)
/*
 * mplslb kernel offload: the label switching fast path as an XDP program.
 *
 * One hash map, label -> entry, mirrors the rows of mplslb.switching.LabelSwitchingTable that may be switched
 * in the kernel. For a frame whose top label stack entry names an entry, and only when every check the userspace
 * fast path makes passes (ingress port, source MAC, IP source of the bottom-of-stack entry, bottom of stack,
 * TTL > 1) and the frame is not a TCP FIN or RST the session manager must see, the program rewrites the Ethernet
 * addresses (next hop, output port), decrements the TTL, drops an 802.1Q tag as userspace does, counts the frame in
 * the entry and redirects it to the output port. Everything else is XDP_PASS: the daemon's packet socket gets it
 * and the userspace path forwards, reports or drops and counts it exactly as without the offload.
 *
 * Self-contained on purpose (no kernel or libbpf headers): built with `clang -O2 -target bpf -c`. The loader
 * (mplslb.offload.bpf) creates the map and patches each reference to it; the layout of struct entry is mirrored by
 * ENTRY in mplslb/offload/xdp.py.
 */

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;

#define SEC(name) __attribute__((section(name), used))

#define XDP_PASS 2
#define XDP_REDIRECT 4

#define ETH_P_8021Q 0x8100
#define ETH_P_MPLS_UC 0x8847
#define MPLS_BOS 0x100
#define TCP_FIN 0x01
#define TCP_RST 0x04
#define TCP_FLAGS_OFFSET 13
#define MAX_TCP_OFFSET 16384

/* entry.flags */
#define F_V6 0x01       /* the payload under the label is IPv6 (peer IP at +8, TCP header at tcp_offset) */
#define F_TCP_END 0x02  /* TCP session: FIN and RST go up to the session manager */

struct xdp_md {
	__u32 data;
	__u32 data_end;
	__u32 data_meta;
	__u32 ingress_ifindex;
	__u32 rx_queue_index;
	__u32 egress_ifindex;
};

struct entry {
	__u32 out_ifindex;
	__u32 in_ifindex;
	__u8 rewrite[12]; /* next hop MAC, output port MAC */
	__u8 peer[6];     /* the source MAC the label is bound to */
	__u8 flags;
	__u8 ip_len;      /* 0 (no IP binding), 4 or 16 */
	__u8 peer_ip[16];
	__u16 tcp_offset; /* IPv6: IP header start -> TCP header */
	__u16 pad;
	__u64 packets;    /* frames forwarded here, their bytes as received, CLOCK_MONOTONIC ns of the last one */
	__u64 bytes;
	__u64 last_ns;
};

/* The loader creates the map and patches every load of this symbol's address with the map's fd. */
struct map_ref {
	__u32 unused;
};
struct map_ref labels SEC("maps");

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static __u64 (*bpf_ktime_get_ns)(void) = (void *)5;
static long (*bpf_redirect)(__u32 ifindex, __u64 flags) = (void *)23;
static long (*bpf_xdp_adjust_head)(struct xdp_md *ctx, int delta) = (void *)44;

SEC("xdp")
int mplslb_xdp(struct xdp_md *ctx)
{
	__u8 *data = (__u8 *)(long)ctx->data;
	__u8 *end = (__u8 *)(long)ctx->data_end;
	__u64 len = end - data;
	__u32 off = 14;

	if (data + 18 > end)
		return XDP_PASS;
	__u16 ethertype = (data[12] << 8) | data[13];
	if (ethertype == ETH_P_8021Q) {
		if (data + 22 > end)
			return XDP_PASS;
		ethertype = (data[16] << 8) | data[17];
		off = 18;
	}
	if (ethertype != ETH_P_MPLS_UC)
		return XDP_PASS;
	__u8 *lse = data + off;
	if (lse + 4 > end)
		return XDP_PASS;
	__u32 stack_entry = ((__u32)lse[0] << 24) | ((__u32)lse[1] << 16) | ((__u32)lse[2] << 8) | lse[3];
	__u32 label = stack_entry >> 12;
	struct entry *e = bpf_map_lookup_elem(&labels, &label);
	if (!e)
		return XDP_PASS;
	if (e->in_ifindex != ctx->ingress_ifindex)
		return XDP_PASS;
	for (int i = 0; i < 6; i++)
		if (data[6 + i] != e->peer[i])
			return XDP_PASS;
	if (!(stack_entry & MPLS_BOS))
		return XDP_PASS;
	__u8 *ip = lse + 4;
	if (e->ip_len) {
		__u8 *at = ip + ((e->flags & F_V6) ? 8 : 12);
		if (e->ip_len == 16) {
			if (at + 16 > end)
				return XDP_PASS;
			for (int i = 0; i < 16; i++)
				if (at[i] != e->peer_ip[i])
					return XDP_PASS;
		} else {
			if (at + 4 > end)
				return XDP_PASS;
			for (int i = 0; i < 4; i++)
				if (at[i] != e->peer_ip[i])
					return XDP_PASS;
		}
	}
	if ((stack_entry & 0xff) <= 1)
		return XDP_PASS;
	if (e->flags & F_TCP_END) {
		__u32 tcp;
		if (e->flags & F_V6) {
			tcp = e->tcp_offset;
		} else {
			if (ip + 1 > end)
				goto forward;
			tcp = (ip[0] & 0x0f) * 4;
		}
		/* past any frame XDP sees in one buffer: userspace would not find the flags in the frame either */
		if (tcp > MAX_TCP_OFFSET)
			goto forward;
		__u8 *flags = ip + tcp + TCP_FLAGS_OFFSET;
		if (flags + 1 <= end && (*flags & (TCP_FIN | TCP_RST)))
			return XDP_PASS;
	}
forward:
	__sync_fetch_and_add(&e->packets, 1);
	__sync_fetch_and_add(&e->bytes, len);
	e->last_ns = bpf_ktime_get_ns();
	__u32 out = e->out_ifindex;
	lse[3] -= 1; /* TTL > 1 here: the decrement stays in the TTL octet */
	if (off == 18) {
		/* userspace forwards a tagged frame untagged: drop the 4 tag octets in front of the MAC addresses */
		if (bpf_xdp_adjust_head(ctx, 4))
			return XDP_PASS;
		data = (__u8 *)(long)ctx->data;
		end = (__u8 *)(long)ctx->data_end;
		if (data + 14 > end)
			return XDP_PASS;
		data[12] = ETH_P_MPLS_UC >> 8;
		data[13] = ETH_P_MPLS_UC & 0xff;
	}
	__builtin_memcpy(data, e->rewrite, 12);
	return bpf_redirect(out, 0);
}

char _license[] SEC("license") = "Dual MIT/GPL";
