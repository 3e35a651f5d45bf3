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

from mplslb.wire.ethernet import ETH_ALEN, ETH_HLEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, ETH_P_MPLS_UC
from mplslb.wire.ethernet import VLAN_TAG_LEN as VLAN_HLEN
from mplslb.wire.ip import IPPROTO_TCP, IPPROTO_UDP
from mplslb.wire.ipv4 import IHL_UNIT
from mplslb.wire.mpls import ENTRY, LABEL_SHIFT, LABEL_SPACE, MPLS_ENTRY_LEN, RESERVED_LABEL_MAX, S_BIT, TTL_MASK
from mplslb.wire.tcp import TCPFlag

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
IPV6_HLEN: Final = 40  # the fixed header: TCP right after it when the next header is TCP
TCP_FLAGS: Final = 13  # the flags octet in the TCP header
TCP_FIN: Final = int(TCPFlag.FIN)
TCP_RST: Final = int(TCPFlag.RST)
TCP_END: Final = TCP_FIN | TCP_RST  # the flags the session manager must see
#: Reported instead of the flags when the fast path cannot find them (IPv6 extension headers before TCP): the
#: session manager reads the frame itself. Above the 8 bits of real flags.
TCP_FLAGS_UNKNOWN: Final = 0x100
#: A TCP header further into the packet than this is past any frame one buffer holds: its flags are not read.
MAX_TCP_OFFSET: Final = 16384

# -- per-label bits --------------------------------------------------------------------------------------------
WATCH_TCP_END: Final = 0x01  # report frames whose TCP flags carry FIN or RST
WATCH_ALL: Final = 0x02  # report every frame (a response-time measurement is under way)
WATCH_BITS: Final = WATCH_TCP_END | WATCH_ALL
#: Passed with ``watch`` to :meth:`LabelSwitchingTable.install`: the payload under the label is IPv6 (the IP
#: source is at IPV6_SRC, and the TCP flags are read only when TCP follows the fixed header). Kept in its own
#: array, not in ``watch``.
IPV6_PAYLOAD: Final = 0x04

# -- the kernel offload's map entry ----------------------------------------------------------------------------
#: ``flags`` of a kernel entry.
F_V6: Final = 0x01  # the payload under the label is IPv6 (peer IP at IPV6_SRC; TCP flags only right after the header)
F_TCP_END: Final = 0x02  # TCP session: FIN and RST go up to the session manager

#: ``struct entry`` of the kernel map, field by field: (name, C type, struct code, array length or 0). The C
#: declaration and the Python :data:`KERNEL_ENTRY` are both made from this list. The last three fields are the
#: counters the kernel keeps: frames forwarded, their bytes as received, CLOCK_MONOTONIC ns of the last one.
KERNEL_ENTRY_FIELDS: Final = (
    ("out_ifindex", "__u32", "I", 0),
    ("in_ifindex", "__u32", "I", 0),
    ("rewrite", "__u8", "s", ETH_ADDRS),  # next hop MAC, output port MAC
    ("peer", "__u8", "s", ETH_ALEN),  # the source MAC the label is bound to
    ("flags", "__u8", "B", 0),
    ("ip_len", "__u8", "B", 0),  # 0 (no IP binding), 4 or 16
    ("peer_ip", "__u8", "s", IPV6_ADDR_LEN),
    ("pad", "__u32", "I", 0),
    ("packets", "__u64", "Q", 0),
    ("bytes", "__u64", "Q", 0),
    ("last_ns", "__u64", "Q", 0),
)
KERNEL_ENTRY: Final = struct.Struct("=" + "".join(f"{n}{code}" if n else code for _, _, code, n in KERNEL_ENTRY_FIELDS))


def kernel_entry_offsets() -> dict[str, int]:
    """Byte offset of each field of :data:`KERNEL_ENTRY`."""
    offsets: dict[str, int] = {}
    fmt = "="
    for name, _, code, n in KERNEL_ENTRY_FIELDS:
        offsets[name] = struct.calcsize(fmt)
        fmt += f"{n}{code}" if n else code
    return offsets


#: The constants the C programs are built with, by the name they have in C and in this module.
C_CONSTANTS: Final = (
    "ETH_DST", "ETH_SRC", "ETH_ALEN", "ETH_ADDRS", "ETH_TYPE", "ETH_HLEN", "VLAN_HLEN", "VLAN_TYPE",
    "ETH_P_8021Q", "ETH_P_MPLS_UC", "ETH_P_IP", "ETH_P_IPV6",
    "LSE_LEN", "LSE_AT", "LSE_TTL", "LABEL_SHIFT", "MPLS_BOS", "MPLS_TTL_MASK", "LABELLED_MIN", "IP_AT",
    "LABEL_SPACE", "RESERVED_LABEL_MAX",
    "IPV4_IHL_MASK", "IPV4_IHL_UNIT", "IPV4_SRC", "IPV4_DST", "IPV4_ADDR_LEN", "IPV6_SRC", "IPV6_DST",
    "IPV6_ADDR_LEN", "IPV6_NEXT_HEADER", "IPV6_HLEN", "IPPROTO_TCP", "IPPROTO_UDP",
    "TCP_FLAGS", "TCP_FIN", "TCP_RST", "TCP_END", "MAX_TCP_OFFSET",
    "WATCH_TCP_END", "WATCH_ALL", "F_V6", "F_TCP_END",
)  # fmt: skip


def constants() -> dict[str, int]:
    """Every C constant's value, by name."""
    values = globals()
    return {name: int(values[name]) for name in C_CONSTANTS}


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
    lines += ["", "struct entry {"]
    lines += [f"\t{ctype} {name}{f'[{n}]' if n else ''};" for name, ctype, _, n in KERNEL_ENTRY_FIELDS]
    lines += ["};", "", "#endif", ""]
    return "\n".join(lines)


__all__ = [
    "C_CONSTANTS",
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
    "F_TCP_END",
    "F_V6",
    "IHL_UNIT",
    "IPPROTO_TCP",
    "IPPROTO_UDP",
    "IPV4_ADDR_LEN",
    "IPV4_DST",
    "IPV4_IHL_MASK",
    "IPV4_IHL_UNIT",
    "IPV4_SRC",
    "IPV6_ADDR_LEN",
    "IPV6_DST",
    "IPV6_HLEN",
    "IPV6_NEXT_HEADER",
    "IPV6_PAYLOAD",
    "IPV6_SRC",
    "IP_AT",
    "KERNEL_ENTRY",
    "KERNEL_ENTRY_FIELDS",
    "LABELLED_MIN",
    "LABEL_SHIFT",
    "LABEL_SPACE",
    "LSE_AT",
    "LSE_LEN",
    "LSE_TTL",
    "MAX_TCP_OFFSET",
    "MPLS_BOS",
    "MPLS_ENTRY_LEN",
    "MPLS_TTL_MASK",
    "RESERVED_LABEL_MAX",
    "S_BIT",
    "TCP_END",
    "TCP_FIN",
    "TCP_FLAGS",
    "TCP_FLAGS_UNKNOWN",
    "TCP_RST",
    "TTL_MASK",
    "VLAN_HLEN",
    "VLAN_TYPE",
    "WATCH_ALL",
    "WATCH_BITS",
    "WATCH_TCP_END",
    "c_header",
    "constants",
    "kernel_entry_offsets",
]
