"""The Internet checksum against RFC 1071's worked example and a word-by-word reference."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mplslb.wire.checksum import internet_checksum, ones_complement_sum, pseudo_header_sum


def reference_sum(data: bytes) -> int:
    """RFC 1071 section 4.1, word by word with end-around carry."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_rfc1071_example() -> None:
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert ones_complement_sum(data) == 0xDDF2
    assert internet_checksum(data) == 0x220D


def test_checksum_over_data_with_its_checksum_is_zero() -> None:
    header = bytearray.fromhex("450000730000400040110000c0a80001c0a800c7")
    header[10:12] = internet_checksum(header).to_bytes(2, "big")
    assert header[10:12] == bytes.fromhex("b861")  # the well-known example header
    assert internet_checksum(header) == 0


def test_odd_length_is_padded_with_zero() -> None:
    assert internet_checksum(b"\x12") == internet_checksum(b"\x12\x00") == 0xEDFF


def test_all_zero_data_checksums_to_all_ones() -> None:
    assert internet_checksum(bytes(20)) == 0xFFFF
    assert internet_checksum(b"") == 0xFFFF


def test_memoryview_accepted() -> None:
    data = bytes(range(40))
    assert internet_checksum(memoryview(data)[3:17]) == internet_checksum(data[3:17])


@given(st.binary(max_size=300), st.integers(0, 0xFFFF))
def test_matches_reference(data: bytes, initial: int) -> None:
    # 0 and 0xFFFF are the two zeros of one's complement; compare modulo 0xFFFF.
    assert ones_complement_sum(data, initial) % 0xFFFF == (reference_sum(data) + initial) % 0xFFFF


@given(st.binary(max_size=300).filter(lambda b: len(b) % 2 == 0))
def test_appending_the_checksum_gives_zero(data: bytes) -> None:
    assert internet_checksum(data + internet_checksum(data).to_bytes(2, "big")) == 0


@given(
    st.binary(min_size=4, max_size=4),
    st.binary(min_size=4, max_size=4),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
)
def test_pseudo_header_v4(src: bytes, dst: bytes, proto: int, length: int) -> None:
    header = src + dst + bytes([0, proto]) + length.to_bytes(2, "big")
    assert pseudo_header_sum(src, dst, proto, length) % 0xFFFF == reference_sum(header) % 0xFFFF


@given(st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16), st.integers(0, 255))
def test_pseudo_header_v6(src: bytes, dst: bytes, proto: int) -> None:
    length = 70000
    header = src + dst + length.to_bytes(4, "big") + bytes(3) + bytes([proto])
    assert pseudo_header_sum(src, dst, proto, length) % 0xFFFF == reference_sum(header) % 0xFFFF


@pytest.mark.parametrize(("src", "dst"), [(bytes(4), bytes(16)), (bytes(5), bytes(5)), (b"", b"")])
def test_pseudo_header_rejects_bad_addresses(src: bytes, dst: bytes) -> None:
    with pytest.raises(ValueError):
        pseudo_header_sum(src, dst, 6, 20)
