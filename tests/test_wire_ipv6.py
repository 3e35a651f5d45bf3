"""IPv6 headers and the extension header walk: each extension header built by scapy, errors, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH, ESP
from scapy.packet import Packet

from mplslb.wire.ip import (
    IPPROTO_AH,
    IPPROTO_DSTOPTS,
    IPPROTO_ESP,
    IPPROTO_FRAGMENT,
    IPPROTO_HOPOPTS,
    IPPROTO_NONE,
    IPPROTO_ROUTING,
    IPPROTO_TCP,
    IPPROTO_UDP,
)
from mplslb.wire.ipv6 import IPv6Error, build_ipv6, parse_ipv6

SRC = bytes.fromhex("20010db8000000000000000000000001")
DST = bytes.fromhex("20010db8000000000000000000000002")


def _ip() -> IPv6:
    return IPv6(src="2001:db8::1", dst="2001:db8::2")


def test_golden_build() -> None:
    header = build_ipv6(SRC, DST, IPPROTO_TCP, 20, hop_limit=255, traffic_class=0xB8, flow_label=0x12345)
    assert header == bytes.fromhex("6b812345 0014 06 ff") + SRC + DST
    oracle = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2", tc=0xB8, fl=0x12345, hlim=255, nh=6, plen=20))
    assert header == oracle


def test_golden_parse() -> None:
    packet = bytes(_ip() / UDP(sport=1, dport=2) / b"abc")
    h = parse_ipv6(packet)
    assert h == (0, 0, 11, IPPROTO_UDP, 64, SRC, DST, IPPROTO_UDP, (), None, 0, 40, 51)


@pytest.mark.parametrize(
    ("ext", "number"),
    [
        (IPv6ExtHdrHopByHop(), IPPROTO_HOPOPTS),
        (IPv6ExtHdrRouting(addresses=["2001:db8::3", "2001:db8::4"]), IPPROTO_ROUTING),
        (IPv6ExtHdrFragment(id=0xDEADBEEF, m=1), IPPROTO_FRAGMENT),
        (IPv6ExtHdrDestOpt(), IPPROTO_DSTOPTS),
        (AH(nh=IPPROTO_TCP, payloadlen=4, spi=0x100, seq=1, icv=bytes(12)), IPPROTO_AH),
    ],
)
def test_each_extension_header(ext: Packet, number: int) -> None:
    segment = bytes(TCP(sport=1234, dport=80))
    packet = bytes(_ip() / ext / TCP(sport=1234, dport=80))
    h = parse_ipv6(packet)
    assert h.next_header == number
    assert h.ext_headers == (number,)
    assert h.proto == IPPROTO_TCP
    assert h.payload_offset == len(packet) - len(segment)
    assert packet[h.payload_offset : h.payload_offset + 4] == segment[:4]
    if number == IPPROTO_FRAGMENT:
        assert h.fragment == (0, True, 0xDEADBEEF)
    else:
        assert h.fragment is None


def test_chain_of_all_extension_headers() -> None:
    packet = bytes(
        _ip()
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrDestOpt()
        / IPv6ExtHdrRouting(addresses=["2001:db8::3"])
        / IPv6ExtHdrFragment(id=7)
        / AH(nh=IPPROTO_DSTOPTS, payloadlen=4, spi=1, icv=bytes(12))  # scapy leaves both fields to us
        / IPv6ExtHdrDestOpt()
        / UDP(sport=5, dport=6)
    )
    h = parse_ipv6(packet)
    order = (IPPROTO_HOPOPTS, IPPROTO_DSTOPTS, IPPROTO_ROUTING, IPPROTO_FRAGMENT, IPPROTO_AH, IPPROTO_DSTOPTS)
    assert h.ext_headers == order
    assert (h.proto, h.payload_offset, h.fragment) == (IPPROTO_UDP, len(packet) - 8, (0, False, 7))


def test_later_fragment_stops_the_walk() -> None:
    packet = bytes(_ip() / IPv6ExtHdrFragment(offset=100, m=0, id=9, nh=IPPROTO_TCP) / (b"\x3c" * 16))
    h = parse_ipv6(packet)
    assert h.fragment == (100, False, 9)
    assert h.proto == IPPROTO_TCP and h.payload_offset == 48


@pytest.mark.parametrize(("upper", "number"), [(ESP(spi=1, seq=1, data=b"xxxx"), IPPROTO_ESP), (b"", IPPROTO_NONE)])
def test_walk_stops_at_esp_and_no_next_header(upper: Packet | bytes, number: int) -> None:
    packet = bytes(_ip() / IPv6ExtHdrHopByHop(nh=number) / upper)
    h = parse_ipv6(packet)
    assert (h.proto, h.ext_headers, h.payload_offset) == (number, (IPPROTO_HOPOPTS,), 48)


def test_offset_memoryview_and_padding() -> None:
    packet = b"\xff" * 18 + bytes(_ip() / UDP()) + bytes(6)
    h = parse_ipv6(memoryview(packet), 18)
    assert (h.offset, h.payload_offset, h.end) == (18, 58, 66)


def test_allow_truncated_clips_end() -> None:
    packet = build_ipv6(SRC, DST, IPPROTO_TCP, 1000) + bytes(20)
    with pytest.raises(IPv6Error, match="ipv6_bad_payload_length"):
        parse_ipv6(packet)
    assert parse_ipv6(packet, allow_truncated=True).end == 60


def _hop_by_hop(length_units: int, payload: int) -> bytes:
    return build_ipv6(SRC, DST, IPPROTO_HOPOPTS, payload) + bytes([IPPROTO_TCP, length_units]) + bytes(payload - 2)


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (b"", "ipv6_truncated"),
        (build_ipv6(SRC, DST, IPPROTO_TCP, 0)[:39], "ipv6_truncated"),
        (b"\x40" + build_ipv6(SRC, DST, IPPROTO_TCP, 0)[1:], "ipv6_bad_version"),
        (build_ipv6(SRC, DST, IPPROTO_TCP, 1), "ipv6_bad_payload_length"),
        (_hop_by_hop(0, 6), "ipv6_ext_truncated"),  # header of 8 bytes in a 6-byte payload
        (_hop_by_hop(1, 8), "ipv6_ext_truncated"),  # says 16 bytes, 8 there
        (build_ipv6(SRC, DST, IPPROTO_FRAGMENT, 4) + bytes(4), "ipv6_ext_truncated"),
        (
            build_ipv6(SRC, DST, IPPROTO_AH, 8) + bytes([6, 1]) + bytes(6),
            "ipv6_ext_truncated",
        ),  # AH of 12 bytes
    ],
)
def test_errors(packet: bytes, reason: str) -> None:
    with pytest.raises(IPv6Error) as info:
        parse_ipv6(packet)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "kwargs", [{"hop_limit": 256}, {"traffic_class": 256}, {"flow_label": 1 << 20}, {"payload_len": 1 << 16}]
)
def test_build_rejects(kwargs: dict[str, int]) -> None:
    args = {"payload_len": 0, **kwargs}
    with pytest.raises(ValueError):
        build_ipv6(SRC, DST, IPPROTO_TCP, args.pop("payload_len"), **args)
    with pytest.raises(ValueError):
        build_ipv6(SRC[:4], DST[:4], IPPROTO_TCP, 0)


addresses = st.binary(min_size=16, max_size=16)


@given(
    addresses,
    addresses,
    st.integers(0, 255).filter(lambda p: p not in (0, 43, 44, 51, 60)),
    st.integers(0, 600),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 0xFFFFF),
)
def test_round_trip(src: bytes, dst: bytes, proto: int, payload_len: int, hop: int, tc: int, fl: int) -> None:
    header = build_ipv6(src, dst, proto, payload_len, hop_limit=hop, traffic_class=tc, flow_label=fl)
    h = parse_ipv6(header + bytes(payload_len))
    assert h == (tc, fl, payload_len, proto, hop, src, dst, proto, (), None, 0, 40, 40 + payload_len)
    assert bytes(IPv6(header + bytes(payload_len)))[:40] == header
