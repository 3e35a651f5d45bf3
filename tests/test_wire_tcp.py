"""TCP: a SYN with the usual options, byte by byte and against scapy; checksums over v4 and v6; errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from mplslb.wire.ip import IPPROTO_TCP
from mplslb.wire.ipv4 import build_ipv4
from mplslb.wire.tcp import (
    TCPOPT_MSS,
    TCPOPT_SACK_PERMITTED,
    TCPOPT_TIMESTAMP,
    TCPOPT_WSCALE,
    TCPError,
    TCPFlag,
    build_tcp,
    parse_tcp,
    tcp_checksum_ok,
)

SRC4 = bytes([10, 0, 0, 1])
DST4 = bytes([10, 0, 0, 2])
SRC6 = bytes.fromhex("20010db8000000000000000000000001")
DST6 = bytes.fromhex("20010db8000000000000000000000002")

# A Linux SYN's options: MSS 1460, SACK permitted, timestamps, NOP, window scale 7.
SYN_OPTIONS = bytes.fromhex("020405b4 0402 080a 0001e240 00000000 01 030307")


def test_flag_values() -> None:
    assert [int(f) for f in TCPFlag] == [1, 2, 4, 8, 16, 32, 64, 128]
    assert TCPFlag.SYN | TCPFlag.ACK == 0x12


def test_syn_with_options_golden() -> None:
    segment = build_tcp(SRC4, DST4, 40000, 80, seq=0x01020304, flags=TCPFlag.SYN, window=64240, options=SYN_OPTIONS)
    assert segment[:20] == bytes.fromhex("9c40 0050 01020304 00000000 a0 02 faf0") + segment[16:18] + b"\x00\x00"
    assert segment[20:] == SYN_OPTIONS
    oracle = IP(src="10.0.0.1", dst="10.0.0.2") / TCP(
        sport=40000,
        dport=80,
        seq=0x01020304,
        flags="S",
        window=64240,
        options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (123456, 0)), ("NOP", None), ("WScale", 7)],
    )
    assert bytes(oracle[TCP]) == segment  # same bytes, checksum included
    t = parse_tcp(segment)
    assert (t.sport, t.dport, t.seq, t.ack, t.header_length, t.flags, t.window) == (
        40000,
        80,
        0x01020304,
        0,
        40,
        2,
        64240,
    )
    assert t.options == (
        (TCPOPT_MSS, b"\x05\xb4"),
        (TCPOPT_SACK_PERMITTED, b""),
        (TCPOPT_TIMESTAMP, bytes.fromhex("0001e24000000000")),
        (TCPOPT_WSCALE, b"\x07"),
    )
    assert t.payload_offset == 40 and tcp_checksum_ok(SRC4, DST4, segment)


def test_ipv6_checksum_matches_scapy() -> None:
    segment = build_tcp(SRC6, DST6, 443, 50000, seq=7, ack=9, flags=TCPFlag.ACK | TCPFlag.PSH, payload=b"hello")
    oracle = (
        IPv6(src="2001:db8::1", dst="2001:db8::2")
        / TCP(sport=443, dport=50000, seq=7, ack=9, flags="PA", window=65535)
        / b"hello"
    )
    assert bytes(oracle[TCP]) == segment
    assert tcp_checksum_ok(SRC6, DST6, segment)


def test_parse_inside_a_packet_with_end() -> None:
    segment = build_tcp(SRC4, DST4, 1, 2, payload=b"data")
    packet = build_ipv4(SRC4, DST4, IPPROTO_TCP, len(segment)) + segment + bytes(6)  # Ethernet padding
    t = parse_tcp(memoryview(packet), 20, 20 + len(segment))
    assert (t.offset, t.payload_offset) == (20, 40)


def test_corruption_fails_checksum() -> None:
    segment = bytearray(build_tcp(SRC4, DST4, 1, 2, payload=b"data"))
    segment[-1] ^= 1
    assert not tcp_checksum_ok(SRC4, DST4, bytes(segment))
    assert not tcp_checksum_ok(SRC4, bytes([10, 0, 0, 3]), build_tcp(SRC4, DST4, 1, 2))


def test_eol_ends_options() -> None:
    segment = build_tcp(SRC4, DST4, 1, 2, options=bytes.fromhex("0101 00 ff ff ff ff ff"))
    assert parse_tcp(segment).options == ()


def _header(data_offset: int, options: bytes) -> bytes:
    return bytes.fromhex("0001 0002 00000000 00000000") + bytes([data_offset << 4, 0x02]) + bytes(6) + options


@pytest.mark.parametrize(
    ("segment", "reason", "end"),
    [
        (b"", "tcp_truncated", None),
        (bytes(19), "tcp_truncated", None),
        (_header(5, b""), "tcp_truncated", 19),
        (_header(4, b""), "tcp_bad_data_offset", None),
        (_header(6, b""), "tcp_truncated", None),
        (_header(6, bytes.fromhex("0101 01 02")), "tcp_bad_option", None),  # kind 2 without a length byte
        (_header(6, bytes.fromhex("02 00 0000")), "tcp_bad_option", None),  # length 0
        (_header(6, bytes.fromhex("08 01 0000")), "tcp_bad_option", None),  # length 1
        (_header(6, bytes.fromhex("02 05 0000")), "tcp_bad_option", None),  # runs past the header
    ],
)
def test_errors(segment: bytes, reason: str, end: int | None) -> None:
    with pytest.raises(TCPError) as info:
        parse_tcp(segment, 0, end)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "kwargs", [{"seq": 1 << 32}, {"ack": -1}, {"flags": 256}, {"window": 1 << 16}, {"options": bytes(41)}]
)
def test_build_rejects(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        build_tcp(SRC4, DST4, 1, 2, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        build_tcp(SRC4, DST4, 1 << 16, 2)


ports = st.integers(0, 0xFFFF)
option = st.one_of(
    st.just(b"\x01"),
    st.tuples(st.integers(2, 255), st.binary(max_size=8)).map(lambda kv: bytes([kv[0], len(kv[1]) + 2]) + kv[1]),
)


@given(
    st.sampled_from([(SRC4, DST4), (SRC6, DST6)]),
    ports,
    ports,
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.lists(option, max_size=4),
    st.binary(max_size=100),
)
def test_round_trip(
    addrs: tuple[bytes, bytes],
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    options: list[bytes],
    payload: bytes,
) -> None:
    raw_options = b"".join(options)
    segment = build_tcp(
        *addrs,
        sport,
        dport,
        seq=seq,
        ack=ack,
        flags=flags,
        window=window,
        options=raw_options,
        payload=payload,
    )
    t = parse_tcp(segment)
    assert (t.sport, t.dport, t.seq, t.ack, t.flags, t.window) == (sport, dport, seq, ack, flags, window)
    assert t.options == tuple((o[0], o[2:]) for o in options if o != b"\x01")
    assert segment[t.payload_offset :] == payload
    assert tcp_checksum_ok(*addrs, segment)
