"""The packet analyzing unit (claims 1, 2, 10, 15): label inspection, L3-L7 analysis, label attachment.

Theory of operation
-------------------
Claim 2 splits the unit in three:

* the **session label inspecting unit** is the first test of the one-frame fast path
  (:func:`mplslb.switching.scalar.switch_frame`): a frame whose Ethernet type (one 802.1Q tag tolerated) says
  MPLS goes to the switching unit untouched, anything else comes here. Only unlabelled frames are analysed
  (claim 10).
* the **packet contents analyzing unit** (:meth:`PacketAnalyzer.analyze`, this module) reads layers 3 to 7: the IP
  header (IPv4 with options and fragments recognised, IPv6 with its extension headers walked), TCP or UDP ports and
  TCP flags, and, when the packet carries payload, an HTTP/1.x request line and Host header. ICMP and ICMPv6
  errors are read through to the datagram they quote, so an error about a session reaches that session's server.
  The result is the session information (:class:`Analysis`), whose flow key the session table answers "new or
  existing" with.
* the **session label attaching unit** is :meth:`mplslb.switching.table.LabelSwitchingTable.send`: the table that
  knows a label's next hop puts a real MPLS label stack entry (RFC 3032, claim 15) between the Ethernet header and
  the IP packet, trimming any Ethernet padding, and counts the frame for the label.

The commonest packet, IPv4 without options carrying TCP without options or UDP (in an untagged frame, or at a
given offset for :meth:`PacketAnalyzer.analyze_ip`), is read at once (:func:`plain_ipv4_py`, in C where
the switching unit's native build is in use); any packet that is not exactly that, or that fails one of its checks,
takes the general path, which gives the reason it is dropped. Both give the same :class:`Analysis`.

Non-first IP fragments carry no ports; they are dropped as ``ip_fragment`` (the session's first fragment would have
to be reassembled to know it, which a label switch does not do).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple

import numpy as np

from mplslb.flow import FlowKey
from mplslb.switching import scalar
from mplslb.wire.errors import WireError
from mplslb.wire.ethernet import ETH_HLEN, ETH_P_IP, ETH_P_IPV6, parse_ethernet
from mplslb.wire.http import HTTPError, HttpRequest, peek_request
from mplslb.wire.icmp import parse_icmp
from mplslb.wire.ip import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP
from mplslb.wire.ipv4 import FRAG_OFFSET_MASK, IPV4_HLEN, IPv4, ipv4_is_fragment, parse_ipv4
from mplslb.wire.ipv6 import IPv6, parse_ipv6
from mplslb.wire.tcp import TCP_HLEN, TCPFlag, parse_tcp
from mplslb.wire.udp import UDP_HLEN, parse_udp


class AnalysisError(WireError):
    """A frame that decodes but cannot belong to a session (no ports, unsupported protocol...)."""


class Analysis(NamedTuple):
    """Session information learned from an unlabelled frame's layers 3 to 7."""

    key: FlowKey  # as sent: src is the sender
    ip_version: int
    ip_offset: int  # in the frame
    ip_end: int
    l4_offset: int  # in the frame
    tcp_flags: int  # -1 when not TCP
    tcp_seq: int
    payload_len: int
    ttl: int
    tos: int
    http: HttpRequest | None
    icmp_error: bool  # True: ``key`` is the quoted datagram's, as its sender sent it


#: The Host a request is counted under when it is read from a truncated copy of its first octets (the kernel
#: offload's, :meth:`PacketAnalyzer.read_copy`) that ends before its request line does, or before any Host header
#: among its complete lines: the whole request may have had one.
TRUNCATED_HOST = "(truncated)"


class PacketAnalyzer:
    """The packet contents analyzing unit: layers 3 to 7 of an unlabelled frame."""

    def __init__(self, *, l7: bool = True) -> None:
        self.l7 = l7

    def analyze(self, frame: bytes | memoryview) -> Analysis:
        """Analyse an unlabelled Ethernet frame. Raises a :class:`WireError` naming why it cannot be used."""
        if len(frame) >= _PLAIN_MIN and frame[_ETH_TYPE_AT] == _IPV4_HI and frame[_ETH_TYPE_AT + 1] == _IPV4_LO:
            plain = _read_plain(frame, ETH_HLEN, self.l7)
            if plain is not None:
                return plain
        eth = parse_ethernet(frame)
        if eth.ethertype == ETH_P_IP:
            return self._ip(frame, eth.payload_offset, 4, l7=self.l7)
        if eth.ethertype == ETH_P_IPV6:
            return self._ip(frame, eth.payload_offset, 6, l7=self.l7)
        raise AnalysisError("unsupported_ethertype", f"ethertype {eth.ethertype:#06x}")

    def plain_syns(
        self, buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray, frames: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Of ``frames`` (indices of frames lying in ``buf`` as :meth:`~mplslb.balancer.Balancer.receive_block`
        takes them), the ones :meth:`analyze` reads on its plain path (an untagged IPv4 packet without options,
        whole, whose header checks, not a later fragment, carrying TCP without options) as a segment whose flags
        are SYN without ACK, RST or FIN, with no payload: their indices and their first :data:`SYN_HEAD` octets
        (a row each), checked all at once."""
        frames = frames[lengths[frames] >= SYN_HEAD]
        head = buf[starts[frames, None] + np.arange(SYN_HEAD)]
        total = head[:, ETH_HLEN + 2].astype(np.int64) << 8 | head[:, ETH_HLEN + 3]
        words = head[:, ETH_HLEN : ETH_HLEN + IPV4_HLEN].astype(np.int64).reshape(-1, IPV4_HLEN // 2, 2)
        ok = (
            (head[:, _ETH_TYPE_AT] == _IPV4_HI)
            & (head[:, _ETH_TYPE_AT + 1] == _IPV4_LO)
            & (head[:, ETH_HLEN] == _PLAIN_VIHL)
            # a TCP header without options and no payload, so the packet is whole (the frame holds SYN_HEAD)
            & (total == IPV4_HLEN + TCP_HLEN)
            & ((head[:, ETH_HLEN + 6].astype(np.int64) << 8 | head[:, ETH_HLEN + 7]) & FRAG_OFFSET_MASK == 0)
            & (head[:, ETH_HLEN + 9] == IPPROTO_TCP)
            & ((words[:, :, 0] << 8 | words[:, :, 1]).sum(axis=1) % _ONES == 0)  # see _ONES
            & (head[:, _TCP_AT + 12] >> 4 == _TCP_PLAIN_DOFF)
            & (head[:, _TCP_AT + 13] & _SYN_MASK == TCPFlag.SYN)
        )
        return frames[ok], head[ok]

    def read_copy(self, copy: bytes, length: int) -> HttpRequest | None:
        """The HTTP request read from ``copy``, the first octets of a request's payload of ``length`` octets, as
        from the request's frame when its request line and Host fit in the copy. When the copy is truncated and
        ends before the request line does, or holds no Host header among its complete lines, the request is
        counted under :data:`TRUNCATED_HOST` instead (the request line: as read, or empty when it did not fit); a
        truncated copy of a request whose headers ended without a Host is counted there too."""
        if not self.l7:
            return None
        truncated = len(copy) < length
        try:
            http = peek_request(copy)
        except HTTPError as exc:
            return HttpRequest("", "", "", TRUNCATED_HOST) if truncated and exc.reason == "http_incomplete" else None
        return http._replace(host=TRUNCATED_HOST) if truncated and http.host is None else http

    def analyze_ip(self, packet: bytes | memoryview, offset: int = 0, *, l7: bool = True) -> Analysis:
        """Analyse an IP packet that starts at ``offset`` (the version nibble decides v4 or v6); ``l7`` False
        leaves the payload unread (``http`` None) whatever the analyzer's setting."""
        if len(packet) <= offset:
            raise AnalysisError("ip_truncated", "no IP header")
        if offset >= 0 and packet[offset] == _PLAIN_VIHL and len(packet) - offset >= _PLAIN_MIN - ETH_HLEN:
            plain = _read_plain(packet, offset, l7 and self.l7)
            if plain is not None:
                return plain
        version = packet[offset] >> 4
        if version not in (4, 6):
            raise AnalysisError("ip_bad_version", f"version {version}")
        return self._ip(packet, offset, version, l7=l7 and self.l7)

    def _ip(
        self, frame: bytes | memoryview, offset: int, version: int, quoted: bool = False, *, l7: bool = False
    ) -> Analysis:
        """The general path; ``l7``: read an HTTP request in the payload."""
        ip: IPv4 | IPv6
        if version == 4:
            ip = parse_ipv4(frame, offset, verify_checksum=not quoted, allow_truncated=quoted)
            if ipv4_is_fragment(ip) and ip.frag_offset:
                raise AnalysisError("ip_fragment", "non-first fragment carries no ports")
            ttl, tos, proto = ip.ttl, ip.tos, ip.proto
        else:
            ip = parse_ipv6(frame, offset, allow_truncated=quoted)
            if ip.fragment is not None and ip.fragment[0]:
                raise AnalysisError("ip_fragment", "non-first fragment carries no ports")
            ttl, tos, proto = ip.hop_limit, ip.traffic_class, ip.proto
        start, end = ip.payload_offset, min(ip.end, len(frame))
        if proto == IPPROTO_TCP:
            tcp = parse_tcp(frame, start, end) if not quoted else None
            if tcp is None:  # a quoted datagram may hold only the first 8 bytes of TCP: ports and seq
                sport, dport, seq = _quoted_ports(frame, start, end)
                return Analysis(
                    FlowKey(proto, ip.src, sport, ip.dst, dport), version, offset, end, start, -1, seq, 0,
                    ttl, tos, None, True,
                )  # fmt: skip
            payload = end - tcp.payload_offset
            http = _http(frame, tcp.payload_offset, end) if payload > 0 and l7 else None
            key = FlowKey(proto, ip.src, tcp.sport, ip.dst, tcp.dport)
            return Analysis(key, version, offset, end, start, tcp.flags, tcp.seq, payload, ttl, tos, http, False)
        if proto == IPPROTO_UDP:
            if quoted:
                sport, dport, _ = _quoted_ports(frame, start, end)
                key = FlowKey(proto, ip.src, sport, ip.dst, dport)
                return Analysis(key, version, offset, end, start, -1, 0, 0, ttl, tos, None, True)
            udp = parse_udp(frame, start, end)
            payload = udp.end - udp.payload_offset
            http = _http(frame, udp.payload_offset, udp.end) if payload > 0 and l7 else None
            key = FlowKey(proto, ip.src, udp.sport, ip.dst, udp.dport)
            return Analysis(key, version, offset, end, start, -1, 0, payload, ttl, tos, http, False)
        if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6) and not quoted:
            icmp = parse_icmp(frame, start, end, v6=proto == IPPROTO_ICMPV6)
            if not icmp.is_error:
                raise AnalysisError("icmp_not_error", f"ICMP type {icmp.type} to a virtual IP")
            inner = self.analyze_quoted(frame, icmp.payload_offset, end)
            # Keep the outer packet's bounds: the whole error is forwarded, not just the quote.
            return inner._replace(ip_offset=offset, ip_end=end, ttl=ttl, tos=tos)
        raise AnalysisError("unsupported_protocol", f"IP protocol {proto}")

    def analyze_quoted(self, frame: bytes | memoryview, offset: int, end: int) -> Analysis:
        if end - offset < 1:
            raise AnalysisError("icmp_quote_truncated", "empty quote")
        version = frame[offset] >> 4
        if version not in (4, 6):
            raise AnalysisError("icmp_quote_truncated", f"quoted version {version}")
        return self._ip(memoryview(frame)[:end], offset, version, quoted=True)


_ETH_TYPE_AT = 12
_IPV4_HI, _IPV4_LO = ETH_P_IP.to_bytes(2, "big")
_PLAIN_VIHL = 0x45  # version 4, a header of 5 words: no options
_PLAIN_MIN = ETH_HLEN + IPV4_HLEN + UDP_HLEN  # the shortest frame the plain reading takes
_TCP_PLAIN_DOFF = TCP_HLEN // 4
#: An IPv4 header's sum of 16-bit words is its value as a big-endian integer modulo 0xFFFF (mplslb.wire.checksum):
#: 0 when the header checks (an all-zero header, whose sum is 0 too, is not version 4).
_ONES = 0xFFFF
#: version and IHL, TOS, total length, flags and fragment offset, TTL, protocol, source, destination.
_PLAIN_IPV4 = struct.Struct("!BBH2xHBB2x4s4s")
_PLAIN_TCP = struct.Struct("!HHI4xBB")  # ports, sequence number, data offset, flags
_PLAIN_UDP = struct.Struct("!HHH")
_new = tuple.__new__
#: The octets a SYN of a new session is read from: Ethernet, IPv4 without options, TCP without options.
SYN_HEAD = ETH_HLEN + IPV4_HLEN + TCP_HLEN
_TCP_AT = ETH_HLEN + IPV4_HLEN
#: The flags that tell a pure SYN (a new connection) from any other segment: SYN set, the other three clear.
_SYN_MASK = TCPFlag.SYN | TCPFlag.ACK | TCPFlag.RST | TCPFlag.FIN


def _http(frame: bytes | memoryview, start: int, end: int) -> HttpRequest | None:
    try:
        return peek_request(memoryview(frame)[start:end])
    except HTTPError:
        return None


_PORTS_SEQ = struct.Struct("!HHI")
_PORTS = struct.Struct("!HH")


def _quoted_ports(frame: bytes | memoryview, start: int, end: int) -> tuple[int, int, int]:
    if end - start >= _PORTS_SEQ.size:
        sport, dport, seq = _PORTS_SEQ.unpack_from(frame, start)
        return sport, dport, seq
    if end - start >= _PORTS.size:
        sport, dport = _PORTS.unpack_from(frame, start)
        return sport, dport, 0
    raise AnalysisError("icmp_quote_truncated", "quoted datagram too short for ports")


def plain_ipv4_py(frame: bytes | memoryview, ip: int, l7: bool) -> Analysis | None:
    """The analysis of an IPv4 packet at ``ip`` whose header has no options, is whole and checks, of a first (or
    only) fragment, carrying TCP without options or UDP, with its header whole and its length right; None for
    any other (for the general path, which says why it is dropped if it is). ``frame`` holds at least an IPv4
    header and a UDP header from ``ip`` on. The reference: the native build (``_fast.plain_ipv4``) does exactly this
    and is used where it is built (:data:`PLAIN_READER`)."""
    vihl, tos, total_length, flags_frag, ttl, proto, src, dst = _PLAIN_IPV4.unpack_from(frame, ip)
    l4 = ip + IPV4_HLEN
    end = ip + total_length
    if (
        vihl != _PLAIN_VIHL
        or end > len(frame)
        or flags_frag & FRAG_OFFSET_MASK
        or int.from_bytes(frame[ip:l4], "big") % _ONES  # the header's checksum (see mplslb.wire.checksum)
    ):
        return None
    if proto == IPPROTO_TCP:
        if end - l4 < TCP_HLEN:  # also a total length shorter than the IP header
            return None
        sport, dport, seq, doff, flags = _PLAIN_TCP.unpack_from(frame, l4)
        if doff >> 4 != _TCP_PLAIN_DOFF:
            return None
        payload = end - l4 - TCP_HLEN
        http = _http(frame, l4 + TCP_HLEN, end) if payload > 0 and l7 else None
    elif proto == IPPROTO_UDP:
        sport, dport, length = _PLAIN_UDP.unpack_from(frame, l4)
        if length < UDP_HLEN or length > end - l4:  # also a datagram shorter than its header
            return None
        flags, seq, payload = -1, 0, length - UDP_HLEN
        http = _http(frame, l4 + UDP_HLEN, l4 + length) if payload > 0 and l7 else None
    else:
        return None
    # tuple.__new__ as the NamedTuples' own constructors do, without their Python-level call.
    key = _new(FlowKey, (proto, src, sport, dst, dport))
    return _new(Analysis, (key, 4, ip, end, l4, flags, seq, payload, ttl, tos, http, False))


#: The numbers the native plain reading reads, by the names it gives them.
NATIVE_NUMBERS = {
    "IPV4_HLEN": IPV4_HLEN, "TCP_HLEN": TCP_HLEN, "UDP_HLEN": UDP_HLEN, "PLAIN_VIHL": _PLAIN_VIHL,
    "FRAG_OFFSET_MASK": FRAG_OFFSET_MASK, "TCP_PLAIN_DOFF": _TCP_PLAIN_DOFF, "ONES": _ONES,
    "IPPROTO_TCP": IPPROTO_TCP, "IPPROTO_UDP": IPPROTO_UDP,
}  # fmt: skip


def use_native(native: ModuleType | None) -> str:
    """Read plain IPv4 packets with the native module ``native``'s ``plain_ipv4``, bound to this module's types,
    HTTP reader and numbers, or with :func:`plain_ipv4_py` again (None); return which reader is in use."""
    global _read_plain
    if native is None:
        _read_plain = plain_ipv4_py
        return "python"
    native.bind_analyzer(FlowKey, Analysis, _http, NATIVE_NUMBERS)
    _read_plain = native.plain_ipv4
    return "native"


_read_plain: Callable[[bytes | memoryview, int, bool], Analysis | None] = plain_ipv4_py
#: Which plain reading :meth:`PacketAnalyzer.analyze` uses: ``"native"`` where the switching unit's native build is
#: in use (:data:`mplslb.switching.scalar.FAST_PATH`), else ``"python"``.
PLAIN_READER = use_native(scalar.native)
