"""IPv6 header (RFC 8200) and the walk over its extension headers to the upper-layer protocol."""

from __future__ import annotations

import struct
from typing import NamedTuple

from mplslb.wire.checksum import IPV6_ADDR_LEN
from mplslb.wire.errors import WireError
from mplslb.wire.ip import (
    IP_VERSION_6,
    IPPROTO_AH,
    IPPROTO_DSTOPTS,
    IPPROTO_FRAGMENT,
    IPPROTO_HOPOPTS,
    IPPROTO_ROUTING,
)

IPV6_HLEN = 40
IPV6_MAX_PAYLOAD = 0xFFFF
EXT_UNIT = 8  # hop-by-hop, routing and destination options: length in 8-octet units, not counting the first 8
AH_UNIT = 4  # AH (RFC 4302): length in 4-octet units, minus 2
AH_LEN_BIAS = 2
FRAGMENT_HLEN = 8
EXT_MIN_LEN = 8

TRAFFIC_CLASS_MAX = 0xFF
FLOW_LABEL_MAX = 0xFFFFF
HOP_LIMIT_MAX = 0xFF
PROTO_MAX = 0xFF
VERSION_SHIFT = 28
TRAFFIC_CLASS_SHIFT = 20
FRAG_OFFSET_SHIFT = 3
FRAG_MORE = 0x1

# Extension headers with the generic (next header, length) layout.
_OPTION_LIKE = frozenset({IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_DSTOPTS})
EXTENSION_HEADERS = _OPTION_LIKE | {IPPROTO_FRAGMENT, IPPROTO_AH}

_HEADER = struct.Struct("!IHBB16s16s")
_EXT = struct.Struct("!BB")  # next header, length
_FRAGMENT = struct.Struct("!BxHI")  # next header, reserved, offset|res|M, identification


class IPv6Error(WireError):
    """An IPv6 header or extension header that does not decode."""


class IPv6(NamedTuple):
    traffic_class: int
    flow_label: int
    payload_length: int
    next_header: int  # the fixed header's Next Header field
    hop_limit: int
    src: bytes
    dst: bytes
    proto: int  # the upper-layer protocol after the extension headers
    ext_headers: tuple[int, ...]  # protocol numbers of the extension headers walked, in order
    fragment: tuple[int, bool, int] | None  # (offset in 8-octet units, more fragments, identification)
    offset: int
    payload_offset: int  # where the upper-layer header (``proto``) starts
    end: int


def parse_ipv6(buf: bytes | memoryview, offset: int = 0, *, allow_truncated: bool = False) -> IPv6:
    """Decode the IPv6 header at ``offset`` and walk its extension headers.

    The walk stops at the first header that is not hop-by-hop, routing, fragment, destination options or AH
    (so at ESP, No Next Header and upper layers), and after the fragment header of a non-first fragment, whose
    payload is not a header. ``allow_truncated`` clips ``end`` to the buffer for captures cut at their snap
    length; the extension headers walked must still be whole.
    """
    available = len(buf) - offset
    if offset < 0 or available < IPV6_HLEN:
        raise IPv6Error("ipv6_truncated", f"{available} bytes at offset {offset}")
    vtcfl, payload_length, next_header, hop_limit, src, dst = _HEADER.unpack_from(buf, offset)
    if vtcfl >> VERSION_SHIFT != IP_VERSION_6:
        raise IPv6Error("ipv6_bad_version", f"version {vtcfl >> VERSION_SHIFT}")
    end = offset + IPV6_HLEN + payload_length
    if end > len(buf):
        if not allow_truncated:
            raise IPv6Error("ipv6_bad_payload_length", f"payload length {payload_length}, {available} available")
        end = len(buf)
    proto = next_header
    pos = offset + IPV6_HLEN
    ext_headers: list[int] = []
    fragment: tuple[int, bool, int] | None = None
    while proto in EXTENSION_HEADERS:
        if end - pos < EXT_MIN_LEN:
            raise IPv6Error("ipv6_ext_truncated", f"extension header {proto} cut short at offset {pos}")
        ext_headers.append(proto)
        if proto == IPPROTO_FRAGMENT:
            proto, offset_more, ident = _FRAGMENT.unpack_from(buf, pos)
            fragment = (offset_more >> FRAG_OFFSET_SHIFT, bool(offset_more & FRAG_MORE), ident)
            pos += FRAGMENT_HLEN
            if fragment[0]:
                break
            continue
        nxt, length = _EXT.unpack_from(buf, pos)
        size = (length + AH_LEN_BIAS) * AH_UNIT if proto == IPPROTO_AH else (length + 1) * EXT_UNIT
        if end - pos < size:
            raise IPv6Error("ipv6_ext_truncated", f"extension header {proto} of {size} bytes at offset {pos}")
        proto = nxt
        pos += size
    return IPv6(
        traffic_class=(vtcfl >> TRAFFIC_CLASS_SHIFT) & TRAFFIC_CLASS_MAX,
        flow_label=vtcfl & FLOW_LABEL_MAX,
        payload_length=payload_length,
        next_header=next_header,
        hop_limit=hop_limit,
        src=bytes(src),
        dst=bytes(dst),
        proto=proto,
        ext_headers=tuple(ext_headers),
        fragment=fragment,
        offset=offset,
        payload_offset=pos,
        end=end,
    )


def build_ipv6(
    src: bytes,
    dst: bytes,
    proto: int,
    payload_len: int,
    *,
    hop_limit: int = 64,
    traffic_class: int = 0,
    flow_label: int = 0,
) -> bytes:
    """A fixed IPv6 header; ``proto`` goes in Next Header, ``payload_len`` in Payload Length."""
    if len(src) != IPV6_ADDR_LEN or len(dst) != IPV6_ADDR_LEN:
        raise ValueError("IPv6 addresses must be 16 bytes")
    for name, value, top in (
        ("proto", proto, PROTO_MAX),
        ("payload_len", payload_len, IPV6_MAX_PAYLOAD),
        ("hop_limit", hop_limit, HOP_LIMIT_MAX),
        ("traffic_class", traffic_class, TRAFFIC_CLASS_MAX),
        ("flow_label", flow_label, FLOW_LABEL_MAX),
    ):
        if not 0 <= value <= top:
            raise ValueError(f"{name} {value} out of range 0..{top}")
    first = (IP_VERSION_6 << VERSION_SHIFT) | (traffic_class << TRAFFIC_CLASS_SHIFT) | flow_label
    return _HEADER.pack(first, payload_len, proto, hop_limit, src, dst)
