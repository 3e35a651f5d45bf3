"""UDP: golden datagrams against scapy over IPv4 and IPv6, errors, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6

from mplslb.wire.udp import UDPError, build_udp, parse_udp, udp_checksum_ok

SRC4 = bytes([192, 0, 2, 1])
DST4 = bytes([198, 51, 100, 7])
SRC6 = bytes.fromhex("20010db8000000000000000000000001")
DST6 = bytes.fromhex("20010db8000000000000000000000002")


def test_golden_v4() -> None:
    datagram = build_udp(SRC4, DST4, 53, 33000, b"abc")
    assert datagram[:6] == bytes.fromhex("0035 80e8 000b")
    assert datagram == bytes((IP(src="192.0.2.1", dst="198.51.100.7") / UDP(sport=53, dport=33000) / b"abc")[UDP])
    assert parse_udp(datagram) == (53, 33000, 11, int.from_bytes(datagram[6:8], "big"), 0, 8, 11)
    assert udp_checksum_ok(SRC4, DST4, datagram)


def test_golden_v6() -> None:
    datagram = build_udp(SRC6, DST6, 6635, 6635, bytes(20))
    assert datagram == bytes(
        (IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=6635, dport=6635) / bytes(20))[UDP]
    )
    assert udp_checksum_ok(SRC6, DST6, datagram)


def test_zero_checksum_means_none() -> None:
    datagram = bytes.fromhex("0001 0002 0009 0000 ff")
    assert udp_checksum_ok(SRC4, DST4, datagram)


def test_end_bounds_the_datagram() -> None:
    datagram = build_udp(SRC4, DST4, 1, 2, b"12345")
    u = parse_udp(memoryview(b"\x00" * 4 + datagram + bytes(10)), 4, 4 + len(datagram))
    assert (u.offset, u.payload_offset, u.end) == (4, 12, 17)


def test_partial_accepts_a_first_fragment() -> None:
    datagram = build_udp(SRC4, DST4, 1, 2, bytes(100))[:40]
    with pytest.raises(UDPError, match="udp_bad_length"):
        parse_udp(datagram)
    assert parse_udp(datagram, partial=True).end == 40


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "udp_truncated"),
        (bytes(7), "udp_truncated"),
        (bytes.fromhex("0001 0002 0007 0000"), "udp_bad_length"),
        (bytes.fromhex("0001 0002 0010 0000") + bytes(7), "udp_bad_length"),
    ],
)
def test_errors(data: bytes, reason: str) -> None:
    with pytest.raises(UDPError) as info:
        parse_udp(data)
    assert info.value.reason == reason


def test_build_rejects() -> None:
    with pytest.raises(ValueError):
        build_udp(SRC4, DST4, 70000, 1)
    with pytest.raises(ValueError):
        build_udp(SRC4, DST4, 1, 1, bytes(0xFFFF))
    with pytest.raises(ValueError):
        build_udp(SRC4, DST6, 1, 1)


ports = st.integers(0, 0xFFFF)


@given(st.sampled_from([(SRC4, DST4), (SRC6, DST6)]), ports, ports, st.binary(max_size=200))
def test_round_trip(addrs: tuple[bytes, bytes], sport: int, dport: int, payload: bytes) -> None:
    datagram = build_udp(*addrs, sport, dport, payload)
    u = parse_udp(datagram)
    assert (u.sport, u.dport, u.length, u.end) == (sport, dport, 8 + len(payload), len(datagram))
    assert u.checksum != 0  # a computed zero is sent as 0xffff
    assert datagram[u.payload_offset :] == payload and udp_checksum_ok(*addrs, datagram)
