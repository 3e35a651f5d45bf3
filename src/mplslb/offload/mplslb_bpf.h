/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/*
 * What mplslb's BPF programs share of the kernel's BPF interface, written out so no kernel or libbpf header is
 * needed: the section attribute, the XDP context and the tc verdicts, the map reference the loader patches, and the helpers every
 * program calls (by their number in the kernel's helper table). Frame layout lives in mplslb_layout.h.
 */
#ifndef MPLSLB_BPF_H
#define MPLSLB_BPF_H

#define SEC(name) __attribute__((section(name), used))

#define XDP_DROP 1
#define XDP_PASS 2
#define TC_ACT_OK 0
#define TC_ACT_SHOT 2

struct xdp_md {
	__u32 data;
	__u32 data_end;
	__u32 data_meta;
	__u32 ingress_ifindex;
	__u32 rx_queue_index;
	__u32 egress_ifindex;
};

/* The loader creates each map and patches every load of its symbol's address with the map's fd. */
struct map_ref {
	__u32 unused;
};

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static __u64 (*bpf_ktime_get_ns)(void) = (void *)5;
static long (*bpf_skb_pull_data)(struct __sk_buff *skb, __u32 len) = (void *)39;
static long (*bpf_xdp_adjust_head)(struct xdp_md *ctx, int delta) = (void *)44;

#endif
