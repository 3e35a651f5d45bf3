"""ICMP and ICMPv6: headers against scapy, error classification, the unreachable message we send."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import ICMP as ScapyICMP
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoRequest, IPv6

from mplslb.wire.checksum import internet_checksum, pseudo_header_sum
from mplslb.wire.icmp import (
    ICMP6_DST_UNREACH,
    ICMP6_ECHO_REPLY,
    ICMP6_ECHO_REQUEST,
    ICMP6_NEIGHBOR_ADVERT,
    ICMP6_NEIGHBOR_SOLICIT,
    ICMP6_PACKET_TOO_BIG,
    ICMP6_TIME_EXCEEDED,
    ICMP_DEST_UNREACH,
    ICMP_ECHO,
    ICMP_ECHO_REPLY,
    ICMP_TIME_EXCEEDED,
    ICMPError,
    build_icmp_unreachable,
    parse_icmp,
)
from mplslb.wire.ip import IPPROTO_ICMP, IPPROTO_ICMPV6
from mplslb.wire.ipv4 import parse_ipv4
from mplslb.wire.ipv6 import parse_ipv6

SRC4 = bytes([192, 0, 2, 1])
DST4 = bytes([198, 51, 100, 7])
SRC6 = bytes.fromhex("20010db8000000000000000000000001")
DST6 = bytes.fromhex("20010db8000000000000000000000002")


def test_type_constants() -> None:
    assert (ICMP_ECHO_REPLY, ICMP_DEST_UNREACH, ICMP_ECHO, ICMP_TIME_EXCEEDED) == (0, 3, 8, 11)
    assert (ICMP6_DST_UNREACH, ICMP6_PACKET_TOO_BIG, ICMP6_TIME_EXCEEDED) == (1, 2, 3)
    assert (ICMP6_ECHO_REQUEST, ICMP6_ECHO_REPLY, ICMP6_NEIGHBOR_SOLICIT, ICMP6_NEIGHBOR_ADVERT) == (
        128,
        129,
        135,
        136,
    )


def test_echo_v4() -> None:
    message = bytes(ScapyICMP(type=8, id=0x1234, seq=5) / b"ping")
    i = parse_icmp(message)
    assert (i.type, i.code, i.rest, i.payload_offset, i.end, i.is_error) == (8, 0, 0x12340005, 8, 12, False)
    assert i.checksum == int.from_bytes(message[2:4], "big")


def test_echo_v6() -> None:
    message = bytes(ICMPv6EchoRequest(id=1, seq=2))
    i = parse_icmp(message, v6=True)
    assert (i.type, i.rest, i.is_error) == (ICMP6_ECHO_REQUEST, 0x00010002, False)


def test_time_exceeded_is_an_error_with_the_quote_after_the_header() -> None:
    quoted = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=33434))
    message = bytes(ScapyICMP(type=11, code=0) / quoted)
    i = parse_icmp(b"\x00" * 20 + message, 20)
    assert i.is_error and message[i.payload_offset - 20 :] == quoted


@pytest.mark.parametrize(
    ("icmp_type", "v6", "error"),
    [
        (3, False, True),
        (5, False, True),
        (0, False, False),
        (13, False, False),
        (1, True, True),
        (4, True, True),
        (127, True, True),
        (128, True, False),
        (136, True, False),
    ],
)
def test_is_error(icmp_type: int, v6: bool, error: bool) -> None:
    assert parse_icmp(bytes([icmp_type]) + bytes(7), v6=v6).is_error is error


def test_truncated() -> None:
    with pytest.raises(ICMPError, match="icmp_truncated"):
        parse_icmp(bytes(7))
    with pytest.raises(ICMPError, match="icmp_truncated"):
        parse_icmp(bytes(20), 0, 7)


def test_unreachable_v4_matches_scapy() -> None:
    quoted = bytes(IP(src="198.51.100.7", dst="192.0.2.1") / UDP(sport=5, dport=6) / b"q")
    packet = build_icmp_unreachable(SRC4, DST4, quoted)
    oracle = IP(src="192.0.2.1", dst="198.51.100.7", ttl=64, id=0, flags="DF") / ScapyICMP(type=3, code=13) / quoted
    assert packet == bytes(oracle)
    h = parse_ipv4(packet)  # checks the header checksum
    assert h.proto == IPPROTO_ICMP and h.end == len(packet)
    assert internet_checksum(packet[20:]) == 0


def test_unreachable_v6_matches_scapy() -> None:
    quoted = bytes(range(256)) * 2
    packet = build_icmp_unreachable(SRC6, DST6, quoted, code=4)
    oracle = IPv6(src="2001:db8::1", dst="2001:db8::2", hlim=64) / ICMPv6DestUnreach(code=4) / quoted
    assert packet == bytes(oracle)
    h = parse_ipv6(packet)
    assert h.proto == IPPROTO_ICMPV6
    assert internet_checksum(packet[40:], pseudo_header_sum(SRC6, DST6, IPPROTO_ICMPV6, len(packet) - 40)) == 0


def test_unreachable_v6_default_code_is_admin_prohibited() -> None:
    packet = build_icmp_unreachable(SRC6, DST6, b"")
    assert packet[40:42] == bytes([ICMP6_DST_UNREACH, 1])
    assert build_icmp_unreachable(SRC4, DST4, b"")[20:22] == bytes([ICMP_DEST_UNREACH, 13])


def test_unreachable_quote_fits_the_minimum_mtu() -> None:
    assert len(build_icmp_unreachable(SRC4, DST4, bytes(2000))) == 576
    assert len(build_icmp_unreachable(SRC6, DST6, bytes(2000))) == 1280


def test_unreachable_rejects() -> None:
    with pytest.raises(ValueError):
        build_icmp_unreachable(SRC4, DST4, b"", code=256)
    with pytest.raises(ValueError):
        build_icmp_unreachable(bytes(5), bytes(5), b"")


@given(st.sampled_from([(SRC4, DST4), (SRC6, DST6)]), st.binary(max_size=1500), st.integers(0, 255))
def test_unreachable_round_trip(addrs: tuple[bytes, bytes], quoted: bytes, code: int) -> None:
    packet = build_icmp_unreachable(*addrs, quoted, code=code)
    v6 = len(addrs[0]) == 16
    ip = parse_ipv6(packet) if v6 else parse_ipv4(packet)
    i = parse_icmp(packet, ip.payload_offset, ip.end, v6=v6)
    assert (i.type, i.code, i.is_error) == ((1 if v6 else 3), code, True)
    assert packet[i.payload_offset :] == quoted[: 1232 if v6 else 548]
