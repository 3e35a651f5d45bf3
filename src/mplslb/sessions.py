"""The session managing unit (claims 1, 6): the session table and each session's lifecycle.

Theory of operation
-------------------
A session is one client flow (a TCP connection, a UDP flow) to a virtual IP, bound to one server and to one pair
of labels. The table finds a session by its flow key (for unlabelled frames, claim 2) and by its C2S label (for
reports from the fast path). The lifecycle is a transition table, in the manner of h11's ``_state.py``:

    state        event            -> state
    START        SERVER_REPLY     -> ESTABLISHED     the server answered (SYN-ACK, first UDP reply)
    START        FIN              -> CLOSING
    ESTABLISHED  FIN              -> CLOSING         one side sent FIN
    CLOSING      FIN_OTHER_SIDE   -> CLOSED          both sides sent FIN
    (live)       RST              -> CLOSED
    (live)       IDLE_TIMEOUT     -> CLOSED          per protocol and per state
    (live)       SERVER_DOWN      -> INTERRUPTED     its server failed, was removed or set down
    (live)       SERVER_REPLY/FIN -> unchanged       repeats (retransmissions) change nothing

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
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from mplslb.balancing.algorithms import FlowKey

if TYPE_CHECKING:
    from mplslb.balancing.servers import Server
    from mplslb.wire.http import HttpRequest


class SessionState(StrEnum):
    START = "start"
    ESTABLISHED = "established"
    CLOSING = "closing"
    CLOSED = "closed"
    INTERRUPTED = "interrupted"


class SessionEvent(StrEnum):
    SERVER_REPLY = "server_reply"
    FIN = "fin"
    FIN_OTHER_SIDE = "fin_other_side"
    RST = "rst"
    IDLE_TIMEOUT = "idle_timeout"
    SERVER_DOWN = "server_down"


S, E = SessionState, SessionEvent
LIVE_STATES = (S.START, S.ESTABLISHED, S.CLOSING)

TRANSITIONS: dict[tuple[SessionState, SessionEvent], SessionState] = {
    (S.START, E.SERVER_REPLY): S.ESTABLISHED,
    (S.START, E.FIN): S.CLOSING,
    (S.ESTABLISHED, E.SERVER_REPLY): S.ESTABLISHED,
    (S.ESTABLISHED, E.FIN): S.CLOSING,
    (S.CLOSING, E.SERVER_REPLY): S.CLOSING,
    (S.CLOSING, E.FIN): S.CLOSING,
    (S.CLOSING, E.FIN_OTHER_SIDE): S.CLOSED,
    **{(state, E.RST): S.CLOSED for state in LIVE_STATES},
    **{(state, E.IDLE_TIMEOUT): S.CLOSED for state in LIVE_STATES},
    **{(state, E.SERVER_DOWN): S.INTERRUPTED for state in LIVE_STATES},
}
FINAL_STATES = frozenset({S.CLOSED, S.INTERRUPTED})
del S, E


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
        if proto == 6:
            if state is SessionState.START:
                return self.tcp_start
            if state is SessionState.CLOSING:
                return self.tcp_closing
            return self.tcp_established
        return self.udp if proto == 17 else self.other


class Session:
    """One session's relevant information and state (the session table's row)."""

    __slots__ = (
        "c2s",
        "client_mac",
        "client_port",
        "deadline",
        "end_reason",
        "ended",
        "fin_from_client",
        "fin_from_server",
        "ip_version",
        "key",
        "l7",
        "request_at",
        "rt_pending",
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
        self.fin_from_client = False
        self.fin_from_server = False
        self.syn_at = now  # when the first frame went to the server: SYN -> SYN-ACK is the first response time
        self.request_at = 0.0  # when the client's first request bytes went to the server
        self.rt_pending = True  # a response-time measurement is still under way
        self.l7: HttpRequest | None = None

    @property
    def s2c(self) -> int:
        return self.c2s + 1

    @property
    def proto(self) -> int:
        return self.key.proto

    def __repr__(self) -> str:
        return f"Session(c2s={self.c2s}, server={self.server.config.name}, state={self.state})"


class SessionTable:
    """The session table: by flow key, by C2S label, with the idle-deadline heap."""

    def __init__(self, timeouts: Timeouts | None = None) -> None:
        self.timeouts = timeouts or Timeouts()
        self.by_key: dict[FlowKey, Session] = {}
        self.by_label: dict[int, Session] = {}
        self._deadlines: list[tuple[float, int, Session]] = []  # (deadline, serial, session)
        self._serial = 0
        self.started = 0
        self.ended: dict[str, int] = {}
        self.peak = 0

    def __len__(self) -> int:
        return len(self.by_label)

    def add(self, session: Session, now: float) -> None:
        if session.key in self.by_key or session.c2s in self.by_label:
            raise ValueError(f"session {session.key} or label {session.c2s} already in the table")
        self.by_key[session.key] = session
        self.by_label[session.c2s] = session
        self.started += 1
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
            if new is SessionState.CLOSED and event is not SessionEvent.IDLE_TIMEOUT:
                self.arm(session, now + self.timeouts.closed_linger)
        elif new is not old:
            self.arm(session, now + self.timeouts.idle(session.proto, new))
        return new

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
