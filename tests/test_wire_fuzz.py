"""The one invariant of every decoder: any input decodes or raises the codec's WireError, nothing else.

Inputs are arbitrary bytes, and valid frames of every kind truncated, bit-flipped, overwritten and extended.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.contrib.mpls import MPLS
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import Dot1Q
from scapy.layers.l2 import Ether as ScapyEther
from scapy.layers.ppp import HDLC, PPP

from mplslb.wire.errors import WireError
from mplslb.wire.ethernet import EthernetError, parse_ethernet
from mplslb.wire.frame import dissect
from mplslb.wire.http import HTTPError, peek_request
from mplslb.wire.icmp import ICMPError, build_icmp_unreachable, parse_icmp
from mplslb.wire.ipv4 import IPv4Error, parse_ipv4
from mplslb.wire.ipv6 import IPv6Error, parse_ipv6
from mplslb.wire.mpls import MplsError, parse_entry, parse_stack, payload_version
from mplslb.wire.pcap import (
    LINKTYPE_C_HDLC,
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_PPP,
    LINKTYPE_RAW,
    PcapError,
    PcapWriter,
    read_pcap,
)
from mplslb.wire.tcp import TCPError, parse_tcp
from mplslb.wire.udp import UDPError, parse_udp

LINKTYPES = (LINKTYPE_ETHERNET, LINKTYPE_PPP, LINKTYPE_C_HDLC, LINKTYPE_LINUX_SLL, LINKTYPE_RAW)

Decoder = Callable[[bytes | memoryview, int], object]
# (decoder taking (buffer, offset), the error class it may raise)
DECODERS: dict[str, tuple[Decoder, type[WireError]]] = {
    "ethernet": (parse_ethernet, EthernetError),
    "mpls_entry": (parse_entry, MplsError),
    "mpls_stack": (parse_stack, MplsError),
    "mpls_payload_version": (payload_version, MplsError),
    "ipv4": (parse_ipv4, IPv4Error),
    "ipv4_truncated_ok": (lambda b, o: parse_ipv4(b, o, False, allow_truncated=True), IPv4Error),
    "ipv6": (parse_ipv6, IPv6Error),
    "tcp": (parse_tcp, TCPError),
    "udp": (parse_udp, UDPError),
    "udp_partial": (lambda b, o: parse_udp(b, o, partial=True), UDPError),
    "icmp": (parse_icmp, ICMPError),
    "icmp6": (lambda b, o: parse_icmp(b, o, v6=True), ICMPError),
    "http": (lambda b, o: peek_request(b[o:] if o >= 0 else b), HTTPError),
}

_INNER = (
    IP(src="10.0.0.1", dst="10.0.0.2")
    / TCP(sport=1, dport=80, options=[("MSS", 1460), ("SAckOK", b"")])
    / b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
)


def Ether() -> ScapyEther:  # addresses given, so scapy does not look up a route
    return ScapyEther(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


VALID_FRAMES: list[tuple[int, bytes]] = [
    (LINKTYPE_ETHERNET, bytes(Ether() / Dot1Q(vlan=3) / MPLS(label=18, s=0) / MPLS(label=16) / _INNER)),
    (
        LINKTYPE_ETHERNET,
        bytes(Ether() / IP(options=[IPOption_Router_Alert()]) / UDP(dport=6635) / MPLS(label=21) / _INNER),
    ),
    (
        LINKTYPE_ETHERNET,
        bytes(
            Ether()
            / IPv6()
            / IPv6ExtHdrHopByHop()
            / IPv6ExtHdrRouting(addresses=["::1"])
            / IPv6ExtHdrDestOpt()
            / IPv6ExtHdrFragment()
            / UDP()
            / b"x"
        ),
    ),
    (LINKTYPE_ETHERNET, bytes(Ether() / IP() / ICMP(type=3) / IP() / UDP())),
    (LINKTYPE_ETHERNET, bytes(Ether() / MPLS(label=19, s=1) / b"\x00\x00\x00\x00" / Ether() / IP() / ICMP())),
    (LINKTYPE_PPP, bytes(HDLC() / PPP(proto=0x0281) / MPLS(label=100704) / IP() / UDP(dport=3503))),
    (LINKTYPE_C_HDLC, b"\x0f\x00\x88\x47" + bytes(MPLS(label=18) / _INNER)),
    (LINKTYPE_RAW, build_icmp_unreachable(bytes(16), bytes(15) + b"\x01", bytes(_INNER))),
    (LINKTYPE_LINUX_SLL, bytes(16)[:14] + b"\x08\x00" + bytes(_INNER)),
]


def _check(decoder: Decoder, error: type[WireError], data: bytes | memoryview, offset: int) -> None:
    with contextlib.suppress(error):
        decoder(data, offset)


def _check_dissect(data: bytes, linktype: int) -> None:
    for kwargs in ({}, {"verify_checksum": False, "orig_len": len(data) + 1000}):
        with contextlib.suppress(WireError):
            dissect(data, linktype, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(DECODERS))
@given(data=st.binary(max_size=200), offset=st.integers(-4, 210))
def test_arbitrary_bytes(name: str, data: bytes, offset: int) -> None:
    decoder, error = DECODERS[name]
    _check(decoder, error, data, offset)
    _check(decoder, error, memoryview(data), offset)


@given(data=st.binary(max_size=300), linktype=st.sampled_from((*LINKTYPES, 0, 65535)))
def test_dissect_arbitrary_bytes(data: bytes, linktype: int) -> None:
    _check_dissect(data, linktype)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[int, bytes]:
    linktype, frame = draw(st.sampled_from(VALID_FRAMES))
    buf = bytearray(frame)
    for _ in range(draw(st.integers(0, 4))):
        if not buf:
            break
        at = draw(st.integers(0, len(buf) - 1))
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        if kind == "flip":
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            buf[at] = draw(st.sampled_from([0x00, 0xFF, 0x01, 0x45, 0x60, 0x81, 0x88, 0x47, 0x19, 0xEB]))
        elif kind == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del buf[at : at + draw(st.integers(1, 8))]
    return linktype, bytes(buf[: draw(st.integers(0, len(buf)))])


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), st.integers(0, 80))
def test_mutated_frames(sample: tuple[int, bytes], offset: int) -> None:
    linktype, frame = sample
    _check_dissect(frame, linktype)
    for decoder, error in DECODERS.values():
        _check(decoder, error, frame, offset)


def _pcap_of(frames: list[bytes]) -> bytes:
    out = io.BytesIO()
    with PcapWriter(out) as writer:
        for i, frame in enumerate(frames):
            writer.write(frame, i)
    return out.getvalue()


@given(st.binary(max_size=300))
def test_read_pcap_arbitrary_bytes(data: bytes) -> None:
    """Any input reads as records or raises PcapError, nothing else."""
    for prefix in (b"", b"\xd4\xc3\xb2\xa1", b"\x0a\x0d\x0d\x0a", b"\x1f\x8b"):
        with contextlib.suppress(PcapError):
            records = list(read_pcap(io.BytesIO(prefix + data)))
            assert all(isinstance(r.data, bytes) and r.orig_len >= 0 for r in records)


@given(st.data())
def test_read_pcap_mutated(data: st.DataObject) -> None:
    buf = bytearray(_pcap_of([f for _, f in VALID_FRAMES[:3]]))
    for _ in range(data.draw(st.integers(1, 4))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    with contextlib.suppress(PcapError):
        records = list(read_pcap(io.BytesIO(bytes(buf[:cut]))))
        assert all(isinstance(r.data, bytes) for r in records)


def test_valid_frames_dissect() -> None:
    for linktype, frame in VALID_FRAMES:
        dissect(frame, linktype, verify_checksum=True)
