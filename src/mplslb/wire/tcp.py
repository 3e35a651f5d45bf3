"""TCP header (RFC 9293) with its options, and checksummed segments over IPv4 or IPv6."""

from __future__ import annotations

import struct
from enum import IntFlag
from typing import NamedTuple

from mplslb.wire.checksum import internet_checksum, pseudo_header_sum
from mplslb.wire.errors import WireError
from mplslb.wire.ip import IPPROTO_TCP

TCP_HLEN = 20
TCP_MAX_HLEN = 60
DATA_OFFSET_UNIT = 4
DATA_OFFSET_MIN = TCP_HLEN // DATA_OFFSET_UNIT
DATA_OFFSET_SHIFT = 4

TCPOPT_EOL = 0
TCPOPT_NOP = 1
TCPOPT_MSS = 2
TCPOPT_WSCALE = 3
TCPOPT_SACK_PERMITTED = 4
TCPOPT_SACK = 5
TCPOPT_TIMESTAMP = 8
OPTION_HLEN = 2  # kind and length

PORT_MAX = 0xFFFF
SEQ_MAX = 0xFFFFFFFF
WINDOW_MAX = 0xFFFF
FLAGS_MAX = 0xFF

_HEADER = struct.Struct("!HHIIBBHHH")
_CHECKSUM = struct.Struct("!H")
_CHECKSUM_OFFSET = 16


class TCPError(WireError):
    """A TCP header that does not decode."""


class TCPFlag(IntFlag):
    FIN = 1
    SYN = 2
    RST = 4
    PSH = 8
    ACK = 16
    URG = 32
    ECE = 64
    CWR = 128


class TCP(NamedTuple):
    sport: int
    dport: int
    seq: int
    ack: int
    header_length: int  # in bytes
    flags: int  # the 8 flag bits, see TCPFlag
    window: int
    checksum: int
    urgent: int
    options: tuple[tuple[int, bytes], ...]  # (kind, value) in order; NOP and EOL padding left out
    offset: int
    payload_offset: int


def _parse_options(buf: bytes | memoryview, pos: int, stop: int) -> tuple[tuple[int, bytes], ...]:
    options: list[tuple[int, bytes]] = []
    while pos < stop:
        kind = buf[pos]
        if kind == TCPOPT_EOL:
            break
        if kind == TCPOPT_NOP:
            pos += 1
            continue
        if stop - pos < OPTION_HLEN:
            raise TCPError("tcp_bad_option", f"option {kind} has no length byte")
        length = buf[pos + 1]
        if length < OPTION_HLEN or pos + length > stop:
            raise TCPError("tcp_bad_option", f"option {kind} has length {length}")
        options.append((kind, bytes(buf[pos + OPTION_HLEN : pos + length])))
        pos += length
    return tuple(options)


def parse_tcp(buf: bytes | memoryview, offset: int = 0, end: int | None = None) -> TCP:
    """Decode the TCP header at ``offset``; ``end`` bounds the segment (default: the end of ``buf``)."""
    stop = len(buf) if end is None else min(end, len(buf))
    available = stop - offset
    if offset < 0 or available < TCP_HLEN:
        raise TCPError("tcp_truncated", f"{available} bytes at offset {offset}")
    sport, dport, seq, ack, doff, flags, window, checksum, urgent = _HEADER.unpack_from(buf, offset)
    data_offset = doff >> DATA_OFFSET_SHIFT
    if data_offset < DATA_OFFSET_MIN:
        raise TCPError("tcp_bad_data_offset", f"data offset {data_offset}")
    header_length = data_offset * DATA_OFFSET_UNIT
    if header_length > available:
        raise TCPError("tcp_truncated", f"header of {header_length} bytes, {available} available")
    options = _parse_options(buf, offset + TCP_HLEN, offset + header_length)
    return TCP(
        sport,
        dport,
        seq,
        ack,
        header_length,
        flags,
        window,
        checksum,
        urgent,
        options,
        offset,
        offset + header_length,
    )


def build_tcp(
    src_ip: bytes,
    dst_ip: bytes,
    sport: int,
    dport: int,
    *,
    seq: int = 0,
    ack: int = 0,
    flags: int = 0,
    window: int = 65535,
    options: bytes = b"",
    payload: bytes = b"",
) -> bytes:
    """A TCP segment (header and payload) with its checksum over the IPv4 or IPv6 pseudo header.

    ``options`` are raw option bytes, padded with EOL to 32 bits.
    """
    options += bytes(-len(options) % DATA_OFFSET_UNIT)
    header_length = TCP_HLEN + len(options)
    if header_length > TCP_MAX_HLEN:
        raise ValueError(f"options too long: {len(options)} bytes")
    for name, value, top in (
        ("sport", sport, PORT_MAX),
        ("dport", dport, PORT_MAX),
        ("seq", seq, SEQ_MAX),
        ("ack", ack, SEQ_MAX),
        ("flags", flags, FLAGS_MAX),
        ("window", window, WINDOW_MAX),
    ):
        if not 0 <= value <= top:
            raise ValueError(f"{name} {value} out of range 0..{top}")
    doff = (header_length // DATA_OFFSET_UNIT) << DATA_OFFSET_SHIFT
    segment = bytearray(_HEADER.pack(sport, dport, seq, ack, doff, flags, window, 0, 0))
    segment += options
    segment += payload
    initial = pseudo_header_sum(src_ip, dst_ip, IPPROTO_TCP, len(segment))
    _CHECKSUM.pack_into(segment, _CHECKSUM_OFFSET, internet_checksum(segment, initial))
    return bytes(segment)


def tcp_checksum_ok(src_ip: bytes, dst_ip: bytes, segment: bytes | memoryview) -> bool:
    """Whether ``segment`` (header and payload, nothing after) carries a correct checksum."""
    return internet_checksum(segment, pseudo_header_sum(src_ip, dst_ip, IPPROTO_TCP, len(segment))) == 0
