"""Ethernet II with VLAN tags: hand-built vectors, scapy as the oracle, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether

from mplslb.wire.ethernet import (
    ETH_HLEN,
    ETH_P_8021AD,
    ETH_P_8021Q,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    ETH_P_MPLS_MC,
    ETH_P_MPLS_UC,
    EthernetError,
    build_ethernet,
    mac_from_str,
    mac_to_str,
    parse_ethernet,
)

DST = bytes.fromhex("0200000000aa")
SRC = bytes.fromhex("0200000000bb")


def test_ethertype_constants() -> None:
    assert (ETH_HLEN, ETH_P_IP, ETH_P_ARP, ETH_P_IPV6) == (14, 0x0800, 0x0806, 0x86DD)
    assert (ETH_P_8021Q, ETH_P_8021AD, ETH_P_MPLS_UC, ETH_P_MPLS_MC) == (0x8100, 0x88A8, 0x8847, 0x8848)


def test_untagged_golden() -> None:
    header = build_ethernet(DST, SRC, ETH_P_MPLS_UC)
    assert header == bytes.fromhex("0200000000aa 0200000000bb 8847")
    assert parse_ethernet(header + b"payload") == (DST, SRC, (), ETH_P_MPLS_UC, 14)


def test_one_tag_golden_and_scapy() -> None:
    tci = (5 << 13) | 100  # priority 5, VLAN 100
    header = build_ethernet(DST, SRC, ETH_P_IP, [tci])
    assert header == bytes.fromhex("0200000000aa 0200000000bb 8100 a064 0800")
    oracle = bytes(Ether(dst="02:00:00:00:00:aa", src="02:00:00:00:00:bb") / Dot1Q(prio=5, vlan=100, type=0x0800))
    assert header == oracle
    assert parse_ethernet(oracle) == (DST, SRC, (tci,), ETH_P_IP, 18)


def test_two_tags_outer_is_8021ad() -> None:
    header = build_ethernet(DST, SRC, ETH_P_IPV6, [10, 20])
    assert header[12:] == bytes.fromhex("88a8 000a 8100 0014 86dd")
    oracle = bytes(Ether(dst=mac_to_str(DST), src=mac_to_str(SRC)) / Dot1AD(vlan=10) / Dot1Q(vlan=20, type=0x86DD))
    assert header == oracle
    assert parse_ethernet(header).vlans == (10, 20)


def test_double_8021q_tolerated() -> None:
    frame = DST + SRC + bytes.fromhex("8100 0001 8100 0002 0800") + bytes(20)
    assert parse_ethernet(frame)[2:] == ((1, 2), ETH_P_IP, 22)


def test_third_tag_is_not_walked() -> None:
    frame = DST + SRC + bytes.fromhex("8100 0001 8100 0002 8100 0003 0800")
    eth = parse_ethernet(frame)
    assert eth.vlans == (1, 2) and eth.ethertype == ETH_P_8021Q and eth.payload_offset == 22


def test_offset_and_memoryview() -> None:
    frame = b"xyz" + build_ethernet(DST, SRC, ETH_P_ARP)
    assert parse_ethernet(memoryview(frame), 3) == (DST, SRC, (), ETH_P_ARP, 17)


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        bytes(13),
        DST + SRC + bytes.fromhex("8100 00"),
        DST + SRC + bytes.fromhex("8100 0001 8100 0002 08"),
    ],
)
def test_truncated(frame: bytes) -> None:
    with pytest.raises(EthernetError) as info:
        parse_ethernet(frame)
    assert info.value.reason == "ethernet_truncated"


def test_negative_offset_is_an_error() -> None:
    with pytest.raises(EthernetError):
        parse_ethernet(bytes(30), -1)


def test_mac_strings() -> None:
    assert mac_to_str(bytes.fromhex("00A0c9123456")) == "00:a0:c9:12:34:56"
    assert mac_from_str("00:A0:c9:12:34:56") == bytes.fromhex("00a0c9123456")
    assert mac_from_str("00-a0-c9-12-34-56") == bytes.fromhex("00a0c9123456")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "00:11:22:33:44",
        "00:11:22:33:44:55:66",
        "0:11:22:33:44:55",
        "00:11:22:33:44:gg",
        "+1:11:22:33:44:55",
        " 1:11:22:33:44:55",
    ],
)
def test_mac_from_str_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        mac_from_str(text)


@pytest.mark.parametrize(
    "args",
    [
        (bytes(5), SRC, ETH_P_IP, ()),
        (DST, SRC, 0x10000, ()),
        (DST, SRC, ETH_P_IP, (0x10000,)),
        (DST, SRC, 1, (1, 2, 3)),
    ],
)
def test_build_rejects(args: tuple[bytes, bytes, int, tuple[int, ...]]) -> None:
    with pytest.raises(ValueError):
        build_ethernet(*args)


macs = st.binary(min_size=6, max_size=6)


@given(
    macs,
    macs,
    st.integers(0x0600, 0xFFFF).filter(lambda t: t not in (0x8100, 0x88A8)),
    st.lists(st.integers(0, 0xFFFF), max_size=2),
)
def test_round_trip(dst: bytes, src: bytes, ethertype: int, vlans: list[int]) -> None:
    header = build_ethernet(dst, src, ethertype, vlans)
    assert parse_ethernet(header) == (dst, src, tuple(vlans), ethertype, len(header))
    assert mac_from_str(mac_to_str(dst)) == dst
