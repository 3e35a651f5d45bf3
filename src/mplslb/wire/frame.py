"""A full dissector, link layer to transport: the balancer's slow path and the tests' view of a frame.

Link layers: Ethernet (VLAN tags), PPP (with or without the HDLC-like ``ff 03`` framing), Cisco HDLC, Linux
cooked capture and raw IP. Below the link layer an MPLS stack is walked and the payload is taken as IP by its
version nibble; anything else (a pseudowire control word, an Ethernet pseudowire) is reported as non-IP.
MPLS in UDP (RFC 7510, destination port 6635) is followed one level: the labels and the IP view are then the
inner ones.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from mplslb.wire.checksum import internet_checksum, pseudo_header_sum
from mplslb.wire.errors import WireError
from mplslb.wire.ethernet import (
    ETH_P_IP,
    ETH_P_IPV6,
    ETH_P_MPLS_MC,
    ETH_P_MPLS_UC,
    Ethernet,
    parse_ethernet,
)
from mplslb.wire.icmp import ICMP, parse_icmp
from mplslb.wire.ip import IP_VERSION_4, IP_VERSION_6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP
from mplslb.wire.ip import ip_version as version_nibble
from mplslb.wire.ipv4 import IPv4, ipv4_is_fragment, parse_ipv4
from mplslb.wire.ipv6 import IPv6, parse_ipv6
from mplslb.wire.mpls import MPLS_UDP_PORT, LabelEntry, parse_stack
from mplslb.wire.pcap import (
    LINKTYPE_C_HDLC,
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_PPP,
    LINKTYPE_RAW,
)
from mplslb.wire.tcp import TCP, parse_tcp
from mplslb.wire.udp import UDP, parse_udp

NO_PROTO = -1

# PPP (RFC 1661) protocol numbers, and the HDLC-like framing of RFC 1662 some captures keep.
PPP_IP = 0x0021
PPP_IPV6 = 0x0057
PPP_MPLS_UC = 0x0281
PPP_MPLS_MC = 0x0283
PPP_ADDRESS_CONTROL = b"\xff\x03"
PPP_PROTOCOL_LEN = 2
PPP_PFC_BIT = 0x01  # a one-byte (field-compressed) protocol number is odd
_PPP_TO_ETHERTYPE = {
    PPP_IP: ETH_P_IP,
    PPP_IPV6: ETH_P_IPV6,
    PPP_MPLS_UC: ETH_P_MPLS_UC,
    PPP_MPLS_MC: ETH_P_MPLS_MC,
}

CHDLC_HLEN = 4  # address, control, ethertype
SLL_HLEN = 16  # Linux cooked capture v1; the ethertype is the last field
MPLS_ETHERTYPES = frozenset({ETH_P_MPLS_UC, ETH_P_MPLS_MC})
_VERSION_TO_ETHERTYPE = {IP_VERSION_4: ETH_P_IP, IP_VERSION_6: ETH_P_IPV6}
_ETHERTYPE_TO_VERSION = {ETH_P_IP: IP_VERSION_4, ETH_P_IPV6: IP_VERSION_6}

_U16 = struct.Struct("!H")


class FrameError(WireError):
    """A link-layer header (other than Ethernet) that does not decode, or an unknown link type."""


class Dissection(NamedTuple):
    eth: Ethernet | None
    labels: tuple[LabelEntry, ...]  # with udp_mpls, the stack inside the UDP datagram
    ip_version: int  # 4, 6, or 0 when the frame carries no IP packet we can see
    ip: IPv4 | IPv6 | None
    proto: int  # the upper-layer protocol, NO_PROTO (-1) without IP
    l4: TCP | UDP | ICMP | None  # None for non-first fragments and protocols not decoded
    src: bytes  # IP addresses, b"" without IP
    dst: bytes
    sport: int  # TCP/UDP ports, 0 otherwise
    dport: int
    payload_offset: int  # after the deepest header decoded
    payload_end: int
    udp_mpls: bool  # the labels came from MPLS in UDP; ip, l4 and the rest describe the inner packet


def dissect(
    buf: bytes | memoryview,
    linktype: int = LINKTYPE_ETHERNET,
    *,
    verify_checksum: bool = True,
    orig_len: int | None = None,
    follow_udp: bool = True,
) -> Dissection:
    """Dissect one frame of link type ``linktype`` (a pcap LINKTYPE_* value).

    ``verify_checksum`` checks IPv4 header checksums. ``orig_len`` is the frame's length on the wire: when it
    is more than ``len(buf)`` (a capture cut at its snap length) IP lengths beyond the buffer are accepted.
    ``follow_udp=False`` describes MPLS in UDP as the UDP datagram it is (the outer packet). Raises WireError
    subclasses only.
    """
    truncated = orig_len is not None and orig_len > len(buf)
    eth, ethertype, pos = _link_layer(buf, linktype)
    labels: tuple[LabelEntry, ...] = ()
    if ethertype in MPLS_ETHERTYPES:
        labels, pos = parse_stack(buf, pos)
        ethertype = _VERSION_TO_ETHERTYPE.get(version_nibble(buf, pos), 0)
    version = _ETHERTYPE_TO_VERSION.get(ethertype, 0)
    if not version:
        return Dissection(eth, labels, 0, None, NO_PROTO, None, b"", b"", 0, 0, pos, len(buf), False)
    outer = _dissect_ip(buf, pos, version, verify_checksum, truncated)
    udp = outer.l4
    if isinstance(udp, UDP) and udp.dport == MPLS_UDP_PORT and follow_udp:
        inner_buf = memoryview(buf)[: udp.end]
        # A first fragment or a cut capture holds only the start of the inner packet.
        truncated = truncated or udp.offset + udp.length > udp.end
        labels, pos = parse_stack(inner_buf, udp.payload_offset)
        version = version_nibble(inner_buf, pos)
        if not version:
            return Dissection(eth, labels, 0, None, NO_PROTO, None, b"", b"", 0, 0, pos, udp.end, True)
        inner = _dissect_ip(inner_buf, pos, version, verify_checksum, truncated)
        return Dissection(eth, labels, version, *inner, True)
    return Dissection(eth, labels, version, *outer, False)


class _IPView(NamedTuple):
    ip: IPv4 | IPv6
    proto: int
    l4: TCP | UDP | ICMP | None
    src: bytes
    dst: bytes
    sport: int
    dport: int
    payload_offset: int
    payload_end: int


def _link_layer(buf: bytes | memoryview, linktype: int) -> tuple[Ethernet | None, int, int]:
    """The Ethernet header if any, the ethertype of what follows the link layer (0: neither IP nor MPLS) and
    its offset."""
    if linktype == LINKTYPE_ETHERNET:
        eth = parse_ethernet(buf)
        return eth, eth.ethertype, eth.payload_offset
    if linktype == LINKTYPE_PPP:
        pos = len(PPP_ADDRESS_CONTROL) if bytes(buf[: len(PPP_ADDRESS_CONTROL)]) == PPP_ADDRESS_CONTROL else 0
        if len(buf) <= pos:
            raise FrameError("ppp_truncated", "no protocol field")
        if buf[pos] & PPP_PFC_BIT:
            protocol, pos = buf[pos], pos + 1
        elif len(buf) - pos < PPP_PROTOCOL_LEN:
            raise FrameError("ppp_truncated", "protocol field cut short")
        else:
            (protocol,) = _U16.unpack_from(buf, pos)
            pos += PPP_PROTOCOL_LEN
        return None, _PPP_TO_ETHERTYPE.get(protocol, 0), pos
    if linktype in (LINKTYPE_C_HDLC, LINKTYPE_LINUX_SLL):
        hlen = CHDLC_HLEN if linktype == LINKTYPE_C_HDLC else SLL_HLEN
        if len(buf) < hlen:
            raise FrameError("chdlc_truncated" if linktype == LINKTYPE_C_HDLC else "sll_truncated", f"{len(buf)} bytes")
        (ethertype,) = _U16.unpack_from(buf, hlen - PPP_PROTOCOL_LEN)
        return None, ethertype, hlen
    if linktype in (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6):
        return None, _VERSION_TO_ETHERTYPE.get(version_nibble(buf, 0), 0), 0
    raise FrameError("frame_unsupported_linktype", f"link type {linktype}")


def _is_later_fragment(ip: IPv4 | IPv6) -> bool:
    if isinstance(ip, IPv4):
        return ip.frag_offset > 0
    return ip.fragment is not None and ip.fragment[0] > 0


def _dissect_ip(buf: bytes | memoryview, pos: int, version: int, verify_checksum: bool, truncated: bool) -> _IPView:
    ip: IPv4 | IPv6
    if version == IP_VERSION_4:
        ip = parse_ipv4(buf, pos, verify_checksum, allow_truncated=truncated)
        fragmented = ipv4_is_fragment(ip)
        icmp_proto = IPPROTO_ICMP
    else:
        ip = parse_ipv6(buf, pos, allow_truncated=truncated)
        fragmented = ip.fragment is not None and (ip.fragment[0] > 0 or ip.fragment[1])
        icmp_proto = IPPROTO_ICMPV6
    proto, start, end = ip.proto, ip.payload_offset, ip.end
    if not _is_later_fragment(ip):
        if proto == IPPROTO_TCP:
            tcp = parse_tcp(buf, start, end)
            return _IPView(ip, proto, tcp, ip.src, ip.dst, tcp.sport, tcp.dport, tcp.payload_offset, end)
        if proto == IPPROTO_UDP:
            udp = parse_udp(buf, start, end, partial=fragmented or truncated)
            return _IPView(ip, proto, udp, ip.src, ip.dst, udp.sport, udp.dport, udp.payload_offset, udp.end)
        if proto == icmp_proto:
            icmp = parse_icmp(buf, start, end, v6=version == IP_VERSION_6)
            return _IPView(ip, proto, icmp, ip.src, ip.dst, 0, 0, icmp.payload_offset, end)
    return _IPView(ip, proto, None, ip.src, ip.dst, 0, 0, start, end)


#: Where the checksum lies in a TCP and in a UDP header.
_L4_CHECKSUM_AT = {IPPROTO_TCP: 16, IPPROTO_UDP: 6}


def complete_l4_checksum(buf: bytes | memoryview) -> bytes | None:
    """``buf`` (an Ethernet frame, labelled or not) with its TCP or UDP checksum computed in full: for a frame a
    packet socket took with a partial one (``TP_STATUS_CSUMNOTREADY``: its sender left the sum to an offload, and
    only the pseudo-header's is in place), which must leave again with its final checksum. None when the frame does
    not dissect to one whole TCP segment or UDP datagram under IP (no other kind of frame has a partial checksum)."""
    try:
        d = dissect(buf, verify_checksum=False, follow_udp=False)  # MPLS in UDP: the outer datagram's checksum
    except WireError:
        return None
    at = _L4_CHECKSUM_AT.get(d.proto)
    if d.ip is None or at is None or d.l4 is None:
        return None
    start, end = d.ip.payload_offset, d.ip.end
    out = bytearray(buf)
    out[start + at : start + at + 2] = b"\0\0"
    total = internet_checksum(out[start:end], pseudo_header_sum(d.src, d.dst, d.proto, end - start))
    if d.proto == IPPROTO_UDP and total == 0:
        total = 0xFFFF  # a computed zero is sent as all ones (zero means "no checksum")
    _U16.pack_into(out, start + at, total)
    return bytes(out)
