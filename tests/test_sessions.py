"""The session managing unit: the lifecycle transition table, the session table and its idle-deadline heap."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import SERVERS, SYN, client_tcp, ip, standard_balancer
from mplslb.flow import FlowKey
from mplslb.balancing.servers import Server, ServerPool
from mplslb.sessions import (
    FINAL_STATES,
    TRANSITIONS,
    InvalidTransition,
    Session,
    SessionEvent,
    SessionState,
    SessionTable,
    Timeouts,
)

S, E = SessionState, SessionEvent
TCP, UDP, ICMP = 6, 17, 1

# Written out by hand from the module's documentation, not derived from TRANSITIONS.
EXPECTED = {
    (S.START, E.SERVER_REPLY): S.ESTABLISHED,
    (S.START, E.FIN): S.CLOSING,
    (S.START, E.RST): S.CLOSED,
    (S.START, E.IDLE_TIMEOUT): S.CLOSED,
    (S.START, E.SERVER_DOWN): S.INTERRUPTED,
    (S.ESTABLISHED, E.SERVER_REPLY): S.ESTABLISHED,
    (S.ESTABLISHED, E.FIN): S.CLOSING,
    (S.ESTABLISHED, E.RST): S.CLOSED,
    (S.ESTABLISHED, E.IDLE_TIMEOUT): S.CLOSED,
    (S.ESTABLISHED, E.SERVER_DOWN): S.INTERRUPTED,
    (S.CLOSING, E.SERVER_REPLY): S.CLOSING,
    (S.CLOSING, E.FIN): S.CLOSING,
    (S.CLOSING, E.FIN_OTHER_SIDE): S.CLOSED,
    (S.CLOSING, E.RST): S.CLOSED,
    (S.CLOSING, E.IDLE_TIMEOUT): S.CLOSED,
    (S.CLOSING, E.SERVER_DOWN): S.INTERRUPTED,
}
ILLEGAL = [pair for pair in itertools.product(S, E) if pair not in EXPECTED]
TIMEOUTS = Timeouts(tcp_start=10.0, tcp_established=900.0, tcp_closing=120.0, udp=300.0, other=60.0, closed_linger=2.0)


@pytest.fixture(scope="module")
def server() -> Server:
    return ServerPool(SERVERS).get("s1")


def make(server: Server, n: int = 0, *, proto: int = TCP, now: float = 0.0) -> Session:
    key = FlowKey(proto, ip("10.1.0.1"), 40000 + n, ip("10.0.0.100"), 80)
    return Session(key, 17 + 2 * n, server, client_port=0, client_mac=b"\x02" * 6, ip_version=4, now=now)


def in_state(server: Server, state: SessionState, *, proto: int = TCP) -> tuple[SessionTable, Session]:
    table = SessionTable(TIMEOUTS)
    session = make(server, proto=proto)
    table.add(session, 0.0)
    session.state = state
    return table, session


# -- the transition table ----------------------------------------------------------------------------------------
def test_the_table_is_what_the_documentation_says() -> None:
    assert TRANSITIONS == EXPECTED
    assert frozenset({S.CLOSED, S.INTERRUPTED}) == FINAL_STATES
    assert all(state not in FINAL_STATES for state, _ in EXPECTED)  # nothing leaves a final state


@pytest.mark.parametrize(("state", "event"), list(EXPECTED), ids=[f"{s}-{e}" for s, e in EXPECTED])
def test_every_allowed_transition(server: Server, state: SessionState, event: SessionEvent) -> None:
    table, session = in_state(server, state)
    assert table.apply(session, event, 5.0) is EXPECTED[(state, event)]
    assert session.state is EXPECTED[(state, event)]


@pytest.mark.parametrize(("state", "event"), ILLEGAL, ids=[f"{s}-{e}" for s, e in ILLEGAL])
def test_illegal_transitions_raise_and_change_nothing(server: Server, state: SessionState, event: SessionEvent) -> None:
    table, session = in_state(server, state)
    before = (session.state, session.ended, session.end_reason, session.deadline, session.timer)
    deadline = table.next_deadline()
    with pytest.raises(InvalidTransition, match=str(event)):
        table.apply(session, event, 5.0)
    assert (session.state, session.ended, session.end_reason, session.deadline, session.timer) == before
    assert table.next_deadline() == deadline


def test_final_states_accept_no_event(server: Server) -> None:
    for state in FINAL_STATES:
        for event in E:
            _, session = in_state(server, state)
            with pytest.raises(InvalidTransition):
                SessionTable(TIMEOUTS).apply(session, event, 1.0)


def test_a_full_tcp_close(server: Server) -> None:
    table = SessionTable(TIMEOUTS)
    s = make(server)
    table.add(s, 0.0)
    assert s.deadline == 10.0  # tcp_start
    assert table.apply(s, E.SERVER_REPLY, 0.1) is S.ESTABLISHED and s.deadline == 900.1
    assert table.apply(s, E.SERVER_REPLY, 0.2) is S.ESTABLISHED and s.deadline == 900.1  # a repeat: no re-arm
    assert table.apply(s, E.FIN, 3.0) is S.CLOSING and s.deadline == 123.0  # tcp_closing
    assert table.apply(s, E.FIN, 3.5) is S.CLOSING and s.deadline == 123.0
    assert table.apply(s, E.FIN_OTHER_SIDE, 4.0) is S.CLOSED
    assert (s.ended, s.end_reason, s.deadline) == (4.0, "fin_other_side", 6.0)  # lingers closed_linger
    table.remove(s)
    assert table.ended == {"fin_other_side": 1}
    assert len(table) == 0 and table.lookup(s.key) is None and table.by_c2s(s.c2s) is None


@pytest.mark.parametrize(
    ("event", "reason", "linger"),
    [(E.RST, "rst", True), (E.IDLE_TIMEOUT, "idle_timeout", False), (E.SERVER_DOWN, "server_down", False)],
)
def test_ending_records_time_reason_and_linger(server: Server, event: SessionEvent, reason: str, linger: bool) -> None:
    table, s = in_state(server, S.ESTABLISHED)
    timer = s.timer
    table.apply(s, event, 50.0, reason)
    assert s.state in FINAL_STATES and (s.ended, s.end_reason) == (50.0, reason)
    if linger:  # a closed session keeps its labels a moment for the last ACK
        assert s.deadline == 52.0 and s.timer != timer
        assert table.due(52.0) == [s]
    else:
        assert s.timer == timer
        assert table.due(1e9) == [s]  # only the old idle entry is left
    _, s2 = in_state(server, S.START)
    SessionTable(TIMEOUTS).apply(s2, event, 1.0)
    assert s2.end_reason == str(event)  # no reason given: the event's name


# -- Timeouts --------------------------------------------------------------------------------------------------
def test_idle_timeouts_per_protocol_and_state() -> None:
    t = TIMEOUTS
    assert [t.idle(TCP, st_) for st_ in (S.START, S.ESTABLISHED, S.CLOSING)] == [10.0, 900.0, 120.0]
    assert {t.idle(UDP, st_) for st_ in S} == {300.0}
    assert {t.idle(ICMP, st_) for st_ in S} == {60.0}
    default = Timeouts()
    assert (default.tcp_established, default.tcp_closing, default.udp) == (900.0, 120.0, 300.0)  # as IPVS


@pytest.mark.parametrize("name", ["tcp_start", "tcp_established", "tcp_closing", "udp", "other", "closed_linger"])
@pytest.mark.parametrize("value", [-1.0, -1e-9, math.nan])
def test_timeouts_reject_negative_and_nan(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"timeouts\.{name} must be >= 0"):
        Timeouts(**{name: value})


def test_timeouts_accept_zero() -> None:
    t = Timeouts(tcp_start=0, udp=0.0, closed_linger=0)
    assert t.idle(TCP, S.START) == 0 and t.idle(UDP, S.START) == 0


# -- the session table -----------------------------------------------------------------------------------------
def test_add_lookup_and_counts(server: Server) -> None:
    table = SessionTable(TIMEOUTS)
    a, b = make(server, 0), make(server, 1, proto=UDP)
    table.add(a, 0.0)
    table.add(b, 1.0)
    assert (len(table), table.started, table.peak) == (2, 2, 2)
    assert table.lookup(a.key) is a and table.by_c2s(b.c2s) is b and b.s2c == b.c2s + 1
    assert table.lookup(FlowKey(TCP, ip("10.1.0.9"), 1, ip("10.0.0.100"), 80)) is None
    assert b.deadline == 301.0  # udp
    a.state = S.CLOSED
    a.end_reason = "rst"
    table.remove(a)
    table.add(make(server, 2), 2.0)
    assert (len(table), table.started, table.peak) == (2, 3, 2)


def test_add_refuses_duplicates(server: Server) -> None:
    table = SessionTable(TIMEOUTS)
    a = make(server, 0)
    table.add(a, 0.0)
    same_key = Session(a.key, 99, server, client_port=0, client_mac=b"\x02" * 6, ip_version=4, now=0.0)
    same_label = make(server, 0)
    same_label.key = a.key._replace(sport=1)
    for dup in (a, same_key, same_label):
        with pytest.raises(ValueError, match="already in the table"):
            table.add(dup, 1.0)
    assert len(table) == 1 and table.started == 1


# -- the idle-deadline heap ------------------------------------------------------------------------------------
def test_due_returns_sessions_whose_deadline_came(server: Server) -> None:
    table = SessionTable(TIMEOUTS)
    sessions = [make(server, i) for i in range(3)]
    for i, s in enumerate(sessions):
        table.add(s, float(i))  # deadlines 10, 11, 12
    assert table.next_deadline() == 10.0
    assert table.due(9.999) == []
    assert table.due(11.0) == sessions[:2]
    assert [s.timer for s in sessions] == [0, 0, sessions[2].timer] and sessions[2].timer != 0
    assert table.due(11.5) == []
    assert table.next_deadline() == 12.0
    assert table.due(100.0) == [sessions[2]]
    assert table.next_deadline() is None and table.due(1e9) == []


def test_rearming_later_leaves_a_stale_entry_that_is_skipped(server: Server) -> None:
    table = SessionTable(TIMEOUTS)
    s = make(server)
    table.add(s, 0.0)
    table.arm(s, 25.0)
    assert table.next_deadline() == 10.0  # lazy: the old entry stays in the heap until it surfaces
    assert table.due(10.0) == []
    assert table.next_deadline() == 25.0
    assert table.due(24.9) == [] and table.due(25.0) == [s]


def test_rearming_earlier_fires_once(server: Server) -> None:
    table = SessionTable(TIMEOUTS)
    s = make(server)
    table.add(s, 0.0)
    table.arm(s, 4.0)
    assert table.next_deadline() == 4.0
    assert table.due(4.0) == [s]
    assert table.due(10.0) == []  # the original entry is stale


def test_removed_sessions_are_skipped(server: Server) -> None:
    table = SessionTable(TIMEOUTS)
    a, b = make(server, 0), make(server, 1)
    table.add(a, 0.0)
    table.add(b, 0.0)
    a.end_reason = "rst"
    table.remove(a)
    assert table.due(10.0) == [b]


def test_ties_come_out_in_arming_order(server: Server) -> None:
    table = SessionTable(TIMEOUTS)
    sessions = [make(server, i) for i in range(5)]
    for s in sessions:
        table.add(s, 0.0)
    for s in reversed(sessions):
        table.arm(s, 7.0)
    assert table.due(7.0) == list(reversed(sessions))


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 5), st.floats(0, 100, allow_nan=False), st.booleans()), max_size=40))
def test_heap_matches_a_model(server: Server, ops: list[tuple[int, float, bool]]) -> None:
    """Arm (or advance the clock and collect) at random; each session comes out once, at its latest deadline."""
    table = SessionTable(TIMEOUTS)
    sessions = [make(server, i) for i in range(6)]
    armed: dict[int, tuple[float, int] | None] = {}  # session -> (deadline, arming order), None once collected
    order = itertools.count()
    for i, s in enumerate(sessions):
        table.add(s, 0.0)
        armed[i] = (10.0, next(order))
    clock = 0.0
    for index, value, collect in ops:
        if collect:
            clock = max(clock, value)
            due = table.due(clock)
            expected = sorted((a, i) for i, a in armed.items() if a is not None and a[0] <= clock)
            assert [sessions.index(s) for s in due] == [i for _, i in expected]
            for _, i in expected:
                armed[i] = None
        else:
            when = max(clock, value)
            table.arm(sessions[index], when)
            armed[index] = (when, next(order))
    pending = [a[0] for a in armed.values() if a is not None]
    nxt = table.next_deadline()
    if pending:
        assert nxt is not None and nxt <= min(pending)
        assert table.due(min(pending)) != []
    else:
        assert table.due(math.inf) == []


# -- expiry through the balancer -------------------------------------------------------------------------------
def test_idle_session_expires_through_the_balancer() -> None:
    b = standard_balancer(servers=SERVERS[:1], fail_threshold=5)
    b.receive(0, client_tcp(SYN), 0.0)
    assert b.next_deadline() == b.config.timeouts.tcp_start
    b.on_timer(b.config.timeouts.tcp_start)
    stats = b.stats()
    assert stats.sessions_active == 0 and stats.sessions_ended == {"idle_timeout": 1}
    assert stats.labels.in_use_count == 0 and stats.labels.quarantined_count == 1


def test_server_failing_while_several_sessions_are_due() -> None:
    b = standard_balancer(servers=SERVERS[:1])  # fail_threshold 3
    for i in range(5):
        assert b.receive(0, client_tcp(SYN, sport=40000 + i), 0.0)
    b.on_timer(20.0)  # five SYNs unanswered, all due at once
    stats = b.stats()
    assert stats.sessions_active == 0 and stats.servers[0].status == "down"
    assert stats.labels.in_use_count == 0 and sum(stats.sessions_ended.values()) == 5
