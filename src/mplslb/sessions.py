"""The session managing unit (claims 1, 6): the session table and each session's lifecycle.

Theory of operation
-------------------
A session is one client flow (a TCP connection, a UDP flow) to a virtual IP, bound to one server and to one pair
of labels. The table finds a session by its flow key (for unlabelled frames, claim 2) and by its C2S label (for
reports from the fast path). The lifecycle is a transition table, in the manner of h11's ``_state.py``:

    state           event           -> state
    START           SERVER_REPLY    -> ESTABLISHED      the server answered (SYN-ACK, first UDP reply)
    START           CLIENT_FIN      -> CLOSING_CLIENT
    START           SERVER_FIN      -> CLOSING_SERVER
    ESTABLISHED     CLIENT_FIN      -> CLOSING_CLIENT   the client sent FIN
    ESTABLISHED     SERVER_FIN      -> CLOSING_SERVER   the server sent FIN
    CLOSING_CLIENT  SERVER_FIN      -> CLOSED           both sides sent FIN
    CLOSING_SERVER  CLIENT_FIN      -> CLOSED
    (live)          RST             -> CLOSED
    (live)          IDLE_TIMEOUT    -> CLOSED           per protocol and per state
    (live)          SERVER_DOWN     -> INTERRUPTED      its server failed, was removed or set down
    (live)          SERVER_REPLY, a repeated FIN        -> unchanged (retransmissions change nothing)

Everything that changes a session's state goes through the table (h11's rule): which side has sent FIN is the
state itself, and the response-time measurement the balancer runs from the session's own frames (SYN -> SYN-ACK,
request -> first response byte, within a budget of watched frames) is :meth:`SessionTable.observe`, which also
makes the START -> ESTABLISHED transition.

CLOSED and INTERRUPTED are final. A closed session lingers a short while (``closed_linger``) before its labels are
withdrawn so the last ACK of a TCP close still reaches its peer; an interrupted one is withdrawn at once. An event
the table does not list for a state raises :class:`InvalidTransition` and leaves the session unchanged: the
balancer only feeds events it has decoded, so this is a programming error, not bad input.

Idle timeouts are lazy (as IPVS does): each live session has one deadline in a heap; when it fires, the session's
last activity (the later of its two labels' last-seen times, kept by the switching unit) decides whether it has
really been idle or is re-armed. The cost is O(log n) per session per timeout period, not per frame.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple

from mplslb.flow import FlowKey
from mplslb.wire.ip import IPPROTO_TCP, IPPROTO_UDP
from mplslb.wire.tcp import TCPFlag

if TYPE_CHECKING:
    from mplslb.balancing.servers import Server
    from mplslb.wire.http import HttpRequest


class SessionState(StrEnum):
    START = "start"
    ESTABLISHED = "established"
    CLOSING_CLIENT = "closing_client"  # the client sent FIN
    CLOSING_SERVER = "closing_server"  # the server sent FIN
    CLOSED = "closed"
    INTERRUPTED = "interrupted"


class SessionEvent(StrEnum):
    SERVER_REPLY = "server_reply"
    CLIENT_FIN = "client_fin"
    SERVER_FIN = "server_fin"
    RST = "rst"
    IDLE_TIMEOUT = "idle_timeout"
    SERVER_DOWN = "server_down"


S, E = SessionState, SessionEvent
LIVE_STATES = (S.START, S.ESTABLISHED, S.CLOSING_CLIENT, S.CLOSING_SERVER)
CLOSING_STATES = frozenset({S.CLOSING_CLIENT, S.CLOSING_SERVER})

TRANSITIONS: dict[tuple[SessionState, SessionEvent], SessionState] = {
    (S.START, E.SERVER_REPLY): S.ESTABLISHED,
    (S.START, E.CLIENT_FIN): S.CLOSING_CLIENT,
    (S.START, E.SERVER_FIN): S.CLOSING_SERVER,
    (S.ESTABLISHED, E.SERVER_REPLY): S.ESTABLISHED,
    (S.ESTABLISHED, E.CLIENT_FIN): S.CLOSING_CLIENT,
    (S.ESTABLISHED, E.SERVER_FIN): S.CLOSING_SERVER,
    (S.CLOSING_CLIENT, E.SERVER_REPLY): S.CLOSING_CLIENT,
    (S.CLOSING_CLIENT, E.CLIENT_FIN): S.CLOSING_CLIENT,
    (S.CLOSING_CLIENT, E.SERVER_FIN): S.CLOSED,
    (S.CLOSING_SERVER, E.SERVER_REPLY): S.CLOSING_SERVER,
    (S.CLOSING_SERVER, E.SERVER_FIN): S.CLOSING_SERVER,
    (S.CLOSING_SERVER, E.CLIENT_FIN): S.CLOSED,
    **{(state, E.RST): S.CLOSED for state in LIVE_STATES},
    **{(state, E.IDLE_TIMEOUT): S.CLOSED for state in LIVE_STATES},
    **{(state, E.SERVER_DOWN): S.INTERRUPTED for state in LIVE_STATES},
}
FINAL_STATES = frozenset({S.CLOSED, S.INTERRUPTED})
del S, E

_SYN_ACK = int(TCPFlag.SYN | TCPFlag.ACK)
_RST = int(TCPFlag.RST)
_FIN = int(TCPFlag.FIN)
#: How many watched frames a session may spend on its response-time measurement before watching stops.
WATCH_BUDGET = 16


class InvalidTransition(RuntimeError):
    """An event the transition table does not allow in the session's state."""


@dataclass(frozen=True)
class Timeouts:
    """Idle timeouts in seconds, per protocol and state (IPVS's defaults are tcp 900, tcpfin 120, udp 300)."""

    tcp_start: float = 10.0
    tcp_established: float = 900.0
    tcp_closing: float = 120.0
    udp: float = 300.0
    other: float = 60.0
    closed_linger: float = 2.0

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value >= 0:
                raise ValueError(f"timeouts.{name} must be >= 0, got {value!r}")

    def idle(self, proto: int, state: SessionState) -> float:
        if proto == IPPROTO_TCP:
            if state is SessionState.START:
                return self.tcp_start
            if state in CLOSING_STATES:
                return self.tcp_closing
            return self.tcp_established
        return self.udp if proto == IPPROTO_UDP else self.other


class Session:
    """One session's relevant information and state (the session table's row)."""

    __slots__ = (
        "c2s",
        "client_mac",
        "client_port",
        "deadline",
        "end_reason",
        "ended",
        "ip_version",
        "key",
        "l7",
        "request_at",
        "rt_budget",
        "server",
        "started",
        "state",
        "syn_at",
        "timer",
    )

    def __init__(
        self,
        key: FlowKey,
        c2s: int,
        server: Server,
        *,
        client_port: int,
        client_mac: bytes,
        ip_version: int,
        now: float,
    ) -> None:
        self.key = key
        self.c2s = c2s
        self.server = server
        self.client_port = client_port
        self.client_mac = client_mac
        self.ip_version = ip_version
        self.state = SessionState.START
        self.started = now
        self.ended = 0.0
        self.deadline = 0.0
        self.timer = 0
        self.end_reason = ""
        self.syn_at = now  # when the first frame went to the server: SYN -> SYN-ACK is the first response time
        self.request_at = 0.0  # when the client's first request bytes went to the server
        self.rt_budget = WATCH_BUDGET  # watched frames left for the response-time measurement; 0: over
        self.l7: HttpRequest | None = None

    @property
    def s2c(self) -> int:
        return self.c2s + 1

    @property
    def proto(self) -> int:
        return self.key.proto

    @property
    def rt_pending(self) -> bool:
        """A response-time measurement is still under way."""
        return self.rt_budget > 0

    def __repr__(self) -> str:
        return f"Session(c2s={self.c2s}, server={self.server.config.name}, state={self.state})"


class Observation(NamedTuple):
    """What one watched frame of a session told the response-time measurement."""

    response_time: float | None  # a sample for the server's estimate (seconds)
    server_replied: bool  # the server's first answer to the session (passive health: a success)
    request_seen: bool  # the client's first request bytes: the C2S label need not be watched any more
    done: bool  # the measurement is over: neither label need be watched any more


class SessionTable:
    """The session table: by flow key, by C2S label, with the idle-deadline heap.

    ``on_end`` is called once for each session that reaches a final state, at that moment (its labels may still
    linger a while): the load balancing unit counts it off its server there.
    """

    def __init__(self, timeouts: Timeouts | None = None, on_end: Callable[[Session], None] | None = None) -> None:
        self.timeouts = timeouts or Timeouts()
        self.on_end = on_end
        self.by_key: dict[FlowKey, Session] = {}
        self.by_label: dict[int, Session] = {}
        self._deadlines: list[tuple[float, int, Session]] = []  # (deadline, serial, session)
        self._serial = 0
        self.started = 0
        self.ended: dict[str, int] = {}
        self.peak = 0
        self.live = 0  # sessions not yet closed or interrupted (closed ones may still linger in the table)

    def __len__(self) -> int:
        return len(self.by_label)

    def add(self, session: Session, now: float) -> None:
        if session.key in self.by_key or session.c2s in self.by_label:
            raise ValueError(f"session {session.key} or label {session.c2s} already in the table")
        self.by_key[session.key] = session
        self.by_label[session.c2s] = session
        self.started += 1
        self.live += 1
        self.peak = max(self.peak, len(self.by_label))
        self.arm(session, now + self.timeouts.idle(session.proto, session.state))

    def lookup(self, key: FlowKey) -> Session | None:
        return self.by_key.get(key)

    def by_c2s(self, c2s: int) -> Session | None:
        return self.by_label.get(c2s)

    def arm(self, session: Session, deadline: float) -> None:
        self._serial += 1
        session.deadline = deadline
        session.timer = self._serial
        heapq.heappush(self._deadlines, (deadline, self._serial, session))

    def apply(self, session: Session, event: SessionEvent, now: float, reason: str = "") -> SessionState:
        """Apply ``event`` to ``session`` per the transition table; returns the new state."""
        new = TRANSITIONS.get((session.state, event))
        if new is None:
            raise InvalidTransition(f"{event} not allowed in state {session.state} ({session!r})")
        old, session.state = session.state, new
        if new in FINAL_STATES:
            session.ended = now
            session.end_reason = reason or str(event)
            session.rt_budget = 0
            self.live -= 1
            if self.on_end is not None:
                self.on_end(session)
            if new is SessionState.CLOSED and event is not SessionEvent.IDLE_TIMEOUT:
                self.arm(session, now + self.timeouts.closed_linger)
        elif new is not old:
            self.arm(session, now + self.timeouts.idle(session.proto, new))
        return new

    def tcp_end(self, session: Session, flags: int, *, from_client: bool, now: float) -> None:
        """A TCP segment of a live session carried RST or FIN (``flags``) from one side."""
        if session.state in FINAL_STATES:
            return
        if flags & _RST:
            self.apply(session, SessionEvent.RST, now, "rst")
        elif flags & _FIN:
            self.apply(session, SessionEvent.CLIENT_FIN if from_client else SessionEvent.SERVER_FIN, now, "fin")

    def observe(
        self, session: Session, *, from_client: bool, tcp_flags: int, payload_len: int, now: float
    ) -> Observation:
        """A watched frame of ``session`` (``tcp_flags`` -1 when not TCP): time the server's responses from the
        session's own frames, SYN -> SYN-ACK (or a UDP request -> its first reply) and request -> first response
        byte, within :data:`WATCH_BUDGET` frames. The server's first answer moves the session to ESTABLISHED."""
        if session.rt_budget <= 0 or session.state in FINAL_STATES:
            return Observation(None, False, False, True)
        session.rt_budget -= 1
        sample: float | None = None
        replied = request = False
        tcp = session.proto == IPPROTO_TCP
        if not from_client and session.state is SessionState.START:
            if not tcp or (tcp_flags >= 0 and tcp_flags & _SYN_ACK == _SYN_ACK):
                sample, replied = now - session.syn_at, True
                self.apply(session, SessionEvent.SERVER_REPLY, now)
                if not tcp:
                    session.rt_budget = 0  # a UDP flow's first reply times its request: done
        elif payload_len:
            if from_client:
                request = self.request_seen(session, now)
            elif session.request_at:
                sample = now - session.request_at
                session.rt_budget = 0
        return Observation(sample, replied, request, session.rt_budget <= 0)

    def request_seen(self, session: Session, now: float) -> bool:
        """The client sent request bytes; True when they are the session's first (the request is timed from
        here)."""
        if session.request_at:
            return False
        session.request_at = now
        return True

    def remove(self, session: Session) -> None:
        """Take a final session out of the table (its labels are withdrawn by the caller)."""
        self.by_key.pop(session.key, None)
        self.by_label.pop(session.c2s, None)
        self.ended[session.end_reason] = self.ended.get(session.end_reason, 0) + 1

    def next_deadline(self) -> float | None:
        return self._deadlines[0][0] if self._deadlines else None

    def due(self, now: float) -> list[Session]:
        """Sessions whose deadline has come (stale heap entries skipped)."""
        out: list[Session] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, serial, session = heapq.heappop(heap)
            if session.timer == serial and self.by_label.get(session.c2s) is session:
                session.timer = 0
                out.append(session)
        return out
