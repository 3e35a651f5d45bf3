"""Malformed and unwanted frames at the balancer: nothing raises, nothing reaches a server, every drop is named.

Each case feeds one frame to :meth:`Balancer.receive` and checks that it produced no frame at all and that
``stats().drops`` grew by exactly one under the reason the code names (the wire codecs' ``WireError.reason``, the
analyzer's, the switching table's or the balancer's own). Cases that need a live label first open a real session:
a TCP SYN (or a UDP query) to the virtual IP, whose C2S label is read from the frame sent toward the server.

Then properties: arbitrary bytes and mutations of valid frames on any port never raise, and each frame either
produces exactly one output frame or is counted under exactly one drop reason (a refusal answered with a RST or an
ICMP error is the one output); frames sent toward a server port carry a C2S label installed for that port. Last,
every Ethernet frame of the real captures in shared/data/pcap goes through on a client port and a server port.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import (
    ACK,
    CLIENT_PORTS,
    DNS,
    FIN,
    HTTP,
    OTHER4,
    OTHER6,
    PORT_MAC,
    PSH,
    RST,
    SERVER_BY_MAC,
    SERVER_PORTS,
    SYN,
    VIP,
    VIP6,
    client_addr,
    client_mac,
    client_tcp,
    client_udp,
    ether,
    fix_ipv4_checksum,
    icmp4,
    icmp6,
    ip_packet,
    ipv4,
    ipv6,
    labelled,
    mac,
    mutate,
    reply_tcp_packet,
    reply_udp_packet,
    standard_balancer,
    tcp_segment,
    udp_datagram,
)
from mplslb.analyzer import Analysis, PacketAnalyzer
from mplslb.balancer import Balancer
from mplslb.balancing.admission import RefuseWith
from mplslb.wire.errors import WireError
from mplslb.wire.ethernet import ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, ETH_P_MPLS_MC, ETH_P_MPLS_UC
from mplslb.wire.ip import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP
from mplslb.wire.ipv4 import IP_MF
from mplslb.wire.mpls import pack_entry
from mplslb.wire.pcap import LINKTYPE_ETHERNET, read_pcap

NOW = 1.0
CLIENT, SERVER = CLIENT_PORTS[0], SERVER_PORTS[0]
ETH_P_LLDP = 0x88CC
IPPROTO_GRE, IPPROTO_NONE = 47, 59
IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_FRAGMENT, IPPROTO_AH = 0, 43, 44, 51


def _eth(ethertype: int, rest: bytes = b"", *, port: int = CLIENT, src: bytes | None = None) -> bytes:
    return PORT_MAC[port] + (src or client_mac(0)) + struct.pack("!H", ethertype) + rest


def _drops(b: Balancer) -> dict[str, int]:
    return b.stats().drops


def _tally(b: Balancer) -> tuple[int, int]:
    """(frames dropped, new sessions refused) so far: the sums of what :meth:`Balancer.stats` reports, read off the
    counters it is made from (it builds the whole status, too dear once per frame over the real captures)."""
    return sum(b.drops.values()) + sum(b.switching.drops.values()), sum(b.admission.refused.values())


def feed(b: Balancer, port: int, frame: bytes, now: float = NOW) -> tuple[list[tuple[int, bytes]], dict[str, int]]:
    """Receive one frame; return the output and how the drop counters moved."""
    before = _drops(b)
    out = b.receive(port, frame, now)
    after = _drops(b)
    moved = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    return out, moved


def assert_dropped(b: Balancer, port: int, frame: bytes, reason: str) -> None:
    frames_in = b.frames_in
    out, moved = feed(b, port, frame)
    assert out == [], f"expected a drop ({reason}), got output {out!r}"
    assert moved == {reason: 1}
    assert b.frames_in == frames_in + 1


def top_label(frame: bytes) -> tuple[int, int, bool]:
    """(label, TTL, S) of the first label stack entry of an untagged MPLS frame."""
    assert frame[12:14] == struct.pack("!H", ETH_P_MPLS_UC)
    (entry,) = struct.unpack_from("!I", frame, 14)
    return entry >> 12, entry & 0xFF, bool(entry & 0x100)


# -- a balancer with live sessions ------------------------------------------------------------------------------
@dataclass
class Live:
    """A session opened on a fresh balancer: its labels and the server it went to."""

    b: Balancer
    c2s: int
    server_port: int
    server_mac: bytes
    v6: bool
    proto: int

    @property
    def s2c(self) -> int:
        return self.c2s + 1

    def c2s_frame(self, flags: int = ACK, payload: bytes = b"data", **kw: object) -> bytes:
        """A C2S frame of the session as its client sends it (overridable: port MAC, source MAC, client)."""
        client = int(kw.pop("client", 0))  # type: ignore[call-overload]
        src_mac = kw.pop("src_mac", client_mac(0))
        in_port = int(kw.pop("in_port", CLIENT))  # type: ignore[call-overload]
        src = client_addr(client, self.v6)
        dst = VIP6 if self.v6 else VIP
        if self.proto == IPPROTO_TCP:
            packet = ip_packet(src, dst, IPPROTO_TCP, tcp_segment(src, dst, 40000, HTTP, flags, payload))
        else:
            packet = ip_packet(src, dst, IPPROTO_UDP, udp_datagram(src, dst, 40000, DNS, payload))
        return labelled(PORT_MAC[in_port], src_mac, self.c2s, packet, **kw)  # type: ignore[arg-type]

    def s2c_frame(self, **kw: object) -> bytes:
        """An S2C frame of the session as its server sends it (overridable: port, MAC, packet)."""
        port = int(kw.pop("port", self.server_port))  # type: ignore[call-overload]
        src_mac = kw.pop("src_mac", self.server_mac)
        packet = kw.pop("packet", None)
        if packet is None:
            packet = (
                reply_tcp_packet(ACK, b"resp", v6=self.v6)
                if self.proto == IPPROTO_TCP
                else reply_udp_packet(v6=self.v6)
            )
        return labelled(PORT_MAC[port], src_mac, self.s2c, packet, **kw)  # type: ignore[arg-type]


def open_session(b: Balancer, *, v6: bool = False, proto: int = IPPROTO_TCP, now: float = 0.0) -> Live:
    first = client_tcp(SYN, v6=v6) if proto == IPPROTO_TCP else client_udp(v6=v6)
    out = b.receive(CLIENT, first, now)
    assert len(out) == 1
    port, frame = out[0]
    assert port in SERVER_PORTS
    label, _, bottom = top_label(frame)
    assert bottom and label % 2 == 1
    return Live(b, label, port, frame[0:6], v6, proto)


def other_server_port(port: int) -> int:
    return next(p for p in SERVER_PORTS if p != port)


@pytest.fixture(scope="module")
def shared() -> Balancer:
    """One balancer for the cases that need no session: each asserts only its own frame's effect."""
    return standard_balancer()


@pytest.fixture
def live() -> Live:
    return open_session(standard_balancer())


# -- codec-level garbage, identical on client and server ports ---------------------------------------------------
def _syn4() -> bytes:
    return ipv4(client_addr(), VIP, IPPROTO_TCP, tcp_segment(client_addr(), VIP, 40000, HTTP, SYN))


def _syn6() -> bytes:
    return ipv6(client_addr(v6=True), VIP6, IPPROTO_TCP, tcp_segment(client_addr(v6=True), VIP6, 40000, HTTP, SYN))


def _with(packet: bytes, offset: int, value: bytes, *, checksum: bool = True) -> bytes:
    buf = bytearray(packet)
    buf[offset : offset + len(value)] = value
    return fix_ipv4_checksum(buf) if checksum and buf[0] >> 4 == 4 else bytes(buf)


def _v4(proto: int, l4: bytes, **kw: object) -> bytes:
    return ipv4(client_addr(), VIP, proto, l4, **kw)  # type: ignore[arg-type]


def _v6(proto: int, l4: bytes, ext: bytes = b"") -> bytes:
    return ipv6(client_addr(v6=True), VIP6, proto, l4, ext=ext)


def _tcp_header(doff: int, options: bytes = b"", flags: int = SYN) -> bytes:
    return struct.pack("!HHIIBBHHH", 40000, HTTP, 1, 0, doff << 4, flags, 65535, 0, 0) + options


def _codec_cases() -> list[tuple[str, bytes, str]]:
    cases: list[tuple[str, bytes, str]] = [("empty", b"", "ethernet_truncated")]
    valid = ether(PORT_MAC[CLIENT], client_mac(0), _syn4())
    cases += [(f"{n}_bytes", valid[:n], "ethernet_truncated") for n in range(1, 14)]
    cases += [
        ("ethernet_only_ipv4", _eth(ETH_P_IP), "ipv4_truncated"),
        ("ethernet_only_ipv6", _eth(ETH_P_IPV6), "ipv6_truncated"),
        ("ethernet_only_mpls", _eth(ETH_P_MPLS_UC), "mpls_truncated"),
    ]
    cases += [(f"mpls_entry_{n}_of_4", _eth(ETH_P_MPLS_UC, b"\x00" * n), "mpls_truncated") for n in (1, 2, 3)]
    cases += [(f"vlan_tag_{n}_of_4", _eth(ETH_P_8021Q, b"\x00" * n), "ethernet_truncated") for n in (0, 1, 2, 3)]
    vlan_mpls = struct.pack("!HH", 5, ETH_P_MPLS_UC)
    cases += [
        (f"vlan_mpls_entry_{n}_of_4", _eth(ETH_P_8021Q, vlan_mpls + b"\x00" * n), "mpls_truncated")
        for n in (0, 1, 2, 3)
    ]
    cases.append(("vlan_then_nothing", _eth(ETH_P_8021Q, struct.pack("!HH", 5, ETH_P_IP)), "ipv4_truncated"))
    syn4, syn6 = _syn4(), _syn6()
    cases += [(f"ipv4_header_{n}_bytes", _eth(ETH_P_IP, syn4[:n]), "ipv4_truncated") for n in (1, 10, 19)]
    with_options = ipv4(client_addr(), VIP, IPPROTO_TCP, b"", options=b"\x01\x01\x01\x01")  # IHL 6, no payload
    cases += [(f"ipv4_options_cut_{n}", _eth(ETH_P_IP, with_options[:n]), "ipv4_truncated") for n in (20, 21, 23)]
    cases += [(f"ipv6_header_{n}_bytes", _eth(ETH_P_IPV6, syn6[:n]), "ipv6_truncated") for n in (1, 20, 39)]
    cases += [
        ("ipv4_version_5", _eth(ETH_P_IP, _with(syn4, 0, b"\x55")), "ipv4_bad_version"),
        ("ipv4_ethertype_v6_packet", _eth(ETH_P_IP, syn6), "ipv4_bad_version"),
        ("ipv6_ethertype_v4_packet", _eth(ETH_P_IPV6, syn4 + bytes(20)), "ipv6_bad_version"),
    ]
    cases += [
        (f"ipv4_ihl_{ihl}", _eth(ETH_P_IP, _with(syn4, 0, bytes([0x40 | ihl]))), "ipv4_bad_ihl") for ihl in range(5)
    ]
    too_long = struct.pack("!H", len(syn4) + 1)
    too_short = struct.pack("!H", 19)
    bad_sum = bytearray(syn4)
    bad_sum[10] ^= 0xFF
    cases += [
        ("ipv4_total_length_beyond_frame", _eth(ETH_P_IP, _with(syn4, 2, too_long)), "ipv4_bad_total_length"),
        ("ipv4_total_length_below_header", _eth(ETH_P_IP, _with(syn4, 2, too_short)), "ipv4_bad_total_length"),
        ("ipv4_bad_checksum", _eth(ETH_P_IP, bytes(bad_sum)), "ipv4_bad_checksum"),
        ("ipv4_bad_checksum_ttl", _eth(ETH_P_IP, _with(syn4, 8, b"\x07", checksum=False)), "ipv4_bad_checksum"),
        (
            "ipv6_payload_length_beyond_frame",
            _eth(ETH_P_IPV6, _with(syn6, 4, struct.pack("!H", len(syn6) - 39))),
            "ipv6_bad_payload_length",
        ),
    ]
    segment = tcp_segment(client_addr(v6=True), VIP6, 40000, HTTP, SYN)
    cases += [
        (
            "ipv6_hopopts_under_8",
            _eth(ETH_P_IPV6, _v6(IPPROTO_HOPOPTS, b"", ext=b"\x06\x00\x01\x00")),
            "ipv6_ext_truncated",
        ),
        (
            "ipv6_hopopts_length_beyond",
            _eth(ETH_P_IPV6, _v6(IPPROTO_HOPOPTS, b"", ext=b"\x06\x05" + bytes(6))),
            "ipv6_ext_truncated",
        ),
        (
            "ipv6_routing_cut",
            _eth(ETH_P_IPV6, _v6(IPPROTO_ROUTING, b"", ext=b"\x06\x02" + bytes(14))),
            "ipv6_ext_truncated",
        ),
        (
            "ipv6_fragment_cut",
            _eth(ETH_P_IPV6, _v6(IPPROTO_FRAGMENT, b"", ext=b"\x06\x00\x00\x00")),
            "ipv6_ext_truncated",
        ),
        ("ipv6_ah_cut", _eth(ETH_P_IPV6, _v6(IPPROTO_AH, b"", ext=b"\x06\x04" + bytes(10))), "ipv6_ext_truncated"),
        (
            "ipv6_dstopts_then_tcp_cut",
            _eth(ETH_P_IPV6, _v6(60, segment[:12], ext=b"\x06\x00" + bytes(6))),
            "tcp_truncated",
        ),
    ]
    cases += [
        (f"tcp_{n}_bytes", _eth(ETH_P_IP, _v4(IPPROTO_TCP, _tcp_header(5)[:n])), "tcp_truncated") for n in (0, 8, 19)
    ]
    cases += [
        (f"tcp_doff_{d}", _eth(ETH_P_IP, _v4(IPPROTO_TCP, _tcp_header(d))), "tcp_bad_data_offset") for d in range(5)
    ]
    cases += [
        ("tcp_doff_beyond_segment", _eth(ETH_P_IP, _v4(IPPROTO_TCP, _tcp_header(15))), "tcp_truncated"),
        ("tcp_doff_beyond_by_4", _eth(ETH_P_IP, _v4(IPPROTO_TCP, _tcp_header(7, bytes(4)))), "tcp_truncated"),
        ("tcp6_truncated", _eth(ETH_P_IPV6, _v6(IPPROTO_TCP, segment[:10])), "tcp_truncated"),
        (
            "tcp_option_length_0",
            _eth(ETH_P_IP, _v4(IPPROTO_TCP, _tcp_header(6, b"\x02\x00\x05\xb4"))),
            "tcp_bad_option",
        ),
        (
            "tcp_option_length_1",
            _eth(ETH_P_IP, _v4(IPPROTO_TCP, _tcp_header(6, b"\x02\x01\x05\xb4"))),
            "tcp_bad_option",
        ),
        (
            "tcp_option_beyond_header",
            _eth(ETH_P_IP, _v4(IPPROTO_TCP, _tcp_header(6, b"\x02\x08\x05\xb4", flags=SYN) + b"payload!")),
            "tcp_bad_option",
        ),
        (
            "tcp_option_no_length_byte",
            _eth(ETH_P_IP, _v4(IPPROTO_TCP, _tcp_header(6, b"\x01\x01\x01\x08"))),
            "tcp_bad_option",
        ),
    ]
    good_udp = udp_datagram(client_addr(), VIP, 40000, DNS, b"query")
    cases += [(f"udp_{n}_bytes", _eth(ETH_P_IP, _v4(IPPROTO_UDP, good_udp[:n])), "udp_truncated") for n in (0, 4, 7)]
    cases += [
        (
            "udp_length_beyond",
            _eth(ETH_P_IP, _v4(IPPROTO_UDP, _with(good_udp, 4, struct.pack("!H", 14), checksum=False))),
            "udp_bad_length",
        ),
        (
            "udp_length_below_8",
            _eth(ETH_P_IP, _v4(IPPROTO_UDP, _with(good_udp, 4, struct.pack("!H", 7), checksum=False))),
            "udp_bad_length",
        ),
        (
            "udp6_length_beyond",
            _eth(
                ETH_P_IPV6,
                _v6(
                    IPPROTO_UDP,
                    _with(udp_datagram(client_addr(v6=True), VIP6, 1, DNS, b"q"), 4, b"\x01\x00", checksum=False),
                ),
            ),
            "udp_bad_length",
        ),
    ]
    cases += [
        (f"icmp_{n}_bytes", _eth(ETH_P_IP, _v4(IPPROTO_ICMP, icmp4(3, 1)[:n])), "icmp_truncated") for n in (0, 4, 7)
    ]
    cases += [
        ("icmpv6_truncated", _eth(ETH_P_IPV6, _v6(IPPROTO_ICMPV6, icmp6(1, 4)[:5])), "icmp_truncated"),
        ("icmp_echo_to_vip", _eth(ETH_P_IP, _v4(IPPROTO_ICMP, icmp4(8, 0, 0x10001, b"ping"))), "icmp_not_error"),
        ("icmpv6_echo_to_vip", _eth(ETH_P_IPV6, _v6(IPPROTO_ICMPV6, icmp6(128, 0, 1, b"ping"))), "icmp_not_error"),
        ("icmp_error_empty_quote", _eth(ETH_P_IP, _v4(IPPROTO_ICMP, icmp4(3, 3))), "icmp_quote_truncated"),
        (
            "icmp_error_quote_bad_version",
            _eth(ETH_P_IP, _v4(IPPROTO_ICMP, icmp4(3, 3, body=b"\x15" + bytes(27)))),
            "icmp_quote_truncated",
        ),
        (
            "icmp_error_quote_without_ports",
            _eth(ETH_P_IP, _v4(IPPROTO_ICMP, icmp4(3, 3, body=ipv4(VIP, client_addr(), IPPROTO_UDP, b"\x00\x35")))),
            "icmp_quote_truncated",
        ),
        ("icmp_error_quote_ip_cut", _eth(ETH_P_IP, _v4(IPPROTO_ICMP, icmp4(3, 3, body=syn4[:12]))), "ipv4_truncated"),
        ("gre", _eth(ETH_P_IP, _v4(IPPROTO_GRE, bytes(8))), "unsupported_protocol"),
        ("ipv6_no_next_header", _eth(ETH_P_IPV6, _v6(IPPROTO_NONE, b"")), "unsupported_protocol"),
        ("arp", _eth(ETH_P_ARP, bytes(28)), "unsupported_ethertype"),
        ("lldp", _eth(ETH_P_LLDP, bytes(32)), "unsupported_ethertype"),
        ("mpls_multicast", _eth(ETH_P_MPLS_MC, pack_entry(1001) + syn4), "unsupported_ethertype"),
        (
            "three_vlan_tags",
            _eth(0x88A8, struct.pack("!HHHHHH", 1, 0x8100, 2, 0x8100, 3, ETH_P_IP) + syn4),
            "unsupported_ethertype",
        ),
        ("ipv4_later_fragment", _eth(ETH_P_IP, _v4(IPPROTO_TCP, bytes(24), flags=0, frag_offset=185)), "ip_fragment"),
        (
            "ipv4_middle_fragment",
            _eth(ETH_P_IP, _v4(IPPROTO_UDP, bytes(24), flags=IP_MF, frag_offset=1)),
            "ip_fragment",
        ),
        (
            "ipv6_later_fragment",
            _eth(ETH_P_IPV6, _v6(IPPROTO_FRAGMENT, bytes(16), ext=struct.pack("!BxHI", IPPROTO_TCP, 185 << 3, 7))),
            "ip_fragment",
        ),
    ]
    return cases


CODEC_CASES = _codec_cases()


def test_codec_cases_are_distinct() -> None:
    names = [name for name, _, _ in CODEC_CASES]
    assert len(names) == len(set(names))
    assert len({frame for _, frame, _ in CODEC_CASES}) == len(CODEC_CASES)


@pytest.mark.parametrize("port", [CLIENT, SERVER], ids=["client_port", "server_port"])
@pytest.mark.parametrize(("name", "frame", "reason"), CODEC_CASES, ids=[c[0] for c in CODEC_CASES])
def test_garbage_is_dropped_under_its_reason(shared: Balancer, port: int, name: str, frame: bytes, reason: str) -> None:
    assert_dropped(shared, port, frame, reason)


# -- unwanted but well-formed frames ------------------------------------------------------------------------------
CLIENT_CASES: list[tuple[str, Callable[[], bytes], str]] = [
    ("tcp_to_non_vip", lambda: client_tcp(SYN, vip=OTHER4), "not_a_vip"),
    ("tcp6_to_non_vip", lambda: client_tcp(SYN, v6=True, vip=OTHER6), "not_a_vip"),
    (
        "udp_to_non_vip",
        lambda: ether(
            PORT_MAC[0],
            client_mac(0),
            ipv4(client_addr(), OTHER4, IPPROTO_UDP, udp_datagram(client_addr(), OTHER4, 1, DNS)),
        ),
        "not_a_vip",
    ),
    ("tcp_to_unserved_port", lambda: client_tcp(SYN, dport=443), "no_service"),
    ("tcp_to_udp_only_port", lambda: client_tcp(SYN, dport=DNS), "no_service"),
    ("udp_to_tcp_only_port", lambda: client_udp(dport=HTTP), "no_service"),
    ("udp6_to_unserved_port", lambda: client_udp(dport=54, v6=True), "no_service"),
    (
        "icmp_error_without_session",
        lambda: ether(
            PORT_MAC[0],
            client_mac(0),
            ipv4(client_addr(), VIP, IPPROTO_ICMP, icmp4(3, 3, body=reply_udp_packet(sport=1234))),
        ),
        "icmp_no_session",
    ),
    (
        "icmpv6_error_without_session",
        lambda: ether(
            PORT_MAC[0],
            client_mac(0),
            ipv6(client_addr(v6=True), VIP6, IPPROTO_ICMPV6, icmp6(1, 4, body=reply_udp_packet(v6=True, sport=1234))),
        ),
        "icmp_no_session",
    ),
]
CLIENT_CASES += [
    (f"tcp_{name}_without_session", lambda flags=flags: client_tcp(flags, sport=41000), "tcp_no_session")
    for name, flags in (
        ("ack", ACK),
        ("fin_ack", FIN | ACK),
        ("rst", RST),
        ("rst_ack", RST | ACK),
        ("syn_ack", SYN | ACK),
        ("syn_fin", SYN | FIN),
        ("syn_rst", SYN | RST),
        ("no_flags", 0),
        ("psh_ack_data", PSH | ACK),
    )
]
CLIENT_CASES.append(
    ("tcp6_ack_without_session", lambda: client_tcp(ACK, b"GET / HTTP/1.1\r\n", v6=True), "tcp_no_session")
)

SERVERS_MAC = mac(0x5E, 1)
SERVER_CASES: list[tuple[str, Callable[[], bytes], str]] = [
    (f"{name}_from_server_without_session", build, "unlabelled_from_server")
    for name, build in (
        ("tcp_reply", lambda: ether(PORT_MAC[SERVER], SERVERS_MAC, reply_tcp_packet(SYN | ACK))),
        ("tcp6_reply", lambda: ether(PORT_MAC[SERVER], SERVERS_MAC, reply_tcp_packet(ACK, b"x", v6=True))),
        ("udp_reply", lambda: ether(PORT_MAC[SERVER], SERVERS_MAC, reply_udp_packet())),
        ("syn_to_vip", lambda: client_tcp(SYN, port=SERVER, src_mac=SERVERS_MAC)),
        (
            "tcp_to_elsewhere",
            lambda: ether(PORT_MAC[SERVER], SERVERS_MAC, _v4(IPPROTO_TCP, tcp_segment(OTHER4, OTHER4, 1, 2, ACK))),
        ),
    )
]


@pytest.mark.parametrize(("name", "build", "reason"), CLIENT_CASES, ids=[c[0] for c in CLIENT_CASES])
def test_unwanted_client_frames(shared: Balancer, name: str, build: Callable[[], bytes], reason: str) -> None:
    assert_dropped(shared, CLIENT, build(), reason)


@pytest.mark.parametrize(("name", "build", "reason"), SERVER_CASES, ids=[c[0] for c in SERVER_CASES])
def test_unlabelled_server_frames_without_session(
    shared: Balancer, name: str, build: Callable[[], bytes], reason: str
) -> None:
    assert_dropped(shared, SERVER, build(), reason)


@pytest.mark.parametrize("port", [4, -1, 1000])
def test_unknown_port(shared: Balancer, port: int) -> None:
    assert_dropped(shared, port, client_tcp(SYN), "unknown_port")


# -- labels ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("port", [CLIENT, SERVER], ids=["client_port", "server_port"])
@pytest.mark.parametrize("label", range(16))
def test_reserved_labels_on_top(shared: Balancer, port: int, label: int) -> None:
    assert_dropped(shared, port, labelled(PORT_MAC[port], client_mac(0), label, _syn4()), "mpls_reserved_label")


@pytest.mark.parametrize("port", [CLIENT, SERVER], ids=["client_port", "server_port"])
@pytest.mark.parametrize("label", [16, 17, 18, 1001, 524288, (1 << 20) - 2, (1 << 20) - 1])
def test_labels_nobody_owns(shared: Balancer, port: int, label: int) -> None:
    # 17/18 are the first pair the balancer would hand out: nothing is installed in `shared`.
    assert shared.switching.entry(label) is None
    assert_dropped(shared, port, labelled(PORT_MAC[port], client_mac(0), label, _syn4()), "label_unknown")


def test_label_stack_without_bottom_unknown_label(shared: Balancer) -> None:
    frame = labelled(PORT_MAC[CLIENT], client_mac(0), 1001, b"", s=False, below=[pack_entry(1003, s=False)] * 3)
    assert_dropped(shared, CLIENT, frame, "label_unknown")


def test_vlan_tagged_reserved_label(shared: Balancer) -> None:
    frame = labelled(PORT_MAC[CLIENT], client_mac(0), 3, _syn4(), vlans=[7])
    assert_dropped(shared, CLIENT, frame, "mpls_reserved_label")


# -- a live session's labels, misused ----------------------------------------------------------------------------
def test_live_labels_are_forwarded_as_a_control(live: Live) -> None:
    out, moved = feed(live.b, CLIENT, live.c2s_frame(ttl=2))
    assert moved == {}
    assert [(p, top_label(f)) for p, f in out] == [(live.server_port, (live.c2s, 1, True))]
    out, moved = feed(live.b, live.server_port, live.s2c_frame())
    assert moved == {}
    assert [(p, top_label(f)[0]) for p, f in out] == [(CLIENT, live.s2c)]


@pytest.mark.parametrize("ttl", [0, 1])
def test_ttl_expired_on_installed_labels(live: Live, ttl: int) -> None:
    assert_dropped(live.b, CLIENT, live.c2s_frame(ttl=ttl), "mpls_ttl_expired")
    assert_dropped(live.b, live.server_port, live.s2c_frame(ttl=ttl), "mpls_ttl_expired")
    assert live.b.switching.packets[live.c2s] == 1  # the SYN only: expired frames are not counted as switched


def test_c2s_label_from_the_other_client_port(live: Live) -> None:
    assert_dropped(live.b, CLIENT_PORTS[1], live.c2s_frame(in_port=CLIENT_PORTS[1]), "label_wrong_ingress")


@pytest.mark.parametrize("port", SERVER_PORTS)
def test_c2s_label_from_a_server_port(live: Live, port: int) -> None:
    assert_dropped(live.b, port, live.c2s_frame(in_port=port, src_mac=live.server_mac), "label_wrong_ingress")


def test_c2s_label_from_the_wrong_source_mac(live: Live) -> None:
    assert_dropped(live.b, CLIENT, live.c2s_frame(src_mac=client_mac(9)), "label_wrong_ingress")


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_c2s_label_forged_into_another_clients_session(v6: bool) -> None:
    """Client 1 behind the same router (same port, same source MAC) puts client 0's label on its own packet."""
    live = open_session(standard_balancer(), v6=v6)
    assert_dropped(live.b, CLIENT, live.c2s_frame(client=1), "label_wrong_ingress")


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_c2s_label_forged_with_bottom_bit_clear(v6: bool) -> None:
    live = open_session(standard_balancer(), v6=v6)
    frame = live.c2s_frame(client=1, s=False, below=[pack_entry(live.c2s, 0, True, 64)])
    out, moved = feed(live.b, CLIENT, frame)
    assert out == []
    assert sum(moved.values()) == 1


def test_s2c_label_from_a_client_port(live: Live) -> None:
    assert_dropped(live.b, CLIENT, live.s2c_frame(port=CLIENT, src_mac=client_mac(0)), "label_wrong_ingress")


def test_s2c_label_from_the_other_server_port(live: Live) -> None:
    port = other_server_port(live.server_port)
    assert_dropped(live.b, port, live.s2c_frame(port=port), "label_wrong_ingress")


def test_s2c_label_from_another_servers_mac(live: Live) -> None:
    other = next(m for m in SERVER_BY_MAC if m != live.server_mac)
    assert_dropped(live.b, live.server_port, live.s2c_frame(src_mac=other), "label_wrong_ingress")


def test_s2c_label_not_from_the_vip(live: Live) -> None:
    packet = ip_packet(OTHER4, client_addr(), IPPROTO_TCP, tcp_segment(OTHER4, client_addr(), HTTP, 40000, ACK, b"x"))
    assert_dropped(live.b, live.server_port, live.s2c_frame(packet=packet), "label_wrong_ingress")


def test_labels_of_an_ended_session_are_unknown(live: Live) -> None:
    b = live.b
    assert b.receive(CLIENT, live.c2s_frame(RST | ACK, b""), 1.0)  # forwarded; the session is half-open (no
    b.on_timer(1.0 + b.config.timeouts.tcp_start)  # SYN-ACK yet): the RST changes nothing, its SYN's time runs out
    assert b.stats().sessions_active == 0
    assert b.switching.entry(live.c2s) is None and b.switching.entry(live.s2c) is None
    assert_dropped(b, CLIENT, live.c2s_frame(), "label_unknown")
    assert_dropped(b, live.server_port, live.s2c_frame(), "label_unknown")


def test_server_reply_from_the_wrong_server(live: Live) -> None:
    other = next(m for m in SERVER_BY_MAC if m != live.server_mac)
    frame = ether(PORT_MAC[live.server_port], other, reply_tcp_packet(SYN | ACK))
    assert_dropped(live.b, live.server_port, frame, "server_wrong_source")
    port = other_server_port(live.server_port)
    frame = ether(PORT_MAC[port], live.server_mac, reply_tcp_packet(SYN | ACK))
    assert_dropped(live.b, port, frame, "server_wrong_source")


def test_unlabelled_server_reply_of_a_live_session_is_labelled_as_a_control(live: Live) -> None:
    out, moved = feed(
        live.b, live.server_port, ether(PORT_MAC[live.server_port], live.server_mac, reply_tcp_packet(ACK))
    )
    assert moved == {}
    assert [(p, top_label(f)[0]) for p, f in out] == [(CLIENT, live.s2c)]


def test_later_fragment_of_a_live_session(live: Live) -> None:
    frame = ether(PORT_MAC[CLIENT], client_mac(0), _v4(IPPROTO_TCP, b"more data", flags=0, frag_offset=3))
    assert_dropped(live.b, CLIENT, frame, "ip_fragment")


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_icmp_error_about_a_session_goes_to_its_server(v6: bool) -> None:
    """The spec's exception: an ICMP error from the client about the VIP's datagram reaches the session's server."""
    live = open_session(standard_balancer(), v6=v6, proto=IPPROTO_UDP)
    quoted = reply_udp_packet(b"answer", v6=v6)
    if v6:
        packet = ipv6(client_addr(v6=True), VIP6, IPPROTO_ICMPV6, icmp6(1, 4, body=quoted))
    else:
        packet = ipv4(client_addr(), VIP, IPPROTO_ICMP, icmp4(3, 3, body=quoted))
    out, moved = feed(live.b, CLIENT, ether(PORT_MAC[CLIENT], client_mac(0), packet))
    assert moved == {}
    assert [(p, top_label(f)[0]) for p, f in out] == [(live.server_port, live.c2s)]
    assert out[0][1][18:] == packet


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4_frag_needed", "ipv6_packet_too_big"])
def test_icmp_error_quoting_part_of_a_large_datagram_goes_to_its_server(v6: bool) -> None:
    live = open_session(standard_balancer(), v6=v6, proto=IPPROTO_UDP)
    big = reply_udp_packet(b"x" * 1400, v6=v6)
    if v6:
        packet = ipv6(client_addr(v6=True), VIP6, IPPROTO_ICMPV6, icmp6(2, 0, 1280, body=big[:1232]))
    else:
        packet = ipv4(client_addr(), VIP, IPPROTO_ICMP, icmp4(3, 4, 1300, body=big[:28]))
    out, moved = feed(live.b, CLIENT, ether(PORT_MAC[CLIENT], client_mac(0), packet))
    assert moved == {}
    assert [(p, top_label(f)[0]) for p, f in out] == [(live.server_port, live.c2s)]


def test_refusal_answers_the_client_not_a_server() -> None:
    """Another exception: a refused SYN gets a RST from the VIP on the client's port, nothing goes to a server."""
    b = standard_balancer(max_sessions=1)
    open_session(b)
    out, moved = feed(b, CLIENT, client_tcp(SYN, sport=41000))
    assert moved == {}
    assert [p for p, _ in out] == [CLIENT]
    assert out[0][1][:12] == client_mac(0) + PORT_MAC[CLIENT]
    assert b.stats().refused == {"global_session_limit": 1}


# -- properties -------------------------------------------------------------------------------------------------
ALL_PORTS = (*CLIENT_PORTS, *SERVER_PORTS, 9)


def check_frame(b: Balancer, port: int, frame: bytes, now: float, refuse_with: RefuseWith) -> None:
    """Feed one frame and check the invariant: exactly one output frame, or exactly one drop counted, or (when
    refusals are silent) exactly one refusal counted; what goes toward a server carries its installed C2S label."""
    drops_before, refused_before = _tally(b)
    out_before = b.frames_out
    out = b.receive(port, frame, now)
    drops_after, refused_after = _tally(b)
    dropped, refused = drops_after - drops_before, refused_after - refused_before
    silent = refused if refuse_with is RefuseWith.DROP else 0
    assert len(out) + dropped + silent == 1, (out, dropped, refused)
    assert b.frames_out - out_before == len(out)
    # Every frame took one way: unknown port, dropped by the switching table, fast path or slow path.
    unrouted = b.drops.get("unknown_port", 0) + sum(b.switching.drops.values())
    assert b.frames_in == b.fast_path + b.slow_path + unrouted
    for out_port, data in out:
        if out_port in SERVER_PORTS:
            label, _ttl, _ = top_label(data)
            assert label % 2 == 1
            entry = b.switching.entry(label)
            assert entry is not None and entry.port_id == out_port
            assert data[:6] == entry.next_hop and data[6:12] == PORT_MAC[out_port]
        else:
            assert out_port in CLIENT_PORTS


def _base_frames(b: Balancer) -> list[tuple[int, bytes]]:
    """Valid frames of every kind, with live labels from sessions opened on ``b``."""
    tcp4 = open_session(b)
    tcp6 = open_session(b, v6=True)
    udp4 = open_session(b, proto=IPPROTO_UDP)
    frames: list[tuple[int, bytes]] = []
    for s in (tcp4, tcp6, udp4):
        frames.append((CLIENT, s.c2s_frame()))
        frames.append((s.server_port, s.s2c_frame()))
        frames.append((CLIENT, s.c2s_frame(vlans=[5])))
    frames += [
        (CLIENT, client_tcp(SYN, sport=42000)),
        (CLIENT, client_tcp(ACK, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")),
        (CLIENT, client_tcp(FIN | ACK, v6=True)),
        (CLIENT, client_udp(b"q", sport=42001, v6=True)),
        (CLIENT, client_tcp(SYN, sport=42002, v6=True)),
        (tcp4.server_port, ether(PORT_MAC[tcp4.server_port], tcp4.server_mac, reply_tcp_packet(SYN | ACK))),
        (
            CLIENT,
            ether(
                PORT_MAC[CLIENT],
                client_mac(0),
                ipv4(client_addr(), VIP, IPPROTO_ICMP, icmp4(3, 3, body=reply_udp_packet())),
            ),
        ),
    ]
    return frames


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2000), st.integers(0, 7)),
    st.tuples(st.just("cut"), st.integers(0, 2000), st.just(0)),
    st.tuples(st.just("set"), st.integers(0, 2000), st.integers(0, 255)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(st.tuples(st.sampled_from(ALL_PORTS), st.binary(max_size=120)), min_size=1, max_size=30),
    refuse_with=st.sampled_from(list(RefuseWith)),
)
def test_arbitrary_bytes_never_raise(frames: list[tuple[int, bytes]], refuse_with: RefuseWith) -> None:
    b = standard_balancer(refuse_with=refuse_with)
    for i, (port, data) in enumerate(frames):
        check_frame(b, port, data, NOW + i, refuse_with)
    assert b.stats().frames_in == len(frames)
    b.on_timer(NOW + 1000.0)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    picks=st.lists(
        st.tuples(st.integers(0, 100), st.lists(mutation, max_size=4), st.sampled_from((None, *ALL_PORTS))),
        min_size=1,
        max_size=25,
    ),
    refuse_with=st.sampled_from(list(RefuseWith)),
    max_sessions=st.sampled_from([0, 3]),
)
def test_mutated_valid_frames_never_raise(
    picks: list[tuple[int, list[tuple[str, int, int]], int | None]], refuse_with: RefuseWith, max_sessions: int
) -> None:
    b = standard_balancer(refuse_with=refuse_with, max_sessions=max_sessions)
    base = _base_frames(b)
    for i, (index, mutations, port) in enumerate(picks):
        home, frame = base[index % len(base)]
        check_frame(b, home if port is None else port, mutate(frame, mutations), NOW + 0.01 * i, refuse_with)
        if i % 7 == 6:
            assert b.on_timer(NOW + 0.01 * i + 20.0) == []
    assert b.stats().frames_in == len(picks) + 3  # and the three session-opening frames


# -- the analyzer's plain-IPv4 reading -----------------------------------------------------------------------
def _analysis_or_reason(read: Callable[[], object]) -> object:
    try:
        return read()
    except WireError as exc:
        return exc.reason


def _ipv4_frames() -> list[bytes]:
    """Untagged IPv4 frames of every shape the plain reading takes or leaves: TCP with and without payload and
    options, UDP, IP options, a first and a later fragment, ICMP, another protocol."""
    src = client_addr(0, False)
    segment = tcp_segment(src, VIP, 40000, HTTP, PSH | ACK, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    with_mss = tcp_segment(src, VIP, 40000, HTTP, SYN, options=b"\x02\x04\x05\xb4")
    frames = [
        client_tcp(SYN),
        client_tcp(ACK, b"GET /x HTTP/1.1\r\nHost: example\r\n\r\n"),
        client_tcp(FIN | ACK, b"data"),
        ether(PORT_MAC[0], client_mac(0), ipv4(src, VIP, IPPROTO_TCP, with_mss)),
        client_udp(),
        client_udp(b""),
        client_udp(b"GET / HTTP/1.1\r\n\r\n"),
        ether(PORT_MAC[0], client_mac(0), ipv4(src, VIP, IPPROTO_TCP, segment, options=b"\x01\x01\x01\x00")),
        ether(PORT_MAC[0], client_mac(0), ipv4(src, VIP, IPPROTO_TCP, segment, flags=IP_MF, ttl=3, tos=0xB8)),
        ether(PORT_MAC[0], client_mac(0), ipv4(src, VIP, IPPROTO_TCP, segment, frag_offset=3)),
        ether(PORT_MAC[0], client_mac(0), ipv4(src, VIP, IPPROTO_ICMP, icmp4(3, 3, 0, b"x" * 28))),
        ether(PORT_MAC[0], client_mac(0), ipv4(src, VIP, IPPROTO_GRE, b"\x00" * 24)),
    ]
    syn, query = client_tcp(SYN), client_udp()
    frames += (
        [  # lengths that cut the TCP or UDP header short, or overrun the IP packet, the checksum right
            fix_ipv4_checksum(syn[:16] + struct.pack("!H", length) + syn[18:], 14) for length in (19, 20, 32, 39)
        ]
        + [query[:38] + struct.pack("!H", length) + query[40:] for length in (0, 7, 8, len(query) - 34 + 1)]
    )
    return [f + pad for f in frames for pad in (b"", b"\x00" * 6)]


@settings(max_examples=300, deadline=None)
@given(
    index=st.integers(0, 100),
    mutations=st.lists(st.tuples(st.sampled_from(["flip", "cut", "set"]), st.integers(14, 80), st.integers(0, 255)),
                       max_size=3),
    checksum=st.booleans(),
    l7=st.booleans(),
)  # fmt: skip
def test_plain_ipv4_reading_agrees_with_the_general_one(
    index: int, mutations: list[tuple[str, int, int]], checksum: bool, l7: bool
) -> None:
    """Every untagged IPv4 frame (and its IP packet given to ``analyze_ip``) analyses as the general path reads the
    same frame with a VLAN tag: the same :class:`Analysis` but for the offsets, or the same drop reason; with the
    header checksum fixed after the mutations, the plain reading's own checks are the ones met."""
    frames = _ipv4_frames()
    frame = mutate(frames[index % len(frames)], mutations)
    if checksum and len(frame) >= 34 and frame[14] >> 4 == 4:
        frame = fix_ipv4_checksum(frame, 14)
    analyzer = PacketAnalyzer(l7=l7)
    if len(frame) <= 14 or frame[12:14] != struct.pack("!H", ETH_P_IP) or frame[14] >> 4 != 4:
        return  # not read as IPv4 by either (a mutation that wraps past the end may land on the ethertype)
    # A VLAN tag before the ethertype sends the same packet down the general path, 4 bytes further on.
    general = _analysis_or_reason(lambda: analyzer.analyze(frame[:12] + b"\x81\x00\x00\x05" + frame[12:]))
    if isinstance(general, Analysis):
        general = general._replace(ip_offset=14, ip_end=general.ip_end - 4, l4_offset=general.l4_offset - 4)
    for read in (analyzer.analyze, lambda f: analyzer.analyze_ip(f, 14)):
        assert _analysis_or_reason(lambda read=read: read(frame)) == general
        assert _analysis_or_reason(lambda read=read: read(memoryview(frame))) == general
    without_l7 = general._replace(http=None) if isinstance(general, Analysis) else general
    assert _analysis_or_reason(lambda: analyzer.analyze_ip(frame, 14, l7=False)) == without_l7


# -- real captures ---------------------------------------------------------------------------------------------
def _capture_files(shared_data: Path) -> list[Path]:
    pcaps = shared_data / "pcap"
    if not pcaps.is_dir():
        pytest.skip(f"no captures at {pcaps}")
    files = sorted(p for p in pcaps.rglob("*") if p.is_file() and ".pcap" in p.name)
    if not files:
        pytest.skip(f"no capture files under {pcaps}")
    return files


@pytest.mark.parametrize("port", [CLIENT, SERVER], ids=["client_port", "server_port"])
def test_real_captures_never_raise(shared_data: Path, port: int) -> None:
    fed = 0
    for path in _capture_files(shared_data):
        b = standard_balancer()
        for i, record in enumerate(read_pcap(path)):
            if record.linktype != LINKTYPE_ETHERNET:
                continue
            check_frame(b, port, record.data, NOW + 0.001 * i, RefuseWith.RST)
            fed += 1
        assert b.stats().frames_in == b.frames_in
        b.on_timer(NOW + 3600.0)
    assert fed > 10_000  # the gzip'd libtrace capture alone holds 10,507 Ethernet frames
