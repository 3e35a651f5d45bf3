"""The fast paths' frame layout: every offset, bit and bound they read, defined once.

Three idioms switch a labelled frame (the one-frame path in :mod:`~mplslb.switching.scalar`, numpy over a block
in :mod:`~mplslb.switching.block`, and C in the kernel programs under :mod:`mplslb.offload`), and all of them take
their numbers from here. The C programs get them as a generated header (:func:`c_header`, written at build time
by :mod:`mplslb.offload.build`); a test compiles that header with the host compiler and checks every value and
every field offset of the kernel map's entry against this module.

What a session-labelled frame looks like on the wire::

    0        6        12     14 (18 with one 802.1Q tag)
    | dst MAC | src MAC | type | label stack entry (4) | IPv4 or IPv6 packet ...
                                label<<12 | tc<<9 | S<<8 | TTL

The label is always the only (bottom) entry of its stack; the block path and the kernel take untagged frames
at the offsets below, the one-frame path also one 802.1Q tag (everything after it moves by :data:`VLAN_HLEN`).
"""

from __future__ import annotations

import struct
from typing import Final

from mplslb.labels import C2S_MAX, C2S_MIN, S2C_MAX, S2C_MIN
from mplslb.wire.ethernet import ETH_ALEN, ETH_HLEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, ETH_P_MPLS_UC
from mplslb.wire.ethernet import VLAN_TAG_LEN as VLAN_HLEN
from mplslb.wire.icmp import (
    ICMP6_INFO_MIN,
    ICMP_DEST_UNREACH,
    ICMP_HLEN,
    ICMP_PARAMETER_PROBLEM,
    ICMP_REDIRECT,
    ICMP_SOURCE_QUENCH,
    ICMP_TIME_EXCEEDED,
)
from mplslb.wire.ip import (
    IP_VERSION_4,
    IP_VERSION_6,
    IPPROTO_AH,
    IPPROTO_DSTOPTS,
    IPPROTO_FRAGMENT,
    IPPROTO_HOPOPTS,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_ROUTING,
    IPPROTO_TCP,
    IPPROTO_UDP,
)
from mplslb.wire.ipv4 import FRAG_OFFSET_MASK, IHL_MIN, IHL_UNIT, IPV4_HLEN
from mplslb.wire.ipv6 import AH_LEN_BIAS, AH_UNIT, EXT_MIN_LEN, EXT_UNIT, FRAGMENT_HLEN, IPV6_HLEN
from mplslb.wire.mpls import (
    ENTRY,
    LABEL_SHIFT,
    LABEL_SPACE,
    MAX_STACK_DEPTH,
    MPLS_ENTRY_LEN,
    RESERVED_LABEL_MAX,
    S_BIT,
    TC_SHIFT,
    TTL_MASK,
)
from mplslb.wire.tcp import (
    DATA_OFFSET_MIN,
    DATA_OFFSET_SHIFT,
    DATA_OFFSET_UNIT,
    OPTION_HLEN,
    TCP_HLEN,
    TCPOPT_EOL,
    TCPOPT_NOP,
    TCPOPT_TIMESTAMP,
    TCPFlag,
)
from mplslb.wire.udp import UDP_HLEN

# -- Ethernet --------------------------------------------------------------------------------------------------
ETH_DST: Final = 0
ETH_SRC: Final = ETH_ALEN  # the source MAC address
ETH_ADDRS: Final = 2 * ETH_ALEN  # both addresses: what the switch rewrites
ETH_TYPE: Final = 2 * ETH_ALEN  # the ethertype
VLAN_TYPE: Final = ETH_TYPE + VLAN_HLEN  # the ethertype after one 802.1Q tag

# -- the label stack entry (RFC 3032) --------------------------------------------------------------------------
LSE_LEN: Final = MPLS_ENTRY_LEN
LSE_AT: Final = ETH_HLEN  # the entry of an untagged frame
LSE_TTL: Final = LSE_LEN - 1  # the TTL octet within the entry
MPLS_BOS: Final = S_BIT
MPLS_TTL_MASK: Final = TTL_MASK
LABELLED_MIN: Final = ETH_HLEN + LSE_LEN  # the shortest frame that carries an entry
IP_AT: Final = LSE_AT + LSE_LEN  # the packet under the entry of an untagged frame

# -- the packet under the label --------------------------------------------------------------------------------
IPV4_IHL_MASK: Final = 0x0F
IPV4_IHL_UNIT: Final = IHL_UNIT
IPV4_SRC: Final = 12
IPV4_DST: Final = 16
IPV4_ADDR_LEN: Final = 4
IPV6_NEXT_HEADER: Final = 6
IPV6_SRC: Final = 8
IPV6_DST: Final = 24
IPV6_ADDR_LEN: Final = 16
TCP_FLAGS: Final = 13  # the flags octet in the TCP header
TCP_FIN: Final = int(TCPFlag.FIN)
TCP_RST: Final = int(TCPFlag.RST)
TCP_END: Final = TCP_FIN | TCP_RST  # the flags the session manager must see
TCP_SYN: Final = int(TCPFlag.SYN)
TCP_ACK: Final = int(TCPFlag.ACK)
TCP_SYN_ACK: Final = TCP_SYN | TCP_ACK  # a server's answer to a SYN
#: A client's segment completes the handshake when these flags read TCP_ACK alone (no SYN, no RST).
TCP_PURE_ACK_MASK: Final = TCP_ACK | TCP_SYN | TCP_RST
TCP_SEQ_AT: Final = 4  # the sequence number in the TCP header (4 octets, network order)
TCP_ACK_AT: Final = 8  # the acknowledgment number in the TCP header (4 octets, network order)
#: The 16-bit one's complement sum of an IPv4 header whose checksum is right (also the mask of one 16-bit word).
CHECKSUM_OK: Final = 0xFFFF
#: The timestamps option (RFC 7323, kind TCPOPT_TIMESTAMP) is this long; Linux sends it after two NOPs.
TCPOLEN_TIMESTAMP: Final = 10
TCP_TS_ALIGNED_LEN: Final = 2 + TCPOLEN_TIMESTAMP  # the options' octets, the two NOPs included
TCP_CHECK_AT: Final = 16  # the checksum in the TCP header
#: A label's last acknowledgment number as the fast paths record it (``LabelSwitchingTable.acks``, the kernel
#: entry's ``ack``): this bit over the 32-bit number says one is known; 0 is "none seen yet".
ACK_KNOWN: Final = 1 << 32
#: Reported instead of the flags when the fast path cannot find them (IPv6 extension headers before TCP): the
#: session manager reads the frame itself. Above the 8 bits of real flags.
TCP_FLAGS_UNKNOWN: Final = 0x100
#: A TCP header further into the packet than this is past any frame one buffer holds: its flags are not read.
MAX_TCP_OFFSET: Final = 16384
#: Covers where an ICMP error's quote may start (at most MAX_TCP_OFFSET + the ICMP header): the kernel datapath
#: masks the offset with it (and bounds the quote's length by it), below the verifier's largest packet offset.
QUOTE_MASK: Final = (1 << (MAX_TCP_OFFSET + ICMP_HLEN).bit_length()) - 1
#: What the kernel datapath's egress program makes readable of a GSO super-packet (segmented after it): its headers,
#: Ethernet, IP with options or IPv6 with extension headers, TCP with options, which the stack keeps linear anyway.
GSO_HEADERS: Final = 256

L4_PORTS_LEN: Final = 4  # the source and destination ports, the first octets of TCP and UDP alike

# -- per-label bits --------------------------------------------------------------------------------------------
WATCH_TCP_END: Final = 0x01  # report frames whose TCP flags carry FIN or RST
WATCH_ALL: Final = 0x02  # report every frame (a response-time measurement is under way)
#: On a C2S label: the session manager reads the session's first request (L7 analysis). The userspace paths report
#: every frame under WATCH_ALL anyway; the kernel offload, which records a measurement in its map instead of
#: reporting it, copies the request's first REQUEST_COPY octets for it (F_L7), or passes that one frame up.
WATCH_REQUEST: Final = 0x08
WATCH_BITS: Final = WATCH_TCP_END | WATCH_ALL | WATCH_REQUEST
#: Passed with ``watch`` to :meth:`LabelSwitchingTable.install`: the payload under the label is IPv6 (the IP
#: source is at IPV6_SRC, and the TCP flags are read only when TCP follows the fixed header). Kept in its own
#: array, not in ``watch``.
IPV6_PAYLOAD: Final = 0x04

# -- a label's row in the switching table -----------------------------------------------------------------------
#: What a frame reads and counts of its label (valid, watch bits, IP version, ingress and output ports, peer MAC,
#: the Ethernet addresses it leaves with, packets, bytes, last seen, last acknowledgment number, and the flow key
#: and peer IP it is bound to) lies in one row of ROW_SIZE octets, two cache lines side by side, at
#: ``label << ROW_SHIFT``: a frame at a label unrelated to the last one's misses the cache for its row, not once
#: per field, and a live session is no object at all. The rows are read through typed views of the same memory,
#: so each field's offset is given in its own unit. The MACs are kept as the integers their octets spell
#: (big-endian), so a frame's source MAC is compared and its new Ethernet header packed without a byte string.
ROW_SIZE: Final = 128
ROW_SHIFT: Final = 7  # label << ROW_SHIFT: the row's first octet
ROW_WORD_SHIFT: Final = 5  # label << ROW_WORD_SHIFT: its first 32-bit word
ROW_QUAD_SHIFT: Final = 4  # label << ROW_QUAD_SHIFT: its first 64-bit word
ROW_VALID: Final = 0  # octet: 1 while the label is installed
ROW_WATCH: Final = 1  # octet: the watch bits
ROW_V6: Final = 2  # octet: 1 when the payload under the label is IPv6
ROW_IN_PORT: Final = 1  # signed 32-bit word: the ingress port id
ROW_OUT_PORT: Final = 2  # signed 32-bit word: the output port id
ROW_REWRITE_TAIL: Final = 3  # signed 32-bit word: octets 8-11 of the rewrite (our port's MAC's last four)
ROW_PACKETS: Final = 2  # 64-bit word: frames switched or sent
ROW_BYTES: Final = 3  # 64-bit word: their octets
ROW_LAST_SEEN: Final = 4  # 64-bit float: when the last one was
ROW_ACKS: Final = 5  # 64-bit word: ACK_KNOWN | the last acknowledgment number, 0 before any
ROW_PEER: Final = 6  # 64-bit word: the peer MAC the label's frames must come from
ROW_REWRITE: Final = 7  # 64-bit word: octets 0-7 of the rewrite (the next hop's MAC, our port's MAC's first two)
ROW_FLOW: Final = 64  # octets: the flow key (IP source, IP destination, the two ports), FLOW_MAX at most
ROW_FLOW_LEN: Final = 100  # octet: the flow key's length, 0 when the label is bound to no flow
ROW_PEER_IP_LEN: Final = 101  # octet: the peer IP's length, 0 when none is bound
ROW_PEER_IP: Final = 104  # octets: the peer IP the label's frames must come from
#: 32-bit word: bumped by every install and withdrawal of the label (GENERATION_MASK wide), so whoever holds a
#: decision made from the row can tell whether it still stands.
ROW_GENERATION: Final = 30
GENERATION_MASK: Final = 0x7FFFFFFF
#: The longest flow key (IPv6) and peer IP.
FLOW_MAX: Final = 36
PEER_IP_MAX: Final = 16
#: The whole row, written at once when a label is installed (the valid octet last, on its own).
ROW: Final = struct.Struct("=BBBxiiiQQdQQQ")
#: The row's flow binding at once, from ROW_FLOW: the flow key, its length, the peer IP's length, the peer IP.
ROW_BINDING: Final = struct.Struct(f"={FLOW_MAX}sBB{ROW_PEER_IP - ROW_PEER_IP_LEN - 1}x{PEER_IP_MAX}s")
#: A label pair's two rows (C2S, then S2C), whole, written at once when a session's labels are installed: each
#: ROW, its flow binding (ROW_BINDING) and its generation word, then the row's last four octets (unused).
ROW_PAIR: Final = struct.Struct("=" + 2 * (ROW.format[1:] + ROW_BINDING.format[1:] + "I4x"))
#: A row's rewrite as the octets it stands for: ``ROW_REWRITE`` (octets 0-7), ``ROW_REWRITE_TAIL`` (8-11).
REWRITE: Final = struct.Struct("!Qi")
#: The Ethernet header and label stack entry a labelled frame leaves with: the row's rewrite, the MPLS ethertype,
#: the entry.
LABELLED_HEAD: Final = struct.Struct("!QiHI")

# -- the kernel offload's map entry ----------------------------------------------------------------------------
#: ``flags`` of a kernel entry.
F_V6: Final = 0x01  # the payload under the label is IPv6 (peer IP at IPV6_SRC; TCP flags only right after the header)
F_TCP_END: Final = 0x02  # TCP session: FIN and RST go up to the session manager
F_FLOW: Final = 0x04  # the session's flow is bound: IP destination ``dst_ip`` and, in TCP and UDP, ``ports``
#: The session's response time is being measured: the program records its first answers in the C2S entry's
#: ``rt_left`` .. ``response_ns`` (an S2C frame finds it as label - 1) and clears the flag once nothing more is
#: wanted of this direction (see mplslb.offload.xdp).
F_RT: Final = 0x08
#: C2S: the session's first request is wanted by the session manager (WATCH_REQUEST, L7 analysis): the program
#: copies its first REQUEST_COPY octets into the label's slot of the request map, or passes the frame up when the
#: label has no slot there.
F_L7: Final = 0x10
#: TCP session: the first FIN under the label (RST clear), once neither of the session's entries has ``F_RT``, is
#: forwarded and recorded in the entry (``fin_seq`` .. ``fin_ns``) instead of going up; the daemon folds the record
#: into the session table (see mplslb.offload.xdp). A later FIN under the label goes up as before.
F_FIN: Final = 0x20
#: A ticket (``offload_syn``): the label pair is pre-decided for a new TCP session whose SYN the program may take
#: (see mplslb.offload.xdp, "Tickets"); the client's fields are not filled in yet and every frame under the label
#: goes up (the daemon's table does not hold it: dropped there). The program clears it once it filled them in.
F_TICKET: Final = 0x40

#: ``struct entry`` of the kernel map, field by field: (name, C type, struct code, array length or 0). The C
#: declaration and the Python :data:`KERNEL_ENTRY` are both made from this list. The four fields after the
#: addresses are what the kernel keeps: frames forwarded, their bytes as received, CLOCK_MONOTONIC ns of the last
#: one, and the last acknowledgment number of a TCP session's label (as ``LabelSwitchingTable.acks``). The fields
#: after them are a C2S entry's measurement record (F_RT), written by the program and read by the daemon, and the
#: last four the label's FIN record (F_FIN), likewise.
KERNEL_ENTRY_FIELDS: Final = (
    ("out_ifindex", "__u32", "I", 0),
    ("in_ifindex", "__u32", "I", 0),
    ("rewrite", "__u8", "s", ETH_ADDRS),  # next hop MAC, output port MAC
    ("peer", "__u8", "s", ETH_ALEN),  # the source MAC the label is bound to
    ("flags", "__u8", "B", 0),
    ("ip_len", "__u8", "B", 0),  # 0 (no IP binding), 4 or 16
    ("peer_ip", "__u8", "s", IPV6_ADDR_LEN),
    ("dst_ip", "__u8", "s", IPV6_ADDR_LEN),  # with F_FLOW: the IP destination (4 or 16 octets, as peer_ip)
    ("ports", "__u8", "s", L4_PORTS_LEN),  # with F_FLOW: source and destination port as on the wire
    ("packets", "__u64", "Q", 0),
    ("bytes", "__u64", "Q", 0),
    ("last_ns", "__u64", "Q", 0),
    ("ack", "__u64", "Q", 0),  # ACK_KNOWN | the last acknowledgment number forwarded (0: none yet)
    ("rt_left", "__u32", "I", 0),  # watched frames the measurement may still take (WATCH_BUDGET at install)
    ("rt_pad", "__u32", "I", 0),
    ("answer_ns", "__u64", "Q", 0),  # the server's first answer (TCP: its SYN-ACK), CLOCK_MONOTONIC ns
    ("ack_ns", "__u64", "Q", 0),  # the client's latest pure ACK (the one after answer_ns completes the handshake)
    ("request_ns", "__u64", "Q", 0),  # the client's first payload (the request)
    ("response_ns", "__u64", "Q", 0),  # the server's first payload after the request
    ("fin_seq", "__u32", "I", 0),  # F_FIN: the sequence number of the FIN the program took under the label
    ("fin_taken", "__u32", "I", 0),  # F_FIN: 1 once it took one (a later FIN goes up)
    ("fin_ack", "__u64", "Q", 0),  # ACK_KNOWN | the other label's last acknowledgment number as the FIN passed
    ("fin_ns", "__u64", "Q", 0),  # F_FIN: CLOCK_MONOTONIC ns of the FIN
)
Fields = tuple[tuple[str, str, str, int], ...]


def struct_format(fields: Fields) -> str:
    """The :mod:`struct` format of a packed struct made from ``fields`` (name, C type, code, array length)."""
    return "=" + "".join(f"{n}{code}" if n else code for _, _, code, n in fields)


def struct_offsets(fields: Fields) -> dict[str, int]:
    """Byte offset of each field of a packed struct made from ``fields``."""
    offsets: dict[str, int] = {}
    fmt = "="
    for name, _, code, n in fields:
        offsets[name] = struct.calcsize(fmt)
        fmt += f"{n}{code}" if n else code
    return offsets


KERNEL_ENTRY: Final = struct.Struct(struct_format(KERNEL_ENTRY_FIELDS))


# -- the endpoints' kernel datapath (mplslb_endpoint.c) -------------------------------------------------------
IP_VERSION_SHIFT: Final = 4  # the version nibble of the first octet, IPv4 and IPv6 alike
#: The first octet of an IPv4 header without options: what the one-compare flow check of the fast paths expects.
IPV4_PLAIN: Final = (IP_VERSION_4 << IP_VERSION_SHIFT) | IHL_MIN
IPV4_FRAG_AT: Final = 6  # flags and fragment offset
IPV4_PROTO: Final = 9
IPV4_TOTAL_LEN: Final = 2
IPV6_PAYLOAD_LEN: Final = 4
IPV6_FRAG_OFFSET_SHIFT: Final = 3
#: Extension headers the kernel walks before it gives up on a packet (``ipv6_ext_too_many``); the userspace
#: endpoint walks any number.
IPV6_EXT_MAX: Final = 6
TCP_DOFF: Final = 12  # the data offset octet in the TCP header
L4_SPORT: Final = 0
L4_DPORT: Final = 2
UDP_LEN: Final = 4
SYN_ONLY: Final = int(TCPFlag.SYN)
SYN_MASK: Final = int(TCPFlag.SYN | TCPFlag.ACK)
FAMILY_V4: Final = 4
FAMILY_V6: Final = 6
NS_PER_MS: Final = 1_000_000
NS_PER_S: Final = 1_000_000_000
ENDPOINT_TTL: Final = 64  # the TTL of the entry the endpoints push, as mplslb.endpoint.Endpoint's default

#: ``struct syn_bucket``, the one element of the balancer program's per-CPU SYN map: a token bucket for the
#: unlabelled TCP SYNs (no ACK) this CPU hands to the slow path, and what it did with them.
#: How many octets of a session's first request (its payload, from the first) the kernel offload copies for the L7
#: analysis: the request line and Host of a request that fits are read as from the whole frame.
REQUEST_COPY: Final = 256
#: ``struct request``, a slot of the kernel offload's request map (C2S label -> slot, F_L7): the first octets of the
#: session's first request and its whole payload length, ``len`` nonzero once the program filled it (a copy
#: awaits the daemon; an empty one if the kernel could not copy).
REQUEST_FIELDS: Final = (
    ("copied", "__u32", "I", 0),  # octets copied into ``data``
    ("len", "__u32", "I", 0),  # the request's payload length (0: no request yet; more than ``copied``: truncated)
    ("data", "__u8", "s", REQUEST_COPY),
)

SYN_BUCKET_FIELDS: Final = (
    ("rate", "__u64", "Q", 0),  # SYNs per second this CPU lets through, also its burst (0: no limit)
    ("last_ns", "__u64", "Q", 0),  # CLOCK_MONOTONIC ns of the last SYN seen
    ("credit", "__u64", "Q", 0),  # tokens, in units of 1/NS_PER_S of a SYN
    ("passed", "__u64", "Q", 0),
    ("shed", "__u64", "Q", 0),
)
#: The most SYNs per second a bucket may be configured with (``rate * NS_PER_S`` must fit 64 bits).
SYN_RATE_MAX: Final = 1_000_000_000

#: Tickets (``offload_syn``): the most pre-decided label pairs outstanding at once (the ticket queue's size; the
#: queue of taken tickets is as large, so the program never fails to report one).
TICKETS_MAX: Final = 2048
#: The IPv4 header's TOS and TTL octets, IPv6's hop limit: the label stack entry a SYN taken in the kernel gets is
#: built from them as the userspace path builds it (``Balancer._to_server``: TC from the top 3 bits of the TOS).
IPV4_TOS_AT: Final = 1
IPV4_TTL_AT: Final = 8
IPV6_HOP_LIMIT_AT: Final = 7
TOS_TO_TC: Final = 5
IPV4_MORE_FRAGMENTS: Final = 0x2000  # the MF bit of the flags and fragment offset field
TCP_OPTIONS_MAX: Final = 15 * DATA_OFFSET_UNIT - TCP_HLEN  # the most option octets a TCP header holds
#: ``struct syn_port``, the value of the client port map (ingress ifindex -> the port's MAC): the ports a SYN may be
#: taken on.
SYN_PORT_FIELDS: Final = (
    ("port_mac", "__u8", "s", ETH_ALEN),
    ("port_pad", "__u16", "H", 0),
)
#: ``struct service_key`` of the service map: a (VIP, TCP port) the daemon serves (address left-aligned, the port
#: as on the wire).
SERVICE_KEY_FIELDS: Final = (
    ("svc_addr", "__u8", "s", IPV6_ADDR_LEN),
    ("svc_port", "__u8", "s", 2),
    ("svc_family", "__u8", "B", 0),  # FAMILY_V4 or FAMILY_V6
    ("svc_pad", "__u8", "B", 0),
)
#: ``struct syn_flow``, the key of the flow map (a live TCP session's flow as the client sends it -> its C2S label):
#: the program takes a SYN only for a flow not in it.
SYN_FLOW_FIELDS: Final = (
    ("fl_src", "__u8", "s", IPV6_ADDR_LEN),
    ("fl_dst", "__u8", "s", IPV6_ADDR_LEN),
    ("fl_ports", "__u8", "s", L4_PORTS_LEN),  # source and destination port as on the wire
    ("fl_family", "__u8", "B", 0),
    ("fl_pad", "__u8", "s", 3),
)
#: ``struct taken``, what the program reports of a SYN it took under a ticket (the taken queue): the ticket's C2S
#: label, the port it came in on, its time, and the client's fields it filled into the two entries.
TAKEN_FIELDS: Final = (
    ("t_c2s", "__u32", "I", 0),
    ("t_ifindex", "__u32", "I", 0),
    ("t_ns", "__u64", "Q", 0),  # CLOCK_MONOTONIC ns of the SYN
    ("t_mac", "__u8", "s", ETH_ALEN),  # the client's MAC (the frame's source)
    ("t_family", "__u8", "B", 0),
    ("t_closed", "__u8", "B", 0),  # 1: taken on the flow of a session the program saw close (flow_closed)
    ("t_src", "__u8", "s", IPV6_ADDR_LEN),
    ("t_dst", "__u8", "s", IPV6_ADDR_LEN),
    ("t_ports", "__u8", "s", L4_PORTS_LEN),
    ("t_len", "__u32", "I", 0),  # the frame's length as received (the SYN's bytes, counted in the C2S entry)
)
#: What the program counts of the SYNs it looked at for a ticket (a per-CPU array, in this order).
TICKET_COUNTERS: Final = (
    "syn_taken",  # taken under a ticket and sent to the ticket's server
    "syn_no_ticket",  # would have been taken: no ticket left (went up)
    "syn_flow_live",  # its flow is a live session's (a retransmission, a reused flow: went up)
)

#: ``struct flow_key`` of the endpoints' flow map: the 5-tuple as the local host sends the flow (ports in host order;
#: an IPv4 address fills the first 4 octets and the rest stay zero).
FLOW_KEY_FIELDS: Final = (
    ("proto", "__u8", "B", 0),
    ("family", "__u8", "B", 0),  # FAMILY_V4 or FAMILY_V6
    ("sport", "__u16", "H", 0),
    ("dport", "__u16", "H", 0),
    ("kpad", "__u16", "H", 0),
    ("src", "__u8", "s", IPV6_ADDR_LEN),
    ("dst", "__u8", "s", IPV6_ADDR_LEN),
)
#: ``struct flow`` of the flow map: the label to push, the MAC address to send to, CLOCK_MONOTONIC ns of last use.
FLOW_FIELDS: Final = (
    ("last_ns", "__u64", "Q", 0),
    ("label", "__u32", "I", 0),
    ("peer", "__u8", "s", ETH_ALEN),
    ("fpad", "__u16", "H", 0),
    ("fpad2", "__u32", "I", 0),
    ("heard_ns", "__u64", "Q", 0),  # the last labelled frame of the flow from the wire (client: its fallback)
)
#: ``struct vip_key`` of the virtual IP set.
VIP_KEY_FIELDS: Final = (
    ("addr", "__u8", "s", IPV6_ADDR_LEN),
    ("vfamily", "__u32", "I", 0),
)
#: ``struct endpoint_config``, the one element of the config map.
ENDPOINT_CONFIG_FIELDS: Final = (
    ("mac", "__u8", "s", ETH_ALEN),  # this host's wire interface
    ("gateway", "__u8", "s", ETH_ALEN),  # client: the balancer port's MAC
    ("ttl", "__u32", "I", 0),
    ("fallback_ms", "__u32", "I", 0),  # client: a flow unheard for this long goes unlabelled again (0: never)
)
#: The fields of the kernel's ``struct __sk_buff`` the tc programs read (the BPF context ABI, not the frame).
SKB_FIELDS: Final = (
    ("len", "__u32", "I", 0),
    ("skb_before_protocol", "__u32", "s", 3 * 4),
    ("protocol", "__u32", "I", 0),
    ("vlan_present", "__u32", "I", 0),
    ("skb_before_ingress_ifindex", "__u8", "s", 12),
    ("ingress_ifindex", "__u32", "I", 0),
    ("skb_before_data", "__u8", "s", 36),
    ("data", "__u32", "I", 0),
    ("data_end", "__u32", "I", 0),
    ("skb_before_gso_segs", "__u8", "s", 80),
    ("gso_segs", "__u32", "I", 0),
)

#: What the endpoint programs count, in this order (an index into the counters map). The reasons a frame is
#: dropped have the names :class:`mplslb.endpoint.Endpoint` and the wire codecs give them; the first ones count
#: frames that went through.
#: The endpoint datapath's traffic counters; every other name of :data:`ENDPOINT_COUNTERS` is a drop reason.
ENDPOINT_TRAFFIC: Final = (
    "from_wire",  # a labelled frame popped and handed to the host
    "from_host",  # a packet of a known flow labelled for the wire
    "from_host_gso",  # of from_host: a super-packet labelled whole, segmented by the stack after the push
    "from_host_unlabelled",  # client: a flow's first packet, sent unlabelled
    "passed",  # not the datapath's: ARP, ND, unlabelled frames, traffic not from or to a virtual IP
)
ENDPOINT_COUNTERS: Final = (
    *ENDPOINT_TRAFFIC,
    "not_c2s_label",
    "not_s2c_label",
    "not_for_vip",
    "no_session_label",
    "mpls_truncated",
    "mpls_no_bottom",
    "mpls_too_deep",
    "ip_truncated",
    "ip_bad_version",
    "ipv4_truncated",
    "ipv4_bad_ihl",
    "ipv4_bad_total_length",
    "ipv4_bad_checksum",
    "ipv6_truncated",
    "ipv6_bad_payload_length",
    "ipv6_ext_truncated",
    "ipv6_ext_too_many",
    "ip_fragment",
    "tcp_truncated",
    "tcp_bad_data_offset",
    "udp_truncated",
    "udp_bad_length",
    "icmp_truncated",
    "icmp_not_error",
    "icmp_quote_truncated",
    "not_from_vip",
    "unsupported_protocol",
    "room_failed",
    "fallback_unlabelled",  # client: a flow unheard for fallback_ms sent unlabelled again (the label died?)
)

#: What the balancer's tc ingress program (``offload_gso``) counts, in this order (an index into its per-CPU
#: counters map): super-packets it switched, those whose FIN it cleared first, unlabelled ones it left to the host's
#: stack; every other name is the reason a labelled super-packet was dropped (userspace cannot read one).
GSO_TRAFFIC: Final = ("gso_forwarded", "gso_fin_cleared", "gso_passed_unlabelled")
GSO_COUNTERS: Final = (
    *GSO_TRAFFIC,
    "gso_unknown_label",  # no entry in the kernel for its label (or no room for a label stack entry)
    "gso_check_failed",  # ingress port, source MAC or IP, bottom of stack, the session's flow
    "gso_ttl_expired",  # TTL <= 1
    "gso_watched",  # the session manager wants the frame (a measurement the kernel cannot record, L7 analysis)
    "gso_tcp_end",  # an RST, or a FIN whose flag could not be cleared
    "gso_vlan_pop_failed",
    "gso_pull_failed",  # the headers (or, under a measurement, the whole packet) could not be made readable
)


SYN_BUCKET: Final = struct.Struct(struct_format(SYN_BUCKET_FIELDS))
REQUEST: Final = struct.Struct(struct_format(REQUEST_FIELDS))
FLOW_KEY: Final = struct.Struct(struct_format(FLOW_KEY_FIELDS))
FLOW: Final = struct.Struct(struct_format(FLOW_FIELDS))
VIP_KEY: Final = struct.Struct(struct_format(VIP_KEY_FIELDS))
ENDPOINT_CONFIG: Final = struct.Struct(struct_format(ENDPOINT_CONFIG_FIELDS))
SYN_PORT: Final = struct.Struct(struct_format(SYN_PORT_FIELDS))
SERVICE_KEY: Final = struct.Struct(struct_format(SERVICE_KEY_FIELDS))
SYN_FLOW: Final = struct.Struct(struct_format(SYN_FLOW_FIELDS))
TAKEN: Final = struct.Struct(struct_format(TAKEN_FIELDS))
#: Every struct of the generated header: C name -> fields.
C_STRUCTS: Final = {
    "entry": KERNEL_ENTRY_FIELDS,
    "syn_bucket": SYN_BUCKET_FIELDS,
    "request": REQUEST_FIELDS,
    "flow_key": FLOW_KEY_FIELDS,
    "flow": FLOW_FIELDS,
    "vip_key": VIP_KEY_FIELDS,
    "endpoint_config": ENDPOINT_CONFIG_FIELDS,
    "syn_port": SYN_PORT_FIELDS,
    "service_key": SERVICE_KEY_FIELDS,
    "syn_flow": SYN_FLOW_FIELDS,
    "taken": TAKEN_FIELDS,
    "__sk_buff": SKB_FIELDS,
}


def counter_constant(name: str) -> str:
    """The C name of an endpoint counter's index."""
    return "EP_" + name.upper()


#: The constants the C programs are built with, by the name they have in C and in this module.
C_CONSTANTS: Final = (
    "ETH_DST", "ETH_SRC", "ETH_ALEN", "ETH_ADDRS", "ETH_TYPE", "ETH_HLEN", "VLAN_HLEN", "VLAN_TYPE",
    "ETH_P_8021Q", "ETH_P_MPLS_UC", "ETH_P_IP", "ETH_P_IPV6",
    "LSE_LEN", "LSE_AT", "LSE_TTL", "LABEL_SHIFT", "MPLS_BOS", "MPLS_TTL_MASK", "LABELLED_MIN", "IP_AT",
    "LABEL_SPACE", "RESERVED_LABEL_MAX",
    "IPV4_IHL_MASK", "IPV4_IHL_UNIT", "IPV4_SRC", "IPV4_DST", "IPV4_ADDR_LEN", "IPV6_SRC", "IPV6_DST",
    "IPV6_ADDR_LEN", "IPV6_NEXT_HEADER", "IPV6_HLEN", "IPPROTO_TCP", "IPPROTO_UDP",
    "TCP_FLAGS", "TCP_FIN", "TCP_RST", "TCP_END", "MAX_TCP_OFFSET", "TCP_SYN", "TCP_ACK", "TCP_SYN_ACK",
    "TCP_PURE_ACK_MASK", "TCP_SEQ_AT", "TCP_ACK_AT", "ACK_KNOWN", "WATCH_TCP_END", "WATCH_ALL", "WATCH_REQUEST",
    "F_V6", "F_TCP_END",
    "F_FLOW", "F_RT", "F_L7", "F_FIN", "REQUEST_COPY", "IP_VERSION_4", "IP_VERSION_6", "IPV4_PLAIN", "TCPOPT_TIMESTAMP",
    "TCPOLEN_TIMESTAMP", "TCP_TS_ALIGNED_LEN", "TCPOPT_NOP", "OPTION_HLEN", "CHECKSUM_OK",
    "C2S_MIN", "C2S_MAX", "S2C_MIN", "S2C_MAX", "MAX_STACK_DEPTH",
    "IP_VERSION_SHIFT", "IPV4_HLEN", "IHL_MIN", "IPV4_FRAG_AT", "FRAG_OFFSET_MASK", "IPV4_PROTO", "IPV4_TOTAL_LEN",
    "IPV6_PAYLOAD_LEN", "IPV6_FRAG_OFFSET_SHIFT", "IPV6_EXT_MAX",
    "IPPROTO_HOPOPTS", "IPPROTO_ROUTING", "IPPROTO_FRAGMENT", "IPPROTO_DSTOPTS", "IPPROTO_AH", "IPPROTO_ICMP",
    "IPPROTO_ICMPV6", "EXT_UNIT", "EXT_MIN_LEN", "AH_UNIT", "AH_LEN_BIAS", "FRAGMENT_HLEN",
    "TCP_HLEN", "DATA_OFFSET_MIN", "DATA_OFFSET_SHIFT", "DATA_OFFSET_UNIT", "UDP_HLEN", "UDP_LEN",
    "TCP_DOFF", "L4_SPORT", "L4_DPORT", "L4_PORTS_LEN", "SYN_ONLY", "SYN_MASK", "FAMILY_V4", "FAMILY_V6",
    "ENDPOINT_TTL", "NS_PER_MS", "NS_PER_S", "ICMP_HLEN", "ICMP_DEST_UNREACH", "ICMP_SOURCE_QUENCH", "ICMP_REDIRECT",
    "ICMP_TIME_EXCEEDED", "ICMP_PARAMETER_PROBLEM", "ICMP6_INFO_MIN", "QUOTE_MASK", "GSO_HEADERS",
    "TCP_CHECK_AT", "F_TICKET", "TICKETS_MAX", "IPV4_TOS_AT", "IPV4_TTL_AT", "IPV6_HOP_LIMIT_AT", "TOS_TO_TC",
    "TC_SHIFT", "TCPOPT_EOL", "IPV4_MORE_FRAGMENTS", "TCP_OPTIONS_MAX",
)  # fmt: skip


def constants() -> dict[str, int]:
    """Every C constant's value, by name."""
    values = globals()
    out = {name: int(values[name]) for name in C_CONSTANTS}
    out.update((counter_constant(name), i) for i, name in enumerate(ENDPOINT_COUNTERS))
    out["EP_COUNTERS"] = len(ENDPOINT_COUNTERS)
    out.update((name.upper(), i) for i, name in enumerate(GSO_COUNTERS))
    out["GSO_COUNTERS"] = len(GSO_COUNTERS)
    out.update((name.upper(), i) for i, name in enumerate(TICKET_COUNTERS))
    out["TICKET_COUNTERS"] = len(TICKET_COUNTERS)
    return out


_C_SIZES: Final = {"__u8": 1, "__u16": 2, "__u32": 4, "__u64": 8}


def c_header() -> str:
    """The layout as a C header: one ``#define`` per constant and ``struct entry`` of the kernel map."""
    lines = [
        "/* Generated from mplslb.switching.layout at build time: do not edit. */",
        "#ifndef MPLSLB_LAYOUT_H",
        "#define MPLSLB_LAYOUT_H",
        "",
        "typedef unsigned char __u8;",
        "typedef unsigned short __u16;",
        "typedef unsigned int __u32;",
        "typedef unsigned long long __u64;",
        "",
    ]
    lines += [f"#define {name} {value:#x}" for name, value in constants().items()]
    for cname, fields in C_STRUCTS.items():
        lines += ["", f"struct {cname} {{"]
        lines += [f"\t{ctype} {name}{f'[{n // _C_SIZES[ctype]}]' if n else ''};" for name, ctype, _, n in fields]
        lines += ["};"]
    lines += ["", "#endif", ""]
    return "\n".join(lines)


__all__ = [
    "ACK_KNOWN",
    "AH_LEN_BIAS",
    "AH_UNIT",
    "C2S_MAX",
    "C2S_MIN",
    "CHECKSUM_OK",
    "C_CONSTANTS",
    "C_STRUCTS",
    "DATA_OFFSET_MIN",
    "DATA_OFFSET_SHIFT",
    "DATA_OFFSET_UNIT",
    "ENDPOINT_CONFIG",
    "ENDPOINT_CONFIG_FIELDS",
    "ENDPOINT_COUNTERS",
    "ENTRY",
    "ETH_ADDRS",
    "ETH_ALEN",
    "ETH_DST",
    "ETH_HLEN",
    "ETH_P_8021Q",
    "ETH_P_IP",
    "ETH_P_IPV6",
    "ETH_P_MPLS_UC",
    "ETH_SRC",
    "ETH_TYPE",
    "EXT_MIN_LEN",
    "EXT_UNIT",
    "FLOW",
    "FLOW_FIELDS",
    "FLOW_KEY",
    "FLOW_KEY_FIELDS",
    "FLOW_MAX",
    "FRAGMENT_HLEN",
    "FRAG_OFFSET_MASK",
    "F_FIN",
    "F_FLOW",
    "F_L7",
    "F_RT",
    "F_TCP_END",
    "F_TICKET",
    "F_V6",
    "GENERATION_MASK",
    "GSO_COUNTERS",
    "GSO_TRAFFIC",
    "ICMP6_INFO_MIN",
    "ICMP_DEST_UNREACH",
    "ICMP_HLEN",
    "ICMP_PARAMETER_PROBLEM",
    "ICMP_REDIRECT",
    "ICMP_SOURCE_QUENCH",
    "ICMP_TIME_EXCEEDED",
    "IHL_MIN",
    "IHL_UNIT",
    "IPPROTO_AH",
    "IPPROTO_DSTOPTS",
    "IPPROTO_FRAGMENT",
    "IPPROTO_HOPOPTS",
    "IPPROTO_ICMP",
    "IPPROTO_ICMPV6",
    "IPPROTO_ROUTING",
    "IPPROTO_TCP",
    "IPPROTO_UDP",
    "IPV4_ADDR_LEN",
    "IPV4_DST",
    "IPV4_HLEN",
    "IPV4_IHL_MASK",
    "IPV4_IHL_UNIT",
    "IPV4_MORE_FRAGMENTS",
    "IPV4_PLAIN",
    "IPV4_SRC",
    "IPV4_TOS_AT",
    "IPV4_TTL_AT",
    "IPV6_ADDR_LEN",
    "IPV6_DST",
    "IPV6_HLEN",
    "IPV6_HOP_LIMIT_AT",
    "IPV6_NEXT_HEADER",
    "IPV6_PAYLOAD",
    "IPV6_SRC",
    "IP_AT",
    "IP_VERSION_4",
    "IP_VERSION_6",
    "KERNEL_ENTRY",
    "KERNEL_ENTRY_FIELDS",
    "L4_DPORT",
    "L4_PORTS_LEN",
    "L4_SPORT",
    "LABELLED_HEAD",
    "LABELLED_MIN",
    "LABEL_SHIFT",
    "LABEL_SPACE",
    "LSE_AT",
    "LSE_LEN",
    "LSE_TTL",
    "MAX_STACK_DEPTH",
    "MAX_TCP_OFFSET",
    "MPLS_BOS",
    "MPLS_ENTRY_LEN",
    "MPLS_TTL_MASK",
    "NS_PER_MS",
    "NS_PER_S",
    "OPTION_HLEN",
    "PEER_IP_MAX",
    "QUOTE_MASK",
    "REQUEST",
    "REQUEST_COPY",
    "REQUEST_FIELDS",
    "RESERVED_LABEL_MAX",
    "REWRITE",
    "ROW",
    "ROW_ACKS",
    "ROW_BINDING",
    "ROW_BYTES",
    "ROW_FLOW",
    "ROW_FLOW_LEN",
    "ROW_GENERATION",
    "ROW_IN_PORT",
    "ROW_LAST_SEEN",
    "ROW_OUT_PORT",
    "ROW_PACKETS",
    "ROW_PAIR",
    "ROW_PEER",
    "ROW_PEER_IP",
    "ROW_PEER_IP_LEN",
    "ROW_QUAD_SHIFT",
    "ROW_REWRITE",
    "ROW_REWRITE_TAIL",
    "ROW_SHIFT",
    "ROW_SIZE",
    "ROW_V6",
    "ROW_VALID",
    "ROW_WATCH",
    "ROW_WORD_SHIFT",
    "S2C_MAX",
    "S2C_MIN",
    "SERVICE_KEY",
    "SERVICE_KEY_FIELDS",
    "SYN_BUCKET",
    "SYN_BUCKET_FIELDS",
    "SYN_FLOW",
    "SYN_FLOW_FIELDS",
    "SYN_PORT",
    "SYN_PORT_FIELDS",
    "SYN_RATE_MAX",
    "S_BIT",
    "TAKEN",
    "TAKEN_FIELDS",
    "TCPOLEN_TIMESTAMP",
    "TCPOPT_EOL",
    "TCPOPT_NOP",
    "TCPOPT_TIMESTAMP",
    "TCP_ACK",
    "TCP_ACK_AT",
    "TCP_CHECK_AT",
    "TCP_END",
    "TCP_FIN",
    "TCP_FLAGS",
    "TCP_FLAGS_UNKNOWN",
    "TCP_HLEN",
    "TCP_OPTIONS_MAX",
    "TCP_PURE_ACK_MASK",
    "TCP_RST",
    "TCP_SEQ_AT",
    "TCP_SYN",
    "TCP_SYN_ACK",
    "TCP_TS_ALIGNED_LEN",
    "TC_SHIFT",
    "TICKETS_MAX",
    "TICKET_COUNTERS",
    "TOS_TO_TC",
    "TTL_MASK",
    "UDP_HLEN",
    "VIP_KEY",
    "VIP_KEY_FIELDS",
    "VLAN_HLEN",
    "VLAN_TYPE",
    "WATCH_ALL",
    "WATCH_BITS",
    "WATCH_REQUEST",
    "WATCH_TCP_END",
    "Fields",
    "c_header",
    "constants",
    "counter_constant",
    "struct_format",
    "struct_offsets",
]
