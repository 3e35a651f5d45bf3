// SPDX-License-Identifier: (MIT OR GPL-2.0)
/*
 * The GSO probe's programs (bench/gso_probe/run.sh): a server namespace labels what it sends on its egress, a
 * balancer namespace switches the label (rewrites the MAC addresses, decrements the TTL, redirects to the client's
 * port), a client namespace pops it. Each way of doing a step is its own section; run.sh attaches one per step.
 * Built with -DOUT_IF=<ifindex of the balancer's client port> -DOUT_MACS=<12 bytes: client MAC, port MAC>.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/pkt_cls.h>

#define SEC(n) __attribute__((section(n), used))
#define LABEL 1001
#define ENTRY ((LABEL << 12) | 0x100 | 64) /* bottom of stack, TTL 64 */
#define FRAME_MAX (1500 + 14 + 4)          /* the largest frame one segment makes on a 1500-byte wire */

static long (*bpf_redirect)(__u32 ifindex, __u64 flags) = (void *)23;
static long (*bpf_skb_change_head)(struct __sk_buff *skb, __u32 len, __u64 flags) = (void *)43;
static long (*bpf_xdp_adjust_head)(struct xdp_md *ctx, int delta) = (void *)44;
static long (*bpf_skb_adjust_room)(struct __sk_buff *skb, __s32 diff, __u32 mode, __u64 flags) = (void *)50;
static long (*bpf_redirect_peer)(__u32 ifindex, __u64 flags) = (void *)155;
static long (*bpf_trace_printk)(const char *fmt, __u32 size, ...) = (void *)6;

static const __u8 out_macs[12] = {OUT_MACS};

static inline void put_entry(__u8 *d)
{
	d[12] = 0x88;
	d[13] = 0x47;
	d[14] = ENTRY >> 24;
	d[15] = (ENTRY >> 16) & 0xff;
	d[16] = (ENTRY >> 8) & 0xff;
	d[17] = ENTRY & 0xff;
}

static inline int is_ipv4(__u8 *d, __u8 *e)
{
	return d + 14 <= e && d[12] == 0x08 && d[13] == 0x00;
}

static inline int is_mpls(__u8 *d, __u8 *e)
{
	return d + 18 <= e && d[12] == 0x88 && d[13] == 0x47;
}

/* Server egress: grow the frame at its head; the entry is part of the link-layer header, GSO state untouched. */
SEC("tc_push_head") int push_head(struct __sk_buff *skb)
{
	__u8 *d = (void *)(long)skb->data, *e = (void *)(long)skb->data_end;
	if (!is_ipv4(d, e))
		return TC_ACT_OK;
	__u8 macs[12];
	__builtin_memcpy(macs, d, 12);
	if (bpf_skb_change_head(skb, 4, 0))
		return TC_ACT_SHOT;
	d = (void *)(long)skb->data;
	e = (void *)(long)skb->data_end;
	if (d + 18 > e)
		return TC_ACT_SHOT;
	__builtin_memcpy(d, macs, 12);
	put_entry(d);
	return TC_ACT_OK;
}

/* Server egress: room at the MAC (points the network header at the entry and marks a super-packet dodgy). */
SEC("tc_push_room") int push_room(struct __sk_buff *skb)
{
	__u8 *d = (void *)(long)skb->data, *e = (void *)(long)skb->data_end;
	if (!is_ipv4(d, e))
		return TC_ACT_OK;
	if (bpf_skb_adjust_room(skb, 4, BPF_ADJ_ROOM_MAC, 0))
		return TC_ACT_SHOT;
	d = (void *)(long)skb->data;
	e = (void *)(long)skb->data_end;
	if (d + 18 > e)
		return TC_ACT_SHOT;
	put_entry(d);
	return TC_ACT_OK;
}

static inline int xdp_switch(struct xdp_md *ctx, int pass_big)
{
	__u8 *d = (void *)(long)ctx->data, *e = (void *)(long)ctx->data_end;
	if (!is_mpls(d, e) || (pass_big && e - d > FRAME_MAX))
		return XDP_PASS;
	__builtin_memcpy(d, out_macs, 12);
	d[17] -= 1;
	return bpf_redirect(OUT_IF, 0);
}

/* Balancer ingress, generic XDP: switch every labelled frame. */
SEC("xdp_fwd") int probe_xdp_fwd(struct xdp_md *ctx)
{
	return xdp_switch(ctx, 0);
}

/* Balancer ingress, generic XDP: switch labelled frames of one segment, pass super-packets on to tc. */
SEC("xdp_fwd_small") int probe_xdp_fwd_small(struct xdp_md *ctx)
{
	return xdp_switch(ctx, 1);
}

static inline int tc_switch(struct __sk_buff *skb, int peer)
{
	__u8 *d = (void *)(long)skb->data, *e = (void *)(long)skb->data_end;
	if (!is_mpls(d, e))
		return TC_ACT_OK;
	__builtin_memcpy(d, out_macs, 12);
	d[17] -= 1;
	return peer ? bpf_redirect_peer(OUT_IF, 0) : bpf_redirect(OUT_IF, 0);
}

/* Balancer ingress, tc: switch what XDP passed, out of the client port. */
SEC("tc_fwd") int probe_tc_fwd(struct __sk_buff *skb)
{
	return tc_switch(skb, 0);
}

/* Balancer ingress, tc: switch what XDP passed straight into the client port's veth peer (its namespace). */
SEC("tc_fwd_peer") int probe_tc_fwd_peer(struct __sk_buff *skb)
{
	return tc_switch(skb, 1);
}

/* Client ingress, generic XDP: pop the entry. */
SEC("xdp_pop") int probe_xdp_pop(struct xdp_md *ctx)
{
	__u8 *d = (void *)(long)ctx->data, *e = (void *)(long)ctx->data_end;
	if (!is_mpls(d, e))
		return XDP_PASS;
	__u8 macs[12];
	__builtin_memcpy(macs, d, 12);
	if (bpf_xdp_adjust_head(ctx, 4))
		return XDP_DROP;
	d = (void *)(long)ctx->data;
	e = (void *)(long)ctx->data_end;
	if (d + 14 > e)
		return XDP_DROP;
	__builtin_memcpy(d, macs, 12);
	d[12] = 0x08;
	d[13] = 0x00;
	return XDP_PASS;
}

/* Client ingress, tc: pop the entry with adjust_room (the skb's protocol is MPLS here); a failure is traced. */
SEC("tc_pop_room") int probe_tc_pop_room(struct __sk_buff *skb)
{
	__u8 *d = (void *)(long)skb->data, *e = (void *)(long)skb->data_end;
	if (!is_mpls(d, e))
		return TC_ACT_OK;
	long err = bpf_skb_adjust_room(skb, -4, BPF_ADJ_ROOM_MAC, 0);
	if (err) {
		char fmt[] = "gso_probe: pop adjust_room %ld\n";
		bpf_trace_printk(fmt, sizeof(fmt), err);
		return TC_ACT_SHOT;
	}
	d = (void *)(long)skb->data;
	e = (void *)(long)skb->data_end;
	if (d + 14 > e)
		return TC_ACT_SHOT;
	d[12] = 0x08;
	d[13] = 0x00;
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
