"""ICMP (RFC 792) and ICMPv6 (RFC 4443) headers, and the "administratively prohibited" error we send."""

from __future__ import annotations

import struct
from typing import NamedTuple

from mplslb.wire.checksum import IPV4_ADDR_LEN, IPV6_ADDR_LEN, internet_checksum, pseudo_header_sum
from mplslb.wire.errors import WireError
from mplslb.wire.ip import IPPROTO_ICMP, IPPROTO_ICMPV6
from mplslb.wire.ipv4 import IPV4_HLEN, build_ipv4
from mplslb.wire.ipv6 import IPV6_HLEN, build_ipv6

ICMP_HLEN = 8

# ICMP for IPv4
ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_SOURCE_QUENCH = 4
ICMP_REDIRECT = 5
ICMP_ECHO = 8
ICMP_TIME_EXCEEDED = 11
ICMP_PARAMETER_PROBLEM = 12
ICMP_UNREACH_ADMIN_PROHIBITED = 13  # code of DEST_UNREACH (RFC 1812)
ICMP_ERROR_TYPES = frozenset(
    {ICMP_DEST_UNREACH, ICMP_SOURCE_QUENCH, ICMP_REDIRECT, ICMP_TIME_EXCEEDED, ICMP_PARAMETER_PROBLEM}
)

# ICMPv6
ICMP6_DST_UNREACH = 1
ICMP6_PACKET_TOO_BIG = 2
ICMP6_TIME_EXCEEDED = 3
ICMP6_PARAM_PROB = 4
ICMP6_ECHO_REQUEST = 128
ICMP6_ECHO_REPLY = 129
ICMP6_NEIGHBOR_SOLICIT = 135
ICMP6_NEIGHBOR_ADVERT = 136
ICMP6_DST_UNREACH_ADMIN = 1  # code of DST_UNREACH
ICMP6_INFO_MIN = 128  # types below are errors (RFC 4443 section 2.1)

# An error quotes as much of the offending packet as fits the minimum MTU: 576 (RFC 1812) / 1280 (RFC 4443).
IPV4_MIN_MTU = 576
IPV6_MIN_MTU = 1280
ICMP_MAX_QUOTE = IPV4_MIN_MTU - IPV4_HLEN - ICMP_HLEN  # 548
ICMP6_MAX_QUOTE = IPV6_MIN_MTU - IPV6_HLEN - ICMP_HLEN  # 1232

ERROR_TTL = 64
CODE_MAX = 0xFF

_HEADER = struct.Struct("!BBHI")
_CHECKSUM = struct.Struct("!H")
_CHECKSUM_OFFSET = 2


class ICMPError(WireError):
    """An ICMP header that does not decode."""


class ICMP(NamedTuple):
    type: int
    code: int
    checksum: int
    rest: int  # the 32-bit "rest of header" (identifier and sequence, MTU, pointer, unused)
    offset: int
    payload_offset: int
    end: int
    is_error: bool  # an error message: the quoted original datagram starts at payload_offset


def parse_icmp(buf: bytes | memoryview, offset: int = 0, end: int | None = None, *, v6: bool = False) -> ICMP:
    """Decode the ICMP (or with ``v6`` ICMPv6) header at ``offset``; ``end`` bounds the message."""
    stop = len(buf) if end is None else min(end, len(buf))
    available = stop - offset
    if offset < 0 or available < ICMP_HLEN:
        raise ICMPError("icmp_truncated", f"{available} bytes at offset {offset}")
    icmp_type, code, checksum, rest = _HEADER.unpack_from(buf, offset)
    is_error = icmp_type < ICMP6_INFO_MIN if v6 else icmp_type in ICMP_ERROR_TYPES
    return ICMP(icmp_type, code, checksum, rest, offset, offset + ICMP_HLEN, stop, is_error)


def build_icmp_unreachable(src_ip: bytes, dst_ip: bytes, quoted: bytes, *, code: int | None = None) -> bytes:
    """A complete IP packet from ``src_ip`` to ``dst_ip`` carrying a destination-unreachable error.

    IPv4 addresses give ICMP type 3 (default code 13, communication administratively prohibited) quoting at
    most 548 bytes of ``quoted``; IPv6 addresses give ICMPv6 type 1 (default code 1, administratively
    prohibited) quoting at most 1232 bytes, so the packet fits the minimum MTU. Checksums are filled in.
    """
    if len(src_ip) == IPV4_ADDR_LEN:
        message = _message(ICMP_DEST_UNREACH, ICMP_UNREACH_ADMIN_PROHIBITED if code is None else code)
        message += quoted[:ICMP_MAX_QUOTE]
        _CHECKSUM.pack_into(message, _CHECKSUM_OFFSET, internet_checksum(message))
        return build_ipv4(src_ip, dst_ip, IPPROTO_ICMP, len(message), ttl=ERROR_TTL) + message
    if len(src_ip) == IPV6_ADDR_LEN:
        message = _message(ICMP6_DST_UNREACH, ICMP6_DST_UNREACH_ADMIN if code is None else code)
        message += quoted[:ICMP6_MAX_QUOTE]
        initial = pseudo_header_sum(src_ip, dst_ip, IPPROTO_ICMPV6, len(message))
        _CHECKSUM.pack_into(message, _CHECKSUM_OFFSET, internet_checksum(message, initial))
        return build_ipv6(src_ip, dst_ip, IPPROTO_ICMPV6, len(message), hop_limit=ERROR_TTL) + message
    raise ValueError(f"addresses must be 4 or 16 bytes, got {len(src_ip)}")


def _message(icmp_type: int, code: int) -> bytearray:
    if not 0 <= code <= CODE_MAX:
        raise ValueError(f"ICMP code {code} out of range 0..{CODE_MAX}")
    return bytearray(_HEADER.pack(icmp_type, code, 0, 0))
