"""The session managing unit (claims 1, 6): the session table and each session's lifecycle.

Theory of operation
-------------------
A session is one client flow (a TCP connection, a UDP flow) to a virtual IP, bound to one server and to one pair
of labels. The table finds a session by its flow key (for unlabelled frames, claim 2) and by its C2S label (for
reports from the fast path). The lifecycle is a transition table, in the manner of h11's ``_state.py``:

    state           event           -> state
    START           SYN_ACK         -> ANSWERED         the server answered a TCP SYN (half-open still)
    ANSWERED        CLIENT_ACK      -> ESTABLISHED      the client completed the handshake
    START           SERVER_REPLY    -> ESTABLISHED      a UDP (or other) flow's first reply
    START           SERVER_RST      -> ENDING           the server refused the SYN
    (half-open)     CLIENT_RST, FIN -> unchanged        the half-open timeout decides (see below)
    ESTABLISHED     CLIENT_FIN      -> CLOSING_CLIENT   the client sent FIN
    ESTABLISHED     SERVER_FIN      -> CLOSING_SERVER   the server sent FIN
    CLOSING_CLIENT  SERVER_FIN      -> ENDING           both sides sent FIN
    CLOSING_SERVER  CLIENT_FIN      -> ENDING
    (open)          CLIENT_RST, SERVER_RST -> ENDING
    ENDING          QUIET           -> CLOSED           the linger passed with no traffic after the close, or
                                                        the client opened a new connection on the flow ("reused")
    ENDING          REVIVE          -> ESTABLISHED      traffic went on: the RST/FIN was not believed
    (half-open)     EVICTED         -> CLOSED           the oldest half-open session made room for a new SYN
    (live)          IDLE_TIMEOUT    -> CLOSED           per protocol and per state
    (live)          SERVER_DOWN     -> INTERRUPTED      its server failed, was removed or set down
    (live)          a retransmission (SYN_ACK, SERVER_REPLY, a repeated FIN or RST) -> unchanged

(half-open) is START and ANSWERED, (open) is ESTABLISHED and the CLOSING states, (live) every non-final state.

Everything that changes a session's state goes through the table (h11's rule): which side has sent FIN is the
state itself, and the response-time measurement the balancer runs from the session's own frames (SYN -> SYN-ACK,
request -> first response byte, within a budget of watched frames) is :meth:`SessionTable.observe`, which also
makes the START -> ANSWERED -> ESTABLISHED transitions.

Trust: no frame ends a session on its own word. Anyone on a client's segment can forge a client's frame, labelled or
not, but cannot see the server's, so does not know where the sequence numbers are. An RST, the FIN that would end
an open session, the client's first FIN (which would cut an idle keep-alive session's life to ``tcp_closing``), and
any RST or FIN that would start an ENDING session's linger again, is first judged by its sequence
number (:meth:`SessionTable.closes` says which segments are; the balancer judges them with the switching table's
record of each label's last acknowledgment number): one further than ``rst_window`` from the last acknowledgment
number the other end sent is not believed, is counted in :attr:`SessionTable.not_believed` (``rst_out_of_window``,
``fin_out_of_window``) and changes nothing. Before the other end has acknowledged anything there is nothing to judge
by, and the segment is taken as it comes.
A believed RST or second FIN only moves the session to ENDING, which keeps its labels and keeps forwarding.
When the linger (``closed_linger``) expires, the session closes only if none of its frames passed more than half
the linger after the close event (the labels' last-seen times, kept by the switching unit, say so at no cost per
frame); otherwise it is revived (counted in :attr:`SessionTable.revived`). A real close is quiet within a round
trip, so it ends at the linger's end; a forged one is followed by the endpoints' own traffic. Half-open sessions
are cheap to shed instead: they live ``tcp_start`` seconds from their SYN whatever is sent, an RST or FIN changes
nothing for them, and :meth:`SessionTable.oldest_half_open` finds the oldest for eviction when their share of the
table is used up.

CLOSED and INTERRUPTED are final, and a final session's labels are withdrawn at once (the linger happened in
ENDING). An event the table does not list for a state raises :class:`InvalidTransition` and leaves the session
unchanged: the balancer only feeds events it has decoded, so this is a programming error, not bad input.

Idle timeouts are lazy (as IPVS does): each live session has one deadline in an array; when it fires, the session's
last activity (the later of its two labels' last-seen times, kept by the switching unit) decides whether it has
really been idle or is re-armed. A timer run reads only the blocks of rows whose lower bound of deadlines has
come: nothing is paid per frame, nor any memory per session.
"""

from __future__ import annotations

import math
import struct
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from mplslb.flow import FlowKey
from mplslb.labels import C2S_MAX, C2S_MIN
from mplslb.state import HEAP, Allocator
from mplslb.switching import scalar
from mplslb.wire.ethernet import ETH_ALEN
from mplslb.wire.ip import IPPROTO_TCP, IPPROTO_UDP
from mplslb.wire.tcp import TCPFlag

if TYPE_CHECKING:
    from mplslb.balancing.servers import Server


def nonzero_bytes(flags: np.ndarray) -> np.ndarray:
    """The positions of the nonzero elements of the uint8 array ``flags``, as ``np.flatnonzero`` finds them, but
    found eight at a time: a few times faster while few are set (the whole array is still read)."""
    whole = flags.size & ~7
    words = np.flatnonzero(flags[:whole].view(np.uint64))
    found: np.ndarray = ((words[:, None] << 3) + np.arange(8))[flags[:whole].reshape(-1, 8)[words] != 0]
    if whole == flags.size:
        return found
    return np.concatenate((found, np.flatnonzero(flags[whole:]) + whole))


class SessionState(StrEnum):
    START = "start"
    ANSWERED = "answered"  # the server sent SYN-ACK, the client has not completed the handshake
    ESTABLISHED = "established"
    CLOSING_CLIENT = "closing_client"  # the client sent FIN
    CLOSING_SERVER = "closing_server"  # the server sent FIN
    ENDING = "ending"  # an RST or the second FIN: closes at the linger's end unless traffic goes on
    CLOSED = "closed"
    INTERRUPTED = "interrupted"


class SessionEvent(StrEnum):
    SERVER_REPLY = "server_reply"
    SYN_ACK = "syn_ack"
    CLIENT_ACK = "client_ack"
    CLIENT_FIN = "client_fin"
    SERVER_FIN = "server_fin"
    CLIENT_RST = "client_rst"
    SERVER_RST = "server_rst"
    QUIET = "quiet"
    REVIVE = "revive"
    EVICTED = "evicted"
    IDLE_TIMEOUT = "idle_timeout"
    SERVER_DOWN = "server_down"


S, E = SessionState, SessionEvent
HALF_OPEN_STATES = frozenset({S.START, S.ANSWERED})
OPEN_STATES = (S.ESTABLISHED, S.CLOSING_CLIENT, S.CLOSING_SERVER)
LIVE_STATES = (S.START, S.ANSWERED, *OPEN_STATES, S.ENDING)
CLOSING_STATES = frozenset({S.CLOSING_CLIENT, S.CLOSING_SERVER})
_ENDS = (E.CLIENT_FIN, E.SERVER_FIN, E.CLIENT_RST, E.SERVER_RST)

TRANSITIONS: dict[tuple[SessionState, SessionEvent], SessionState] = {
    (S.START, E.SYN_ACK): S.ANSWERED,
    (S.START, E.SERVER_REPLY): S.ESTABLISHED,
    (S.START, E.SERVER_RST): S.ENDING,
    (S.ANSWERED, E.SYN_ACK): S.ANSWERED,
    (S.ANSWERED, E.CLIENT_ACK): S.ESTABLISHED,
    **{
        (state, event): state
        for state in HALF_OPEN_STATES
        for event in _ENDS
        if (state, event) != (S.START, E.SERVER_RST)
    },
    **{(state, E.EVICTED): S.CLOSED for state in HALF_OPEN_STATES},
    (S.ESTABLISHED, E.SERVER_REPLY): S.ESTABLISHED,
    (S.ESTABLISHED, E.CLIENT_FIN): S.CLOSING_CLIENT,
    (S.ESTABLISHED, E.SERVER_FIN): S.CLOSING_SERVER,
    (S.CLOSING_CLIENT, E.SERVER_REPLY): S.CLOSING_CLIENT,
    (S.CLOSING_CLIENT, E.CLIENT_FIN): S.CLOSING_CLIENT,
    (S.CLOSING_CLIENT, E.SERVER_FIN): S.ENDING,
    (S.CLOSING_SERVER, E.SERVER_REPLY): S.CLOSING_SERVER,
    (S.CLOSING_SERVER, E.SERVER_FIN): S.CLOSING_SERVER,
    (S.CLOSING_SERVER, E.CLIENT_FIN): S.ENDING,
    **{(state, event): S.ENDING for state in OPEN_STATES for event in (E.CLIENT_RST, E.SERVER_RST)},
    **{(S.ENDING, event): S.ENDING for event in (*_ENDS, E.SERVER_REPLY)},
    (S.ENDING, E.QUIET): S.CLOSED,
    (S.ENDING, E.REVIVE): S.ESTABLISHED,
    **{(state, E.IDLE_TIMEOUT): S.CLOSED for state in LIVE_STATES},
    **{(state, E.SERVER_DOWN): S.INTERRUPTED for state in LIVE_STATES},
}
FINAL_STATES = frozenset({S.CLOSED, S.INTERRUPTED})
del S, E

_SYN_ACK = int(TCPFlag.SYN | TCPFlag.ACK)
_SYN = int(TCPFlag.SYN)
_ACK = int(TCPFlag.ACK)
_RST = int(TCPFlag.RST)
_FIN = int(TCPFlag.FIN)
#: How far (either way) an RST's or closing FIN's sequence number may lie from the last acknowledgment number the
#: other end sent and still be believed: a window without scaling. The most: half the sequence space.
RST_WINDOW = 65535
RST_WINDOW_MAX = (1 << 31) - 1
#: How many watched frames a session may spend on its response-time measurement before watching stops.
WATCH_BUDGET = 16
#: The watched frames of a whole exchange (SYN-ACK, ACK, request, response): SessionTable.whole_exchange.
_WHOLE_EXCHANGE = 4


class InvalidTransition(RuntimeError):
    """An event the transition table does not allow in the session's state."""


@dataclass(frozen=True)
class Timeouts:
    """Idle timeouts in seconds, per protocol and state (IPVS's defaults are tcp 900, tcpfin 120, udp 300).

    ``tcp_start`` is the life of a half-open TCP session (START or ANSWERED), counted from its SYN whatever it
    sends; ``closed_linger`` how long an ENDING session keeps its labels before its close is believed (or not).
    """

    tcp_start: float = 5.0
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
            if state in HALF_OPEN_STATES:
                return self.tcp_start
            if state is SessionState.ENDING:
                return self.closed_linger
            if state in CLOSING_STATES:
                return self.tcp_closing
            return self.tcp_established
        return self.udp if proto == IPPROTO_UDP else self.other


class Session:
    """A view of one row of the session table (the session's relevant information and state).

    Views are made on demand and hold nothing but the table and the row: the session itself lives in the table's
    fixed-size arrays, so a live session costs no Python object. Two views of the same row are equal.
    """

    __slots__ = ("pair", "table")

    def __init__(self, table: SessionTable, pair: int) -> None:
        self.table = table
        self.pair = pair

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Session) and other.table is self.table and other.pair == self.pair

    def __hash__(self) -> int:
        return hash((id(self.table), self.pair))

    @property
    def c2s(self) -> int:
        return self.table.c2s_min + 2 * self.pair

    @property
    def s2c(self) -> int:
        return self.table.c2s_min + 2 * self.pair + 1

    @property
    def key(self) -> FlowKey:
        return self.table.key_of(self.pair)

    @property
    def proto(self) -> int:
        return self.table.proto[self.pair]

    @property
    def server(self) -> Server:
        return self.table.server_of(self.table.server[self.pair])

    @property
    def state(self) -> SessionState:
        """The state; a row taken out of the table keeps showing the final state its session ended in."""
        code = self.table.state[self.pair]
        return _STATES[code or self.table.final_state[self.pair]]

    @property
    def client_port(self) -> int:
        return self.table.client_port[self.pair]

    @property
    def client_mac(self) -> bytes:
        at = self.pair * ETH_ALEN
        return bytes(self.table.client_mac[at : at + ETH_ALEN])

    @property
    def ip_version(self) -> int:
        return self.table.ip_version[self.pair]

    @property
    def started(self) -> float:
        """When the session's first frame went to the server (SYN -> SYN-ACK is its first response time)."""
        return self.table.start_time[self.pair]

    @property
    def syn_at(self) -> float:
        return self.table.start_time[self.pair]

    @property
    def request_at(self) -> float:
        """When the client's first request bytes went to the server; 0 before."""
        return self.table.request_at[self.pair]

    @property
    def ended(self) -> float:
        return self.table.end_time[self.pair]

    @property
    def end_reason(self) -> str:
        return self.table.reasons[self.table.end_reason[self.pair]]

    @property
    def deadline(self) -> float:
        return self.table.deadline[self.pair]

    @property
    def rt_budget(self) -> int:
        """Watched frames left for the response-time measurement; 0: over."""
        return self.table.rt_budget[self.pair]

    @property
    def rt_pending(self) -> bool:
        """A response-time measurement is still under way."""
        return self.table.rt_budget[self.pair] > 0

    def __repr__(self) -> str:
        return f"Session(c2s={self.c2s}, server={self.server.config.name}, state={self.state})"


class Observation(NamedTuple):
    """What one watched frame of a session told the response-time measurement."""

    response_time: float | None  # a sample for the server's estimate (seconds)
    server_replied: bool  # the server's first answer to the session (passive health: a success)
    request_seen: bool  # the client's first request bytes: the C2S label need not be watched any more
    done: bool  # the measurement is over: neither label need be watched any more
    handshake_done: bool = False  # the client's ACK completed the TCP handshake (ANSWERED -> ESTABLISHED)


_new = tuple.__new__  # a NamedTuple's own constructor, without its Python-level call
_STATES: tuple[SessionState, ...] = (SessionState.START, *SessionState)  # code 0 is a free row (never read)
_CODE = {state: code for code, state in enumerate(_STATES) if code}
#: Each state's code in :attr:`SessionTable.state` (0 is a free row), for readers of the arrays.
STATE_CODES: dict[SessionState, int] = dict(_CODE)
_FREE = 0
_START, _ESTABLISHED = _CODE[SessionState.START], _CODE[SessionState.ESTABLISHED]
_ANSWERED, _ENDING = _CODE[SessionState.ANSWERED], _CODE[SessionState.ENDING]
_CLOSED = _CODE[SessionState.CLOSED]
_CLOSING_CLIENT, _CLOSING_SERVER = _CODE[SessionState.CLOSING_CLIENT], _CODE[SessionState.CLOSING_SERVER]
_OPEN_CODES = frozenset(_CODE[state] for state in OPEN_STATES)
_FINAL_CODES = frozenset(_CODE[state] for state in FINAL_STATES)
_FINAL_CODE_LIST = sorted(_FINAL_CODES)
_HALF_OPEN_CODES = frozenset(_CODE[state] for state in HALF_OPEN_STATES)
#: A flow key as a row stores it: protocol, address length, ports, source and destination (IPv4 zero-padded).
_KEY = struct.Struct("!BBHH16s16s")
KEY_SIZE = 40
#: Offsets in a packed key (_KEY): protocol, address length, destination port, destination address.
_KEY_PROTO, _KEY_ALEN, _KEY_DPORT, _KEY_DST = 0, 1, 4, 22
assert _KEY.size == _KEY_DST + 16
_EMPTY = -1
#: Deadlines are found by block: each block of 2**_BLOCK_SHIFT rows keeps a lower bound of its rows' deadlines, so
#: a timer run reads only the blocks whose bound has come (a fixed 4 KiB for the whole label space, nothing per
#: session). Past _FULL_PASS_BLOCKS blocks due, one pass over every row is cheaper than a pass per block.
_BLOCK_SHIFT = 10
_NOT_LOOKED_UP: tuple[None, bytes, int, int] = (None, b"", 0, _EMPTY)
_FULL_PASS_BLOCKS = 32


#: The memoryviews :func:`open_row_py` writes a new row through, in this order (:attr:`SessionTable._row_columns`).
ROW_COLUMNS = ("keys", "proto", "ip_version", "rt_budget", "end_reason", "client_port", "server", "client_mac",
               "start_time", "request_at", "end_time", "ending_at", "home", "_slots")  # fmt: skip


def open_row_py(
    columns: tuple[memoryview[Any], ...], pair: int, slot: int, packed: bytes, proto: int, ip_version: int, budget: int,
    client_port: int, server: int, mac: bytes, now: float, /,
) -> None:  # fmt: skip
    """Write a new session's row ``pair`` through ``columns`` (ROW_COLUMNS), all but its state byte: the key
    ``packed`` at the start of its row's key, its protocol, IP version, watch budget, client port, server index,
    client MAC and start time; no end reason, no request, no end yet. Then the key index: the row's home slot (the
    key's hash) and ``slot`` naming the row. Every check comes first, so a row refused is a row not written. The
    native build's ``open_row`` does the same (``mplslb.switching._fast``)."""
    keys, protos, versions, budgets, reasons, ports, servers, macs, starts, requests, ends, endings, home, slots = (
        columns
    )
    rows = len(protos)
    if not 0 <= pair < rows:
        raise IndexError(f"row {pair} is not one of the table's {rows}")
    if not 0 <= slot < len(slots):
        raise IndexError(f"slot {slot} is not one of the index's {len(slots)}")
    if type(packed) is not bytes:
        raise TypeError(f"a packed key is bytes, not {type(packed).__name__}")
    key_size, mac_size = len(keys) // rows, len(macs) // rows
    if len(packed) > key_size:
        raise ValueError(f"a key of {len(packed)} octets does not fit a row's {key_size}")
    if len(mac) != mac_size:
        raise ValueError(f"a MAC of {len(mac)} octets, not {mac_size}")
    for name, value, low, high in (
        ("proto", proto, 0, 0xFF),
        ("ip_version", ip_version, 0, 0xFF),
        ("budget", budget, 0, 0xFF),
        ("client_port", client_port, -(1 << 31), (1 << 31) - 1),
        ("server", server, 0, (1 << 32) - 1),
    ):
        if not low <= value <= high:
            raise ValueError(f"{name} {value} is out of its column's range")
    at = pair * key_size
    keys[at : at + len(packed)] = packed
    protos[pair] = proto
    versions[pair] = ip_version
    budgets[pair] = budget
    reasons[pair] = 0
    ports[pair] = client_port
    servers[pair] = server
    macs[pair * mac_size : (pair + 1) * mac_size] = mac
    starts[pair] = now
    requests[pair] = ends[pair] = endings[pair] = 0.0
    home[pair] = hash(packed) & (len(slots) - 1)
    slots[slot] = pair


def find_slot_py(columns: tuple[memoryview[Any], ...], packed: bytes, /) -> tuple[int, int]:
    """Where the key index (the last of ``columns``, ROW_COLUMNS) keeps the key ``packed``: from the key's hash on,
    the first slot that is empty or names a row of the table whose key (the first column) starts with ``packed``;
    that slot and its row (-1: empty, the slot a new row of the key takes). The native build's ``find_slot`` does the
    same (``mplslb.switching._fast``)."""
    keys, rows, slots = columns[0], len(columns[1]), columns[-1]
    if type(packed) is not bytes:
        raise TypeError(f"a packed key is bytes, not {type(packed).__name__}")
    nslots = len(slots)
    if nslots == 0 or nslots & (nslots - 1):
        raise ValueError("find_slot: the index's slots are not a power of two")
    mask, key_size, key_len = nslots - 1, len(keys) // rows if rows else 0, len(packed)
    at = hash(packed) & mask
    for _ in range(nslots):
        row = slots[at]
        if row == _EMPTY:
            return at, row
        if 0 <= row < rows and key_len <= key_size and keys[row * key_size : row * key_size + key_len] == packed:
            return at, row
        at = (at + 1) & mask
    raise RuntimeError("find_slot: the key index has no empty slot")


class _RowQueue:
    """Rows and a time for each (a TCP session's SYN), first in first out: two growing arrays read from ``head``
    on, 12 octets an entry and no object per entry."""

    __slots__ = ("head", "rows", "times")
    #: Consumed entries are cut off the front once there are this many and they are half the arrays.
    CUT = 4096

    def __init__(self) -> None:
        self.rows = array("I")
        self.times = array("d")
        self.head = 0

    def __len__(self) -> int:
        return len(self.rows) - self.head

    def append(self, row: int, at: float) -> int:
        """Queue ``row``, started ``at``; returns the queue's length."""
        self.rows.append(row)
        self.times.append(at)
        return len(self.rows) - self.head

    def extend(self, rows: list[int], at: float) -> None:
        """Rows that all started ``at``."""
        self.rows.extend(rows)
        self.times.extend([at] * len(rows))

    def first(self) -> tuple[int, float]:
        return self.rows[self.head], self.times[self.head]

    def pop_first(self) -> None:
        self.head += 1
        if self.head >= self.CUT and 2 * self.head >= len(self.rows):
            del self.rows[: self.head]
            del self.times[: self.head]
            self.head = 0

    def kept(self, keep: Callable[[int, float], bool]) -> _RowQueue:
        """A queue of the entries ``keep`` keeps, in the same order."""
        queue = _RowQueue()
        for row, at in zip(self.rows[self.head :], self.times[self.head :], strict=True):
            if keep(row, at):
                queue.append(row, at)
        return queue


class _Views(NamedTuple):
    keys: np.ndarray
    proto: np.ndarray
    ip_version: np.ndarray
    rt_budget: np.ndarray
    end_reason: np.ndarray
    client_port: np.ndarray
    server: np.ndarray
    client_mac: np.ndarray
    start_time: np.ndarray
    request_at: np.ndarray
    end_time: np.ndarray
    ending_at: np.ndarray


class SessionTable:
    """The session table: fixed-size records indexed by label pair, found by flow key or by C2S label.

    Theory of operation
    -------------------
    The row of a session is its label pair's index, ``(c2s - c2s_min) / 2``: finding a session by label is an index.
    Every field is a preallocated array over all pairs (state, protocol, server, client port and MAC, times,
    the measurement's budget, the flow key packed in 40 bytes), written once when the table is made, so a live
    session adds no memory and no Python object. Finding a session by flow key (an unlabelled frame) is an
    open-addressing hash table of row numbers with linear probing (twice as many slots as rows), whose deletions
    shift the following entries back (no tombstones to clean). Idle deadlines are an array too: the table
    remembers the earliest deadline armed, and :meth:`due` finds the rows whose time has come with one vectorised
    pass, so arming costs nothing per frame and the driver decides how often to look.

    ``on_end`` is called when a session stops counting as live: when it becomes ENDING (most ENDING sessions are
    over: they count for neither the global limit nor their server's load) or reaches a final state from any
    other state. The load balancing unit counts it off its server there, and back on in ``on_revive`` when an
    ENDING session's traffic goes on.
    """

    def __init__(
        self,
        timeouts: Timeouts | None = None,
        on_end: Callable[[Session], None] | None = None,
        on_revive: Callable[[Session], None] | None = None,
        *,
        c2s_min: int = C2S_MIN,
        c2s_max: int = C2S_MAX,
        store: Allocator = HEAP,
    ) -> None:
        self.timeouts = timeouts or Timeouts()
        self.on_end = on_end
        self.on_revive = on_revive
        self.c2s_min = c2s_min
        rows = (c2s_max - c2s_min) // 2 + 1
        self.rows = rows
        self._servers: dict[int, Server] = {}  # every server a row has named, by its (never reused) index
        self._store = store
        # The rows' fields: from ``store`` (see :mod:`mplslb.state`), so they may outlive the process.
        self.state = store.array("sessions.state", "B", rows)
        self.proto = store.array("sessions.proto", "B", rows)
        self.ip_version = store.array("sessions.ip_version", "B", rows)
        self.rt_budget = store.array("sessions.rt_budget", "B", rows)
        self.end_reason = store.array("sessions.end_reason", "B", rows)
        # The final state a session ended in (its row may be free again).
        self.final_state = store.array("sessions.final_state", "B", rows)
        self.client_port = store.array("sessions.client_port", "i", rows)
        self.server = store.array("sessions.server", "I", rows)
        self.start_time = store.array("sessions.start_time", "d", rows)
        self.request_at = store.array("sessions.request_at", "d", rows)
        self.end_time = store.array("sessions.end_time", "d", rows)
        # When the RST or second FIN that made the session ENDING came.
        self.ending_at = store.array("sessions.ending_at", "d", rows)
        self.deadline = store.array("sessions.deadline", "d", rows)
        self.keys = store.array("sessions.keys", "B", KEY_SIZE * rows)
        self.client_mac = store.array("sessions.client_mac", "B", ETH_ALEN * rows)
        # The key index is derived from the keys (and from the process's hash seed): never kept, rebuilt.
        self.home = array("i", [0]) * rows  # the hash slot each row's key hashes to
        slots = 1 << max(4, (2 * rows - 1).bit_length())
        self._mask = slots - 1
        self._slots = array("i", [_EMPTY]) * slots
        self._row_columns = tuple(memoryview(getattr(self, name)) for name in ROW_COLUMNS)
        #: The last key :meth:`lookup` was given, packed, with its slot and row as :func:`find_slot_py` finds them: a
        #: new session's key is looked up just before it opens. Forgotten whenever the key index changes.
        self._looked_up: tuple[FlowKey | None, bytes, int, int] = _NOT_LOOKED_UP
        self._np_state = np.frombuffer(self.state, dtype=np.uint8)
        self._np_deadline = np.frombuffer(self.deadline, dtype=np.float64)
        self._np_server = np.frombuffer(self.server, dtype=np.uint32)
        self._np_views: _Views | None = None
        # A lower bound of the deadlines armed in each block of rows (see _BLOCK_SHIFT); derived, never kept.
        self._block_min = array("d", [math.inf]) * ((rows >> _BLOCK_SHIFT) + 1)
        self._np_block_min = np.frombuffer(self._block_min, dtype=np.float64)
        self.reasons: list[str] = [""]
        self._reason_code: dict[str, int] = {"": 0}
        self._next = math.inf
        self._count = 0
        self.started = 0  # sessions ever opened
        self.ended: dict[str, int] = {}  # sessions taken out of the table, by end reason
        self.peak = 0
        self.live = 0  # sessions not yet closed, interrupted or ENDING
        self.half_open = 0  # live TCP sessions in START or ANSWERED
        self.revived = 0  # ENDING sessions whose traffic went on: the RST or FIN was not believed
        #: RSTs and closing FINs whose sequence number was not believed, by reason (the module docstring).
        self.not_believed: dict[str, int] = {}
        # (row, its SYN's time) of TCP sessions in the order they opened; entries of rows no longer half-open
        # are skipped when met (and swept when they outnumber the live ones).
        self._half_open_fifo = _RowQueue()
        #: Told of every session opened (event None) and every change of state, with the event (not of the row's
        #: removal): a cluster node sends these to its peers (:mod:`mplslb.cluster`).
        self.on_change: Callable[[Session, SessionEvent | None], None] | None = None

    @property
    def timeouts(self) -> Timeouts:
        """The idle timeouts deadlines are armed with from now on."""
        return self._timeouts

    @timeouts.setter
    def timeouts(self, timeouts: Timeouts) -> None:
        self._timeouts = timeouts
        # A new session's idle timeout (its first state's), by protocol number.
        self._opening = [timeouts.idle(proto, SessionState.START) for proto in range(256)]

    # -- rows -------------------------------------------------------------------------------------------------------
    def state_counts(self) -> dict[str, int]:
        """Live sessions by state (lower-case state names; one pass over the state column)."""
        states = self._np_state
        counts = np.bincount(states[nonzero_bytes(states)], minlength=len(_STATES))
        return {_STATES[code].name.lower(): int(n) for code, n in enumerate(counts.tolist()) if code and n}

    def __len__(self) -> int:
        return self._count

    def server_of(self, index: int) -> Server:
        return self._servers[index]

    def key_of(self, pair: int) -> FlowKey:
        proto, alen, sport, dport, src, dst = _KEY.unpack_from(self.keys, pair * KEY_SIZE)
        return FlowKey(proto, src[:alen], sport, dst[:alen], dport)

    def open(
        self,
        key: FlowKey,
        c2s: int,
        server: Server,
        *,
        client_port: int,
        client_mac: bytes,
        ip_version: int,
        now: float,
    ) -> Session:
        """Start a session: ``key`` (as the client sent it) on label pair ``c2s``, bound to ``server``."""
        pair = (c2s - self.c2s_min) >> 1
        if not 0 <= pair < self.rows or c2s & 1 != self.c2s_min & 1:
            raise ValueError(f"label {c2s} is not a C2S label of this table")
        if self.state[pair] != _FREE:
            raise ValueError(f"label {c2s} already in the table")
        proto = key.proto
        looked, packed, slot, found = self._looked_up
        if looked is not key:  # the key's lookup (an unlabelled frame's, just before) found its slot already
            packed = _KEY.pack(proto, len(key.src), key.sport, key.dport, key.src, key.dst)
            slot, found = _find_slot(self._row_columns, packed)
        if found != _EMPTY:
            raise ValueError(f"session {key} already in the table")
        if server.index not in self._servers:
            self._name(server)
        self._looked_up = _NOT_LOOKED_UP
        # Every field first, the state byte last: a row is valid only once complete (see mplslb.state).
        _open_row(self._row_columns, pair, slot, packed, proto, ip_version, WATCH_BUDGET, client_port, server.index,
                  client_mac, now)  # fmt: skip
        count = self._count = self._count + 1
        self.started += 1
        self.live += 1
        if count > self.peak:
            self.peak = count
        session = Session(self, pair)
        self._arm(pair, now + self._opening[proto])
        self.state[pair] = _START
        if proto == IPPROTO_TCP:
            self.half_open += 1
            self._queue_half_open(pair, now)
        if self.on_change is not None:
            self.on_change(session, None)
        return session

    def open_block(
        self,
        keys: Sequence[FlowKey],
        c2s: Sequence[int],
        servers: Sequence[Server],
        *,
        client_ports: Sequence[int],
        client_macs: bytes,
        ip_version: int,
        now: float,
    ) -> None:
        """Start many sessions at once, leaving the table as :meth:`open` called for each in turn leaves it (the
        ``client_macs`` back to back): the keys and their index entries one by one, every other field for all the
        rows at once with numpy, the state bytes last. Nothing is written unless every session can open (but keys
        in rows still free, which nothing reads). For a table nobody watches (``on_change`` None): it makes no
        :class:`Session` views."""
        n = len(keys)
        if self.on_change is not None:
            raise RuntimeError("open_block is for a table without on_change")
        if not (len(c2s) == len(servers) == len(client_ports) == n and len(client_macs) == n * ETH_ALEN):
            raise ValueError("open_block needs as many labels, servers, ports and MACs as keys")
        labels = np.array(c2s, dtype=np.int64)
        rows = (labels - self.c2s_min) >> 1
        bad = (rows < 0) | (rows >= self.rows) | ((labels & 1) != self.c2s_min & 1)
        if bad.any():
            raise ValueError(f"label {labels[bad][0]} is not a C2S label of this table")
        taken = self._np_state[rows] != _FREE
        if taken.any():
            raise ValueError(f"label {labels[taken][0]} already in the table")
        ordered = np.sort(rows)
        if (ordered[1:] == ordered[:-1]).any():
            raise ValueError("open_block got a label twice")
        pairs = rows.tolist()
        packed = [_KEY.pack(key.proto, len(key.src), key.sport, key.dport, key.src, key.dst) for key in keys]
        slots, home, mask, columns = self._slots, self.home, self._mask, self._row_columns
        stored = columns[0]
        self._looked_up = _NOT_LOOKED_UP
        for done, (key, pair, one) in enumerate(zip(keys, pairs, packed, strict=True)):
            slot, found = _find_slot(columns, one)
            if found != _EMPTY:  # taken out again: nothing is written unless every session opens
                for earlier in pairs[:done]:
                    self._unhash(earlier)
                raise ValueError(f"session {key} already in the table")
            # The key in its row before the index names the row: a later key of the block probing past this slot
            # compares with this key, not with the key the free row held last.
            stored[pair * KEY_SIZE : pair * KEY_SIZE + len(one)] = one
            slots[slot] = pair
            home[pair] = hash(one) & mask
        for server in servers:
            if server.index not in self._servers:
                self._name(server)
        v = self._views()
        protos = np.array([key.proto for key in keys], dtype=np.uint8)
        v.proto[rows] = protos
        v.ip_version[rows] = ip_version
        v.rt_budget[rows] = WATCH_BUDGET
        v.end_reason[rows] = 0
        v.client_port[rows] = client_ports
        v.server[rows] = [server.index for server in servers]
        v.client_mac[rows] = np.frombuffer(client_macs, dtype=np.uint8).reshape(n, ETH_ALEN)
        v.start_time[rows] = now
        v.request_at[rows] = v.end_time[rows] = v.ending_at[rows] = 0.0
        count = self._count = self._count + n
        self.started += n
        self.live += n
        self.peak = max(self.peak, count)
        proto_list = protos.tolist()
        deadlines = now + np.array([self._opening[proto] for proto in proto_list], dtype=np.float64)
        tcp = protos == IPPROTO_TCP
        self._np_deadline[rows] = deadlines
        np.minimum.at(self._np_block_min, rows >> _BLOCK_SHIFT, deadlines)
        self._next = min(self._next, float(deadlines.min()))
        self._np_state[rows] = _START
        opened = rows[tcp].tolist()
        if opened:
            self.half_open += len(opened)
            fifo = self._half_open_fifo
            fifo.extend(opened, now)
            if len(fifo) > 2 * self.half_open + 64:
                self._half_open_fifo = fifo.kept(self._is_half_open)

    def _name(self, server: Server) -> None:
        """Keep the name of a server no row named before, durably before a row names it (see mplslb.state)."""
        self._store.remember(f"server.{server.index}", server.config.name)
        self._servers[server.index] = server

    def _views(self) -> _Views:
        """Numpy views of the rows' fields that :meth:`open_block` writes (made once)."""
        if self._np_views is None:
            rows = self.rows
            self._np_views = _Views(
                np.frombuffer(self.keys, dtype=np.uint8).reshape(rows, KEY_SIZE),
                np.frombuffer(self.proto, dtype=np.uint8),
                np.frombuffer(self.ip_version, dtype=np.uint8),
                np.frombuffer(self.rt_budget, dtype=np.uint8),
                np.frombuffer(self.end_reason, dtype=np.uint8),
                np.frombuffer(self.client_port, dtype=np.int32),
                self._np_server,
                np.frombuffer(self.client_mac, dtype=np.uint8).reshape(rows, ETH_ALEN),
                np.frombuffer(self.start_time, dtype=np.float64),
                np.frombuffer(self.request_at, dtype=np.float64),
                np.frombuffer(self.end_time, dtype=np.float64),
                np.frombuffer(self.ending_at, dtype=np.float64),
            )
        return self._np_views

    def _queue_half_open(self, pair: int, started: float) -> None:
        fifo = self._half_open_fifo
        if fifo.append(pair, started) > 2 * self.half_open + 64:
            self._half_open_fifo = fifo.kept(self._is_half_open)

    def _is_half_open(self, pair: int, started: float) -> bool:
        return self.state[pair] in _HALF_OPEN_CODES and self.start_time[pair] == started

    def oldest_half_open(self) -> Session | None:
        """The half-open TCP session that opened first, or None (amortised O(1): stale entries are dropped)."""
        fifo = self._half_open_fifo
        while len(fifo):
            pair, started = fifo.first()
            if self._is_half_open(pair, started):
                return Session(self, pair)
            fifo.pop_first()
        return None

    def lookup(self, key: FlowKey) -> Session | None:
        packed = _KEY.pack(key.proto, len(key.src), key.sport, key.dport, key.src, key.dst)
        slot, row = _find_slot(self._row_columns, packed)
        self._looked_up = (key, packed, slot, row)
        return None if row == _EMPTY else Session(self, row)

    def by_c2s(self, c2s: int) -> Session | None:
        pair = (c2s - self.c2s_min) >> 1
        if not 0 <= pair < self.rows or self.state[pair] == _FREE or c2s & 1 != self.c2s_min & 1:
            return None
        return Session(self, pair)

    def sessions(self) -> list[Session]:
        """Every session in the table (live, or final and lingering), in label order."""
        return [Session(self, int(pair)) for pair in nonzero_bytes(self._np_state).tolist()]

    def servers_of(self, pairs: np.ndarray) -> np.ndarray:
        """The indices of the servers of the sessions in ``pairs``."""
        servers: np.ndarray = self._np_server[pairs]
        return servers

    def occupied(self) -> tuple[np.ndarray, np.ndarray]:
        """The rows in use and their servers' indices, as arrays (for figures over the whole table)."""
        rows = nonzero_bytes(self._np_state)
        return rows, self._np_server[rows]

    def oldest(
        self, limit: int, *, state: SessionState | None = None, server: Server | None = None
    ) -> tuple[int, list[Session]]:
        """The sessions in the table (in ``state`` and of ``server`` when given): how many, and the ``limit`` that
        started first (for a listing: read from the arrays, one Python object per session listed only)."""
        mask = self._np_state != _FREE if state is None else self._np_state == _CODE[state]
        if server is not None:
            mask &= self._np_server == server.index
        rows = np.flatnonzero(mask)
        started = np.frombuffer(self.start_time, dtype=np.float64)[rows]
        first = rows[np.lexsort((rows, started))[:limit]]  # by start, then by row (label order)
        return int(rows.size), [Session(self, int(pair)) for pair in first]

    def per_service(self, services: Iterable[tuple[bytes, int, int]]) -> dict[tuple[bytes, int, int], int]:
        """How many sessions in the table, not in a final state, each of ``services`` (destination address,
        protocol, destination port, as the clients sent them) has. Read from the arrays, no object per session."""
        states = self._np_state
        rows = nonzero_bytes(states)  # the rows in use (a few of many, mostly), then those not final
        rows = rows[~np.isin(states[rows], _FINAL_CODE_LIST)]
        keys = np.frombuffer(self.keys, dtype=np.uint8).reshape(-1, KEY_SIZE)[rows]
        proto, alen = keys[:, _KEY_PROTO], keys[:, _KEY_ALEN]
        dport = keys[:, _KEY_DPORT].astype(np.uint16) << 8 | keys[:, _KEY_DPORT + 1]
        found: dict[tuple[bytes, int, int], int] = {}
        for service in services:
            dst, p, port = service
            mask = (proto == p) & (dport == port) & (alen == len(dst))
            mask &= np.all(keys[:, _KEY_DST : _KEY_DST + len(dst)] == np.frombuffer(dst, dtype=np.uint8), axis=1)
            found[service] = int(np.count_nonzero(mask))
        return found

    def of_server(self, server: Server) -> list[Session]:
        """The sessions of ``server`` in the table."""
        rows = np.flatnonzero((self._np_state != _FREE) & (self._np_server == server.index))
        return [Session(self, int(pair)) for pair in rows]

    def arm(self, session: Session, deadline: float) -> None:
        """Make ``deadline`` the session's (its idle timeout, checked when it comes)."""
        self._arm(session.pair, deadline)

    def _arm(self, pair: int, deadline: float) -> None:
        self.deadline[pair] = deadline
        block = pair >> _BLOCK_SHIFT
        if deadline < self._block_min[block]:
            self._block_min[block] = deadline
        if deadline < self._next:
            self._next = deadline

    # -- the lifecycle ----------------------------------------------------------------------------------------------
    def apply(self, session: Session, event: SessionEvent, now: float, reason: str = "") -> SessionState:
        """Apply ``event`` to ``session`` per the transition table; returns the new state."""
        pair = session.pair
        old = _STATES[self.state[pair]]
        new = TRANSITIONS.get((old, event))
        if new is None or self.state[pair] == _FREE:
            raise InvalidTransition(f"{event} not allowed in state {old} ({session!r})")
        if new is SessionState.ENDING and old is not SessionState.ENDING:
            self.ending_at[pair] = now  # before the state byte: an ENDING row always has its close's time
        self.state[pair] = _CODE[new]
        if old in HALF_OPEN_STATES and new not in HALF_OPEN_STATES and self.proto[pair] == IPPROTO_TCP:
            self.half_open -= 1
        if new in FINAL_STATES:
            self.end_time[pair] = now
            self.final_state[pair] = _CODE[new]
            self.end_reason[pair] = self._reason(reason or str(event))
            self.rt_budget[pair] = 0
            if old is not SessionState.ENDING:  # an ENDING session was counted off when it began to end
                self._counted_off(session)
        elif new is SessionState.ENDING:
            if old is not SessionState.ENDING:
                self._arm(pair, now + self._timeouts.closed_linger)
                self._counted_off(session)
            elif event in _ENDS:
                # A close repeated (a FIN retransmitted, an RST answering late data) is more evidence of the close,
                # not of life: the linger starts again from it, so the exchange it causes both ways (the FIN and
                # its ACK) is not taken for the session going on.
                self.ending_at[pair] = now
                self._arm(pair, now + self._timeouts.closed_linger)
        elif new is not old and new not in HALF_OPEN_STATES:  # a half-open session keeps its SYN's deadline
            if event is SessionEvent.REVIVE:
                self.revived += 1
                self.live += 1
                if self.on_revive is not None:
                    self.on_revive(session)
            self._arm(pair, now + self._timeouts.idle(self.proto[pair], new))
        if new is not old and self.on_change is not None:
            self.on_change(session, event)
        return new

    def assume(self, session: Session, new: SessionState, now: float) -> bool:
        """Put a live session in the live state ``new`` as a peer reports it (a replica follows the transitions
        seen where its frames pass, which may skip states): the counts, the ENDING linger and the revival are kept
        as :meth:`apply` keeps them. A report that would take a session back to a half-open state is stale and
        ignored. Returns whether the state changed; :attr:`on_change` is not told."""
        pair = session.pair
        old = _STATES[self.state[pair]]
        if new is old or self.state[pair] in _FINAL_CODES or new in FINAL_STATES:
            return False
        if new in HALF_OPEN_STATES and (old not in HALF_OPEN_STATES or new is SessionState.START):
            return False
        self.state[pair] = _CODE[new]
        if old in HALF_OPEN_STATES and new not in HALF_OPEN_STATES and self.proto[pair] == IPPROTO_TCP:
            self.half_open -= 1
        if new is SessionState.ENDING:
            self.ending_at[pair] = now
            self._arm(pair, now + self._timeouts.closed_linger)
            self._counted_off(session)
            return True
        if old is SessionState.ENDING:
            self.live += 1
            if self.on_revive is not None:
                self.on_revive(session)
        if new not in HALF_OPEN_STATES:
            self._arm(pair, now + self._timeouts.idle(self.proto[pair], new))
        return True

    def _counted_off(self, session: Session) -> None:
        self.live -= 1
        if self.on_end is not None:
            self.on_end(session)

    def _reason(self, reason: str) -> int:
        code = self._reason_code.get(reason)
        if code is None:
            if len(self.reasons) > 255:
                raise ValueError("too many distinct end reasons")
            code = self._reason_code[reason] = len(self.reasons)
            self.reasons.append(reason)
        return code

    def tcp_end(self, session: Session, flags: int, *, from_client: bool, now: float) -> None:
        """A TCP segment of a live session carried RST or FIN (``flags``) from one side."""
        if self.state[session.pair] in _FINAL_CODES:
            return
        if flags & _RST:
            self.apply(session, SessionEvent.CLIENT_RST if from_client else SessionEvent.SERVER_RST, now)
        elif flags & _FIN:
            self.apply(session, SessionEvent.CLIENT_FIN if from_client else SessionEvent.SERVER_FIN, now)

    def closes(self, session: Session, flags: int, *, from_client: bool) -> bool:
        """Would a TCP segment with ``flags`` from one side make the open ``session`` ENDING (an RST, or the FIN of
        one side when the other has sent its own), start an ENDING session's linger again (any RST or FIN), or, for
        the client's first FIN, shorten an established session's idle timeout to ``tcp_closing``? These are the
        segments judged by their sequence number. A server's first FIN is not: it comes in on the server's own port
        from the server's MAC, where nobody on a client's segment can send."""
        state = self.state[session.pair]
        if state == _ENDING:
            return bool(flags & (_RST | _FIN))
        if state not in _OPEN_CODES:
            return False
        if flags & _RST:
            return True
        if not flags & _FIN:
            return False
        return state in (_ESTABLISHED, _CLOSING_SERVER) if from_client else state == _CLOSING_CLIENT

    def disbelieve(self, flags: int) -> None:
        """Count an RST or closing FIN (``flags``) whose sequence number was not believed; nothing else changes."""
        reason = "rst_out_of_window" if flags & _RST else "fin_out_of_window"
        self.not_believed[reason] = self.not_believed.get(reason, 0) + 1

    def client_ack(self, session: Session, flags: int, now: float) -> bool:
        """A client's TCP segment (``flags``, -1 unknown): True when its ACK completed the handshake."""
        if self.state[session.pair] != _ANSWERED or flags < 0 or flags & (_ACK | _SYN | _RST) != _ACK:
            return False
        self.apply(session, SessionEvent.CLIENT_ACK, now)
        return True

    def quiet_endings(self, pairs: np.ndarray, last_active: np.ndarray, now: float) -> np.ndarray:
        """Which of ``pairs`` :meth:`linger_over` would close now (a mask; nothing changes): ENDING, due, nothing of
        them passed after half the linger (``last_active``: their labels' last-seen times), nobody told of changes."""
        if self.on_change is not None:
            return np.zeros(pairs.size, dtype=np.bool_)
        grace = self._views().ending_at[pairs] + self._timeouts.closed_linger / 2
        quiet: np.ndarray = (self._np_state[pairs] == _ENDING) & (self._np_deadline[pairs] <= now)
        quiet &= last_active <= grace
        return quiet

    def close_quiet(self, pairs: np.ndarray, now: float) -> None:
        """:meth:`linger_over` for ``pairs``, which :meth:`quiet_endings` takes: CLOSED at ``now``, in one pass."""
        v = self._views()
        v.end_time[pairs] = now
        np.frombuffer(self.final_state, dtype=np.uint8)[pairs] = _CLOSED
        v.end_reason[pairs] = self._reason("closed")
        v.rt_budget[pairs] = 0
        self._np_state[pairs] = _CLOSED

    def linger_over(self, session: Session, last_active: float, now: float) -> SessionState:
        """An ENDING session's linger expired: CLOSED if nothing of it passed more than half the linger after the
        close event (``last_active``: its labels' last-seen time), otherwise revived."""
        grace = self.ending_at[session.pair] + self._timeouts.closed_linger / 2
        if last_active > grace:
            return self.apply(session, SessionEvent.REVIVE, now)
        return self.apply(session, SessionEvent.QUIET, now, "closed")

    def observe(
        self, session: Session, *, from_client: bool, tcp_flags: int, payload_len: int, now: float
    ) -> Observation:
        """A watched frame of ``session`` (``tcp_flags`` -1 when not TCP): time the server's responses from the
        session's own frames, SYN -> SYN-ACK (or a UDP request -> its first reply) and request -> first response
        byte, within :data:`WATCH_BUDGET` frames. The server's first answer moves a TCP session to ANSWERED (another to
        ESTABLISHED); the client's ACK after it, which is looked for whatever the budget, completes the handshake."""
        pair = session.pair
        handshake = from_client and self.client_ack(session, tcp_flags, now)
        if self.rt_budget[pair] <= 0 or self.state[pair] in _FINAL_CODES:
            return _new(Observation, (None, False, False, True, handshake))
        self.rt_budget[pair] -= 1
        sample: float | None = None
        replied = request = False
        tcp = self.proto[pair] == IPPROTO_TCP
        if not from_client and self.state[pair] == _START:
            if not tcp or (tcp_flags >= 0 and tcp_flags & _SYN_ACK == _SYN_ACK):
                sample, replied = now - self.start_time[pair], True
                self.apply(session, SessionEvent.SYN_ACK if tcp else SessionEvent.SERVER_REPLY, now)
                if not tcp:
                    self.rt_budget[pair] = 0  # a UDP flow's first reply times its request: done
        elif payload_len:
            if from_client:
                request = self.request_seen(session, now)
            elif self.request_at[pair]:
                sample = now - self.request_at[pair]
                self.rt_budget[pair] = 0
        return _new(Observation, (sample, replied, request, self.rt_budget[pair] <= 0, handshake))

    def whole_exchange(
        self, session: Session, answer: float, ack: float, request: float, response: float
    ) -> tuple[float, float] | None:
        """What :meth:`observe` makes of a TCP session's four watched moments seen at once, in this order: the
        server's SYN-ACK at ``answer``, the client's ACK at ``ack``, its first request at ``request``, the first
        response byte at ``response``: the session goes from START through ANSWERED to ESTABLISHED, its request is
        timed and its measurement is over. Returns the two samples (SYN to SYN-ACK, request to response), or None,
        changing nothing, unless the session is in START with budget for four frames, no request seen and nobody
        told of its changes (:attr:`on_change`), and the times are in order (``answer`` after the start, ``ack`` after
        ``answer``, ``response`` after ``request``)."""
        pair = session.pair
        started = self.start_time[pair]
        if (
            self.state[pair] != _START
            or self.proto[pair] != IPPROTO_TCP
            or self.rt_budget[pair] < _WHOLE_EXCHANGE
            or self.request_at[pair]
            or self.on_change is not None
            or not started < answer < ack
            or not 0 < request < response
        ):
            return None
        self.state[pair] = _ESTABLISHED  # through ANSWERED, which keeps the SYN's deadline
        self.half_open -= 1
        self._arm(pair, ack + self._timeouts.tcp_established)
        self.request_at[pair] = request
        self.rt_budget[pair] = 0
        return answer - started, response - request

    def start_times(self, pairs: np.ndarray) -> np.ndarray:
        """The start times of the sessions in ``pairs``."""
        times: np.ndarray = self._views().start_time[pairs]
        return times

    def whole_exchanges(
        self, pairs: np.ndarray, answer: np.ndarray, ack: np.ndarray, request: np.ndarray, response: np.ndarray
    ) -> np.ndarray:
        """Which of ``pairs`` :meth:`whole_exchange` would take with these times (a mask; nothing changes)."""
        if self.on_change is not None:
            return np.zeros(pairs.size, dtype=np.bool_)
        v = self._views()
        inside = (pairs >= 0) & (pairs < self.rows)
        at = np.where(inside, pairs, 0)
        started = v.start_time[at]
        taken: np.ndarray = (
            inside
            & (self._np_state[at] == _START)
            & (v.proto[at] == IPPROTO_TCP)
            & (v.rt_budget[at] >= _WHOLE_EXCHANGE)
            & (v.request_at[at] == 0)
            & (started < answer)
            & (answer < ack)
            & (request > 0)
            & (request < response)
        )
        return taken

    def close_whole(
        self,
        pairs: np.ndarray,
        ack: np.ndarray,
        request: np.ndarray,
        first: np.ndarray,
        second: np.ndarray,
        each: Callable[[Session], None],
    ) -> None:
        """What :meth:`whole_exchange` (the client's ACK at ``ack``, the request at ``request``) and then both sides'
        FINs (the first at ``first``, the other at ``second``), each believed, make of ``pairs``, which
        :meth:`whole_exchanges` takes: ESTABLISHED, CLOSING, then ENDING at ``second``, with the deadlines those
        transitions arm, in one pass over the arrays. Then, session by session in order, ``each`` (the caller's
        part of its exchange) and its count off (:attr:`on_end`), as the transitions one at a time would have."""
        v = self._views()
        n = int(pairs.size)
        if not n:
            return
        self.half_open -= n
        v.request_at[pairs] = request
        v.rt_budget[pairs] = 0
        v.ending_at[pairs] = second
        self._np_state[pairs] = _ENDING
        timeouts = self._timeouts
        ending = second + timeouts.closed_linger
        self._np_deadline[pairs] = ending
        armed = np.minimum(np.minimum(ack + timeouts.tcp_established, first + timeouts.tcp_closing), ending)
        np.minimum.at(self._np_block_min, pairs >> _BLOCK_SHIFT, armed)
        self._next = min(self._next, float(armed.min()))
        for pair in pairs.tolist():
            session = Session(self, pair)
            each(session)
            self._counted_off(session)

    def stop_measuring(self, session: Session) -> None:
        """End the response-time measurement without a sample (its watched frames were spent elsewhere)."""
        self.rt_budget[session.pair] = 0

    def request_seen(self, session: Session, now: float) -> bool:
        """The client sent request bytes; True when they are the session's first (the request is timed from
        here)."""
        pair = session.pair
        if self.request_at[pair]:
            return False
        self.request_at[pair] = now
        return True

    def remove(self, session: Session) -> None:
        """Take a final session out of the table (its labels are withdrawn by the caller); its row is free."""
        pair = session.pair
        if self.state[pair] == _FREE:
            return
        reason = self.reasons[self.end_reason[pair]]
        self.ended[reason] = self.ended.get(reason, 0) + 1
        self.state[pair] = _FREE
        self._count -= 1
        self._unhash(pair)

    def _unhash(self, pair: int) -> None:
        """Take ``pair`` out of the key index, shifting the entries after it back (linear probing's deletion)."""
        slots, mask, home = self._slots, self._mask, self.home
        self._looked_up = _NOT_LOOKED_UP
        at = home[pair]
        while slots[at] != pair:
            at = (at + 1) & mask
        hole = at
        probe = hole
        while True:
            probe = (probe + 1) & mask
            row = slots[probe]
            if row == _EMPTY:
                break
            want = home[row]
            # The entry at ``probe`` may move into the hole if its home does not lie cyclically in (hole, probe].
            if (probe > hole and (want <= hole or want > probe)) or (probe < hole and want <= hole and want > probe):
                slots[hole] = row
                hole = probe
        slots[hole] = _EMPTY

    # -- a table adopted from a previous process (mplslb.state) ---------------------------------------------------
    def final_codes(self) -> frozenset[int]:
        """The state bytes of final (closed, interrupted) rows."""
        return _FINAL_CODES

    def drop_row(self, pair: int) -> None:
        """Free ``pair``'s row as it lies in the arrays, before :meth:`restore` (adoption's repairs)."""
        self.state[pair] = _FREE

    def restore(self, servers: dict[int, Server], now: float) -> list[int]:
        """Rebuild what is derived from the rows after adopting them: the key index, the counts, the half-open
        sessions' queue (oldest first) and the deadlines. ``servers`` names the servers the rows' indices refer to.

        A half-open TCP session's wait starts again at ``now`` (its answer, or the client's ACK, may have passed
        while no daemon watched); an ENDING session lingers until its close's time plus ``closed_linger``. Returns
        the live rows (neither final nor ENDING)."""
        state = np.frombuffer(self.state, dtype=np.uint8)
        rows = np.flatnonzero(state).tolist()
        self._servers.update(servers)
        slots, mask = self._slots, self._mask
        self._looked_up = _NOT_LOOKED_UP
        for pair in rows:
            packed = bytes(self.keys[pair * KEY_SIZE : pair * KEY_SIZE + _KEY.size])
            slot, found = _find_slot(self._row_columns, packed)
            if found != _EMPTY:
                raise ValueError(f"rows {found} and {pair} hold the same flow key")
            slots[slot] = pair
            self.home[pair] = hash(packed) & mask
        live = [pair for pair in rows if state[pair] not in _FINAL_CODES and state[pair] != _ENDING]
        half_open = [pair for pair in live if state[pair] in _HALF_OPEN_CODES and self.proto[pair] == IPPROTO_TCP]
        half_open.sort(key=lambda pair: (self.start_time[pair], pair))  # the order they opened in
        self._half_open_fifo = _RowQueue()
        self.half_open = len(half_open)
        self._count = len(rows)
        self.live = len(live)
        self.peak = max(self.peak, self._count)
        at = np.asarray(rows, dtype=np.intp)
        deadlines = self._np_deadline[at]
        self._next = float(deadlines.min()) if deadlines.size else math.inf
        self._np_block_min[:] = math.inf
        np.minimum.at(self._np_block_min, at >> _BLOCK_SHIFT, deadlines)
        linger = self._timeouts.closed_linger
        for pair in rows:
            if state[pair] == _ENDING:
                if not 0 < self.ending_at[pair] <= now:
                    self.ending_at[pair] = now
                self._arm(pair, self.ending_at[pair] + linger)
        wait = now + self._timeouts.tcp_start
        for pair in half_open:
            self.start_time[pair] = now
            self._arm(pair, wait)
        self._half_open_fifo.extend(half_open, now)
        return live

    # -- deadlines --------------------------------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        return None if self._count == 0 or self._next == math.inf else self._next

    def due(self, now: float, limit: int | None = None) -> list[Session]:
        """Sessions whose deadline has come, earliest first, at most ``limit`` of them (:meth:`due_pairs`)."""
        return [Session(self, pair) for pair in self.due_pairs(now, limit).tolist()]

    def still_due(self, pairs: np.ndarray) -> None:
        """Rows :meth:`due_pairs` gave that the caller did not handle after all: the next call finds those still due
        (their blocks' bounds and the next deadline take their deadlines back)."""
        if pairs.size:
            deadline = self._np_deadline[pairs]
            np.minimum.at(self._np_block_min, pairs >> _BLOCK_SHIFT, deadline)
            self._next = min(self._next, float(deadline.min()))

    def due_pairs(self, now: float, limit: int | None = None) -> np.ndarray:
        """The rows of the sessions whose deadline has come, earliest first, at most ``limit`` of them: the rest
        stay due (their blocks' bounds and the next deadline say so). The rows not due set the next deadline. Only
        the blocks of rows whose lower bound has come are read, and their bounds made exact."""
        if self._count == 0 or now < self._next:
            return np.empty(0, dtype=np.intp)
        bounds = self._np_block_min
        blocks = np.flatnonzero(bounds <= now)
        deadline, state = self._np_deadline, self._np_state
        if blocks.size > _FULL_PASS_BLOCKS:
            spans = [(0, self.rows)]
        else:
            spans = [(int(b) << _BLOCK_SHIFT, min((int(b) + 1) << _BLOCK_SHIFT, self.rows)) for b in blocks]
        found = []
        size = 1 << _BLOCK_SHIFT
        for lo, hi in spans:
            occupied = state[lo:hi] != _FREE
            times = deadline[lo:hi]
            due_mask = occupied & (times <= now)
            found.append(np.flatnonzero(due_mask) + lo)
            # the rows not due bound their block again; a due row not armed again is found again next time
            later = np.where(occupied & ~due_mask, times, math.inf)
            if hi - lo <= size:
                bounds[lo >> _BLOCK_SHIFT] = later.min()
            else:
                bounds[: (hi + size - 1) >> _BLOCK_SHIFT] = np.minimum.reduceat(later, np.arange(0, hi - lo, size))
        self._next = float(bounds.min())
        rows = np.concatenate(found) if len(found) > 1 else found[0] if found else np.empty(0, dtype=np.intp)
        if rows.size > 1:
            rows = rows[np.argsort(deadline[rows], kind="stable")]
        if limit is not None and rows.size > limit:
            rows, rest = rows[:limit], rows[limit:]
            self.still_due(rest)
        return rows


def use_native(native: ModuleType | None) -> str:
    """Write new sessions' rows and find keys in the key index with the native module ``native``'s ``open_row``
    and ``find_slot``, or with :func:`open_row_py` and :func:`find_slot_py` again (None); return which are in use."""
    global _open_row, _find_slot
    _open_row = open_row_py if native is None else native.open_row
    _find_slot = find_slot_py if native is None else native.find_slot
    return "python" if native is None else "native"


_open_row: Callable[..., None] = open_row_py
_find_slot: Callable[[tuple[memoryview[Any], ...], bytes], tuple[int, int]] = find_slot_py
#: Which row writer and key finder :meth:`SessionTable.open` and :meth:`SessionTable.lookup` use: ``"native"`` where
#: the switching unit's native build is in use (:data:`mplslb.switching.scalar.FAST_PATH`), else ``"python"``.
ROW_WRITER = use_native(scalar.native)
