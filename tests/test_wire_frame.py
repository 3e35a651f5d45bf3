"""The full dissector on frames built with scapy: every link type, label stacks, MPLS in UDP, fragments."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.contrib.mpls import MPLS
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import ARP, CookedLinux, Dot1Q, Ether
from scapy.layers.ppp import HDLC, PPP
from scapy.packet import Packet

from mplslb.wire import icmp as wicmp
from mplslb.wire import tcp as wtcp
from mplslb.wire import udp as wudp
from mplslb.wire.errors import WireError
from mplslb.wire.ethernet import ETH_P_ARP, EthernetError, build_ethernet
from mplslb.wire.frame import NO_PROTO, FrameError, dissect
from mplslb.wire.ip import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP
from mplslb.wire.ipv4 import IPv4, IPv4Error, build_ipv4
from mplslb.wire.ipv6 import IPv6 as WireIPv6
from mplslb.wire.ipv6 import build_ipv6
from mplslb.wire.mpls import MplsError, stack_of
from mplslb.wire.pcap import LINKTYPE_C_HDLC, LINKTYPE_LINUX_SLL, LINKTYPE_PPP, LINKTYPE_RAW

A4, B4 = "192.0.2.1", "198.51.100.2"
RA4, RB4 = bytes([192, 0, 2, 1]), bytes([198, 51, 100, 2])
A6, B6 = "2001:db8::1", "2001:db8::2"
RA6 = bytes.fromhex("20010db8000000000000000000000001")
RB6 = bytes.fromhex("20010db8000000000000000000000002")
ETHER = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def labels_of(frame: bytes, linktype: int = 1) -> list[int]:
    return [e.label for e in dissect(frame, linktype).labels]


def test_plain_tcp_over_ethernet() -> None:
    frame = bytes(ETHER / IP(src=A4, dst=B4) / TCP(sport=1234, dport=80, flags="S") / b"GET")
    d = dissect(frame)
    assert d.eth is not None and d.eth.ethertype == 0x0800
    assert (d.labels, d.ip_version, d.proto, d.src, d.dst, d.sport, d.dport) == (
        (),
        4,
        IPPROTO_TCP,
        RA4,
        RB4,
        1234,
        80,
    )
    assert isinstance(d.ip, IPv4) and isinstance(d.l4, wtcp.TCP) and not d.udp_mpls
    assert frame[d.payload_offset : d.payload_end] == b"GET"


def test_vlan_mpls_stack_ipv6_udp() -> None:
    frame = bytes(
        ETHER
        / Dot1Q(vlan=7)
        / MPLS(label=1000, s=0, ttl=9)
        / MPLS(label=17, s=1, ttl=8)
        / IPv6(src=A6, dst=B6)
        / UDP(sport=53, dport=5353)
        / b"dns"
    )
    d = dissect(frame)
    assert d.eth is not None and d.eth.vlans == (7,)
    assert [(e.label, e.s, e.ttl) for e in d.labels] == [(1000, False, 9), (17, True, 8)]
    assert (d.ip_version, d.proto, d.src, d.dst, d.sport, d.dport) == (6, IPPROTO_UDP, RA6, RB6, 53, 5353)
    assert isinstance(d.ip, WireIPv6) and isinstance(d.l4, wudp.UDP)
    assert frame[d.payload_offset : d.payload_end] == b"dns"


def test_explicit_null_then_icmp() -> None:
    frame = bytes(ETHER / MPLS(label=0, s=1) / IP(src=A4, dst=B4) / ICMP(type=8) / b"ping")
    d = dissect(frame)
    assert labels_of(frame) == [0]
    assert (d.proto, d.sport, d.dport) == (IPPROTO_ICMP, 0, 0) and isinstance(d.l4, wicmp.ICMP)


def test_icmpv6() -> None:
    d = dissect(bytes(ETHER / IPv6(src=A6, dst=B6) / ICMPv6EchoRequest()))
    assert d.proto == IPPROTO_ICMPV6 and isinstance(d.l4, wicmp.ICMP) and d.l4.type == 128


def test_mpls_in_udp_describes_the_inner_packet() -> None:
    inner = IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=5000, dport=443)
    frame = bytes(ETHER / IP(src=A4, dst=B4) / UDP(sport=49152, dport=6635) / MPLS(label=21, s=1) / inner / b"x")
    d = dissect(frame)
    assert d.udp_mpls and labels_of(frame) == [21]
    assert (d.src, d.dst, d.proto, d.sport, d.dport) == (
        bytes([10, 0, 0, 1]),
        bytes([10, 0, 0, 2]),
        IPPROTO_TCP,
        5000,
        443,
    )
    assert frame[d.payload_offset : d.payload_end] == b"x"


def test_mpls_in_udp_with_non_ip_payload() -> None:
    frame = bytes(ETHER / IP(src=A4, dst=B4) / UDP(sport=1, dport=6635) / MPLS(label=30, s=1) / bytes(20))
    d = dissect(frame)
    assert d.udp_mpls and d.ip_version == 0 and d.ip is None and d.proto == NO_PROTO and labels_of(frame) == [30]


def test_mpls_in_udp_without_bottom_of_stack() -> None:
    frame = bytes(ETHER / IP(src=A4, dst=B4) / UDP(sport=1, dport=6635) / MPLS(label=30, s=0))
    with pytest.raises(MplsError, match="mpls_no_bottom"):
        dissect(frame)


def test_pseudowire_is_not_guessed() -> None:
    inner = Ether() / IP() / ICMP()
    frame = bytes(ETHER / MPLS(label=19, s=0) / MPLS(label=16, s=1) / b"\x00\x00\x00\x00" / inner)
    d = dissect(frame)
    assert labels_of(frame) == [19, 16] and d.ip_version == 0 and d.ip is None and d.l4 is None
    assert d.payload_offset == 22 and d.payload_end == len(frame)


def test_arp_is_not_ip() -> None:
    d = dissect(bytes(ETHER / ARP()))
    assert d.eth is not None and d.eth.ethertype == ETH_P_ARP
    assert (d.ip_version, d.ip, d.proto, d.l4, d.src, d.sport) == (0, None, NO_PROTO, None, b"", 0)


@pytest.mark.parametrize(
    ("frame", "linktype"),
    [
        (HDLC() / PPP(proto=0x0021) / IP(src=A4, dst=B4) / UDP(sport=7, dport=9), LINKTYPE_PPP),
        (PPP(proto=0x0021) / IP(src=A4, dst=B4) / UDP(sport=7, dport=9), LINKTYPE_PPP),
        (
            b"\xff\x03\x21" / IP(src=A4, dst=B4) / UDP(sport=7, dport=9),
            LINKTYPE_PPP,
        ),  # protocol field compressed
        (b"\x0f\x00\x08\x00" / IP(src=A4, dst=B4) / UDP(sport=7, dport=9), LINKTYPE_C_HDLC),
        (CookedLinux(proto=0x0800) / IP(src=A4, dst=B4) / UDP(sport=7, dport=9), LINKTYPE_LINUX_SLL),
        (IP(src=A4, dst=B4) / UDP(sport=7, dport=9), LINKTYPE_RAW),
    ],
)
def test_link_types_ipv4(frame: Packet, linktype: int) -> None:
    d = dissect(bytes(frame), linktype)
    assert d.eth is None and (d.ip_version, d.src, d.dst, d.sport, d.dport) == (4, RA4, RB4, 7, 9)


@pytest.mark.parametrize(
    ("frame", "linktype"),
    [
        (HDLC() / PPP(proto=0x0281) / MPLS(label=100704, s=1) / IPv6(src=A6, dst=B6) / TCP(), LINKTYPE_PPP),
        (PPP(proto=0x0281) / MPLS(label=100704, s=1) / IPv6(src=A6, dst=B6) / TCP(), LINKTYPE_PPP),
        (b"\x8f\x00\x88\x47" / MPLS(label=100704, s=1) / IPv6(src=A6, dst=B6) / TCP(), LINKTYPE_C_HDLC),
    ],
)
def test_link_types_mpls(frame: Packet, linktype: int) -> None:
    d = dissect(bytes(frame), linktype)
    assert labels_of(bytes(frame), linktype) == [100704] and d.ip_version == 6 and d.proto == IPPROTO_TCP


def test_ppp_ipv6_and_other_protocols() -> None:
    assert dissect(bytes(PPP(proto=0x0057) / IPv6(src=A6, dst=B6) / UDP()), LINKTYPE_PPP).ip_version == 6
    assert dissect(bytes(HDLC() / PPP(proto=0xC021) / bytes(10)), LINKTYPE_PPP).ip_version == 0  # LCP
    assert dissect(bytes(IPv6(src=A6, dst=B6)), LINKTYPE_RAW).ip_version == 6
    assert dissect(b"\x00\x01", LINKTYPE_RAW).ip_version == 0


@pytest.mark.parametrize(
    ("frame", "linktype", "reason"),
    [
        (b"", LINKTYPE_PPP, "ppp_truncated"),
        (b"\xff\x03", LINKTYPE_PPP, "ppp_truncated"),
        (b"\xff\x03\x00", LINKTYPE_PPP, "ppp_truncated"),
        (b"\x0f\x00\x08", LINKTYPE_C_HDLC, "chdlc_truncated"),
        (bytes(15), LINKTYPE_LINUX_SLL, "sll_truncated"),
        (bytes(60), 12345, "frame_unsupported_linktype"),
        (bytes(10), 1, "ethernet_truncated"),
    ],
)
def test_link_layer_errors(frame: bytes, linktype: int, reason: str) -> None:
    with pytest.raises(WireError) as info:
        dissect(frame, linktype)
    assert info.value.reason == reason
    assert isinstance(info.value, EthernetError if reason.startswith("ethernet") else FrameError)


def test_ipv4_fragments() -> None:
    first = bytes(
        ETHER / IP(src=A4, dst=B4, flags="MF", frag=0, proto=17) / UDP(sport=1, dport=2, len=1000) / bytes(40)
    )
    d = dissect(first)
    assert isinstance(d.l4, wudp.UDP) and d.sport == 1  # the first fragment's UDP length covers all fragments
    later = bytes(ETHER / IP(src=A4, dst=B4, frag=10, proto=6) / bytes(40))
    d = dissect(later)
    assert d.l4 is None and d.proto == IPPROTO_TCP and d.sport == 0 and d.payload_offset == 34


def test_ipv6_fragments() -> None:
    later = bytes(ETHER / IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(offset=3, nh=17) / bytes(24))
    d = dissect(later)
    assert d.l4 is None and d.proto == IPPROTO_UDP
    first = bytes(ETHER / IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(m=1) / UDP(sport=3, dport=4, len=500) / bytes(8))
    assert dissect(first).sport == 3


def test_mpls_in_udp_on_a_later_fragment_is_not_followed() -> None:
    frame = bytes(ETHER / IP(src=A4, dst=B4, frag=5, proto=17) / bytes.fromhex("0001 19eb 0010 0000") / bytes(8))
    d = dissect(frame)
    assert not d.udp_mpls and d.l4 is None


def test_bad_checksum_and_its_switch() -> None:
    frame = bytearray(bytes(ETHER / IP(src=A4, dst=B4) / UDP()))
    frame[14 + 8] -= 1  # TTL changed, checksum not
    with pytest.raises(IPv4Error, match="ipv4_bad_checksum"):
        dissect(bytes(frame))
    assert dissect(bytes(frame), verify_checksum=False).ip_version == 4


def test_snapped_capture_needs_orig_len() -> None:
    frame = bytes(ETHER / IP(src=A4, dst=B4) / TCP() / bytes(1000))[:100]
    with pytest.raises(IPv4Error, match="ipv4_bad_total_length"):
        dissect(frame)
    d = dissect(frame, orig_len=1054)
    assert d.proto == IPPROTO_TCP and d.payload_end == 100


addresses4 = st.binary(min_size=4, max_size=4)
addresses6 = st.binary(min_size=16, max_size=16)


@given(
    st.one_of(st.tuples(addresses4, addresses4), st.tuples(addresses6, addresses6)),
    st.lists(st.integers(16, (1 << 20) - 1), max_size=4),
    st.lists(st.integers(0, 0xFFFF), max_size=2),
    st.sampled_from(["tcp", "udp"]),
    st.integers(0, 0xFFFF).filter(lambda p: p != 6635),
    st.integers(0, 0xFFFF).filter(lambda p: p != 6635),
    st.binary(max_size=64),
)
def test_built_frames_dissect_to_what_was_built(
    addrs: tuple[bytes, bytes],
    labels: list[int],
    vlans: list[int],
    transport: str,
    sport: int,
    dport: int,
    payload: bytes,
) -> None:
    src, dst = addrs
    v6 = len(src) == 16
    if transport == "tcp":
        segment, proto = wtcp.build_tcp(src, dst, sport, dport, payload=payload), IPPROTO_TCP
    else:
        segment, proto = wudp.build_udp(src, dst, sport, dport, payload), IPPROTO_UDP
    packet = (build_ipv6 if v6 else build_ipv4)(src, dst, proto, len(segment)) + segment
    ethertype = 0x8847 if labels else (0x86DD if v6 else 0x0800)
    frame = build_ethernet(bytes(6), bytes(6), ethertype, vlans) + stack_of(labels) + packet
    d = dissect(frame)
    assert [e.label for e in d.labels] == labels
    assert (d.ip_version, d.src, d.dst, d.proto, d.sport, d.dport) == (
        6 if v6 else 4,
        src,
        dst,
        proto,
        sport,
        dport,
    )
    assert frame[d.payload_offset : d.payload_end] == payload


def test_mpls_in_udp_first_fragment_accepts_a_cut_inner_packet() -> None:
    inner = bytes(MPLS(label=21, s=1) / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=7, dport=8) / bytes(500))
    udp = bytes(UDP(sport=1, dport=6635, len=8 + len(inner))) + inner[:100]
    frame = bytes(ETHER / IP(src=A4, dst=B4, flags="MF", proto=17)) + udp
    frame = frame[:16] + (20 + len(udp)).to_bytes(2, "big") + frame[18:]  # IP total length: this fragment only
    d = dissect(frame, verify_checksum=False)
    assert d.udp_mpls and (d.sport, d.dport) == (7, 8) and d.payload_end == len(frame)
