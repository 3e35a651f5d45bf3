"""Answering for our own addresses on the wire: ARP (RFC 826) and IPv6 neighbour discovery (RFC 4861).

Theory of operation
-------------------
Clients (or their router) must resolve a virtual IP to the balancer's MAC address on the port they reach it by;
the servers hold the VIP too, but only behind their agents, so they never answer for it on the wire (as in
direct server return). :func:`answer` takes an unlabelled frame that arrived on a client-side port and, if it is
an ARP request or a neighbour solicitation for one of ``addresses``, returns the reply frame from ``port_mac``.
Anything else returns None. Sans-I/O, like the rest of the core.

The other direction, finding the servers' MAC addresses, is :mod:`mplslb.resolver`; it builds its frames with
:func:`arp_request`, :func:`neighbor_solicitation`, and announces the VIPs with :func:`gratuitous_arp` and
:func:`unsolicited_advert`. :func:`heard` reads the binding of IP address to MAC address a neighbour's ARP or ND
frame tells (its reply, its gratuitous announcement, or its own request), for the resolver to learn from.
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
_NA = struct.Struct("!BBHI16sBB6s")  # an NA or NS with one link-layer address option
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
_ARP_ETHERNET_IPV4 = (ARP_HTYPE_ETHERNET, ETH_P_IP, ETH_ALEN, _IPV4_LEN)
BROADCAST_MAC = b"\xff" * ETH_ALEN
ND_OPT_SOURCE_LL = 1
_SOLICITED_NODE = bytes.fromhex("ff0200000000000000000001ff")  # RFC 4291: ff02::1:ff00:0/104
_SOLICITED_NODE_MAC = bytes.fromhex("3333ff")
_LINK_LOCAL = bytes.fromhex("fe80000000000000")
_ND_OPT_UNIT = 8  # option lengths are in units of 8 octets
_UNSPECIFIED4 = bytes(_IPV4_LEN)


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


# -- the frames the balancer sends on its own account ---------------------------------------------------------
def arp_request(sender_mac: bytes, sender_ip: bytes, target_ip: bytes, dst_mac: bytes = BROADCAST_MAC) -> bytes:
    """An ARP request for ``target_ip`` (broadcast unless ``dst_mac`` is given: a unicast probe of a known entry).

    ``sender_ip`` may be ``0.0.0.0`` (an ARP probe, RFC 5227) when the port has no address of its own: the target
    still answers, to ``sender_mac``."""
    body = _ARP.pack(*_ARP_ETHERNET_IPV4, ARP_REQUEST, sender_mac, sender_ip, bytes(ETH_ALEN), target_ip)
    return build_ethernet(dst_mac, sender_mac, ETH_P_ARP) + body


def gratuitous_arp(mac: bytes, ip: bytes) -> bytes:
    """A gratuitous ARP (RFC 5227 announcement: a broadcast request with sender and target ``ip``) telling the
    segment that ``ip`` is at ``mac``."""
    body = _ARP.pack(*_ARP_ETHERNET_IPV4, ARP_REQUEST, mac, ip, bytes(ETH_ALEN), ip)
    return build_ethernet(BROADCAST_MAC, mac, ETH_P_ARP) + body


def link_local(mac: bytes) -> bytes:
    """The IPv6 link-local address a port with ``mac`` has by modified EUI-64 (RFC 4291 appendix A)."""
    eui = bytes((mac[0] ^ 0x02, mac[1], mac[2], 0xFF, 0xFE, mac[3], mac[4], mac[5]))
    return _LINK_LOCAL + eui


def solicited_node(address: bytes) -> tuple[bytes, bytes]:
    """The solicited-node multicast address of ``address`` and its Ethernet group address (RFC 2464)."""
    group = _SOLICITED_NODE + address[-3:]
    return group, _SOLICITED_NODE_MAC + address[-3:]


def neighbor_solicitation(sender_mac: bytes, target: bytes, dst_mac: bytes | None = None) -> bytes:
    """A neighbour solicitation for ``target`` from the link-local address of ``sender_mac``, with our link-layer
    address as an option. Multicast to the target's solicited-node group, or unicast to ``dst_mac`` (a probe of a
    known entry, RFC 4861 section 7.3.3)."""
    src = link_local(sender_mac)
    group, group_mac = solicited_node(target)
    dst, eth_dst = (group, group_mac) if dst_mac is None else (target, dst_mac)
    message = bytearray(_NA.pack(ICMP6_NEIGHBOR_SOLICIT, 0, 0, 0, target, ND_OPT_SOURCE_LL, 1, sender_mac))
    _set_checksum(message, src, dst)
    packet = build_ipv6(src, dst, IPPROTO_ICMPV6, len(message), hop_limit=ND_HOP_LIMIT) + bytes(message)
    return build_ethernet(eth_dst, sender_mac, ETH_P_IPV6) + packet


def unsolicited_advert(mac: bytes, address: bytes) -> bytes:
    """An unsolicited neighbour advertisement (RFC 4861 section 7.2.6) to all nodes: ``address`` is at ``mac``,
    override set so that caches holding another address for it take this one."""
    message = bytearray(_NA.pack(ICMP6_NEIGHBOR_ADVERT, 0, 0, ND_FLAG_OVERRIDE, address, ND_OPT_TARGET_LL, 1, mac))
    _set_checksum(message, address, _ALL_NODES)
    packet = build_ipv6(address, _ALL_NODES, IPPROTO_ICMPV6, len(message), hop_limit=ND_HOP_LIMIT) + bytes(message)
    return build_ethernet(_ALL_NODES_MAC, mac, ETH_P_IPV6) + packet


def announcement(mac: bytes, address: bytes) -> bytes:
    """The gratuitous ARP (IPv4) or unsolicited advertisement (IPv6) for ``address`` at ``mac``."""
    return gratuitous_arp(mac, address) if len(address) == _IPV4_LEN else unsolicited_advert(mac, address)


def _set_checksum(message: bytearray, src: bytes, dst: bytes) -> None:
    checksum = internet_checksum(message, pseudo_header_sum(src, dst, IPPROTO_ICMPV6, len(message)))
    struct.pack_into("!H", message, 2, checksum)


# -- what a neighbour tells ------------------------------------------------------------------------------------
def heard(frame: bytes | memoryview) -> tuple[bytes, bytes] | None:
    """``(ip, mac)`` if ``frame`` is an ARP or ND frame that binds a neighbour's IP address to its MAC address:
    an ARP request or reply (the sender's pair, gratuitous or not), a neighbour advertisement (its target and
    target link-layer option, else the frame's source) or a solicitation with a source link-layer option (its
    source). None for anything else, malformed frames included (ND checksums are verified)."""
    if len(frame) < ETH_HLEN:
        return None
    ethertype = (frame[_ETH_TYPE] << 8) | frame[_ETH_TYPE + 1]
    if ethertype == ETH_P_ARP:
        if len(frame) < ETH_HLEN + _ARP.size:
            return None
        htype, ptype, hlen, plen, op, sha, spa, _, _ = _ARP.unpack_from(frame, ETH_HLEN)
        if (htype, ptype, hlen, plen) != _ARP_ETHERNET_IPV4 or op not in (ARP_REQUEST, ARP_REPLY):
            return None
        if spa == _UNSPECIFIED4 or sha[0] & 1:  # a probe tells nothing; a multicast sender is no neighbour
            return None
        return bytes(spa), bytes(sha)
    if ethertype == ETH_P_IPV6:
        return _heard_nd(frame)
    return None


def _heard_nd(frame: bytes | memoryview) -> tuple[bytes, bytes] | None:
    ip = ETH_HLEN
    if len(frame) < ip + _IPV6_HLEN + _NS_MIN or frame[ip] >> 4 != 6 or frame[ip + _NEXT] != IPPROTO_ICMPV6:
        return None
    icmp = ip + _IPV6_HLEN
    kind = frame[icmp]
    if kind not in (ICMP6_NEIGHBOR_SOLICIT, ICMP6_NEIGHBOR_ADVERT) or frame[ip + _HOP_LIMIT] != ND_HOP_LIMIT:
        return None
    length = int.from_bytes(frame[ip + 4 : ip + 6], "big")
    if length < _NS_MIN or len(frame) < icmp + length:
        return None
    message = bytes(frame[icmp : icmp + length])
    src = bytes(frame[ip + _SRC : ip + _SRC + _IPV6_LEN])
    dst = bytes(frame[ip + _SRC + _IPV6_LEN : ip + _SRC + 2 * _IPV6_LEN])
    if internet_checksum(message, pseudo_header_sum(src, dst, IPPROTO_ICMPV6, length)) != 0:
        return None
    wanted = ND_OPT_TARGET_LL if kind == ICMP6_NEIGHBOR_ADVERT else ND_OPT_SOURCE_LL
    lladdr = None
    at = _NS_MIN
    while at + 2 <= length:
        opt_type, opt_len = message[at], message[at + 1] * _ND_OPT_UNIT
        if opt_len == 0 or at + opt_len > length:
            return None  # RFC 4861: a zero-length option is invalid
        if opt_type == wanted and opt_len >= 2 + ETH_ALEN:
            lladdr = message[at + 2 : at + 2 + ETH_ALEN]
        at += opt_len
    if kind == ICMP6_NEIGHBOR_ADVERT:
        target = message[_NS_TARGET : _NS_TARGET + _IPV6_LEN]
        mac = lladdr if lladdr is not None else bytes(frame[ETH_ALEN : 2 * ETH_ALEN])
        return None if mac[0] & 1 else (target, mac)
    if lladdr is None or src == bytes(_IPV6_LEN):
        return None
    return src, lladdr
