"""IPv4 headers: a well-known vector, options, scapy as the oracle, every error, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, IPOption_Router_Alert

from mplslb.wire.checksum import internet_checksum
from mplslb.wire.ip import IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP
from mplslb.wire.ipv4 import IP_DF, IP_MF, IPv4Error, build_ipv4, ipv4_is_fragment, parse_ipv4

SRC = bytes([192, 168, 0, 1])
DST = bytes([192, 168, 0, 199])
# The example header of the Wikipedia "IPv4 header checksum" article, checksum b861.
GOLDEN = bytes.fromhex("4500 0073 0000 4000 4011 b861 c0a8 0001 c0a8 00c7")


def test_golden_build() -> None:
    assert build_ipv4(SRC, DST, IPPROTO_UDP, 0x73 - 20, ttl=64, ident=0, flags=IP_DF) == GOLDEN


def test_golden_parse() -> None:
    h = parse_ipv4(GOLDEN + bytes(0x73 - 20))
    assert h == (5, 0, 0x73, 0, IP_DF, 0, 64, IPPROTO_UDP, 0xB861, SRC, DST, b"", 0, 20, 0x73)
    assert not ipv4_is_fragment(h)


def test_against_scapy_with_options() -> None:
    payload = b"x" * 12
    oracle = bytes(
        IP(
            src="10.1.2.3",
            dst="10.9.8.7",
            ttl=3,
            id=0x1234,
            tos=0xB8,
            flags="MF",
            frag=100,
            proto=IPPROTO_TCP,
            options=[IPOption_Router_Alert()],
        )
        / payload
    )
    ours = build_ipv4(
        bytes([10, 1, 2, 3]),
        bytes([10, 9, 8, 7]),
        IPPROTO_TCP,
        len(payload),
        ttl=3,
        ident=0x1234,
        tos=0xB8,
        flags=IP_MF,
        frag_offset=100,
        options=bytes.fromhex("94040000"),
    )
    assert ours + payload == oracle
    h = parse_ipv4(oracle)
    assert (h.ihl, h.options, h.payload_offset, h.end) == (
        6,
        bytes.fromhex("94040000"),
        24,
        24 + len(payload),
    )
    assert (h.flags, h.frag_offset, h.tos, h.ttl, h.ident) == (IP_MF, 100, 0xB8, 3, 0x1234)
    assert ipv4_is_fragment(h)


def test_options_are_padded() -> None:
    header = build_ipv4(SRC, DST, IPPROTO_ICMP, 0, options=b"\x01\x01\x01")  # three NOPs, one EOL pad byte
    assert len(header) == 24 and header[20:] == b"\x01\x01\x01\x00"
    assert internet_checksum(header) == 0


def test_later_fragment_is_a_fragment() -> None:
    h = parse_ipv4(build_ipv4(SRC, DST, IPPROTO_UDP, 0, flags=0, frag_offset=1))
    assert ipv4_is_fragment(h)


def test_trailing_padding_allowed() -> None:
    packet = build_ipv4(SRC, DST, IPPROTO_TCP, 6) + bytes(6) + b"\x00" * 20
    h = parse_ipv4(packet)
    assert h.end == 26 and h.total_length == 26


def test_offset_and_memoryview() -> None:
    packet = b"\xee" * 14 + GOLDEN + bytes(0x73 - 20)
    h = parse_ipv4(memoryview(packet), 14)
    assert (h.offset, h.payload_offset, h.end) == (14, 34, 14 + 0x73)


def test_allow_truncated_clips_end() -> None:
    packet = build_ipv4(SRC, DST, IPPROTO_TCP, 1000) + bytes(100)
    with pytest.raises(IPv4Error, match="ipv4_bad_total_length"):
        parse_ipv4(packet)
    assert parse_ipv4(packet, allow_truncated=True).end == len(packet)


def _with(header: bytes, index: int, value: int, fix_checksum: bool = True) -> bytes:
    changed = bytearray(header)
    changed[index] = value
    if fix_checksum:
        changed[10:12] = b"\x00\x00"
        changed[10:12] = internet_checksum(changed).to_bytes(2, "big")
    return bytes(changed)


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (b"", "ipv4_truncated"),
        (GOLDEN[:19], "ipv4_truncated"),
        (_with(GOLDEN, 0, 0x65), "ipv4_bad_version"),
        (_with(GOLDEN, 0, 0x44), "ipv4_bad_ihl"),
        (_with(GOLDEN, 0, 0x4F), "ipv4_truncated"),  # a 60-byte header in 20 bytes
        (GOLDEN, "ipv4_bad_total_length"),  # 0x73 bytes promised, 20 there
        (_with(_with(GOLDEN, 2, 0), 3, 19) + bytes(100), "ipv4_bad_total_length"),  # shorter than the header
        (_with(GOLDEN, 8, 63, fix_checksum=False) + bytes(0x73 - 20), "ipv4_bad_checksum"),
    ],
)
def test_errors(packet: bytes, reason: str) -> None:
    with pytest.raises(IPv4Error) as info:
        parse_ipv4(packet)
    assert info.value.reason == reason


def test_checksum_not_verified_on_request() -> None:
    packet = _with(GOLDEN, 8, 63, fix_checksum=False) + bytes(0x73 - 20)
    assert parse_ipv4(packet, verify_checksum=False).ttl == 63


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ttl": 256},
        {"ident": 0x10000},
        {"tos": -1},
        {"flags": 8},
        {"frag_offset": 0x2000},
        {"options": bytes(41)},
    ],
)
def test_build_rejects(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        build_ipv4(SRC, DST, IPPROTO_TCP, 0, **kwargs)  # type: ignore[arg-type]


def test_build_rejects_bad_addresses_and_length() -> None:
    with pytest.raises(ValueError):
        build_ipv4(bytes(16), DST, IPPROTO_TCP, 0)
    with pytest.raises(ValueError):
        build_ipv4(SRC, DST, IPPROTO_TCP, 0xFFFF)


addresses = st.binary(min_size=4, max_size=4)


@given(
    addresses,
    addresses,
    st.integers(0, 255),
    st.integers(0, 1000),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.integers(0, 255),
    st.integers(0, 7),
    st.integers(0, 0x1FFF),
    st.binary(max_size=40),
)
def test_round_trip(
    src: bytes,
    dst: bytes,
    proto: int,
    payload_len: int,
    ttl: int,
    ident: int,
    tos: int,
    flags: int,
    frag_offset: int,
    options: bytes,
) -> None:
    header = build_ipv4(
        src,
        dst,
        proto,
        payload_len,
        ttl=ttl,
        ident=ident,
        tos=tos,
        flags=flags,
        frag_offset=frag_offset,
        options=options,
    )
    h = parse_ipv4(header + bytes(payload_len))
    padded = options + bytes(-len(options) % 4)
    assert (h.src, h.dst, h.proto, h.ttl, h.ident, h.tos, h.flags, h.frag_offset) == (
        src,
        dst,
        proto,
        ttl,
        ident,
        tos,
        flags,
        frag_offset,
    )
    assert (h.options, h.payload_offset, h.end) == (padded, len(header), len(header) + payload_len)
    assert bytes(IP(header + bytes(payload_len)))[: len(header)] == header
