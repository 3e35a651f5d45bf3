"""Simulated clients and servers: small TCP and UDP stacks with real headers behind the endpoint objects.

Theory of operation
-------------------
Each host owns an endpoint object from :mod:`mplslb.endpoint` and sits on an Ethernet segment. What the host's
"stack" sends is an IP packet handed to ``endpoint.from_host`` (which labels it, or not); what arrives from the
wire goes through ``endpoint.from_wire`` (which strips the label and learns the reply label) before the stack sees
it. The stacks are deliberately small but honest on the wire: real IPv4/IPv6, TCP and UDP headers with checksums,
sequence and acknowledgement numbers that follow the bytes sent, so tshark follows the streams.

* A client's TCP session: SYN, SYN-ACK, ACK, then ``requests`` HTTP/1.1 requests on the connection, each answered
  in MSS-sized segments; the client closes with FIN, the server answers FIN-ACK, the client ACKs. A UDP session:
  ``requests`` datagrams, each sent when the previous reply came back.
* A server has ``workers`` that serve requests one at a time, each taking an exponentially distributed service
  time; requests wait in a queue when all workers are busy, so response times grow with load. A server that has
  ``failed`` answers nothing.

Every client session ends as ``completed``, ``refused`` (RST or ICMP unreachable from the virtual IP while
connecting), or ``failed`` (no answer within its timeout, e.g. its server went down).
"""

from __future__ import annotations

import random
import struct
from collections import deque
from dataclasses import dataclass, field

from mplslb.endpoint import ClientEndpoint, ServerEndpoint
from mplslb.sim.engine import EventLoop, Segment
from mplslb.wire.errors import WireError
from mplslb.wire.icmp import parse_icmp
from mplslb.wire.ip import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP
from mplslb.wire.ipv4 import build_ipv4, parse_ipv4
from mplslb.wire.ipv6 import build_ipv6, parse_ipv6
from mplslb.wire.tcp import TCPFlag, build_tcp, parse_tcp
from mplslb.wire.udp import build_udp, parse_udp

SYN, ACK, FIN, RST, PSH = (int(f) for f in (TCPFlag.SYN, TCPFlag.ACK, TCPFlag.FIN, TCPFlag.RST, TCPFlag.PSH))
MSS = 1460
_MSS_OPTION = struct.pack("!BBH", 2, 4, MSS)
EPHEMERAL_FIRST, EPHEMERAL_LAST = 32768, 60999


def ip_packet(src: bytes, dst: bytes, proto: int, payload: bytes, ident: int = 0) -> bytes:
    if len(src) == 16:
        return build_ipv6(src, dst, proto, len(payload)) + payload
    return build_ipv4(src, dst, proto, len(payload), ident=ident & 0xFFFF) + payload


class _Stack:
    """What both simulated stacks share: an endpoint on a segment, IP packets out through it, TCP segments that
    advance the connection's send sequence."""

    loop: EventLoop
    segment: Segment
    endpoint: ClientEndpoint | ServerEndpoint
    _ident: int

    def _emit(self, src: bytes, dst: bytes, proto: int, payload: bytes) -> None:
        self._ident += 1
        packet = ip_packet(src, dst, proto, payload, self._ident)
        frame = self.endpoint.from_host(packet, self.loop.now)
        if frame is not None:
            self.segment.send(frame)

    def _segment(
        self, conn: _ClientConn | _ServerConn, src: bytes, dst: bytes, ports: tuple[int, int], flags: int, ack: int,
        payload: bytes, options: bytes,
    ) -> None:  # fmt: skip
        segment = build_tcp(
            src,
            dst,
            ports[0],
            ports[1],
            seq=conn.snd_nxt,
            ack=ack,
            flags=flags,
            window=65535,
            options=options,
            payload=payload,
        )
        conn.snd_nxt = (conn.snd_nxt + len(payload) + (1 if flags & (SYN | FIN) else 0)) & 0xFFFFFFFF
        self._emit(src, dst, IPPROTO_TCP, segment)


class Received:
    """The parts of a received IP packet the small stacks use."""

    __slots__ = ("ack", "dport", "flags", "icmp", "payload", "proto", "seq", "sport", "src")

    def __init__(self, packet: bytes) -> None:
        ip = parse_ipv6(packet) if packet and packet[0] >> 4 == 6 else parse_ipv4(packet)
        self.proto = ip.proto
        self.src = ip.src
        self.icmp = False
        self.flags = self.seq = self.ack = 0
        self.sport = self.dport = 0
        self.payload = b""
        end = ip.end
        if ip.proto == IPPROTO_TCP:
            tcp = parse_tcp(packet, ip.payload_offset, end)
            self.sport, self.dport, self.seq, self.ack, self.flags = tcp.sport, tcp.dport, tcp.seq, tcp.ack, tcp.flags
            self.payload = packet[tcp.payload_offset : end]
        elif ip.proto == IPPROTO_UDP:
            udp = parse_udp(packet, ip.payload_offset, end)
            self.sport, self.dport = udp.sport, udp.dport
            self.payload = packet[udp.payload_offset : udp.end]
        elif ip.proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            icmp = parse_icmp(packet, ip.payload_offset, end, v6=ip.proto == IPPROTO_ICMPV6)
            self.icmp = icmp.is_error
            # The quoted datagram's ports tell which local socket the error is about.
            quoted = packet[icmp.payload_offset : end]
            if quoted:
                q = parse_ipv6(quoted) if quoted[0] >> 4 == 6 else parse_ipv4(quoted, verify_checksum=False)
                self.proto = q.proto
                if len(quoted) >= q.payload_offset + 4:
                    self.sport, self.dport = struct.unpack_from("!HH", quoted, q.payload_offset)
                    self.sport, self.dport = self.dport, self.sport  # as if it came back from the destination


@dataclass
class SessionResult:
    """What one client session came to."""

    client: str
    proto: str
    ip_version: int
    started: float
    ended: float = 0.0
    outcome: str = ""
    server: str = ""
    requests_done: int = 0
    bytes_received: int = 0
    response_times: list[float] = field(default_factory=list)


class _ClientConn:
    __slots__ = (
        "buffer",
        "done",
        "expect",
        "header_seen",
        "host",
        "local",
        "port",
        "proto",
        "rcv_nxt",
        "request_at",
        "requests",
        "result",
        "size",
        "snd_nxt",
        "state",
        "vip",
        "vport",
    )
    done: bool
    expect: int
    header_seen: bool
    local: bytes
    port: int
    proto: int
    rcv_nxt: int
    request_at: float
    requests: int
    result: SessionResult
    snd_nxt: int
    state: str
    vip: bytes
    vport: int
    host: str
    size: int
    buffer: bytes


class ClientHost(_Stack):
    """A client machine: a ClientEndpoint on a segment, and small TCP/UDP client stacks."""

    def __init__(
        self,
        loop: EventLoop,
        segment: Segment,
        *,
        name: str,
        mac: bytes,
        addr4: bytes,
        addr6: bytes,
        gateway_mac: bytes,
        rng: random.Random,
        results: list[SessionResult],
    ) -> None:
        self.loop, self.segment, self.name = loop, segment, name
        self.addr4, self.addr6 = addr4, addr6
        self.endpoint = ClientEndpoint(mac=mac, gateway_mac=gateway_mac, flow_timeout=120.0)
        self.rng = rng
        self.results = results
        self.conns: dict[tuple[int, int], _ClientConn] = {}
        self._next_port = EPHEMERAL_FIRST + rng.randrange(EPHEMERAL_LAST - EPHEMERAL_FIRST)
        self._ident = 0
        segment.attach(mac, self.on_frame)

    def _port(self, proto: int) -> int:
        for _ in range(EPHEMERAL_LAST - EPHEMERAL_FIRST + 1):
            port = self._next_port
            self._next_port = EPHEMERAL_FIRST if port >= EPHEMERAL_LAST else port + 1
            if (proto, port) not in self.conns:
                return port
        raise RuntimeError(f"{self.name}: out of ephemeral ports")

    def _send(self, conn: _ClientConn, payload: bytes) -> None:
        self._emit(conn.local, conn.vip, conn.proto, payload)

    def _tcp(self, conn: _ClientConn, flags: int, payload: bytes = b"", options: bytes = b"") -> None:
        ack = conn.rcv_nxt if flags & ACK else 0
        self._segment(conn, conn.local, conn.vip, (conn.port, conn.vport), flags, ack, payload, options)

    def open(
        self,
        *,
        proto: int,
        vip: bytes,
        vport: int,
        requests: int,
        host: str,
        size: int,
        timeout: float,
    ) -> SessionResult:
        """Start a session to ``vip:vport``; its result is filled in as it goes."""
        conn = _ClientConn()
        conn.proto, conn.vip, conn.vport, conn.requests = proto, vip, vport, requests
        conn.local = self.addr6 if len(vip) == 16 else self.addr4
        conn.port = self._port(proto)
        conn.host, conn.size = host, size
        conn.snd_nxt = self.rng.getrandbits(32)
        conn.rcv_nxt = 0
        conn.state = "syn_sent" if proto == IPPROTO_TCP else "open"
        conn.done = conn.header_seen = False
        conn.expect = 0
        conn.buffer = b""
        conn.request_at = 0.0
        conn.result = SessionResult(
            self.name, "tcp" if proto == IPPROTO_TCP else "udp", 6 if len(vip) == 16 else 4, self.loop.now
        )
        self.results.append(conn.result)
        self.conns[(proto, conn.port)] = conn
        if proto == IPPROTO_TCP:
            self._tcp(conn, SYN, options=_MSS_OPTION)
        else:
            self._udp_request(conn)
        self.loop.after(timeout, self._timeout, conn)
        return conn.result

    def _request_bytes(self, conn: _ClientConn) -> bytes:
        n = conn.result.requests_done
        return (f"GET /obj/{conn.size}?n={n} HTTP/1.1\r\nHost: {conn.host}\r\nUser-Agent: mplslb-sim\r\n\r\n").encode()

    def _udp_request(self, conn: _ClientConn) -> None:
        conn.request_at = self.loop.now
        query_id = (conn.port + conn.result.requests_done) & 0xFFFF
        request = dns_query(query_id, f"s{conn.size}.{conn.host}")
        self._send(conn, build_udp(conn.local, conn.vip, conn.port, conn.vport, request))

    def _end(self, conn: _ClientConn, outcome: str) -> None:
        if conn.done:
            return
        conn.done = True
        conn.result.outcome = outcome
        conn.result.ended = self.loop.now
        self.conns.pop((conn.proto, conn.port), None)

    def _timeout(self, conn: _ClientConn) -> None:
        self._end(conn, "failed")

    def on_frame(self, frame: bytes, now: float) -> None:
        packet = self.endpoint.from_wire(frame, now)
        if packet is None:
            return
        try:
            rx = Received(packet)
        except WireError:
            return
        conn = self.conns.get((rx.proto, rx.dport))
        if conn is None or conn.done:
            return
        if rx.icmp:
            self._end(conn, "refused" if conn.result.requests_done == 0 else "failed")
        elif rx.proto == IPPROTO_TCP:
            self._on_tcp(conn, rx)
        else:
            self._on_udp(conn, rx)

    def _on_udp(self, conn: _ClientConn, rx: Received) -> None:
        result = conn.result
        result.requests_done += 1
        result.bytes_received += len(rx.payload)
        result.response_times.append(self.loop.now - conn.request_at)
        if not result.server:
            result.server = dns_answer_server(rx.payload)
        if result.requests_done >= conn.requests:
            self._end(conn, "completed")
        else:
            self._udp_request(conn)

    def _on_tcp(self, conn: _ClientConn, rx: Received) -> None:
        if rx.flags & RST:
            self._end(conn, "refused" if conn.state == "syn_sent" else "failed")
            return
        if conn.state == "syn_sent":
            if rx.flags & (SYN | ACK) == SYN | ACK:
                conn.rcv_nxt = (rx.seq + 1) & 0xFFFFFFFF
                conn.state = "established"
                self._tcp(conn, ACK)
                self._send_request(conn)
            return
        if rx.payload:
            if rx.seq != conn.rcv_nxt:
                return  # the simulated network neither loses nor reorders; ignore anything else
            conn.rcv_nxt = (conn.rcv_nxt + len(rx.payload)) & 0xFFFFFFFF
            self._on_response_bytes(conn, rx.payload)
        if rx.flags & FIN:
            conn.rcv_nxt = (conn.rcv_nxt + 1) & 0xFFFFFFFF
            self._tcp(conn, ACK)
            if conn.state == "fin_wait":
                self._end(conn, "completed")
            else:
                self._end(conn, "failed")  # the server closed before answering everything
        elif rx.payload:
            self._tcp(conn, ACK)

    def _send_request(self, conn: _ClientConn) -> None:
        conn.request_at = self.loop.now
        conn.header_seen = False
        conn.buffer = b""
        self._tcp(conn, PSH | ACK, self._request_bytes(conn))

    def _on_response_bytes(self, conn: _ClientConn, data: bytes) -> None:
        result = conn.result
        result.bytes_received += len(data)
        if not conn.header_seen:
            conn.buffer += data
            head, sep, rest = conn.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            conn.header_seen = True
            result.response_times.append(self.loop.now - conn.request_at)
            conn.expect = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    conn.expect = int(value)
                elif name.lower() == b"server":
                    result.server = value.strip().decode()
            conn.expect -= len(rest)
            conn.buffer = b""
        else:
            conn.expect -= len(data)
        if conn.expect <= 0:
            result.requests_done += 1
            if result.requests_done >= conn.requests:
                conn.state = "fin_wait"
                self._tcp(conn, FIN | ACK)
            else:
                self._send_request(conn)


class _ServerConn:
    __slots__ = ("buffer", "client", "cport", "proto", "rcv_nxt", "snd_nxt", "state", "vip", "vport")
    buffer: bytes
    client: bytes
    cport: int
    proto: int
    rcv_nxt: int
    snd_nxt: int
    state: str
    vip: bytes
    vport: int


class ServerHost(_Stack):
    """A server machine: the virtual IP on the host, a ServerEndpoint, workers and a queue."""

    def __init__(
        self,
        loop: EventLoop,
        segment: Segment,
        *,
        name: str,
        mac: bytes,
        vips: list[bytes],
        workers: int,
        service_time: float,
        rng: random.Random,
    ) -> None:
        self.loop, self.segment, self.name = loop, segment, name
        self.endpoint = ServerEndpoint(mac=mac, vips=vips, flow_timeout=120.0)
        self.workers = workers
        self.service_time = service_time
        self.rng = rng
        self.busy = 0
        self.queue: deque[tuple[_ServerConn, bytes]] = deque()
        self.conns: dict[tuple[int, bytes, int, bytes, int], _ServerConn] = {}
        self.failed = False
        self.served = 0
        self.peak_queue = 0
        self._ident = 0
        segment.attach(mac, self.on_frame)

    def _send(self, conn: _ServerConn, payload: bytes) -> None:
        self._emit(conn.vip, conn.client, conn.proto, payload)

    def _tcp(self, conn: _ServerConn, flags: int, payload: bytes = b"", options: bytes = b"") -> None:
        self._segment(conn, conn.vip, conn.client, (conn.vport, conn.cport), flags, conn.rcv_nxt, payload, options)

    def on_frame(self, frame: bytes, now: float) -> None:
        if self.failed:
            return
        packet = self.endpoint.from_wire(frame, now)
        if packet is None:
            return
        try:
            rx = Received(packet)
            ip = parse_ipv6(packet) if packet[0] >> 4 == 6 else parse_ipv4(packet)
        except WireError:
            return
        key = (rx.proto, rx.src, rx.sport, ip.dst, rx.dport)
        conn = self.conns.get(key)
        if rx.proto == IPPROTO_UDP:
            if conn is None:
                conn = _ServerConn()
                conn.proto, conn.client, conn.cport, conn.vip, conn.vport = (
                    IPPROTO_UDP,
                    rx.src,
                    rx.sport,
                    ip.dst,
                    rx.dport,
                )
                conn.state = "udp"
                self.conns[key] = conn
            self._enqueue(conn, rx.payload)
            return
        if rx.proto != IPPROTO_TCP:
            return
        if conn is None:
            if rx.flags & (SYN | ACK) != SYN:
                return
            conn = _ServerConn()
            conn.proto, conn.client, conn.cport, conn.vip, conn.vport = IPPROTO_TCP, rx.src, rx.sport, ip.dst, rx.dport
            conn.rcv_nxt = (rx.seq + 1) & 0xFFFFFFFF
            conn.snd_nxt = self.rng.getrandbits(32)
            conn.state = "syn_rcvd"
            conn.buffer = b""
            self.conns[key] = conn
            self._tcp(conn, SYN | ACK, options=_MSS_OPTION)
            return
        if rx.flags & RST:
            del self.conns[key]
            return
        if conn.state == "syn_rcvd" and rx.flags & ACK:
            conn.state = "established"
        if rx.payload and rx.seq == conn.rcv_nxt:
            conn.rcv_nxt = (conn.rcv_nxt + len(rx.payload)) & 0xFFFFFFFF
            conn.buffer += rx.payload
            while b"\r\n\r\n" in conn.buffer:
                request, _, conn.buffer = conn.buffer.partition(b"\r\n\r\n")
                self._enqueue(conn, request)
        if rx.flags & FIN:
            conn.rcv_nxt = (conn.rcv_nxt + 1) & 0xFFFFFFFF
            conn.state = "last_ack"
            self._tcp(conn, FIN | ACK)
        elif conn.state == "last_ack" and rx.flags & ACK:
            del self.conns[key]

    def _enqueue(self, conn: _ServerConn, request: bytes) -> None:
        if self.busy < self.workers:
            self._start(conn, request)
        else:
            self.queue.append((conn, request))
            self.peak_queue = max(self.peak_queue, len(self.queue))

    def _start(self, conn: _ServerConn, request: bytes) -> None:
        self.busy += 1
        delay = self.rng.expovariate(1.0 / self.service_time) if self.service_time > 0 else 0.0
        self.loop.after(delay, self._finish, conn, request)

    def _finish(self, conn: _ServerConn, request: bytes) -> None:
        self.busy -= 1
        if self.queue:
            self._start(*self.queue.popleft())
        if self.failed:
            return
        self.served += 1
        if conn.proto == IPPROTO_UDP:
            answer = dns_answer(request, self.name)
            if answer:
                self._send(conn, build_udp(conn.vip, conn.client, conn.vport, conn.cport, answer))
            return
        size = _requested_size(request)
        if conn.state not in ("established", "syn_rcvd"):
            return
        body = b"x" * size
        head = f"HTTP/1.1 200 OK\r\nServer: {self.name}\r\nContent-Length: {size}\r\n\r\n".encode()
        data = head + body
        for start in range(0, len(data), MSS):
            chunk = data[start : start + MSS]
            self._tcp(conn, ACK | (PSH if start + MSS >= len(data) else 0), chunk)


def _requested_size(request: bytes) -> int:
    """The size asked for by ``GET /obj/<size>``."""
    try:
        path = request.split(b" ", 2)[1]
        return min(int(path.split(b"/obj/", 1)[1].split(b"?", 1)[0]), 10_000_000)
    except (IndexError, ValueError):
        return 0


# A UDP service that tshark decodes: DNS, a TXT question answered with the server's name and some padding.
_DNS_HEADER = struct.Struct("!HHHHHH")
_DNS_QUERY_FLAGS = 0x0100  # standard query, recursion desired
_DNS_REPLY_FLAGS = 0x8180  # response, recursion desired and available, no error
_DNS_TXT, _DNS_IN, _DNS_NAME_POINTER = 16, 1, 0xC00C
_DNS_ANSWER = struct.Struct("!HHHIH")
_TXT_CHUNK = 255


def dns_query(query_id: int, name: str) -> bytes:
    qname = b"".join(bytes((len(part),)) + part.encode() for part in name.split(".") if part) + b"\x00"
    return _DNS_HEADER.pack(query_id, _DNS_QUERY_FLAGS, 1, 0, 0, 0) + qname + struct.pack("!HH", _DNS_TXT, _DNS_IN)


def dns_answer(query: bytes, server: str) -> bytes:
    """The reply to :func:`dns_query`: TXT strings, the first the server's name, padded to the size asked for
    (the first label of the name is ``s<size>``)."""
    if len(query) < _DNS_HEADER.size + 5:
        return b""
    query_id = _DNS_HEADER.unpack_from(query)[0]
    question = query[_DNS_HEADER.size :]
    size = 0
    if question[0] and question[1:2] == b"s":
        try:
            size = min(int(question[2 : 1 + question[0]]), 1200)
        except ValueError:
            size = 0
    strings = [server.encode()]
    left = max(0, size - len(strings[0]))
    while left > 0:
        chunk = min(left, _TXT_CHUNK)
        strings.append(b"y" * chunk)
        left -= chunk
    rdata = b"".join(bytes((len(s),)) + s for s in strings)
    answer = _DNS_ANSWER.pack(_DNS_NAME_POINTER, _DNS_TXT, _DNS_IN, 60, len(rdata)) + rdata
    return _DNS_HEADER.pack(query_id, _DNS_REPLY_FLAGS, 1, 1, 0, 0) + question + answer


def dns_answer_server(reply: bytes) -> str:
    """The server name in a :func:`dns_answer` reply ("" if it is not one)."""
    at = reply.find(struct.pack("!HHH", _DNS_NAME_POINTER, _DNS_TXT, _DNS_IN))
    if at < 0 or len(reply) < at + _DNS_ANSWER.size + 1:
        return ""
    start = at + _DNS_ANSWER.size
    return reply[start + 1 : start + 1 + reply[start]].decode(errors="replace")
