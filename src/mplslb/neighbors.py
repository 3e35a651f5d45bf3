"""Answering for our own addresses on the wire: ARP (RFC 826) and IPv6 neighbour discovery (RFC 4861).

Theory of operation
-------------------
Clients (or their router) must resolve a virtual IP to the balancer's MAC address on the port they reach it by;
the servers hold the VIP too, but only behind their agents, so they never answer for it on the wire (as in
direct server return). :func:`answer` takes an unlabelled frame that arrived on a client-side port and, if it is
an ARP request or a neighbour solicitation for one of ``addresses``, returns the reply frame from ``port_mac``.
Anything else returns None. Sans-I/O, like the rest of the core.
"""

from __future__ import annotations

import struct
from collections.abc import Container

from mplslb.wire.checksum import internet_checksum, pseudo_header_sum
from mplslb.wire.ethernet import ETH_ALEN, ETH_HLEN, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, build_ethernet
from mplslb.wire.icmp import ICMP6_NEIGHBOR_ADVERT, ICMP6_NEIGHBOR_SOLICIT
from mplslb.wire.ip import IPPROTO_ICMPV6
from mplslb.wire.ipv6 import build_ipv6

ARP_HTYPE_ETHERNET = 1
ARP_REQUEST, ARP_REPLY = 1, 2
_ARP = struct.Struct("!HHBBH6s4s6s4s")
ND_HOP_LIMIT = 255  # RFC 4861: ND messages must carry hop limit 255
ND_OPT_TARGET_LL = 2
ND_FLAG_SOLICITED = 0x40000000
ND_FLAG_OVERRIDE = 0x20000000
_NA = struct.Struct("!BBHI16sBB6s")
_NS_MIN = 24  # type, code, checksum, reserved, target
_IPV6_HLEN = 40
_ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")
_ALL_NODES_MAC = bytes.fromhex("333300000001")  # RFC 2464: 33:33 and the low 32 bits of ff02::1
_ETH_TYPE = 2 * ETH_ALEN
_IPV4_LEN = 4
_IPV6_LEN = 16
_NEXT, _HOP_LIMIT, _SRC = 6, 7, 8  # in the IPv6 header
_NS_TARGET = 8  # in the neighbour solicitation
_ARP_ASKS = (ARP_HTYPE_ETHERNET, ETH_P_IP, ETH_ALEN, _IPV4_LEN, ARP_REQUEST)


def answer(frame: bytes | memoryview, addresses: Container[bytes], port_mac: bytes) -> bytes | None:
    """The ARP reply or neighbour advertisement for ``frame``, if it asks for one of ``addresses``."""
    if len(frame) < ETH_HLEN:
        return None
    ethertype = (frame[_ETH_TYPE] << 8) | frame[_ETH_TYPE + 1]
    if ethertype == ETH_P_ARP:
        return _arp(frame, addresses, port_mac)
    if ethertype == ETH_P_IPV6:
        return _nd(frame, addresses, port_mac)
    return None


def _arp(frame: bytes | memoryview, addresses: Container[bytes], port_mac: bytes) -> bytes | None:
    if len(frame) < ETH_HLEN + _ARP.size:
        return None
    htype, ptype, hlen, plen, op, sha, spa, _, tpa = _ARP.unpack_from(frame, ETH_HLEN)
    if (htype, ptype, hlen, plen, op) != _ARP_ASKS or tpa not in addresses:
        return None
    reply = _ARP.pack(ARP_HTYPE_ETHERNET, ETH_P_IP, ETH_ALEN, _IPV4_LEN, ARP_REPLY, port_mac, tpa, sha, spa)
    return build_ethernet(sha, port_mac, ETH_P_ARP) + reply


def _nd(frame: bytes | memoryview, addresses: Container[bytes], port_mac: bytes) -> bytes | None:
    ip = ETH_HLEN
    if len(frame) < ip + _IPV6_HLEN + _NS_MIN or frame[ip] >> 4 != 6 or frame[ip + _NEXT] != IPPROTO_ICMPV6:
        return None
    icmp = ip + _IPV6_HLEN
    if frame[icmp] != ICMP6_NEIGHBOR_SOLICIT or frame[ip + _HOP_LIMIT] != ND_HOP_LIMIT:
        return None
    target = bytes(frame[icmp + _NS_TARGET : icmp + _NS_TARGET + _IPV6_LEN])
    if target not in addresses:
        return None
    src = bytes(frame[ip + _SRC : ip + _SRC + _IPV6_LEN])
    unspecified = src == bytes(16)  # duplicate address detection: answer to all nodes, not solicited
    dst = _ALL_NODES if unspecified else src
    flags = ND_FLAG_OVERRIDE | (0 if unspecified else ND_FLAG_SOLICITED)
    message = bytearray(_NA.pack(ICMP6_NEIGHBOR_ADVERT, 0, 0, flags, target, ND_OPT_TARGET_LL, 1, port_mac))
    checksum = internet_checksum(message, pseudo_header_sum(target, dst, IPPROTO_ICMPV6, len(message)))
    struct.pack_into("!H", message, 2, checksum)
    packet = build_ipv6(target, dst, IPPROTO_ICMPV6, len(message), hop_limit=ND_HOP_LIMIT) + bytes(message)
    dst_mac = bytes(frame[ETH_ALEN : 2 * ETH_ALEN]) if not unspecified else _ALL_NODES_MAC
    return build_ethernet(dst_mac, port_mac, ETH_P_IPV6) + packet
