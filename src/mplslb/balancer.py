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
response-time measurement. Every path records each TCP label's last acknowledgment number, and an RST or closing
FIN is believed only when its sequence number lies within ``limits.rst_window`` of the last one the other end sent
(:meth:`Balancer._believed`, the same judge for the frames of every path, since they all come here as reports or
unlabelled frames); one that is not is still forwarded (the endpoint's stack judges it by its own exact state) and
counted, and changes nothing.

A server configured by IP address alone gets its MAC from the neighbour resolver (:mod:`mplslb.resolver`): its
probes leave with the timer's frames, the ARP and neighbour discovery frames arriving on server ports go to it, and
until a server's MAC is known it takes no new session. When a server's MAC changes, the labels of its sessions are
repointed to the new one. A server on an MPLS-in-UDP port is known by the pseudo-MAC of its address.

Malformed or unwanted frames are dropped and counted under a named reason; nothing raises out of ``receive``.
"""

from __future__ import annotations

import heapq
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np

from mplslb.analyzer import SYN_HEAD, Analysis, PacketAnalyzer
from mplslb.balancing.admission import AdmissionControl, Refusal, RefuseWith, reset_frame, tcp_reset
from mplslb.balancing.algorithms import make_algorithm
from mplslb.balancing.servers import DownReason, Server, ServerConfig, ServerPool, ServerStatus
from mplslb.config import (
    BalancerConfig,
    ConfigError,
    PortConfig,
    VirtualService,
    check_server,
    diff_configs,
    server_claims,
)
from mplslb.drivers.mplsudp import pseudo_mac
from mplslb.flow import FlowKey
from mplslb.labels import LabelManager, LabelStats
from mplslb.neighbors import announcement, answer
from mplslb.resolver import MacChange, Resolver
from mplslb.sessions import FINAL_STATES, HALF_OPEN_STATES, Session, SessionEvent, SessionState, SessionTable
from mplslb.state import HEAP, Allocator
from mplslb.switching import (
    DROPPED,
    IPV6_PAYLOAD,
    WATCH_ALL,
    WATCH_TCP_END,
    FastEvent,
    LabelSwitchingTable,
    switch_block,
    switch_frame,
)
from mplslb.switching.block import lead_of, switched_counter
from mplslb.switching.layout import ETH_SRC, IP_AT, TCP_ACK_AT, TCP_FLAGS_UNKNOWN, WATCH_REQUEST
from mplslb.wire.errors import WireError
from mplslb.wire.ethernet import ETH_ALEN, ETH_HLEN
from mplslb.wire.http import HttpRequest
from mplslb.wire.ip import IPPROTO_TCP
from mplslb.wire.tcp import TCPFlag

Frames = list[tuple[int, bytes]]

SYN, ACK, FIN, RST = int(TCPFlag.SYN), int(TCPFlag.ACK), int(TCPFlag.FIN), int(TCPFlag.RST)
_SRC_MAC = slice(ETH_SRC, ETH_SRC + ETH_ALEN)
#: How often a driver need run :meth:`Balancer.on_timer` at most: each run looks at every session's deadline in one
#: vectorised pass (1.5 ms for the whole label space here), and idle timeouts are seconds to minutes, so
#: firing up to this much late changes nothing a client sees.
TIMER_GRANULARITY = 0.05
#: Sessions one :meth:`Balancer.on_timer` takes at most (about 20 µs each): when more are due at once (a server's
#: sessions idling out together), the rest wait for the next call, TIMER_GRANULARITY later, and the loop turns
#: in between.
TIMER_SESSIONS = 2048
#: When this many of a timer run's due sessions are each to be refreshed from the kernel (:attr:`Balancer.refresh`),
#: the run asks the driver to read the kernel's whole map and hand it over first (:attr:`Balancer.catch_up`): one read
#: and the sessions handed over together cost less than their reads one by one (three map lookups each), and a
#: timer that refreshes session by session under load leaves the driver's polls further behind.
CATCH_UP_MIN = 32
#: The flow key a decision taken before its SYN is made with (algorithms that read it decide nothing then).
_NO_FLOW = FlowKey(IPPROTO_TCP, b"", 0, b"", 0)
_new = tuple.__new__  # a NamedTuple's own constructor, without its Python-level call
_TOS_TO_TC = 5  # the MPLS traffic class takes the IP precedence bits (the top 3 of the TOS octet)
_HEADER_RANGE = np.arange(IP_AT, dtype=np.int64)
#: What a SYN of a new session is read from in a block (PacketAnalyzer.plain_syns's rows): the client's MAC, the TOS,
#: the TTL, the IP source and destination, the two ports.
_SYN_FIELDS = struct.Struct("!6x6s3xB6xB3x4s4sHH")
_SYN_IP_END = SYN_HEAD  # such a SYN carries no payload: its IP packet ends with its TCP header
_SYN_FLOW = slice(ETH_HLEN + 12, ETH_HLEN + 24)  # its IP source and destination, then its two ports
_SYN_TOS, _SYN_TTL = ETH_HLEN + 1, ETH_HLEN + 8
_NO_HEADS = np.zeros((0, SYN_HEAD), dtype=np.uint8)
#: The fewest SYNs in a row of a block taken at once: fewer go frame by frame (the numpy calls cost more).
SYN_RUN_MIN = 12
_ACK_FIELD = struct.Struct("!I")
#: Half-open sessions whose kernel record is read before one is evicted, at most per new session.
_EVICTION_CHECKS = 64


def _ack(frame: bytes | memoryview, a: Analysis) -> int:
    """The acknowledgment number of a TCP segment with ACK set and RST clear (what the switching table records for
    its label), or -1."""
    if a.tcp_flags < 0 or a.tcp_flags & (ACK | RST) != ACK:
        return -1
    return int(_ACK_FIELD.unpack_from(frame, a.l4_offset + TCP_ACK_AT)[0])


class WholeSessions(NamedTuple):
    """New TCP sessions a fast path outside the apparatus (the kernel offload) saw from their SYN-ACK to both
    FINs between two of its reads, in the order it hands them over: per session its C2S label; the four times
    :meth:`Balancer.measured` takes (on the balancer's clock), the request's copy and length; then its two FINs,
    the first's label, and for each its sequence number, the other end's last acknowledgment number as the FIN
    passed (as :meth:`Balancer.ended` takes them) and its time."""

    c2s: np.ndarray  # int64
    answer: np.ndarray  # float64, and the three below
    ack: np.ndarray
    request: np.ndarray
    response: np.ndarray
    copies: list[bytes | None]
    lengths: list[int]
    first: np.ndarray  # the label whose FIN came first (int64)
    first_seq: np.ndarray  # int64, and the acknowledgment numbers
    first_ack: np.ndarray
    first_at: np.ndarray  # float64
    second_seq: np.ndarray
    second_ack: np.ndarray
    second_at: np.ndarray


class BlockResult(NamedTuple):
    """What :meth:`Balancer.receive_block` did: per frame the output port of the rewritten frame (-1: none), and
    the frames the one-frame path produced for the others, as ``(index, port, frame)``."""

    out_port: np.ndarray
    extra: list[tuple[int, int, bytes]]


@dataclass
class Traffic:
    """Frames and bytes switched for a server's sessions, client to server (in) and server to client (out)."""

    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def add(self, table: LabelSwitchingTable, session: Session) -> None:
        self.count(*table.traffic(session.c2s), *table.traffic(session.s2c))

    def count(self, packets_in: int, bytes_in: int, packets_out: int, bytes_out: int) -> None:
        self.packets_in += packets_in
        self.bytes_in += bytes_in
        self.packets_out += packets_out
        self.bytes_out += bytes_out


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
    mac: str = ""  # the MAC its frames go to now ("" while unknown)
    neighbor: str = "static"  # configured or MPLS-in-UDP; else the resolver's state (resolving, reachable, ...)


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
    sessions_by_state: dict[str, int]
    refused: dict[str, int]
    drops: dict[str, int]
    labels: LabelStats
    labels_installed: int
    servers: tuple[ServerRow, ...]
    l7_hosts: dict[str, int]
    neighbor_replies: int
    #: Closes not believed: RSTs and closing FINs out of window, ENDING sessions revived (sessions' trust).
    not_believed: dict[str, int] = field(default_factory=dict)


class Balancer:
    """The server load balancing apparatus (claim 1), sans I/O: the five units and their timers, wired."""

    def __init__(self, config: BalancerConfig, *, store: Allocator = HEAP) -> None:
        """``store``: where the tables take their arrays (:mod:`mplslb.state`; by default the heap)."""
        self.config = config
        self.ports: dict[int, PortConfig] = {p.port_id: p for p in config.ports}
        self.vips: dict[bytes, VirtualService] = {v.address: v for v in config.vips}
        # The five units of claim 1.
        self.analyzer = PacketAnalyzer(l7=config.l7)
        self.pool = ServerPool(
            config.servers,
            fail_threshold=config.fail_threshold,
            rt_alpha=config.rt_alpha,
            rt_limit=config.rt_limit,
            passive_window=config.passive_window,
        )
        self.algorithm = make_algorithm(config.algorithm, **dict(config.algorithm_params))
        self.admission = AdmissionControl(
            max_sessions=config.max_sessions,
            max_new_per_second=config.max_new_per_second,
            refuse_with=config.refuse_with,
        )
        self.switching = LabelSwitchingTable(
            {p.port_id: p.mac for p in config.ports},
            {p.port_id: (p.line_card, p.number) for p in config.ports},
            store=store,
        )
        self.sessions = SessionTable(
            config.timeouts,
            on_end=self._session_ended,
            on_revive=self._session_revived,
            c2s_min=config.c2s_min,
            c2s_max=config.c2s_max,
            store=store,
        )
        # A cluster node allocates from its own slice of the label space; its tables span every node's slices, for
        # the sessions its peers replicate to it (mplslb.cluster).
        own = config.cluster.slice() if config.cluster is not None else (config.c2s_min, config.c2s_max)
        self.labels = LabelManager(
            quarantine=config.label_quarantine,
            quarantine_min=min(config.label_quarantine_min, config.label_quarantine),
            c2s_min=own[0],
            c2s_max=own[1],
            store=store,
        )
        #: At most this many half-open TCP sessions: a new SYN beyond evicts the oldest.
        self.max_half_open = max(1, int(self.sessions.rows * config.half_open_share))
        #: Set by a driver that runs active health checks: passive health then only suspects a server (counted in
        #: :attr:`Server.suspected`) and the checks' verdict decides.
        self.confirm_passive = False
        #: TCP segments of no session answered with an RST from the VIP (``reset_on_down``).
        self.resets_sent = 0
        self.frames_in = 0
        self.frames_out = 0
        self.fast_path = 0
        self.slow_path = 0
        self.drops: dict[str, int] = {}
        self.l7_hosts: dict[str, int] = {}  # sessions by the Host of their first HTTP request (L7 analysis)
        self.neighbor_replies = 0
        # Per server: the traffic of its ended sessions (live sessions are read from the switching table).
        self._ended_traffic: dict[str, Traffic] = {}
        self._events: list[FastEvent] = []
        #: While more sessions are due than one on_timer takes: when the next call should come (see next_deadline).
        self._timer_backlog: float | None = None
        self.resolver = Resolver(
            {p.port_id: (p.mac, p.address if len(p.address) == 4 else b"")
             for p in config.ports if p.role == "server" and p.kind == "ethernet"},
            config.neighbors,
        )  # fmt: skip
        #: Told of every change of a server's MAC (found, moved, lost); the driver logs it, the core never does.
        self.on_mac: Callable[[MacChange], None] | None = None
        #: Set by a driver whose kernel offload records sessions' response-time measurements and FINs in its map
        #: (:mod:`mplslb.offload.xdp`): called with a session whose measurement is under way, or a TCP session,
        #: before anything else about it is decided, so that what the kernel saw first reaches the table first
        #: (:meth:`measured`, :meth:`ended`).
        self.refresh: Callable[[Session], None] | None = None
        #: Set with :attr:`refresh`: which of the given sessions' C2S labels :attr:`refresh` would hand nothing
        #: for (a mask); the others are refreshed one by one before their timers are judged.
        self.settled: Callable[[np.ndarray], np.ndarray] | None = None
        #: Set with :attr:`refresh`: fold what the kernel counted on a pair's two labels since its last poll into
        #: the switching table now (given the C2S label), before the pair's session is judged idle.
        self.recount: Callable[[int], None] | None = None
        #: Set with :attr:`refresh`: hand over now everything the kernel holds of every session (a poll read and
        #: handed over whole) if that costs less than refreshing the given number of sessions one by one, given the
        #: time and that number; True if it did. Called by :meth:`on_timer` before :data:`CATCH_UP_MIN` or more
        #: due sessions would be refreshed one by one.
        self.catch_up: Callable[[float, int], bool] | None = None
        for server in self.pool.servers:
            self._find(server)

    @property
    def live(self) -> int:
        """Sessions not yet closed, interrupted or ending."""
        return self.sessions.live

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
        (unlabelled, tagged, or a labelled frame to drop) goes through the one-frame path, but for runs of SYNs of
        new sessions, opened together (:meth:`_open_syns`); what they send is in ``result.extra`` as ``(i, port,
        frame)``, in frame order. Listing, for each i in order, the block's frame and then the extras of i gives
        exactly what :meth:`receive` gives frame by frame: the frames that touch session state (the one-frame
        path's, the runs', and switched ones with reports) run in frame order with the switched frames counted up
        to each, and a switched frame whose label an earlier frame withdrew or rebound is put back as it came and
        taken frame by frame.
        """
        n = len(starts)
        starts = np.ascontiguousarray(starts, dtype=np.int64)
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        # What the bulk rewrite changes in a frame (addresses, TTL), kept to undo it for a frame whose label an
        # earlier frame of the block withdrew or rebound (see below).
        saved = np.empty((n, IP_AT), dtype=np.uint8)  # each switched frame's header as it came (the switch fills it)
        planned_at = self.switching.version
        events: list[FastEvent] = []
        report_rows: list[int] = []
        # The switch counts the block's lead itself (the frames before the first one that touches the session state,
        # while their rows are in the cache); the others are counted below, in order with what touches the state.
        verdict = switch_block(
            self.switching, buf, starts, lengths, ports, now, events, count="lead", report_rows=report_rows, saved=saved
        )
        unswitched = np.flatnonzero(~verdict.switched)
        done = lead_of(unswitched, n, report_rows)
        switched = verdict.switched.copy()
        out_port = verdict.out_port.copy()
        labels, acks = np.ascontiguousarray(verdict.labels, np.int64), np.ascontiguousarray(verdict.acks, np.uint64)
        count = switched_counter(self.switching, switched, labels, lengths, acks)
        generation = self.switching.arrays().generation
        planned = verdict.generations
        reports = dict(zip(report_rows, events, strict=True))  # a reported frame's one report, in frame order
        # Frames that touch the session state, in frame order: the ones the block path left to the one-frame path
        # and the switched ones with reports. Switched frames are counted up to each of them before it runs, so
        # the table is always as frame-by-frame processing would have it.
        actions = sorted(unswitched.tolist() + report_rows)  # two ascending runs of distinct frames: a heap
        extra: list[tuple[int, int, bytes]] = []
        out: Frames = []
        # SYNs of new sessions, read at once: a run of them in a row of actions is opened at once (_open_syns).
        syn_row, syn_heads = self._syn_rows(buf, starts, lengths, unswitched)
        single: set[int] = set()  # SYNs for the one-frame path: the first of a run _open_syns did not take
        while actions:
            i = heapq.heappop(actions)
            if i in syn_row and i not in single:
                run = [i]
                while actions and actions[0] in syn_row:
                    run.append(heapq.heappop(actions))
                taken = 0
                if len(run) >= SYN_RUN_MIN:
                    count(done, i + 1, now)
                    done = i + 1
                    heads = syn_heads[[syn_row[j] for j in run]]
                    taken = self._open_syns(run, heads, buf, starts, lengths, ports, now, extra)
                for j in run[taken:]:
                    heapq.heappush(actions, j)
                if taken < len(run):
                    single.add(run[taken])
                if not taken:
                    continue
                count(done, run[taken - 1] + 1, now)
                done = run[taken - 1] + 1
            else:
                count(done, i + 1, now)
                done = i + 1
                reported = reports.pop(i, None)  # the frames to act on are the unswitched and the reported ones
                if reported is not None:
                    self._events = [reported]
                    self._handle_events()
                else:
                    start = int(starts[i])
                    self._receive(int(ports[i]), buf[start : start + int(lengths[i])].tobytes(), now, out)
                    extra.extend((i, port, frame) for port, frame in out)
                    out.clear()
            if self.switching.version != planned_at:
                planned_at = self.switching.version
                later = np.flatnonzero(switched[done:]) + done
                stale = later[generation[labels[later]] != planned[later]]
                for j in stale.tolist():  # its label changed under it: undo the switch, take it frame by frame
                    buf[int(starts[j]) + _HEADER_RANGE] = saved[j]
                    switched[j] = False
                    out_port[j] = -1
                    reports.pop(j, None)
                    if j not in actions:
                        heapq.heappush(actions, j)
        count(done, n, now)
        taken = int(switched.sum())
        self.frames_in += taken
        self.frames_out += taken
        self.fast_path += taken
        return BlockResult(out_port, extra)

    def _syn_rows(
        self, buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray, unswitched: np.ndarray
    ) -> tuple[dict[int, int], np.ndarray]:
        """The SYNs of new sessions among a block's ``unswitched`` frames, read at once by
        :meth:`PacketAnalyzer.plain_syns`: each one's frame index and its row in the second array, their first
        octets. None is read when the block leaves fewer frames than a run to the one-frame path, or another unit
        is told of each session or label as it comes (a cluster's replication, the kernel offload's mirrors)."""
        if len(unswitched) < SYN_RUN_MIN or self.sessions.on_change is not None or self.switching.mirrors:
            return {}, _NO_HEADS
        frames, heads = self.analyzer.plain_syns(buf, starts, lengths, unswitched)
        return {frame: row for row, frame in enumerate(frames.tolist())}, heads

    def _open_syns(
        self,
        run: list[int],
        heads: np.ndarray,
        buf: np.ndarray,
        starts: np.ndarray,
        lengths: np.ndarray,
        ports: np.ndarray,
        now: float,
        extra: list[tuple[int, int, bytes]],
    ) -> int:
        """What :meth:`_receive` does with each frame of ``run`` (frames of a block in a row that
        :meth:`_syn_rows` found to be SYNs; ``heads`` their first octets), in order, for as long as each is a new
        session's that :meth:`_new_session` would open or refuse (its port a client's, its flow new and to a
        virtual service; a half-open session evicted to make room only if it is one of the table's): the decisions
        one by one (:meth:`_decide`), the sessions' rows and labels written together (``SessionTable.open_block``,
        ``LabelSwitchingTable.install_pairs``), then each SYN sent on. Returns how many of the run's first frames
        it took; the next one is for the one-frame path."""
        sessions, vips, roles = self.sessions, self.vips, self.ports
        data = heads.tobytes()
        unpack = _SYN_FIELDS.unpack_from
        opened: set[FlowKey] = set()
        pending: list[tuple[int, int, FlowKey, int, Server]] = []  # (frame, its row in heads, key, C2S, server)
        taken = 0
        for at, (i, port) in enumerate(zip(run, ports[run].tolist(), strict=True)):
            role = roles.get(port)
            if role is None or role.role != "client":
                break
            _, _, _, src, dst, sport, dport = unpack(data, at * SYN_HEAD)
            vip = vips.get(dst)
            if vip is None or not vip.serves(IPPROTO_TCP, dport):
                break
            key = _new(FlowKey, (IPPROTO_TCP, src, sport, dst, dport))
            if key in opened or sessions.lookup(key) is not None:
                break
            oldest = None
            if sessions.half_open + len(pending) >= self.max_half_open:
                # The oldest half-open session makes room once this SYN is admitted, as in _new_session: one of the
                # table's, older than the run's (with none, or with the kernel's records to consult, the run stops).
                oldest = sessions.oldest_half_open() if self.refresh is None else None
                if oldest is None:
                    break
            decided = self._decide(key, sessions.live + len(pending) - (oldest is not None), now, oldest)
            taken += 1
            self.frames_in += 1
            self.slow_path += 1
            if isinstance(decided, Refusal):
                self._send_syns(pending, data, lengths, ports, now, extra)
                pending.clear()
                start = int(starts[i])
                frame = buf[start : start + int(lengths[i])].tobytes()
                out: Frames = []
                self._refuse(decided, port, frame, self.analyzer.analyze(frame), out)
                extra.extend((i, port, sent) for port, sent in out)
                self.frames_out += len(out)
                continue
            c2s, server = decided
            self.pool.session_started(server)
            opened.add(key)
            pending.append((i, at, key, c2s, server))
        self._send_syns(pending, data, lengths, ports, now, extra)
        return taken

    def _send_syns(
        self,
        pending: list[tuple[int, int, FlowKey, int, Server]],
        data: bytes,
        lengths: np.ndarray,
        ports: np.ndarray,
        now: float,
        extra: list[tuple[int, int, bytes]],
    ) -> None:
        """Open the sessions :meth:`_open_syns` decided, install their labels, and send each SYN to its server."""
        if not pending:
            return
        frames, rows, keys, c2s, servers = (list(column) for column in zip(*pending, strict=True))
        heads = np.frombuffer(data, dtype=np.uint8).reshape(-1, SYN_HEAD)[rows]
        client_ports = ports[frames].astype(np.int32)
        client_macs = heads[:, ETH_SRC : ETH_SRC + ETH_ALEN]
        self.sessions.open_block(
            keys, c2s, servers, client_ports=client_ports.tolist(), client_macs=client_macs.tobytes(), ip_version=4,
            now=now,
        )  # fmt: skip
        c2s_watch, s2c_watch = self._watch(True, 4, True)
        labels = np.array(c2s, dtype=np.int64)
        server_ports = [server.config.port_id for server in servers]
        self.switching.install_pairs(
            labels,
            client_ports=client_ports,
            client_macs=client_macs,
            server_ports=np.array(server_ports, dtype=np.int32),
            server_macs=np.frombuffer(b"".join(server.mac for server in servers), dtype=np.uint8).reshape(-1, ETH_ALEN),
            flows=heads[:, _SYN_FLOW],
            c2s_watch=c2s_watch,
            s2c_watch=s2c_watch,
            seen=now,
        )
        sent = self.switching.send_many(
            labels, heads[:, ETH_HLEN:_SYN_IP_END], lengths[frames], now, ttl=heads[:, _SYN_TTL],
            tc=heads[:, _SYN_TOS] >> _TOS_TO_TC,
        ).tobytes()  # fmt: skip
        size = len(sent) // len(pending)
        for at, (i, port) in enumerate(zip(frames, server_ports, strict=True)):
            extra.append((i, port, sent[at * size : (at + 1) * size]))
        self.frames_out += len(pending)

    def _receive(self, port: int, frame: bytes | memoryview, now: float, out: Frames) -> None:
        self.frames_in += 1
        role = self.ports.get(port)
        if role is None:
            self._drop("unknown_port")
            return
        # The session label inspecting unit (claim 2): a labelled frame is switched on its label alone (claim 9).
        result = switch_frame(self.switching.hot, port, frame, now, out, self._events)
        if result >= 0:  # one frame out; the reports that follow send nothing
            self.fast_path += 1
            self.frames_out += 1
            if self._events:
                self._handle_events()
            return
        before = len(out)
        if result != DROPPED:
            self.slow_path += 1
            try:
                analysis = self.analyzer.analyze(frame)
            except WireError as exc:  # no packet of a flow: it may be a neighbour's (ARP, neighbour discovery)
                if role.role == "client":
                    reply = answer(frame, self.vips, role.mac)  # a question about a VIP
                    if reply is not None:
                        self.neighbor_replies += 1
                        out.append((port, reply))
                    else:
                        self._drop(exc.reason)
                elif not self._from_neighbor(port, frame, now):
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
            session = self.sessions.lookup(key.reversed())
            if session is None:
                self._drop("icmp_no_session")
                return
            self._to_server(session.c2s, frame, a, now, out)
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
        if session is not None:  # claim 2: an existing session's packet goes to its server
            self._refresh(session)
            # The binding its labels have: the client's port and MAC (nobody else's SYN can end or take it).
            if port != session.client_port or frame[_SRC_MAC] != session.client_mac:
                self._drop("session_wrong_source")
                return
            if pure_syn and session.state is SessionState.ENDING:
                # A new connection on the flow of one that closed (its client port came back while the close
                # lingered): the closed one ends now and the new one is balanced as any other, with its own labels,
                # as IPVS's conn_reuse_mode does. Its late frames meet a quarantined label.
                self.sessions.apply(session, SessionEvent.QUIET, now, "reused")
                self._finish(session, now)
                self._new_session(port, frame, a, now, out)
                return
            if a.payload_len and self.sessions.request_seen(session, now):
                self._learn_l7(a.http)
            self._to_server(session.c2s, frame, a, now, out)
            if key.proto == IPPROTO_TCP and a.tcp_flags > 0:
                if self.sessions.client_ack(session, a.tcp_flags, now):
                    self._handshake_done(session)
                if a.tcp_flags & (FIN | RST):
                    self._tcp_end(session, a.tcp_flags, True, a.tcp_seq, now)
            return
        if key.proto == IPPROTO_TCP and not pure_syn:
            self._drop("tcp_no_session")
            if self.config.reset_on_down and not a.tcp_flags & RST:
                self._reset(port, frame, a, out)
            return
        self._new_session(port, frame, a, now, out)

    def _reset(self, port: int, frame: bytes | memoryview, a: Analysis, out: Frames) -> None:
        """Answer a client's TCP segment of no session (its server went down, or it was forgotten) as a host
        answers a segment of no connection: an RST from the VIP, exact when the segment carries an ACK."""
        ack = _ACK_FIELD.unpack_from(frame, a.l4_offset + 8)[0] if a.tcp_flags & ACK else None
        occupied = a.payload_len + (1 if a.tcp_flags & FIN else 0)
        packet = tcp_reset(a.key, ip_version=a.ip_version, seq=a.tcp_seq, ack=ack, syn=False, payload_len=occupied)
        mac = bytes(frame[_SRC_MAC])
        out.append((port, reset_frame(packet, ip_version=a.ip_version, client_mac=mac, port_mac=self.ports[port].mac)))
        self.resets_sent += 1

    def _new_session(self, port: int, frame: bytes | memoryview, a: Analysis, now: float, out: Frames) -> None:
        """Claims 4, 7, 8, 11: admission, a server, a label pair, both labels installed, the frame sent on."""
        tcp = a.key.proto == IPPROTO_TCP
        sessions = self.sessions
        # Half-open sessions' share used up: the oldest makes room, once this SYN is admitted (a refused SYN evicts
        # nobody).
        oldest = self._oldest_half_open() if tcp and sessions.half_open >= self.max_half_open else None
        decided = self._decide(a.key, sessions.live - (oldest is not None), now, oldest)
        if isinstance(decided, Refusal):
            self._refuse(decided, port, frame, a, out)
            return
        c2s, server = decided
        client_mac = bytes(frame[_SRC_MAC])
        key = a.key
        session = sessions.open(
            key, c2s, server, client_port=port, client_mac=client_mac, ip_version=a.ip_version, now=now
        )
        if a.payload_len and sessions.request_seen(session, now):
            self._learn_l7(a.http)
        self.pool.session_started(server)
        self._install_labels(c2s, key, server, port, client_mac, a.ip_version, True, now, now)
        self._to_server(c2s, frame, a, now, out)

    def _decide(
        self, key: FlowKey, active: int, now: float, oldest: Session | None = None
    ) -> tuple[int, Server] | Refusal:
        """Admission with ``active`` live sessions, a server and a label pair for a new session of ``key``, or why
        it is refused. ``oldest``: the half-open session it evicts once admitted."""
        refusal = self.admission.admit(active_sessions=active, labels_free=self.labels.free_at(now), now=now)
        if refusal is not None:
            return refusal
        if oldest is not None:
            self.sessions.apply(oldest, SessionEvent.EVICTED, now, "half_open_evicted")
            self._finish(oldest, now)
        server = self.algorithm.choose(self.pool, key, now)
        if server is None:
            return self.admission.refusal_for_no_server(self.pool)
        c2s = self.labels.allocate(now)
        if c2s is None:
            return Refusal.LABELS_EXHAUSTED
        return c2s, server

    def _refuse(self, refusal: Refusal, port: int, frame: bytes | memoryview, a: Analysis, out: Frames) -> None:
        """Count a refused new session and answer its client as the admission control says."""
        self.admission.count(refusal)
        if refusal is Refusal.SERVER_LIMIT:  # charged to the servers whose own limits refused it
            for full in self.pool:
                if full.in_service and not full.eligible:
                    self.pool.session_refused(full)
        refused = self.admission.answer(
            a.key,
            ip_version=a.ip_version,
            tcp_seq=a.tcp_seq,
            payload_len=a.payload_len,
            datagram=bytes(frame[a.ip_offset : a.ip_end]),
            client_mac=bytes(frame[_SRC_MAC]),
            port_mac=self.ports[port].mac,
        )
        if refused is not None:
            out.append((port, refused))

    # -- new TCP sessions decided ahead of their SYN (the kernel offload's tickets, offload_syn) ------------------
    def pre_decide(self, outstanding: int, now: float) -> tuple[int, Server] | str:
        """What :meth:`_new_session` decides for a TCP SYN with ``outstanding`` such decisions not yet taken, decided
        before the SYN comes (admission with the room they leave, a server, a label pair), or why none can be (the
        reason :meth:`_new_session` would refuse one, or ``half_open`` when the half-open share is used up: a SYN
        then evicts the oldest, which only this path does). The chosen server counts the session at once, so the
        next decision sees it; an algorithm that reads the flow key decides nothing (``keyed``)."""
        if self.algorithm.keyed:
            return "keyed_algorithm"
        sessions = self.sessions
        if sessions.half_open + outstanding >= self.max_half_open:
            return "half_open"
        refusal = self.admission.admit(
            active_sessions=sessions.live + outstanding, labels_free=self.labels.free_at(now), now=now
        )
        if refusal is not None:
            return refusal.value
        server = self.algorithm.choose(self.pool, _NO_FLOW, now)
        if server is None:
            return self.admission.refusal_for_no_server(self.pool).value
        c2s = self.labels.allocate(now)
        if c2s is None:
            return Refusal.LABELS_EXHAUSTED.value
        self.pool.session_started(server)
        return c2s, server

    def open_decided(
        self, c2s: int, server: Server, key: FlowKey, port: int, client_mac: bytes, ip_version: int, now: float
    ) -> Session | None:
        """The session a decision of :meth:`pre_decide` became when its SYN (``key`` from ``client_mac`` on
        ``port`` at ``now``) was sent to ``server`` elsewhere, as :meth:`_new_session` opens one; None when the
        flow is a live session's (the decision is then to be given back). A session of the flow that is ending
        (the kernel took the SYN once its flow left the flow map) ends as a reused flow's, as in :meth:`_from_client`
        for a SYN from its client; one from anywhere else is dropped there (``session_wrong_source``)."""
        existing = self.sessions.lookup(key)
        if existing is not None:
            self._refresh(existing)  # what the kernel recorded of it first
            if port != existing.client_port or client_mac != existing.client_mac:
                self._drop("session_wrong_source")
                return None
            if existing.state is not SessionState.ENDING:
                return None
            self.sessions.apply(existing, SessionEvent.QUIET, now, "reused")
            self._finish(existing, now)
        session = self.sessions.open(
            key, c2s, server, client_port=port, client_mac=client_mac, ip_version=ip_version, now=now
        )
        self._install_labels(c2s, key, server, port, client_mac, ip_version, True, now, now)
        return session

    def release_decided(self, c2s: int, server: Server, now: float, *, carried: bool = True) -> None:
        """Give back a decision of :meth:`pre_decide` that no session was opened on: its server's count, its labels
        (to quarantine, as an ended session's, when a frame may have carried them: a SYN was taken under them;
        straight back to the free ones when none can have: they never reached the kernel, or were drained from its
        queue untaken)."""
        self.pool.session_withdrawn(server)
        if carried:
            self.labels.withdraw(c2s, now)
        else:
            self.labels.give_back(c2s, now)

    def install_labels(
        self, session: Session, now: float, *, watched: bool = True, seen: tuple[float, float] | None = None
    ) -> None:
        """Install a session's two labels, bound to where their frames may come from: the client's port, MAC and
        flow for C2S, the server's port, MAC and the VIP for S2C. ``watched``: its frames report to the session
        manager for the response-time measurement and the handshake (a new session); otherwise TCP's FIN and RST
        only (a session replicated from a peer, whose labels were last seen at ``seen``, C2S and S2C)."""
        c2s_seen, s2c_seen = seen or (now, now)
        self._install_labels(
            session.c2s, session.key, session.server, session.client_port, session.client_mac,
            session.ip_version, watched, c2s_seen, s2c_seen,
        )  # fmt: skip

    def _install_labels(
        self,
        c2s: int,
        key: FlowKey,
        server: Server,
        port: int,
        client_mac: bytes,
        ip_version: int,
        watched: bool,
        c2s_seen: float,
        s2c_seen: float,
    ) -> None:
        """:meth:`install_labels` with the session's fields at hand (a new session's, before its row is read)."""
        c2s_watch, s2c_watch = self._watch(key.proto == IPPROTO_TCP, ip_version, watched)
        self.switching.install_pair(
            c2s,
            client_port=port,
            client_mac=client_mac,
            server_port=server.config.port_id,
            server_mac=server.mac,
            key=key,
            c2s_watch=c2s_watch,
            s2c_watch=s2c_watch,
            c2s_seen=c2s_seen,
            s2c_seen=s2c_seen,
        )

    def _watch(self, tcp: bool, ip_version: int, watched: bool) -> tuple[int, int]:
        """A session's labels' watch bits (C2S, S2C): TCP's FIN and RST, and for a ``watched`` session every frame
        until the client's ACK completes the handshake (and the request is seen, for L7 analysis)."""
        v6 = IPV6_PAYLOAD if ip_version == 6 else 0
        end_watch = WATCH_TCP_END if tcp else 0
        c2s_watch = end_watch | v6 | (WATCH_ALL if tcp and watched else 0)
        if self.analyzer.l7 and watched:
            c2s_watch |= WATCH_REQUEST
        return c2s_watch, end_watch | v6 | (WATCH_ALL if watched else 0)

    def _learn_l7(self, http: HttpRequest | None) -> None:
        """Count a session's first request by its Host (L7 analysis)."""
        if http is not None:
            host = http.host or "(no host)"
            self.l7_hosts[host] = self.l7_hosts.get(host, 0) + 1

    def _to_server(self, c2s: int, frame: bytes | memoryview, a: Analysis, now: float, out: Frames) -> None:
        """Send a client's frame to its session's server under the session's C2S label."""
        tc = a.tos >> _TOS_TO_TC
        self.switching.send(c2s, frame, a.ip_offset, a.ip_end, now, out, ttl=a.ttl, tc=tc, ack=_ack(frame, a))

    def _from_server(self, port: int, frame: bytes | memoryview, a: Analysis, now: float, out: Frames) -> None:
        # A server's unlabelled reply (or its ICMP error about a client's datagram) still finds its session.
        session = self.sessions.lookup(a.key if a.icmp_error else a.key.reversed())
        if session is None:
            self._drop("unlabelled_from_server")
            return
        self._refresh(session)
        server = session.server
        if server.config.port_id != port or bytes(frame[_SRC_MAC]) != server.mac:
            self._drop("server_wrong_source")
            return
        self.switching.send(session.s2c, frame, a.ip_offset, a.ip_end, now, out, ttl=a.ttl, ack=_ack(frame, a))

    # -- reports from the fast path ------------------------------------------------------------------------------
    def _handle_events(self) -> None:
        events, self._events = self._events, []
        sessions = self.sessions
        for event in events:
            label = event.label
            session = sessions.by_c2s((label - 1) | 1)  # the pair's C2S label, odd (labels.pair_of)
            if session is None or session.state in FINAL_STATES:
                continue
            if self.refresh is not None:
                self._refresh(session)
            from_client = label & 1 == 1
            flags, a = event.tcp_flags, None
            if flags & TCP_FLAGS_UNKNOWN:  # IPv6 extension headers hid them from the fast path: read the frame
                a = self._analyze_report(event)
                flags = a.tcp_flags if a is not None and a.tcp_flags > 0 else 0
            if flags & RST:
                if not from_client and session.state is SessionState.START:
                    self._server_failed(session.server, DownReason.REFUSED, event.now)
            elif self.switching.watch[label] & WATCH_ALL:
                # Time the server's responses from the session's own frames (the session table keeps the measurement).
                a = a or self._analyze_report(event)
                tcp_flags, payload = (a.tcp_flags, a.payload_len) if a is not None else (-1, 0)
                self._observe(session, from_client, tcp_flags, payload, event.now, a.http if a is not None else None)
            # Only an RST or a FIN can close (SessionTable.closes, tcp_end: nothing to do for any other segment).
            if flags & (FIN | RST) and session.state not in FINAL_STATES and session.proto == IPPROTO_TCP:
                seq = None
                if sessions.closes(session, flags, from_client=from_client):  # judged: its sequence number is read
                    a = a or self._analyze_report(event)
                    seq = a.tcp_seq if a is not None and a.tcp_flags >= 0 else None
                self._tcp_end(session, flags, from_client, seq, event.now)

    def ended(self, label: int, seq: int, ack: int, now: float) -> None:
        """A FIN that a fast path outside the apparatus (the kernel offload) forwarded under ``label`` at ``now``,
        with sequence number ``seq``, when the last acknowledgment number of the session's other label was ``ack``
        (``ACK_KNOWN |`` the number, 0: none): judged and applied as the same FIN reported by the fast path is, by
        that number. The fast path takes a FIN only while neither label is watched (nothing to observe), and the
        driver hands it over before anything later about the session is decided (:attr:`refresh`)."""
        session = self.sessions.by_c2s((label - 1) | 1)  # the pair's C2S label, odd (labels.pair_of)
        if session is None or session.state in FINAL_STATES or session.proto != IPPROTO_TCP:
            return
        self._tcp_end(session, FIN, label & 1 == 1, seq, now, ack)

    def _tcp_end(
        self, session: Session, flags: int, from_client: bool, seq: int | None, now: float, ack: int | None = None
    ) -> None:
        """An RST or FIN (``flags``) of a TCP session from one side: judged (:meth:`_believed`), then applied."""
        if self._believed(session, flags, from_client, seq, ack):
            self.sessions.tcp_end(session, flags, from_client=from_client, now=now)

    def _believed(
        self, session: Session, flags: int, from_client: bool, seq: int | None, ack: int | None = None
    ) -> bool:
        """May this RST or FIN (``flags``, sequence number ``seq``, None when unreadable) change the session's state?
        Only one that would not end it, or one within ``rst_window`` of the last acknowledgment number the other
        end sent (``ack`` when given, as it was when the segment passed, else the switching table's), or any before
        the other end has acknowledged anything; any other is counted and changes nothing."""
        if not self.sessions.closes(session, flags, from_client=from_client):
            return True
        acks = session.s2c if from_client else session.c2s
        if self.switching.in_window(acks, seq, self.config.rst_window, ack):
            return True
        self.sessions.disbelieve(flags)
        return False

    def _analyze_report(self, event: FastEvent) -> Analysis | None:
        """A reported frame's analysis; a server's frame is read without L7 (only a client's request is)."""
        try:
            return self.analyzer.analyze_ip(event.frame, event.ip_offset, l7=event.label & 1 == 1)
        except WireError:
            return None

    def _observe(
        self,
        session: Session,
        from_client: bool,
        tcp_flags: int,
        payload_len: int,
        now: float,
        http: HttpRequest | None,
    ) -> None:
        seen = self.sessions.observe(
            session, from_client=from_client, tcp_flags=tcp_flags, payload_len=payload_len, now=now
        )
        server = session.server
        if seen.response_time is not None:
            self.pool.record_response_time(server, seen.response_time)
        if seen.server_replied:
            self.pool.record_success(server, now)
        if seen.request_seen:
            self._learn_l7(http)
        if seen.done:
            self.switching.clear_watch(session.s2c, WATCH_ALL)
        if seen.request_seen or seen.done or seen.handshake_done:
            self._handshake_done(session)

    def measured(
        self,
        c2s: int,
        answer: float,
        ack: float,
        request: float,
        response: float,
        over: bool,
        copy: bytes | None = None,
        length: int = 0,
    ) -> bool:
        """What a fast path outside the apparatus (the kernel offload) recorded of a session's watched frames, as
        times on the balancer's clock (0: not seen): the server's first answer, the client's latest pure ACK, the
        first request, the first response byte after it, and whether the measurement's budget is spent. Each is
        observed as the frame that carried it would have been (:meth:`SessionTable.observe`), in the order they
        came; what the table already had (from frames that reached this path) is not observed twice. An answer
        timed before the session's start (a start set again after the answer, as a daemon adopting its sessions
        does) moves the session on without a sample.

        Under ``WATCH_REQUEST`` L7 analysis reads the request: from ``copy``, the first octets of its payload (of
        ``length`` octets) the fast path copied (:meth:`PacketAnalyzer.read_copy`), or, without one, from the
        request's frame, which then comes up to this path itself: until it has, the request and the response are
        left for later, and False says the record should be handed over again."""
        session = self.sessions.by_c2s(c2s)
        if session is None or session.state in FINAL_STATES:
            return True
        if answer and ack and request and response and self._whole_exchange(session, answer, ack, request, response,
                                                                             copy, length):  # fmt: skip
            return True
        started = session.started
        flags = ACK if session.proto == IPPROTO_TCP else -1
        if answer and session.state is SessionState.START:
            if answer > started:
                self._observe(session, False, SYN | ACK if flags > 0 else -1, 0, answer, None)
            else:
                self.sessions.apply(session, SessionEvent.SYN_ACK if flags > 0 else SessionEvent.SERVER_REPLY, started)
                self.pool.record_success(session.server, started)
        if flags > 0 and ack > answer and session.state is SessionState.ANSWERED:
            self._observe(session, True, ACK, 0, ack, None)
        if request and not session.request_at:
            http = None
            if self.switching.watch[c2s] & WATCH_REQUEST and session.rt_pending:
                if copy is None:
                    return False  # its frame is on its way here
                http = self.analyzer.read_copy(copy, length)
            self._observe(session, True, flags, 1, request, http)
        if response > session.request_at > 0 and response >= request and session.rt_pending:
            self._observe(session, False, flags, 1, response, None)
        if over and session.rt_pending and session.state not in FINAL_STATES:
            self.sessions.stop_measuring(session)
            self.switching.clear_watch(session.s2c, WATCH_ALL)
            self._handshake_done(session)
        return True

    def closed(self, whole: WholeSessions) -> int:
        """:meth:`measured` with each session's whole exchange, then :meth:`ended` with its first FIN and its
        other, for as many of ``whole``'s sessions from the first as are such a plain close: the exchange one
        :meth:`SessionTable.whole_exchange` takes, the request's copy there if L7 analysis wants it, each FIN
        believed. Their transitions are made over the session table's arrays at once
        (:meth:`SessionTable.close_whole`), their samples and L7 figures recorded session by session in order;
        what they leave is what the calls one at a time leave. Returns how many were taken: the caller hands the
        rest over one call at a time."""
        c2s = whole.c2s
        if not c2s.size:
            return 0
        sessions, switching = self.sessions, self.switching
        pairs = (c2s - sessions.c2s_min) >> 1
        ok = (c2s & 1) == (sessions.c2s_min & 1)
        ok &= sessions.whole_exchanges(pairs, whole.answer, whole.ack, whole.request, whole.response)
        wants = (switching.arrays().watch[c2s] & WATCH_REQUEST) != 0
        ok &= ~wants | np.fromiter((copy is not None for copy in whole.copies), dtype=np.bool_, count=c2s.size)
        window = self.config.rst_window
        # a server's first FIN is not judged (SessionTable.closes); a client's first, and the FIN after the other
        # side's, are
        ok &= (whole.first != c2s) | switching.in_windows(whole.first_seq, whole.first_ack, window)
        ok &= switching.in_windows(whole.second_seq, whole.second_ack, window)
        taken = int(ok.size) if ok.all() else int(np.argmin(ok))
        if not taken:
            return 0
        pool, analyzer = self.pool, self.analyzer
        answers, requests = whole.answer[:taken].tolist(), whole.request[:taken].tolist()
        responses, watch_request = whole.response[:taken].tolist(), wants[:taken].tolist()
        started = sessions.start_times(pairs[:taken]).tolist()
        copies, lengths = whole.copies, whole.lengths
        at = 0

        def each(session: Session) -> None:  # Balancer._whole_exchange's part, in its order
            nonlocal at
            i, at = at, at + 1
            server, answer, label = session.server, answers[i], session.c2s
            pool.record_response_time(server, answer - started[i])
            pool.record_success(server, answer)
            copy = copies[i]
            if watch_request[i] and copy is not None:
                self._learn_l7(analyzer.read_copy(copy, lengths[i]))
            switching.clear_watch(label, WATCH_ALL | WATCH_REQUEST)
            pool.record_response_time(server, responses[i] - requests[i])
            switching.clear_watch(label + 1, WATCH_ALL)

        first = whole.first_at[:taken]
        sessions.close_whole(pairs[:taken], whole.ack[:taken], whole.request[:taken], first, whole.second_at[:taken],
                             each)  # fmt: skip
        return taken

    def _whole_exchange(
        self, session: Session, answer: float, ack: float, request: float, response: float, copy: bytes | None,
        length: int,
    ) -> bool:  # fmt: skip
        """:meth:`measured` for a new TCP session's whole exchange at once (:meth:`SessionTable.whole_exchange`), as
        the four frames' observations one at a time would leave it; False when it is not one (nothing changed)."""
        c2s = session.c2s
        switching = self.switching
        watch_request = switching.watch[c2s] & WATCH_REQUEST
        if watch_request and copy is None:
            return False
        samples = self.sessions.whole_exchange(session, answer, ack, request, response)
        if samples is None:
            return False
        server, pool = session.server, self.pool
        pool.record_response_time(server, samples[0])
        pool.record_success(server, answer)
        if watch_request and copy is not None:
            self._learn_l7(self.analyzer.read_copy(copy, length))
        switching.clear_watch(c2s, WATCH_ALL | WATCH_REQUEST)
        pool.record_response_time(server, samples[1])
        switching.clear_watch(c2s + 1, WATCH_ALL)
        return True

    def _refresh(self, session: Session) -> None:
        """Have the driver hand over what its kernel recorded of ``session``: its measurement while it is on, and a
        TCP session's FINs."""
        if self.refresh is not None and (
            session.proto == IPPROTO_TCP
            or self.switching.watch[session.c2s] & WATCH_ALL
            or self.switching.watch[session.s2c] & WATCH_ALL
        ):
            self.refresh(session)

    def _oldest_half_open(self) -> Session | None:
        """The half-open session to evict: the oldest, once what the kernel recorded of it says it still is. The
        count that calls for an eviction is not refreshed: a younger session whose handshake only the kernel saw
        since the last poll still counts as half-open, so the bound may evict the oldest half-open session up to a
        poll interval early (refreshing every half-open session per SYN would cost a flood one map lookup each)."""
        for _ in range(_EVICTION_CHECKS):
            oldest = self.sessions.oldest_half_open()
            if oldest is None or self.refresh is None:
                return oldest
            self._refresh(oldest)
            if oldest.state in HALF_OPEN_STATES:
                return oldest
            if self.sessions.half_open < self.max_half_open:
                return None
        return self.sessions.oldest_half_open()

    def _handshake_done(self, session: Session) -> None:
        """Stop watching the client's frames once nothing more is wanted of them: the handshake is complete and
        the request seen (or the measurement over)."""
        if session.state not in HALF_OPEN_STATES and (session.request_at or not session.rt_pending):
            self.switching.clear_watch(session.c2s, WATCH_ALL | WATCH_REQUEST)

    def _session_ended(self, session: Session) -> None:
        """A session began to end (ENDING) or ended: it no longer counts for its server (its labels may linger)."""
        self.pool.session_ended(session.server)

    def _session_revived(self, session: Session) -> None:
        """An ENDING session's traffic went on: it counts for its server again."""
        self.pool.session_resumed(session.server)

    # -- timers --------------------------------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """The earliest time :meth:`on_timer` has work to do, or None."""
        sessions = self.sessions.next_deadline()
        if sessions is not None and self._timer_backlog is not None:
            sessions = max(sessions, self._timer_backlog)
        deadlines = [d for d in (sessions, self.labels.next_deadline(), self.resolver.next_deadline()) if d is not None]
        return min(deadlines) if deadlines else None

    def on_timer(self, now: float) -> Frames:
        """Expire idle sessions, finish closed ones, release quarantined labels, probe the servers being resolved.
        Returns frames to send (the probes)."""
        probes, changes = self.resolver.on_timer(now)
        self._macs_changed(changes)
        self.labels.on_timer(now)
        self._timer_backlog = None
        sessions = self.sessions
        due = sessions.due_pairs(now, TIMER_SESSIONS)
        quiet = self._quiet(due, now)
        refreshed = due.size - int(np.count_nonzero(quiet))
        if self.catch_up is not None and refreshed >= CATCH_UP_MIN and self.catch_up(now, refreshed):
            # what the kernel held of them was handed over in one read: those it did not move on are due still
            sessions.still_due(due)
            due = sessions.due_pairs(now, TIMER_SESSIONS)
            quiet = self._quiet(due, now)
        quiet = quiet.tolist()
        at = 0
        while at < due.size:
            if quiet[at]:  # a run of closes over: closed together, what is still one now (earlier ones ran since)
                end = at + 1
                while end < due.size and quiet[end]:
                    end += 1
                still = self._quiet(due[at:end], now)
                taken = int(still.size if still.all() else np.argmin(still))
                if taken:
                    self._close_quiet(due[at : at + taken], now)
                    at += taken
                    continue
            self._timer_one(Session(sessions, int(due[at])), now)
            at += 1
        pending = self.sessions.next_deadline()
        if pending is not None and pending <= now:  # more were due than one call takes (TIMER_SESSIONS)
            self._timer_backlog = now + TIMER_GRANULARITY
        self.frames_out += len(probes)
        return probes

    def _quiet(self, pairs: np.ndarray, now: float) -> np.ndarray:
        """Which of the due ``pairs`` end now as closes whose linger passed quiet, with nothing for
        :attr:`refresh` to hand over first (:attr:`settled`)."""
        sessions, last_seen = self.sessions, self.switching.arrays().last_seen
        c2s = sessions.c2s_min + 2 * pairs
        quiet = sessions.quiet_endings(pairs, np.minimum(last_seen[c2s], last_seen[c2s + 1]), now)
        if self.refresh is not None:
            quiet &= self.settled(c2s) if self.settled is not None else False
        return quiet

    def _close_quiet(self, pairs: np.ndarray, now: float) -> None:
        """What :meth:`_timer_one` does for each of ``pairs``, which :meth:`_quiet` takes (their linger is over:
        CLOSED, then :meth:`_finish`), each step for all of them at once, in their order."""
        sessions, switching = self.sessions, self.switching
        sessions.close_quiet(pairs, now)
        c2s = sessions.c2s_min + 2 * pairs
        arrays = switching.arrays()
        servers = sessions.servers_of(pairs)
        counts = (arrays.packets[c2s], arrays.bytes[c2s], arrays.packets[c2s + 1], arrays.bytes[c2s + 1])
        indices, first, where = np.unique(servers, return_index=True, return_inverse=True)
        for k in np.argsort(first).tolist():  # each server's sums, the servers in the order _finish meets them
            mine = where == k
            self._ended(sessions.server_of(int(indices[k]))).count(*(int(c[mine].sum()) for c in counts))
        switching.withdraw_pairs(c2s)
        labels = self.labels
        for label in c2s.tolist():
            if labels.in_use(label):  # not a peer's session replicated here (mplslb.cluster)
                labels.withdraw(label, now)
        for pair in pairs.tolist():
            sessions.remove(Session(sessions, pair))

    def _timer_one(self, session: Session, now: float) -> None:
        """One due session: expired, finished, or armed again."""
        if self.sessions.by_c2s(session.c2s) != session:
            return  # finished earlier in this round (its server went down with another session's timeout)
        timeouts = self.sessions.timeouts
        self._refresh(session)
        state = session.state
        if state in FINAL_STATES:
            self._finish(session, now)
            return
        if session.deadline > now:
            return  # what the kernel saw of it (a FIN) moved it on and armed it again
        c2s = session.c2s
        if state is SessionState.ENDING:
            # Revived only if both directions went on after the close: a session whose RST or FIN was forged
            # goes on both ways (data one way, ACKs the other); a real close's stragglers (a late last ACK, a
            # retransmitted FIN) come from one side.
            last_seen = self.switching.last_seen
            if self.sessions.linger_over(session, min(last_seen[c2s], last_seen[c2s + 1]), now) in FINAL_STATES:
                self._finish(session, now)
            return
        last = self.switching.last_active(c2s, c2s + 1)
        idle = timeouts.idle(session.proto, state)
        half_open = state in HALF_OPEN_STATES and session.proto == IPPROTO_TCP
        if half_open:
            last = session.started  # no frame keeps a half-open session alive: it has tcp_start from its SYN
        if last + idle > now:
            self.sessions.arm(session, last + idle)
            return
        if not half_open and self.recount is not None:  # idle by the table: what the kernel counted since first
            self.recount(c2s)
            last = self.switching.last_active(c2s, c2s + 1)
            if last + idle > now:
                self.sessions.arm(session, last + idle)
                return
        if half_open and state is SessionState.START and self.labels.in_use(session.c2s):  # not a replica
            self._server_failed(session.server, DownReason.NO_REPLY, now)
            if session.state in FINAL_STATES:
                return  # interrupted (and finished) when its server went down
        reason = "half_open_timeout" if half_open else "idle_timeout"
        self.sessions.apply(session, SessionEvent.IDLE_TIMEOUT, now, reason)
        self._finish(session, now)

    def _ended(self, server: Server) -> Traffic:
        """The traffic of ``server``'s ended sessions (made at its first)."""
        name = server.config.name
        traffic = self._ended_traffic.get(name)
        if traffic is None:
            traffic = self._ended_traffic[name] = Traffic()
        return traffic

    def _finish(self, session: Session, now: float) -> None:
        """Withdraw a final session's labels (they go to quarantine) and take it out of the table."""
        self._ended(session.server).add(self.switching, session)
        self.switching.withdraw(session.c2s)
        self.switching.withdraw(session.s2c)
        if self.labels.in_use(session.c2s):  # not a peer's session replicated here (mplslb.cluster)
            self.labels.withdraw(session.c2s, now)
        self.sessions.remove(session)

    # -- server configuration and state (the control plane) ------------------------------------------------------
    def _server_failed(self, server: Server, reason: DownReason, now: float) -> None:
        self.resolver.suspect(server.config.name, now)  # it may have moved to another MAC
        if self.pool.record_failure(server, reason, now, confirm=self.confirm_passive):
            self._interrupt(server, now)

    def _interrupt(self, server: Server, now: float) -> None:
        """Claim 6: the sessions of a server that failed or left are interrupted and their labels withdrawn."""
        for session in self.sessions.of_server(server):
            if session.state not in FINAL_STATES:
                self.sessions.apply(session, SessionEvent.SERVER_DOWN, now, "server_down")
            self._finish(session, now)

    # Live changes (what the control socket and a reload do) keep ``self.config`` the running configuration: the
    # servers in the pool and not leaving, with their current weights, and the settings in force. A reload is the
    # difference between it and the new file (config.diff_configs). Established sessions are never touched: a new
    # algorithm, limit or weight applies to the next new session.
    def _claims(self, releasing: Iterable[str] = ()) -> dict[str, str]:
        """Every server's name, and the address and MAC of those staying (not leaving, not in ``releasing``), as
        config.claim_server records them."""
        taken: dict[str, str] = {}
        releasing = set(releasing)
        for server in self.pool:
            for key, claim, _ in server_claims(server.config):
                if key == "name" or not (server.leaving or server.name in releasing):
                    taken[claim] = f"server {server.name!r}"
        return taken

    def _check_new_server(self, config: ServerConfig, taken: dict[str, str], source: str) -> None:
        if config.name in self.pool and self.pool.get(config.name).leaving:
            left = self.pool.get(config.name).active
            raise ConfigError(
                source, "name", f"server {config.name!r} is still being removed ({left} sessions left): add it "
                "again once it has left, or remove it with --now first"
            )  # fmt: skip
        roles = {p.port_id: p.role for p in self.config.ports}
        problem = check_server(config, roles, taken, f"server {config.name!r}")
        if problem is not None:
            raise ConfigError(source, *problem)

    def _sync_config(self, config: BalancerConfig | None = None) -> None:
        servers = tuple(
            s.config if s.weight == s.config.weight else replace(s.config, weight=s.weight)
            for s in self.pool
            if not s.leaving
        )
        self.config = replace(config or self.config, servers=servers)

    def add_server(self, config: ServerConfig) -> Server:
        """Add a server; it takes new sessions at once. It is checked as a configuration file's server is (its port
        a server port, its name, address and MAC nobody else's): a ConfigError names the key and the reason."""
        self._check_new_server(config, self._claims(), f"server {config.name!r}")
        server = self.pool.add(config)
        self._find(server)
        self._sync_config()
        return server

    def remove_server(self, name: str, now: float) -> None:
        """Remove a server now: its sessions are interrupted and their labels withdrawn (claim 6)."""
        server = self.pool.get(name)
        self._interrupt(server, now)
        if name in self.pool:  # a leaving server goes with its last session
            self.pool.remove(name)
        self.resolver.remove(name)
        self._sync_config()

    def retire_server(self, name: str) -> bool:
        """Remove a server once its sessions end: no new session goes to it, and it leaves the pool with its last
        session (status ``removing`` meanwhile). True if it had none and left at once."""
        gone = self.pool.retire(name)
        self._sync_config()
        return gone

    def set_algorithm(self, name: str, params: Mapping[str, Any] | None = None) -> None:
        """Choose servers for new sessions with algorithm ``name`` (ValueError if unknown or its parameters are
        wrong); established sessions keep their servers."""
        params = dict(params or {})
        self.algorithm = make_algorithm(name, **params)
        self.config = replace(self.config, algorithm=name, algorithm_params=params)

    def set_limits(
        self,
        *,
        max_sessions: int | None = None,
        max_new_per_second: float | None = None,
        refuse_with: RefuseWith | str | None = None,
    ) -> None:
        """Change the admission limits for new sessions (None: unchanged; 0: no limit). The refusal counts carry on;
        the rate bucket starts full."""
        current = self.admission
        admission = AdmissionControl(
            max_sessions=current.max_sessions if max_sessions is None else max_sessions,
            max_new_per_second=current.max_new_per_second if max_new_per_second is None else max_new_per_second,
            refuse_with=current.refuse_with if refuse_with is None else RefuseWith(refuse_with),
            refused=current.refused,
        )
        self.admission = admission
        self.config = replace(
            self.config,
            max_sessions=admission.max_sessions,
            max_new_per_second=admission.max_new_per_second,
            refuse_with=admission.refuse_with,
        )

    def reconfigure(self, new: BalancerConfig, *, source: str = "(new configuration)") -> tuple[str, ...]:
        """Make the running configuration ``new``, or raise ConfigError (``source``, key, reason) and change
        nothing. Servers gone from ``new`` are retired (they drain out), new ones added, weights and limits taken;
        the settings :data:`~mplslb.config.LIVE_SETTINGS` names apply to new sessions. Returns what changed, one
        ``key:old->new`` per difference (see :func:`~mplslb.config.diff_configs`)."""
        diff = diff_configs(self.config, new)
        if diff.refused:
            raise ConfigError(source, *diff.refused[0])
        taken = self._claims(releasing=diff.removed)
        index = {server.name: i for i, server in enumerate(new.servers)}
        for server in diff.added:
            try:
                self._check_new_server(server, taken, source)
            except ConfigError as exc:
                raise ConfigError(source, f"servers[{index[server.name]}].{exc.key}", exc.reason) from None
        settings = diff.settings
        algorithm = self.algorithm
        if "algorithm" in settings or "algorithm_params" in settings:
            algorithm = make_algorithm(new.algorithm, **dict(new.algorithm_params))  # before anything changes
        for name in diff.removed:
            self.pool.retire(name)
        for server in diff.updated:
            self.pool.update(server)
        for server in diff.added:
            self._find(self.pool.add(server))
        self.algorithm = algorithm
        if {"max_sessions", "max_new_per_second", "refuse_with"} & set(settings):
            self.set_limits(
                max_sessions=new.max_sessions, max_new_per_second=new.max_new_per_second, refuse_with=new.refuse_with
            )
        if {"fail_threshold", "rt_alpha", "rt_limit"} & set(settings):
            self.pool.set_health_settings(
                fail_threshold=new.fail_threshold, rt_alpha=new.rt_alpha, rt_limit=new.rt_limit
            )
        if "timeouts" in settings:
            self.sessions.timeouts = new.timeouts  # idle deadlines armed from now on
        if "l7" in settings:
            self.analyzer.l7 = new.l7
        if "label_quarantine_min" in settings:
            self.labels.quarantine_min = min(new.label_quarantine_min, new.label_quarantine)
        self._sync_config(new)
        return diff.changes

    def mark_down(self, name: str, now: float, reason: DownReason = DownReason.ADMIN) -> None:
        server = self.pool.get(name)
        if reason.lifted_by_check:
            self.resolver.suspect(name, now)  # its health failed: it may have moved to another MAC
        if self.pool.mark_down(name, reason):
            self._interrupt(server, now)

    def mark_up(self, name: str) -> None:
        self.pool.mark_up(name)

    def drain(self, name: str) -> None:
        self.pool.drain(name)

    def set_weight(self, name: str, weight: int) -> None:
        self.pool.set_weight(name, weight)
        self._sync_config()

    # -- neighbours: the servers' MACs, the VIPs' announcements ----------------------------------------------------
    def _find(self, server: Server) -> None:
        """How a new server's frames find it: by its configured MAC, by the pseudo-MAC of its address on an
        MPLS-in-UDP port, or by resolving its address (no new sessions until then)."""
        config = server.config
        if server.mac:
            return
        if self.ports[config.port_id].kind == "mpls_udp":
            self.pool.set_mac(config.name, pseudo_mac(config.address))
        else:
            self.resolver.add(config.name, config.address, config.port_id, 0.0)  # the first probe is due at once

    def recall_macs(self, macs: Mapping[str, bytes], now: float) -> None:
        """Servers' MACs as a previous process knew them (adopted sessions' labels hold them): a server still being
        resolved takes its MAC at once while the resolver confirms it (:meth:`Resolver.recall`)."""
        changes = [
            MacChange(name, b"", mac)
            for name, mac in macs.items()
            if name in self.pool and self.resolver.recall(name, mac, now)
        ]
        self._macs_changed(changes)

    def _from_neighbor(self, port: int, frame: bytes | memoryview, now: float) -> bool:
        """An ARP or neighbour discovery frame from a server port goes to the resolver; True if it was one."""
        changes = self.resolver.receive(port, frame, now)
        if changes is None:
            return False
        self._macs_changed(changes)
        return True

    def _macs_changed(self, changes: list[MacChange]) -> None:
        """Servers' MACs found, changed or lost: new sessions go by the new MAC, and the labels of the sessions a
        server already has follow it (C2S: the next hop; S2C: the peer its frames are taken from)."""
        for name, old, new in changes:
            if name not in self.pool:
                continue
            server = self.pool.get(name)
            self.pool.set_mac(name, new)
            if self.on_mac is not None:
                self.on_mac(MacChange(name, old, new))
            if not new:
                continue  # lost: its sessions keep the last MAC known, a new one moves them
            for session in self.sessions.of_server(server):
                if self.switching.next_hop_of(session.c2s) != new:
                    self.switching.repoint(session.c2s, next_hop=new)
                    self.switching.repoint(session.s2c, peer=new)

    def announcements(self) -> Frames:
        """A gratuitous ARP or unsolicited neighbour advertisement for every VIP on every Ethernet client port, so
        that clients and routers holding another MAC for a VIP take ours (at start and after a failover)."""
        return [
            (port.port_id, announcement(port.mac, vip.address))
            for port in self.config.ports
            if port.role == "client" and port.kind == "ethernet"
            for vip in self.config.vips
        ]

    # -- figures -------------------------------------------------------------------------------------------------
    def server_rows(self) -> tuple[ServerRow, ...]:
        pairs, servers = self.sessions.occupied()
        c2s = self.sessions.c2s_min + 2 * pairs
        arrays = self.switching.arrays()
        live: dict[int, Traffic] = {}
        if pairs.size:
            size = int(servers.max()) + 1

            def per_server(values: np.ndarray) -> list[int]:
                return [int(x) for x in np.bincount(servers, weights=values.astype(np.float64), minlength=size)]

            columns = [per_server(arrays.packets[c2s]), per_server(arrays.packets[c2s + 1]),
                       per_server(arrays.bytes[c2s]), per_server(arrays.bytes[c2s + 1])]  # fmt: skip
            live = {i: Traffic(*(column[i] for column in columns)) for i in range(size)}
        rows = []
        for server in self.pool.servers:
            name = server.config.name
            done = self._ended_traffic.get(name, Traffic())
            now = live.get(server.index, Traffic())
            line_card, number = self.switching.port_place(server.config.port_id)
            rows.append(
                ServerRow(
                    name,
                    str(server.status),
                    server.weight,
                    server.active,
                    server.total,
                    None if server.rt_ewma is None else server.rt_ewma * 1000.0,
                    done.packets_in + now.packets_in,
                    done.packets_out + now.packets_out,
                    done.bytes_in + now.bytes_in,
                    done.bytes_out + now.bytes_out,
                    line_card,
                    number,
                    server.mac.hex(":"),
                    self._neighbor_state(server),
                )
            )
        return tuple(rows)

    def _neighbor_state(self, server: Server) -> str:
        neighbor = self.resolver.get(server.config.name)
        return "static" if neighbor is None else neighbor.status

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
            sessions_by_state=self.sessions.state_counts(),
            refused={str(k): v for k, v in self.admission.refused.items() if v},
            drops=drops,
            labels=self.labels.stats(),
            labels_installed=self.switching.installed,
            servers=self.server_rows(),
            l7_hosts=dict(self.l7_hosts),
            neighbor_replies=self.neighbor_replies,
            not_believed={**self.sessions.not_believed, "revived": self.sessions.revived},
        )

    def live_sessions(self) -> Sequence[Session]:
        return self.sessions.sessions()


__all__ = ["TIMER_GRANULARITY", "Balancer", "BalancerStats", "ServerRow", "ServerStatus"]
