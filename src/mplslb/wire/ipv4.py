"""IPv4 header (RFC 791)."""

from __future__ import annotations

import struct
from typing import NamedTuple

from mplslb.wire.checksum import IPV4_ADDR_LEN, internet_checksum
from mplslb.wire.errors import WireError
from mplslb.wire.ip import IP_VERSION_4

IPV4_HLEN = 20
IPV4_MAX_HLEN = 60
IPV4_MAX_LEN = 0xFFFF
IHL_UNIT = 4
IHL_MIN = IPV4_HLEN // IHL_UNIT

IP_DF = 0x2
IP_MF = 0x1
FLAGS_SHIFT = 13
FRAG_OFFSET_MASK = 0x1FFF
FLAGS_MAX = 0x7
TOS_MAX = 0xFF
TTL_MAX = 0xFF
IDENT_MAX = 0xFFFF
PROTO_MAX = 0xFF

_HEADER = struct.Struct("!BBHHHBBH4s4s")
_CHECKSUM = struct.Struct("!H")
_CHECKSUM_OFFSET = 10


class IPv4Error(WireError):
    """An IPv4 header that does not decode."""


class IPv4(NamedTuple):
    ihl: int  # in 32-bit words
    tos: int
    total_length: int
    ident: int
    flags: int  # 3 bits: IP_DF, IP_MF
    frag_offset: int  # in units of 8 bytes, as on the wire
    ttl: int
    proto: int
    checksum: int
    src: bytes
    dst: bytes
    options: bytes
    offset: int
    payload_offset: int
    end: int  # offset + total_length (clipped to the buffer only when parsed with allow_truncated)


def ipv4_is_fragment(h: IPv4) -> bool:
    """Whether the packet is a fragment: more fragments follow, or it is not the first."""
    return bool(h.flags & IP_MF) or h.frag_offset > 0


def parse_ipv4(
    buf: bytes | memoryview, offset: int = 0, verify_checksum: bool = True, *, allow_truncated: bool = False
) -> IPv4:
    """Decode the IPv4 header at ``offset``. Bytes after ``end`` (Ethernet padding, trailers) are allowed.

    ``allow_truncated`` accepts a total length beyond the buffer (a capture cut at its snap length) and clips
    ``end`` to the buffer; the header itself must still be whole.
    """
    available = len(buf) - offset
    if offset < 0 or available < IPV4_HLEN:
        raise IPv4Error("ipv4_truncated", f"{available} bytes at offset {offset}")
    vihl, tos, total_length, ident, flags_frag, ttl, proto, checksum, src, dst = _HEADER.unpack_from(buf, offset)
    if vihl >> 4 != IP_VERSION_4:
        raise IPv4Error("ipv4_bad_version", f"version {vihl >> 4}")
    ihl = vihl & 0xF
    if ihl < IHL_MIN:
        raise IPv4Error("ipv4_bad_ihl", f"IHL {ihl}")
    header_len = ihl * IHL_UNIT
    if available < header_len:
        raise IPv4Error("ipv4_truncated", f"header of {header_len} bytes, {available} available")
    if total_length < header_len:
        raise IPv4Error("ipv4_bad_total_length", f"total length {total_length} < header length {header_len}")
    end = offset + total_length
    if total_length > available:
        if not allow_truncated:
            raise IPv4Error("ipv4_bad_total_length", f"total length {total_length}, {available} available")
        end = len(buf)
    if verify_checksum and internet_checksum(buf[offset : offset + header_len]) != 0:
        raise IPv4Error("ipv4_bad_checksum", f"header checksum {checksum:#06x}")
    return IPv4(
        ihl=ihl,
        tos=tos,
        total_length=total_length,
        ident=ident,
        flags=flags_frag >> FLAGS_SHIFT,
        frag_offset=flags_frag & FRAG_OFFSET_MASK,
        ttl=ttl,
        proto=proto,
        checksum=checksum,
        src=bytes(src),
        dst=bytes(dst),
        options=bytes(buf[offset + IPV4_HLEN : offset + header_len]),
        offset=offset,
        payload_offset=offset + header_len,
        end=end,
    )


def build_ipv4(
    src: bytes,
    dst: bytes,
    proto: int,
    payload_len: int,
    *,
    ttl: int = 64,
    ident: int = 0,
    tos: int = 0,
    flags: int = IP_DF,
    frag_offset: int = 0,
    options: bytes = b"",
) -> bytes:
    """An IPv4 header (options padded with zeros, i.e. End of Option List, to 32 bits) with its checksum."""
    if len(src) != IPV4_ADDR_LEN or len(dst) != IPV4_ADDR_LEN:
        raise ValueError("IPv4 addresses must be 4 bytes")
    options += b"\x00" * (-len(options) % IHL_UNIT)
    header_len = IPV4_HLEN + len(options)
    if header_len > IPV4_MAX_HLEN:
        raise ValueError(f"options too long: {len(options)} bytes")
    if not 0 <= payload_len <= IPV4_MAX_LEN - header_len:
        raise ValueError(f"payload length {payload_len} does not fit an IPv4 packet")
    for name, value, top in (
        ("ttl", ttl, TTL_MAX),
        ("ident", ident, IDENT_MAX),
        ("tos", tos, TOS_MAX),
        ("flags", flags, FLAGS_MAX),
        ("frag_offset", frag_offset, FRAG_OFFSET_MASK),
        ("proto", proto, PROTO_MAX),
    ):
        if not 0 <= value <= top:
            raise ValueError(f"{name} {value} out of range 0..{top}")
    header = bytearray(
        _HEADER.pack(
            (IP_VERSION_4 << 4) | (header_len // IHL_UNIT),
            tos,
            header_len + payload_len,
            ident,
            (flags << FLAGS_SHIFT) | frag_offset,
            ttl,
            proto,
            0,
            src,
            dst,
        )
    )
    header += options
    _CHECKSUM.pack_into(header, _CHECKSUM_OFFSET, internet_checksum(header))
    return bytes(header)
