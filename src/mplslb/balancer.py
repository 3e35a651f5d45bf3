"""The load-balancing apparatus of claim 1: the five units wired together, and the only object a driver talks to.

Theory of operation
-------------------
A driver hands frames in with the port they came from and the time: :meth:`Balancer.receive` (one frame) or
:meth:`Balancer.receive_batch` (many, same result). Each returns the frames to send as ``[(port, bytes)]``. Timers
are the driver's too: it calls :meth:`Balancer.on_timer` once :meth:`Balancer.next_deadline` has passed.

For each frame the session label switching unit tries first (claims 1, 9): a labelled frame is switched on its label
alone and never analysed. An unlabelled frame goes to the packet analyzing unit (claims 2, 10), which learns the
session information from layers 3 to 7 and asks the session managing unit whether the session exists:

* existing session (claim 2): the frame goes to the session's server with the session's C2S label attached;
* new session (claims 4, 8 steps 1-2, 11): service acceptance control first (global limit, rate, labels left),
  then the load balancing algorithm picks an eligible server, the session label managing unit gives a label pair
  (claim 7), both labels are installed in the label switching table bound to where their frames may come from, and
  the frame leaves for the server with the C2S label attached (claim 15);
* refused (claim 11): the client gets a TCP RST or an ICMP unreachable from the virtual IP, or nothing, as
  configured; sessions already served are not touched.

Servers answer with label + 1 from the virtual IP (claims 8 step 3-4, 12, 13): the balancer never maps the virtual
IP to a real address. Frames from the fast path that the session manager asked to see (FIN/RST, the frames that
time a server's response) come back as reports after forwarding and drive the session lifecycle and the
response-time measurement.

Malformed or unwanted frames are dropped and counted under a named reason; nothing raises out of ``receive``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from mplslb.analyzer import Analysis, PacketAnalyzer, attach_label
from mplslb.balancing.admission import AdmissionControl, Refusal, RefuseWith
from mplslb.balancing.algorithms import FlowKey, make_algorithm
from mplslb.balancing.servers import DownReason, Server, ServerConfig, ServerPool, ServerStatus
from mplslb.config import BalancerConfig, PortConfig, VirtualService
from mplslb.labels import LabelManager, LabelStats, pair_of
from mplslb.neighbors import answer
from mplslb.sessions import FINAL_STATES, Session, SessionEvent, SessionState, SessionTable
from mplslb.switching import (
    DROPPED,
    IPV6_PAYLOAD,
    WATCH_ALL,
    WATCH_TCP_END,
    FastEvent,
    LabelSwitchingTable,
    switch_block,
)
from mplslb.wire.errors import WireError
from mplslb.wire.ethernet import ETH_P_IP, ETH_P_IPV6, build_ethernet
from mplslb.wire.icmp import build_icmp_unreachable
from mplslb.wire.ip import IPPROTO_TCP
from mplslb.wire.ipv4 import build_ipv4
from mplslb.wire.ipv6 import build_ipv6
from mplslb.wire.tcp import TCPFlag, build_tcp

Frames = list[tuple[int, bytes]]

SYN, ACK, FIN, RST = int(TCPFlag.SYN), int(TCPFlag.ACK), int(TCPFlag.FIN), int(TCPFlag.RST)
#: How many reported frames a session may spend on its response-time measurement before watching stops.
WATCH_BUDGET = 16
ICMP_PORT_UNREACHABLE_V4 = 3
ICMP_PORT_UNREACHABLE_V6 = 4


class BlockResult(NamedTuple):
    """What :meth:`Balancer.receive_block` did: per frame the output port of the rewritten frame (-1: none), and
    the frames the one-frame path produced for the others, as ``(index, port, frame)``."""

    out_port: np.ndarray
    extra: list[tuple[int, int, bytes]]


@dataclass(frozen=True)
class ServerRow:
    name: str
    status: str
    weight: int
    active: int
    total: int
    rt_ms: float | None
    packets_in: int
    packets_out: int
    bytes_in: int
    bytes_out: int
    line_card: int
    port: int


@dataclass(frozen=True)
class BalancerStats:
    """A snapshot of the balancer's figures, for tables and metrics."""

    frames_in: int
    frames_out: int
    fast_path: int
    slow_path: int
    sessions_active: int
    sessions_started: int
    sessions_peak: int
    sessions_ended: dict[str, int]
    refused: dict[str, int]
    drops: dict[str, int]
    labels: LabelStats
    labels_installed: int
    servers: tuple[ServerRow, ...]
    l7_hosts: dict[str, int]


class Balancer:
    """The server load balancing apparatus (claim 1), sans I/O."""

    def __init__(self, config: BalancerConfig) -> None:
        self.config = config
        self.ports: dict[int, PortConfig] = {p.port_id: p for p in config.ports}
        self.vips: dict[bytes, VirtualService] = {v.address: v for v in config.vips}
        self.switching = LabelSwitchingTable(
            {p.port_id: p.mac for p in config.ports}, {p.port_id: (p.line_card, p.number) for p in config.ports}
        )
        self.labels = LabelManager(quarantine=config.label_quarantine, c2s_min=config.c2s_min, c2s_max=config.c2s_max)
        self.sessions = SessionTable(config.timeouts)
        self.pool = ServerPool(
            config.servers, fail_threshold=config.fail_threshold, rt_alpha=config.rt_alpha, rt_limit=config.rt_limit
        )
        self.algorithm = make_algorithm(config.algorithm, **dict(config.algorithm_params))
        self.admission = AdmissionControl(
            max_sessions=config.max_sessions,
            max_new_per_second=config.max_new_per_second,
            refuse_with=config.refuse_with,
        )
        self.analyzer = PacketAnalyzer(l7=config.l7)
        self.frames_in = 0
        self.frames_out = 0
        self.fast_path = 0
        self.slow_path = 0
        self.drops: dict[str, int] = {}
        self.l7_hosts: dict[str, int] = {}  # sessions by the Host of their first HTTP request (L7 analysis)
        self.neighbor_replies = 0
        self.live = 0  # sessions not yet closed or interrupted (closed ones may still linger in the table)
        # Per-server totals of ended sessions' label counters (live sessions are read from the switching table).
        self._server_traffic: dict[str, list[int]] = {}
        self._watch_budget: dict[int, int] = {}
        self._events: list[FastEvent] = []

    # -- the data plane ------------------------------------------------------------------------------------------
    def receive(self, port: int, frame: bytes | memoryview, now: float) -> Frames:
        """Take one frame that arrived on ``port`` at ``now``; return the frames to send."""
        out: Frames = []
        self._receive(port, frame, now, out)
        return out

    def receive_batch(self, frames: Iterable[tuple[int, bytes | memoryview]], now: float) -> Frames:
        """Take many frames at once; the result equals calling :meth:`receive` on each in order."""
        out: Frames = []
        receive = self._receive
        for port, frame in frames:
            receive(port, frame, now, out)
        return out

    def receive_block(
        self, buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray, ports: np.ndarray, now: float
    ) -> BlockResult:
        """The block fast path: many frames lying in one buffer (as a TPACKET_V3 ring block holds them).

        Frame i is ``buf[starts[i] : starts[i] + lengths[i]]`` (``buf`` a uint8 numpy array), arrived on
        ``ports[i]``. Label-switched frames are checked, rewritten and counted in bulk with numpy, in place in
        ``buf``: send ``buf[start : start + length]`` to ``result.out_port[i]`` when it is not -1. Every other frame
        (unlabelled, tagged, or a labelled frame to drop) goes through the one-frame path; what it sends is in
        ``result.extra`` as ``(i, port, frame)``. Listing, for each i in order, the block's frame and then the
        extras of i gives exactly what :meth:`receive` gives frame by frame.
        """
        events: list[FastEvent] = []
        verdict = switch_block(self.switching, buf, starts, lengths, ports, now, events)
        switched = int(verdict.switched.sum())
        n = len(starts)
        self.frames_in += switched
        self.frames_out += switched
        self.fast_path += switched
        extra: list[tuple[int, int, bytes]] = []
        if events:
            self._events = events
            self._handle_events([])
        if switched < n:
            out: Frames = []
            for i in np.flatnonzero(~verdict.switched).tolist():
                start = int(starts[i])
                self._receive(int(ports[i]), buf[start : start + int(lengths[i])].tobytes(), now, out)
                extra.extend((i, port, frame) for port, frame in out)
                out.clear()
        return BlockResult(verdict.out_port, extra)

    def _receive(self, port: int, frame: bytes | memoryview, now: float, out: Frames) -> None:
        self.frames_in += 1
        before = len(out)
        role = self.ports.get(port)
        if role is None:
            self._drop("unknown_port")
            return
        result = self.switching.switch(port, frame, now, out, self._events)
        if result >= 0:
            self.fast_path += 1
            if self._events:
                self._handle_events(out)
        elif result != DROPPED:
            self.slow_path += 1
            if role.role == "client":
                reply = answer(frame, self.vips, role.mac)  # ARP / neighbour solicitation for a VIP
                if reply is not None:
                    self.neighbor_replies += 1
                    out.append((port, reply))
                    self.frames_out += 1
                    return
            try:
                analysis = self.analyzer.analyze(frame)
            except WireError as exc:
                self._drop(exc.reason)
            else:
                if role.role == "client":
                    self._from_client(port, frame, analysis, now, out)
                else:
                    self._from_server(port, frame, analysis, now, out)
        self.frames_out += len(out) - before

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def _from_client(self, port: int, frame: bytes | memoryview, a: Analysis, now: float, out: Frames) -> None:
        key = a.key
        if a.icmp_error:  # an error about a datagram the virtual IP sent to a client: goes to that server
            session = self.sessions.lookup(FlowKey(key.proto, key.dst, key.dport, key.src, key.sport))
            if session is None:
                self._drop("icmp_no_session")
                return
            self._to_server(session, frame, a, now, out)
            return
        vip = self.vips.get(key.dst)
        if vip is None:
            self._drop("not_a_vip")
            return
        if not vip.serves(key.proto, key.dport):
            self._drop("no_service")
            return
        session = self.sessions.lookup(key)
        pure_syn = key.proto == IPPROTO_TCP and (a.tcp_flags & (SYN | ACK | RST | FIN)) == SYN
        if session is not None and pure_syn and session.state in FINAL_STATES:
            self._finish(session, now)  # the client reuses the port of a closed session: a new session starts
            session = None
        if session is not None:  # claim 2: an existing session's packet goes to its server
            if a.payload_len and not session.request_at:
                self._request_seen(session, a, now)
            self._to_server(session, frame, a, now, out)
            if a.tcp_flags > 0 and a.tcp_flags & (FIN | RST):
                self._tcp_end(session, a.tcp_flags, from_client=True, now=now)
            return
        if key.proto == IPPROTO_TCP and not pure_syn:
            self._drop("tcp_no_session")
            return
        self._new_session(port, frame, a, now, out)

    def _new_session(self, port: int, frame: bytes | memoryview, a: Analysis, now: float, out: Frames) -> None:
        refusal = self.admission.admit(active_sessions=self.live, labels_free=self.labels.free_count, now=now)
        server: Server | None = None
        if refusal is None:
            server = self.algorithm.choose(self.pool, a.key, now)
            if server is None:
                refusal = self.admission.refusal_for_no_server(self.pool)
        c2s: int | None = None
        if refusal is None:
            c2s = self.labels.allocate(now)
            if c2s is None:
                refusal = Refusal.LABELS_EXHAUSTED
        if refusal is not None or server is None or c2s is None:
            self.admission.count(refusal or Refusal.NO_SERVER)
            if server is not None:
                self.pool.session_refused(server)
            self._refuse(port, frame, a, out)
            return
        client_mac = bytes(frame[6:12])
        session = Session(a.key, c2s, server, client_port=port, client_mac=client_mac, ip_version=a.ip_version, now=now)
        if a.payload_len:
            self._request_seen(session, a, now)
        self.sessions.add(session, now)
        self.live += 1
        self.pool.session_started(server)
        tcp = a.key.proto == IPPROTO_TCP
        v6 = IPV6_PAYLOAD if a.ip_version == 6 else 0
        end_watch = WATCH_TCP_END if tcp else 0
        self.switching.install(
            c2s,
            out_port=server.config.port_id,
            next_hop=server.config.mac,
            in_port=port,
            peer=client_mac,
            peer_ip=a.key.src,
            watch=end_watch | v6 | (WATCH_ALL if tcp and not a.payload_len else 0),
            tcp_offset=a.tcp_offset,
            now=now,
        )
        self.switching.install(
            c2s + 1,
            out_port=port,
            next_hop=client_mac,
            in_port=server.config.port_id,
            peer=server.config.mac,
            peer_ip=a.key.dst,
            watch=end_watch | v6 | WATCH_ALL,
            tcp_offset=a.tcp_offset,
            now=now,
        )
        self._watch_budget[c2s] = WATCH_BUDGET
        self._to_server(session, frame, a, now, out)

    def _request_seen(self, session: Session, a: Analysis, now: float) -> None:
        session.request_at = now
        if a.http is not None:
            session.l7 = a.http
            host = a.http.host or "(no host)"
            self.l7_hosts[host] = self.l7_hosts.get(host, 0) + 1

    def _to_server(self, session: Session, frame: bytes | memoryview, a: Analysis, now: float, out: Frames) -> None:
        cfg = session.server.config
        label = session.c2s
        out.append(
            (
                cfg.port_id,
                attach_label(
                    self.switching.rewrite[label],
                    frame,
                    a.ip_offset,
                    a.ip_end,
                    label,
                    ttl=a.ttl,
                    tc=a.tos >> 5,
                ),
            )
        )
        self.switching.account(label, len(frame), now)

    def _from_server(self, port: int, frame: bytes | memoryview, a: Analysis, now: float, out: Frames) -> None:
        key = a.key
        # A server's unlabelled reply (or its ICMP error about a client's datagram) still finds its session.
        skey = key if a.icmp_error else FlowKey(key.proto, key.dst, key.dport, key.src, key.sport)
        session = self.sessions.lookup(skey)
        if session is None:
            self._drop("unlabelled_from_server")
            return
        cfg = session.server.config
        if cfg.port_id != port or bytes(frame[6:12]) != cfg.mac:
            self._drop("server_wrong_source")
            return
        label = session.s2c
        out.append(
            (
                session.client_port,
                attach_label(self.switching.rewrite[label], frame, a.ip_offset, a.ip_end, label, ttl=a.ttl),
            )
        )
        self.switching.account(label, len(frame), now)

    def _refuse(self, port: int, frame: bytes | memoryview, a: Analysis, out: Frames) -> None:
        """Service acceptance control's answer to a refused new session (claim 11)."""
        mode = self.admission.refuse_with
        if mode is RefuseWith.DROP:
            return
        key = a.key
        v6 = a.ip_version == 6
        if mode is RefuseWith.RST and key.proto == IPPROTO_TCP:
            ack = (a.tcp_seq + 1 + a.payload_len) & 0xFFFFFFFF
            segment = build_tcp(key.dst, key.src, key.dport, key.sport, seq=0, ack=ack, flags=RST | ACK, window=0)
            header = build_ipv6 if v6 else build_ipv4
            packet = header(key.dst, key.src, IPPROTO_TCP, len(segment)) + segment
        else:
            code = None
            if mode is RefuseWith.RST:  # UDP has no RST: port unreachable is its equivalent
                code = ICMP_PORT_UNREACHABLE_V6 if v6 else ICMP_PORT_UNREACHABLE_V4
            packet = build_icmp_unreachable(key.dst, key.src, bytes(frame[a.ip_offset : a.ip_end]), code=code)
        eth = build_ethernet(bytes(frame[6:12]), self.ports[port].mac, ETH_P_IPV6 if v6 else ETH_P_IP)
        out.append((port, eth + packet))

    # -- reports from the fast path ------------------------------------------------------------------------------
    def _handle_events(self, out: Frames) -> None:
        events, self._events = self._events, []
        for event in events:
            session = self.sessions.by_c2s(pair_of(event.label))
            if session is None or session.state in FINAL_STATES:
                continue
            from_client = event.label & 1 == 1
            if event.tcp_flags & RST:
                if not from_client and session.state is SessionState.START:
                    self._server_failed(session.server, DownReason.REFUSED, event.now)
                self._tcp_end(session, event.tcp_flags, from_client=from_client, now=event.now)
            elif self.switching.watch[event.label] & WATCH_ALL:
                self._measure(session, event, from_client)
            if event.tcp_flags & FIN and session.state not in FINAL_STATES:
                self._tcp_end(session, event.tcp_flags, from_client=from_client, now=event.now)

    def _measure(self, session: Session, event: FastEvent, from_client: bool) -> None:
        """Time the server's responses from the session's own frames: SYN -> SYN-ACK, request -> first byte."""
        budget = self._watch_budget.get(session.c2s, 0) - 1
        self._watch_budget[session.c2s] = budget
        try:
            a = self.analyzer.analyze_ip(event.frame, event.ip_offset)
        except WireError:
            a = None
        now = event.now
        server = session.server
        if not from_client and session.state is SessionState.START:
            if session.proto != IPPROTO_TCP or (a is not None and a.tcp_flags & (SYN | ACK) == SYN | ACK):
                self.pool.record_response_time(server, now - session.syn_at)
                self.pool.record_success(server)
                self._apply(session, SessionEvent.SERVER_REPLY, now)
                if session.proto != IPPROTO_TCP:
                    budget = 0  # a UDP flow's first reply times its request: done
        elif a is not None and a.payload_len:
            if from_client and not session.request_at:
                self._request_seen(session, a, now)
                self.switching.set_watch(session.c2s, self.switching.watch[session.c2s] & ~WATCH_ALL)
            elif not from_client and session.request_at:
                self.pool.record_response_time(server, now - session.request_at)
                budget = 0
        if budget <= 0:
            for label in (session.c2s, session.s2c):
                self.switching.set_watch(label, self.switching.watch[label] & ~WATCH_ALL)
            session.rt_pending = False
            self._watch_budget.pop(session.c2s, None)

    def _apply(self, session: Session, event: SessionEvent, now: float, reason: str = "") -> None:
        """Drive the session's lifecycle; a session that reaches a final state stops counting as live (for
        admission and for its server's connection count) at once, though its labels may linger a moment."""
        was_live = session.state not in FINAL_STATES
        self.sessions.apply(session, event, now, reason)
        if was_live and session.state in FINAL_STATES:
            self.live -= 1
            self.pool.session_ended(session.server)

    def _tcp_end(self, session: Session, flags: int, *, from_client: bool, now: float) -> None:
        if session.state in FINAL_STATES:
            return
        if flags & RST:
            self._apply(session, SessionEvent.RST, now, "rst")
            return
        if from_client:
            if session.fin_from_client:
                return
            session.fin_from_client = True
        else:
            if session.fin_from_server:
                return
            session.fin_from_server = True
        both = session.fin_from_client and session.fin_from_server
        self._apply(session, SessionEvent.FIN_OTHER_SIDE if both else SessionEvent.FIN, now, "fin")

    # -- timers --------------------------------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """The earliest time :meth:`on_timer` has work to do, or None."""
        deadlines = [d for d in (self.sessions.next_deadline(), self.labels.next_deadline()) if d is not None]
        return min(deadlines) if deadlines else None

    def on_timer(self, now: float) -> Frames:
        """Expire idle sessions, finish closed ones, release quarantined labels. Returns frames to send (none
        today; the signature keeps drivers alike)."""
        self.labels.on_timer(now)
        timeouts = self.sessions.timeouts
        last_seen = self.switching.last_seen
        for session in self.sessions.due(now):
            if self.sessions.by_c2s(session.c2s) is not session:
                continue  # finished earlier in this round (its server went down with another session's timeout)
            if session.state in FINAL_STATES:
                self._finish(session, now)
                continue
            idle = timeouts.idle(session.proto, session.state)
            if session.state is SessionState.START and session.proto == IPPROTO_TCP:
                last = session.started  # a SYN's retransmissions do not keep an unanswered session alive
            else:
                last = max(last_seen[session.c2s], last_seen[session.s2c])
            if last + idle > now:
                self.sessions.arm(session, last + idle)
                continue
            if session.state is SessionState.START and session.proto == IPPROTO_TCP:
                self._server_failed(session.server, DownReason.NO_REPLY, now)
                if session.state in FINAL_STATES:
                    continue  # interrupted (and finished) when its server went down
            self._apply(session, SessionEvent.IDLE_TIMEOUT, now, "idle_timeout")
            self._finish(session, now)
        return []

    def _finish(self, session: Session, now: float) -> None:
        """Withdraw a final session's labels (they go to quarantine) and take it out of the table."""
        c2s, s2c = session.c2s, session.s2c
        sw = self.switching
        traffic = self._server_traffic.setdefault(session.server.config.name, [0, 0, 0, 0])
        traffic[0] += sw.packets[c2s]
        traffic[1] += sw.packets[s2c]
        traffic[2] += sw.bytes[c2s]
        traffic[3] += sw.bytes[s2c]
        sw.withdraw(c2s)
        sw.withdraw(s2c)
        self.labels.withdraw(c2s, now)
        self.sessions.remove(session)
        self._watch_budget.pop(c2s, None)

    # -- server configuration and state (the control plane) ------------------------------------------------------
    def _server_failed(self, server: Server, reason: DownReason, now: float) -> None:
        if self.pool.record_failure(server, reason):
            self._interrupt(server, now)

    def _interrupt(self, server: Server, now: float) -> None:
        """Claim 6: the sessions of a server that failed or left are interrupted and their labels withdrawn."""
        for session in [s for s in self.sessions.by_label.values() if s.server is server]:
            if session.state not in FINAL_STATES:
                self._apply(session, SessionEvent.SERVER_DOWN, now, "server_down")
            self._finish(session, now)

    def add_server(self, config: ServerConfig) -> Server:
        if self.ports.get(config.port_id) is None or self.ports[config.port_id].role != "server":
            raise ValueError(f"server {config.name!r}: port {config.port_id} is not a server port")
        return self.pool.add(config)

    def remove_server(self, name: str, now: float) -> None:
        server = self.pool.get(name)
        self._interrupt(server, now)
        self.pool.remove(name)

    def mark_down(self, name: str, now: float, reason: DownReason = DownReason.ADMIN) -> None:
        server = self.pool.get(name)
        if self.pool.mark_down(name, reason):
            self._interrupt(server, now)

    def mark_up(self, name: str) -> None:
        self.pool.mark_up(name)

    def drain(self, name: str) -> None:
        self.pool.drain(name)

    def set_weight(self, name: str, weight: int) -> None:
        self.pool.set_weight(name, weight)

    # -- figures -------------------------------------------------------------------------------------------------
    def server_rows(self) -> tuple[ServerRow, ...]:
        sw = self.switching
        live: dict[str, list[int]] = {}
        for session in self.sessions.by_label.values():
            t = live.setdefault(session.server.config.name, [0, 0, 0, 0])
            t[0] += sw.packets[session.c2s]
            t[1] += sw.packets[session.s2c]
            t[2] += sw.bytes[session.c2s]
            t[3] += sw.bytes[session.s2c]
        rows = []
        for server in self.pool.servers:
            name = server.config.name
            done = self._server_traffic.get(name, [0, 0, 0, 0])
            now_ = live.get(name, [0, 0, 0, 0])
            line_card, number = sw.port_place(server.config.port_id)
            rows.append(
                ServerRow(
                    name,
                    str(server.status),
                    server.weight,
                    server.active,
                    server.total,
                    None if server.rt_ewma is None else server.rt_ewma * 1000.0,
                    done[0] + now_[0],
                    done[1] + now_[1],
                    done[2] + now_[2],
                    done[3] + now_[3],
                    line_card,
                    number,
                )
            )
        return tuple(rows)

    def stats(self) -> BalancerStats:
        drops = dict(self.drops)
        for reason, count in self.switching.drops.items():
            drops[reason] = drops.get(reason, 0) + count
        return BalancerStats(
            frames_in=self.frames_in,
            frames_out=self.frames_out,
            fast_path=self.fast_path,
            slow_path=self.slow_path,
            sessions_active=self.live,
            sessions_started=self.sessions.started,
            sessions_peak=self.sessions.peak,
            sessions_ended=dict(self.sessions.ended),
            refused={str(k): v for k, v in self.admission.refused.items() if v},
            drops=drops,
            labels=self.labels.stats(),
            labels_installed=self.switching.installed,
            servers=self.server_rows(),
            l7_hosts=dict(self.l7_hosts),
        )

    def live_sessions(self) -> Sequence[Session]:
        return list(self.sessions.by_label.values())


__all__ = ["Balancer", "BalancerStats", "ServerRow", "ServerStatus"]
