"""MPLS label stack entries: RFC 3032 vectors computed by hand, scapy as the oracle, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.contrib.mpls import MPLS

from mplslb.wire.mpls import (
    LABEL_MAX,
    MAX_STACK_DEPTH,
    MPLS_ENTRY_LEN,
    MPLS_UDP_PORT,
    RESERVED_LABEL_MAX,
    LabelEntry,
    MplsError,
    ReservedLabel,
    encode_entry,
    is_reserved,
    pack_entry,
    pack_stack,
    parse_entry,
    parse_stack,
    payload_version,
    stack_of,
)


def test_constants() -> None:
    assert (MPLS_UDP_PORT, LABEL_MAX, MPLS_ENTRY_LEN, MAX_STACK_DEPTH) == (6635, 0xFFFFF, 4, 16)
    assert RESERVED_LABEL_MAX == 15
    assert [int(x) for x in ReservedLabel] == [0, 1, 2, 3, 7, 13, 14, 15]
    assert ReservedLabel.GAL == 13 and ReservedLabel.ENTROPY_LABEL_INDICATOR == 7


@pytest.mark.parametrize(
    ("label", "tc", "s", "ttl", "hex_"),
    [
        (16, 0, True, 255, "000101ff"),  # label 16 = 0x00010 << 12; S is bit 8
        (0, 0, True, 64, "00000140"),  # IPv4 explicit null
        (LABEL_MAX, 7, False, 0, "fffffe00"),  # every label and TC bit
        (3, 5, False, 1, "00003a01"),  # tc 5 -> 0b101 << 9 = 0xa00
        (0x12345, 2, True, 0x80, "12345580"),
    ],
)
def test_entry_golden(label: int, tc: int, s: bool, ttl: int, hex_: str) -> None:
    assert pack_entry(label, tc, s, ttl).hex() == hex_
    assert encode_entry(label, tc, s, ttl) == int(hex_, 16)
    assert bytes(MPLS(label=label, cos=tc, s=int(s), ttl=ttl))[:4].hex() == hex_
    assert parse_entry(bytes.fromhex(hex_)) == (label, tc, s, ttl)


def test_stack_of_sets_s_on_last_only() -> None:
    assert stack_of([100, 200]).hex() == "00064040000c8140"
    assert stack_of([17], ttl=255, tc=1).hex() == "000113ff"
    assert stack_of([]) == b""


def test_pack_stack_keeps_s_bits_as_given() -> None:
    entries = [LabelEntry(18, 0, True, 255), LabelEntry(16, 0, True, 255)]
    assert pack_stack(entries).hex() == "000121ff000101ff"


def test_parse_stack_golden_with_scapy() -> None:
    frame = bytes(MPLS(label=18, s=0, ttl=254) / MPLS(label=16, s=1, ttl=255)) + b"\x45"
    entries, end = parse_stack(frame)
    assert entries == (LabelEntry(18, 0, False, 254), LabelEntry(16, 0, True, 255))
    assert end == 8
    assert payload_version(frame, end) == 4


def test_parse_stack_at_offset() -> None:
    frame = b"\xaa" * 3 + stack_of([1000, 2001]) + b"\x60"
    entries, end = parse_stack(memoryview(frame), 3)
    assert [e.label for e in entries] == [1000, 2001]
    assert end == 11 and payload_version(frame, end) == 6


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "mpls_truncated"),
        (b"\x00\x01\x01", "mpls_truncated"),
        (pack_entry(16, s=False), "mpls_no_bottom"),
        (pack_entry(16, s=False) + b"\x00\x01", "mpls_truncated"),
        (pack_entry(16, s=False) * MAX_STACK_DEPTH + pack_entry(16), "mpls_too_deep"),
    ],
)
def test_parse_stack_errors(data: bytes, reason: str) -> None:
    with pytest.raises(MplsError) as info:
        parse_stack(data)
    assert info.value.reason == reason


def test_max_depth_is_inclusive() -> None:
    stack = stack_of(list(range(16, 16 + MAX_STACK_DEPTH)))
    assert len(parse_stack(stack)[0]) == MAX_STACK_DEPTH
    with pytest.raises(MplsError, match="mpls_too_deep"):
        parse_stack(stack, max_depth=3)


def test_parse_entry_truncated() -> None:
    with pytest.raises(MplsError, match="mpls_truncated"):
        parse_entry(b"\x00\x01\x01ff", 2)


@pytest.mark.parametrize(
    "args",
    [(LABEL_MAX + 1, 0, True, 0), (-1, 0, True, 0), (16, 8, True, 0), (16, 0, True, 256), (16, 0, True, -1)],
)
def test_encode_rejects_out_of_range(args: tuple[int, int, bool, int]) -> None:
    with pytest.raises(ValueError):
        encode_entry(*args)


def test_payload_version() -> None:
    assert payload_version(b"\x45", 0) == 4
    assert payload_version(b"\x60", 0) == 6
    assert payload_version(b"\x00\x00", 0) == 0  # a pseudowire control word
    assert payload_version(b"", 0) == 0
    assert payload_version(b"\x45", 5) == 0
    assert payload_version(b"\x45", -1) == 0


def test_is_reserved() -> None:
    assert all(is_reserved(x) for x in range(16))
    assert not is_reserved(16) and not is_reserved(LABEL_MAX)


entries = st.builds(LabelEntry, st.integers(0, LABEL_MAX), st.integers(0, 7), st.booleans(), st.integers(0, 255))


@given(entries)
def test_entry_round_trip(entry: LabelEntry) -> None:
    assert parse_entry(pack_entry(*entry)) == entry


@given(
    st.lists(st.integers(0, LABEL_MAX), min_size=1, max_size=MAX_STACK_DEPTH),
    st.integers(0, 255),
    st.integers(0, 7),
)
def test_stack_round_trip(labels: list[int], ttl: int, tc: int) -> None:
    data = stack_of(labels, ttl=ttl, tc=tc)
    parsed, end = parse_stack(data + b"\x45rest")
    assert [e.label for e in parsed] == labels and end == len(data)
    assert all(e.ttl == ttl and e.tc == tc for e in parsed)
    assert [e.s for e in parsed] == [False] * (len(labels) - 1) + [True]
    assert pack_stack(parsed) == data
