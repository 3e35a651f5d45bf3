"""UDP header (RFC 768) and checksummed datagrams over IPv4 or IPv6."""

from __future__ import annotations

import struct
from typing import NamedTuple

from mplslb.wire.checksum import internet_checksum, pseudo_header_sum
from mplslb.wire.errors import WireError
from mplslb.wire.ip import IPPROTO_UDP

UDP_HLEN = 8
UDP_MAX_LEN = 0xFFFF
PORT_MAX = 0xFFFF
NO_CHECKSUM = 0
CHECKSUM_ZERO_AS = 0xFFFF  # a computed 0 is sent as all ones; 0 on the wire means "no checksum" (IPv4)

_HEADER = struct.Struct("!HHHH")


class UDPError(WireError):
    """A UDP header that does not decode."""


class UDP(NamedTuple):
    sport: int
    dport: int
    length: int
    checksum: int
    offset: int
    payload_offset: int
    end: int


def parse_udp(buf: bytes | memoryview, offset: int = 0, end: int | None = None, *, partial: bool = False) -> UDP:
    """Decode the UDP header at ``offset``; ``end`` bounds the datagram (default: the end of ``buf``).

    ``partial`` accepts a length beyond ``end`` (the first fragment of a fragmented datagram, or a capture cut
    at its snap length) and clips ``end`` to what is there.
    """
    stop = len(buf) if end is None else min(end, len(buf))
    available = stop - offset
    if offset < 0 or available < UDP_HLEN:
        raise UDPError("udp_truncated", f"{available} bytes at offset {offset}")
    sport, dport, length, checksum = _HEADER.unpack_from(buf, offset)
    if length < UDP_HLEN or (length > available and not partial):
        raise UDPError("udp_bad_length", f"length {length}, {available} available")
    return UDP(sport, dport, length, checksum, offset, offset + UDP_HLEN, min(offset + length, stop))


def build_udp(src_ip: bytes, dst_ip: bytes, sport: int, dport: int, payload: bytes = b"") -> bytes:
    """A UDP datagram (header and payload) with its checksum over the IPv4 or IPv6 pseudo header."""
    length = UDP_HLEN + len(payload)
    if length > UDP_MAX_LEN:
        raise ValueError(f"payload of {len(payload)} bytes does not fit a UDP datagram")
    if not (0 <= sport <= PORT_MAX and 0 <= dport <= PORT_MAX):
        raise ValueError(f"ports {sport}, {dport} out of range 0..{PORT_MAX}")
    datagram = _HEADER.pack(sport, dport, length, 0) + payload
    checksum = internet_checksum(datagram, pseudo_header_sum(src_ip, dst_ip, IPPROTO_UDP, length))
    return _HEADER.pack(sport, dport, length, checksum or CHECKSUM_ZERO_AS) + payload


def udp_checksum_ok(src_ip: bytes, dst_ip: bytes, datagram: bytes | memoryview) -> bool:
    """Whether ``datagram`` carries a correct checksum; a zero checksum (none sent) is correct."""
    if _HEADER.unpack_from(datagram)[3] == NO_CHECKSUM:
        return True
    return internet_checksum(datagram, pseudo_header_sum(src_ip, dst_ip, IPPROTO_UDP, len(datagram))) == 0
