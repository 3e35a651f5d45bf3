"""The session managing unit: the lifecycle transition table, the session table, its key index and deadlines."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mplslb.sessions as sessions_module
from helpers import ACK, FIN, RST, SERVERS, SYN, client_tcp, ip, standard_balancer
from mplslb.balancing.servers import Server, ServerPool
from mplslb.flow import FlowKey
from mplslb.labels import C2S_MIN
from mplslb.sessions import (
    FINAL_STATES,
    TRANSITIONS,
    WATCH_BUDGET,
    InvalidTransition,
    Session,
    SessionEvent,
    SessionState,
    SessionTable,
    Timeouts,
    nonzero_bytes,
)

S, E = SessionState, SessionEvent
TCP, UDP, ICMP = 6, 17, 1

# Written out by hand from the module's documentation, not derived from TRANSITIONS.
HALF_OPEN = (S.START, S.ANSWERED)
OPEN = (S.ESTABLISHED, S.CLOSING_CLIENT, S.CLOSING_SERVER)
LIVE = (*HALF_OPEN, *OPEN, S.ENDING)
ENDS = (E.CLIENT_FIN, E.SERVER_FIN, E.CLIENT_RST, E.SERVER_RST)
EXPECTED = {
    (S.START, E.SYN_ACK): S.ANSWERED,
    (S.START, E.SERVER_REPLY): S.ESTABLISHED,
    (S.START, E.CLIENT_FIN): S.START,  # half-open: an end changes nothing, the half-open timeout decides
    (S.START, E.SERVER_FIN): S.START,
    (S.START, E.CLIENT_RST): S.START,
    (S.START, E.SERVER_RST): S.ENDING,  # the server refused the SYN
    (S.ANSWERED, E.SYN_ACK): S.ANSWERED,
    (S.ANSWERED, E.CLIENT_ACK): S.ESTABLISHED,
    (S.ANSWERED, E.CLIENT_FIN): S.ANSWERED,
    (S.ANSWERED, E.SERVER_FIN): S.ANSWERED,
    (S.ANSWERED, E.CLIENT_RST): S.ANSWERED,
    (S.ANSWERED, E.SERVER_RST): S.ANSWERED,
    (S.START, E.EVICTED): S.CLOSED,
    (S.ANSWERED, E.EVICTED): S.CLOSED,
    (S.ESTABLISHED, E.SERVER_REPLY): S.ESTABLISHED,
    (S.ESTABLISHED, E.CLIENT_FIN): S.CLOSING_CLIENT,
    (S.ESTABLISHED, E.SERVER_FIN): S.CLOSING_SERVER,
    (S.CLOSING_CLIENT, E.SERVER_REPLY): S.CLOSING_CLIENT,
    (S.CLOSING_CLIENT, E.CLIENT_FIN): S.CLOSING_CLIENT,
    (S.CLOSING_CLIENT, E.SERVER_FIN): S.ENDING,
    (S.CLOSING_SERVER, E.SERVER_REPLY): S.CLOSING_SERVER,
    (S.CLOSING_SERVER, E.SERVER_FIN): S.CLOSING_SERVER,
    (S.CLOSING_SERVER, E.CLIENT_FIN): S.ENDING,
    **{(state, rst): S.ENDING for state in OPEN for rst in (E.CLIENT_RST, E.SERVER_RST)},
    **{(S.ENDING, event): S.ENDING for event in (*ENDS, E.SERVER_REPLY)},
    (S.ENDING, E.QUIET): S.CLOSED,
    (S.ENDING, E.REVIVE): S.ESTABLISHED,
    **{(state, E.IDLE_TIMEOUT): S.CLOSED for state in LIVE},
    **{(state, E.SERVER_DOWN): S.INTERRUPTED for state in LIVE},
}
ILLEGAL = [pair for pair in itertools.product(S, E) if pair not in EXPECTED]
TIMEOUTS = Timeouts(tcp_start=10.0, tcp_established=900.0, tcp_closing=120.0, udp=300.0, other=60.0, closed_linger=2.0)


@pytest.fixture(scope="module")
def server() -> Server:
    return ServerPool(SERVERS).get("s1")


def flow(n: int = 0, proto: int = TCP) -> FlowKey:
    return FlowKey(proto, ip("10.1.0.1"), 40000 + n, ip("10.0.0.100"), 80)


def make(table: SessionTable, server: Server, n: int = 0, *, proto: int = TCP, now: float = 0.0) -> Session:
    """Session n of ``table``: label 17 + 2n, flow from source port 40000 + n."""
    return table.open(flow(n, proto), 17 + 2 * n, server, client_port=0, client_mac=b"\x02" * 6, ip_version=4, now=now)


#: The events that take a new session to each state.
PATH = {
    S.START: (),
    S.ANSWERED: (E.SYN_ACK,),
    S.ESTABLISHED: (E.SYN_ACK, E.CLIENT_ACK),
    S.CLOSING_CLIENT: (E.SYN_ACK, E.CLIENT_ACK, E.CLIENT_FIN),
    S.CLOSING_SERVER: (E.SYN_ACK, E.CLIENT_ACK, E.SERVER_FIN),
    S.ENDING: (E.SYN_ACK, E.CLIENT_ACK, E.CLIENT_RST),
    S.CLOSED: (E.SYN_ACK, E.CLIENT_ACK, E.CLIENT_RST, E.QUIET),
    S.INTERRUPTED: (E.SERVER_DOWN,),
}


def in_state(server: Server, state: SessionState, *, proto: int = TCP) -> tuple[SessionTable, Session]:
    table = SessionTable(TIMEOUTS)
    session = make(table, server, proto=proto)
    for event in PATH[state]:
        table.apply(session, event, 0.0)
    assert session.state is state
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
    before = (session.state, session.ended, session.end_reason, session.deadline)
    deadline = table.next_deadline()
    with pytest.raises(InvalidTransition, match=str(event)):
        table.apply(session, event, 5.0)
    assert (session.state, session.ended, session.end_reason, session.deadline) == before
    assert table.next_deadline() == deadline


def test_final_states_accept_no_event(server: Server) -> None:
    for state in FINAL_STATES:
        for event in E:
            table, session = in_state(server, state)
            with pytest.raises(InvalidTransition):
                table.apply(session, event, 1.0)


def test_new_sessions_are_armed_with_the_timeouts_the_table_has_now(server: Server) -> None:
    """A session opens with its protocol's idle timeout for START (TCP's half-open life, UDP's, any other
    protocol's), from the timeouts the table has when it opens: timeouts set later (a reload) arm the sessions
    opened after them, and leave the armed ones alone."""
    table = SessionTable(TIMEOUTS)
    opened = [make(table, server, n, proto=proto, now=1.0) for n, proto in enumerate((TCP, UDP, 47))]
    assert [s.deadline for s in opened] == [11.0, 301.0, 61.0]
    table.timeouts = Timeouts(tcp_start=3.0, udp=7.0, other=5.0)
    later = [make(table, server, n + 3, proto=proto, now=2.0) for n, proto in enumerate((TCP, UDP, 47))]
    assert [s.deadline for s in later] == [5.0, 9.0, 7.0]
    assert [s.deadline for s in opened] == [11.0, 301.0, 61.0]
    assert table.timeouts.tcp_start == 3.0


def test_a_full_tcp_close(server: Server) -> None:
    table = SessionTable(TIMEOUTS)
    s = make(table, server)
    assert s.deadline == 10.0 and table.half_open == 1  # tcp_start
    assert table.apply(s, E.SYN_ACK, 0.1) is S.ANSWERED and s.deadline == 10.0  # half-open: still its SYN's deadline
    assert table.apply(s, E.CLIENT_ACK, 0.15) is S.ESTABLISHED and s.deadline == 900.15 and table.half_open == 0
    assert table.apply(s, E.SERVER_REPLY, 0.2) is S.ESTABLISHED and s.deadline == 900.15  # a repeat: no re-arm
    assert table.apply(s, E.SERVER_FIN, 3.0) is S.CLOSING_SERVER and s.deadline == 123.0  # tcp_closing
    assert table.apply(s, E.SERVER_FIN, 3.5) is S.CLOSING_SERVER and s.deadline == 123.0  # a repeat
    assert table.apply(s, E.CLIENT_FIN, 4.0) is S.ENDING and s.deadline == 6.0  # lingers closed_linger
    assert table.live == 0 and s.ended == 0.0  # counted off: most ending sessions are over
    assert table.linger_over(s, 4.1, 6.0) is S.CLOSED  # the last ACK came within the grace: believed
    assert (s.ended, s.end_reason) == (6.0, "closed")
    table.remove(s)
    assert table.ended == {"closed": 1}
    assert len(table) == 0 and table.lookup(s.key) is None and table.by_c2s(s.c2s) is None


def test_state_counts_follow_the_sessions(server: Server) -> None:
    table = SessionTable(TIMEOUTS)
    assert table.state_counts() == {}
    a, b, c = (make(table, server, n) for n in range(3))
    table.apply(b, E.SYN_ACK, 0.1)
    table.apply(c, E.SYN_ACK, 0.1)
    table.apply(c, E.CLIENT_ACK, 0.2)
    assert table.state_counts() == {"start": 1, "answered": 1, "established": 1}
    table.apply(c, E.CLIENT_FIN, 0.3)
    table.remove(a)
    assert table.state_counts() == {"answered": 1, "closing_client": 1}


@given(st.integers(0, 70), st.lists(st.tuples(st.integers(0, 69), st.integers(1, 255)), max_size=20))
def test_nonzero_bytes_finds_what_flatnonzero_finds(size: int, marks: list[tuple[int, int]]) -> None:
    flags = np.zeros(size, dtype=np.uint8)
    for at, value in marks:
        if at < size:
            flags[at] = value
    assert nonzero_bytes(flags).tolist() == np.flatnonzero(flags).tolist()


def test_a_close_followed_by_traffic_is_not_believed(server: Server) -> None:
    ended: list[Session] = []
    revived: list[Session] = []
    table = SessionTable(TIMEOUTS, on_end=ended.append, on_revive=revived.append)
    s = make(table, server)
    for event in PATH[S.ESTABLISHED]:
        table.apply(s, event, 0.0)
    table.tcp_end(s, RST, from_client=True, now=10.0)
    assert s.state is S.ENDING and s.deadline == 12.0 and ended == [s] and table.live == 0
    assert table.linger_over(s, 11.5, 12.0) is S.ESTABLISHED  # a frame 1.5 s after the RST (grace: 1 s)
    assert table.revived == 1 and table.live == 1 and s.deadline == 912.0 and revived == [s]
    table.apply(s, E.IDLE_TIMEOUT, 913.0)
    assert ended == [s, s] and table.live == 0  # counted on again when revived, off again at its end


@pytest.mark.parametrize("event", [E.CLIENT_FIN, E.SERVER_FIN, E.CLIENT_RST, E.SERVER_RST])
def test_a_repeated_close_starts_the_linger_again(server: Server, event: SessionEvent) -> None:
    """A FIN retransmitted late in the linger (its ACK then comes from the other side) or an RST answering a late
    segment: both directions carry frames after the grace, yet the session is closing, not going on."""
    table = SessionTable(TIMEOUTS)
    s = make(table, server)
    for e in PATH[S.ESTABLISHED]:
        table.apply(s, e, 0.0)
    table.apply(s, E.SERVER_FIN, 9.0)
    assert table.apply(s, E.CLIENT_FIN, 10.0) is S.ENDING and s.deadline == 12.0
    assert table.apply(s, event, 11.5) is S.ENDING and s.deadline == 13.5
    assert table.apply(s, E.SERVER_REPLY, 11.6) is S.ENDING and s.deadline == 13.5  # not a close: no restart
    assert table.linger_over(s, 11.6, 13.5) is S.CLOSED and table.revived == 0


@pytest.mark.parametrize(("event", "reason"), [(E.IDLE_TIMEOUT, "idle_timeout"), (E.SERVER_DOWN, "server_down")])
def test_ending_records_time_and_reason(server: Server, event: SessionEvent, reason: str) -> None:
    table, s = in_state(server, S.ESTABLISHED)
    idle = s.deadline
    table.apply(s, event, 50.0, reason)
    assert s.state in FINAL_STATES and (s.ended, s.end_reason) == (50.0, reason)
    assert s.deadline == idle
    assert table.due(1e9) == [s]  # only the old idle deadline is left
    table2, s2 = in_state(server, S.START)
    table2.apply(s2, event, 1.0)
    assert s2.end_reason == str(event)  # no reason given: the event's name


@pytest.mark.parametrize(("first", "second"), [(True, False), (False, True)], ids=["client-first", "server-first"])
def test_tcp_end_ends_after_a_fin_from_each_side_whatever_the_order(server: Server, first: bool, second: bool) -> None:
    ended: list[Session] = []
    table = SessionTable(TIMEOUTS, on_end=ended.append)
    s = make(table, server, now=0.0)
    table.apply(s, E.SYN_ACK, 0.0)
    table.apply(s, E.CLIENT_ACK, 0.0)
    assert table.live == 1
    table.tcp_end(s, FIN, from_client=first, now=1.0)
    table.tcp_end(s, FIN | ACK, from_client=first, now=1.5)  # the same side again: a retransmission
    assert s.state is (S.CLOSING_CLIENT if first else S.CLOSING_SERVER) and ended == []
    table.tcp_end(s, ACK, from_client=second, now=1.7)  # no FIN or RST: nothing
    table.tcp_end(s, FIN | ACK, from_client=second, now=2.0)
    assert s.state is S.ENDING and ended == [s] and table.live == 0  # counted off; the linger decides the rest
    table.tcp_end(s, RST, from_client=second, now=3.0)  # ending: a repeated close starts the linger again
    assert s.deadline == 5.0
    assert table.linger_over(s, 3.0, 5.0) is S.CLOSED and ended == [s] and table.live == 0  # counted off once


def test_tcp_end_on_rst_ends_after_the_linger(server: Server) -> None:
    table, s = in_state(server, S.ESTABLISHED)
    table.tcp_end(s, RST | ACK, from_client=False, now=2.0)
    assert s.state is S.ENDING and table.live == 0 and s.deadline == 4.0


def test_rst_and_fin_change_nothing_in_a_half_open_session_but_the_servers_refusal(server: Server) -> None:
    for state in (S.START, S.ANSWERED):
        for flags, from_client in ((RST, True), (FIN, True), (FIN, False)):
            table, s = in_state(server, state)
            table.tcp_end(s, flags, from_client=from_client, now=1.0)
            assert s.state is state and s.deadline == 10.0 and table.half_open == 1
    table, s = in_state(server, S.START)
    table.tcp_end(s, RST | ACK, from_client=False, now=1.0)
    assert s.state is S.ENDING and table.half_open == 0


def test_the_oldest_half_open_session_is_found_in_o1_skipping_the_rest(server: Server) -> None:
    table = SessionTable(TIMEOUTS)
    sessions = [make(table, server, n, now=float(n)) for n in range(4)]
    assert table.half_open == 4 and table.oldest_half_open() == sessions[0]
    table.apply(sessions[0], E.SYN_ACK, 5.0)  # answered: still half-open
    assert table.oldest_half_open() == sessions[0]
    table.apply(sessions[0], E.CLIENT_ACK, 5.0)
    table.apply(sessions[1], E.EVICTED, 5.0)
    table.remove(sessions[1])
    assert table.half_open == 2 and table.oldest_half_open() == sessions[2]
    udp = make(table, server, 9, proto=UDP, now=6.0)  # UDP flows are not half-open TCP sessions
    assert table.half_open == 2 and udp.state is S.START


def test_the_half_open_fifo_stays_bounded_when_nothing_is_evicted(server: Server) -> None:
    table = SessionTable(TIMEOUTS, c2s_min=17, c2s_max=17 + 2 * 63)  # 64 rows, reused over and over
    for n in range(2000):
        s = make(table, server, n % 64, now=float(n))
        table.apply(s, E.SYN_ACK, float(n))
        table.apply(s, E.CLIENT_ACK, float(n))
        table.apply(s, E.IDLE_TIMEOUT, float(n))
        table.remove(s)
    assert table.half_open == 0 and len(table._half_open_fifo) <= 2 * 0 + 65
    assert table.oldest_half_open() is None


def test_the_half_open_queue_keeps_its_order_as_its_front_is_cut_off() -> None:
    queue = sessions_module._RowQueue()
    count = 3 * sessions_module._RowQueue.CUT
    for row in range(count):
        queue.append(row, row / 2)
    for row in range(2 * sessions_module._RowQueue.CUT + 1):
        assert queue.first() == (row, row / 2)
        queue.pop_first()
    assert len(queue.rows) < count and len(queue) == count - 2 * sessions_module._RowQueue.CUT - 1  # cut
    assert queue.first() == (count - len(queue), (count - len(queue)) / 2)
    odd = queue.kept(lambda row, at: row % 2 == 1)
    assert odd.head == 0 and list(odd.rows) == [row for row in range(count - len(queue), count) if row % 2]
    assert list(odd.times) == [row / 2 for row in odd.rows]


def test_observe_times_syn_to_syn_ack_then_request_to_first_response_byte(server: Server) -> None:
    table = SessionTable(TIMEOUTS)
    s = make(table, server, now=1.0)
    seen = table.observe(s, from_client=False, tcp_flags=ACK, payload_len=0, now=1.01)  # not a SYN-ACK
    assert seen == (None, False, False, False, False) and s.state is S.START
    seen = table.observe(s, from_client=False, tcp_flags=SYN | ACK, payload_len=0, now=1.05)
    assert seen.response_time == pytest.approx(0.05) and seen.server_replied and s.state is S.ANSWERED
    seen = table.observe(s, from_client=True, tcp_flags=ACK, payload_len=0, now=1.1)  # the handshake's last ACK
    assert seen.handshake_done and not seen.request_seen and s.state is S.ESTABLISHED
    seen = table.observe(s, from_client=True, tcp_flags=ACK, payload_len=100, now=1.2)
    assert seen.request_seen and seen.response_time is None and not seen.done and s.request_at == 1.2
    seen = table.observe(s, from_client=True, tcp_flags=ACK, payload_len=100, now=1.3)  # not the first request
    assert not seen.request_seen
    seen = table.observe(s, from_client=False, tcp_flags=ACK, payload_len=1000, now=1.5)
    assert seen.response_time == pytest.approx(0.3) and seen.done and not s.rt_pending
    assert table.observe(s, from_client=False, tcp_flags=ACK, payload_len=10, now=2.0).done


def test_observe_ends_a_udp_measurement_at_the_first_reply(server: Server) -> None:
    table = SessionTable(TIMEOUTS)
    s = make(table, server, proto=UDP, now=0.0)
    seen = table.observe(s, from_client=False, tcp_flags=-1, payload_len=40, now=0.02)
    assert seen.response_time == pytest.approx(0.02) and seen.server_replied and seen.done


def test_observe_gives_up_after_its_budget_of_frames(server: Server) -> None:
    table = SessionTable(TIMEOUTS)
    s = make(table, server, now=0.0)
    seen = [table.observe(s, from_client=True, tcp_flags=ACK, payload_len=0, now=0.1) for _ in range(WATCH_BUDGET)]
    assert not any(o.done for o in seen[:-1]) and seen[-1].done and not s.rt_pending


def test_the_clients_ack_is_looked_for_after_the_budget_is_spent(server: Server) -> None:
    table = SessionTable(TIMEOUTS)
    s = make(table, server, now=0.0)
    table.observe(s, from_client=False, tcp_flags=SYN | ACK, payload_len=0, now=0.1)
    for _ in range(WATCH_BUDGET):  # SYN-ACK retransmissions spend the measurement's budget
        table.observe(s, from_client=False, tcp_flags=SYN | ACK, payload_len=0, now=0.2)
    assert not s.rt_pending and s.state is S.ANSWERED
    assert not table.observe(s, from_client=True, tcp_flags=SYN, payload_len=0, now=0.3).handshake_done
    assert table.observe(s, from_client=True, tcp_flags=ACK, payload_len=0, now=0.3).handshake_done
    assert s.state is S.ESTABLISHED


def test_a_tcp_analysis_failure_is_never_taken_for_a_syn_ack(server: Server) -> None:
    table = SessionTable(TIMEOUTS)
    s = make(table, server, now=0.0)
    seen = table.observe(s, from_client=False, tcp_flags=-1, payload_len=0, now=0.1)
    assert not seen.server_replied and s.state is S.START


# -- Timeouts --------------------------------------------------------------------------------------------------
def test_idle_timeouts_per_protocol_and_state() -> None:
    t = TIMEOUTS
    states = (S.START, S.ANSWERED, S.ESTABLISHED, S.CLOSING_CLIENT, S.CLOSING_SERVER, S.ENDING)
    assert [t.idle(TCP, st_) for st_ in states] == [10.0, 10.0, 900.0, 120.0, 120.0, 2.0]
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
def test_open_lookup_and_counts(server: Server) -> None:
    table = SessionTable(TIMEOUTS)
    a, b = make(table, server, 0), make(table, server, 1, proto=UDP, now=1.0)
    assert (len(table), table.started, table.peak, table.live) == (2, 2, 2, 2)
    assert table.lookup(a.key) == a and table.by_c2s(b.c2s) == b and b.s2c == b.c2s + 1
    assert a.key == flow(0) and b.key == flow(1, UDP) and a.server is server and a.client_mac == b"\x02" * 6
    assert table.lookup(FlowKey(TCP, ip("10.1.0.9"), 1, ip("10.0.0.100"), 80)) is None
    assert table.by_c2s(21) is None and table.by_c2s(18) is None  # a free row; an S2C label
    assert b.deadline == 301.0  # udp
    table.apply(a, E.EVICTED, 1.5, "evicted")
    table.remove(a)
    assert table.lookup(a.key) is None and table.by_c2s(a.c2s) is None and a.state is S.CLOSED
    make(table, server, 2, now=2.0)
    assert (len(table), table.started, table.peak, table.ended) == (2, 3, 2, {"evicted": 1})


def test_open_refuses_duplicates(server: Server) -> None:
    table = SessionTable(TIMEOUTS)
    a = make(table, server, 0)
    with pytest.raises(ValueError, match="already in the table"):
        table.open(a.key, 99, server, client_port=0, client_mac=b"\x02" * 6, ip_version=4, now=0.0)
    with pytest.raises(ValueError, match="already in the table"):
        table.open(flow(7), a.c2s, server, client_port=0, client_mac=b"\x02" * 6, ip_version=4, now=0.0)
    with pytest.raises(ValueError, match="not a C2S label"):
        table.open(flow(8), 18, server, client_port=0, client_mac=b"\x02" * 6, ip_version=4, now=0.0)
    assert len(table) == 1 and table.started == 1
    # The slot a lookup found is used by the open that follows it, never by a later one.
    key = flow(9)
    assert table.lookup(key) is None
    table.open(key, 21, server, client_port=0, client_mac=b"\x02" * 6, ip_version=4, now=0.0)
    with pytest.raises(ValueError, match="already in the table"):
        table.open(key, 23, server, client_port=0, client_mac=b"\x02" * 6, ip_version=4, now=0.0)
    assert len(table) == 2 and table.lookup(key) is not None and table.lookup(key).c2s == 21  # type: ignore[union-attr]


def test_addresses_of_both_families_round_trip(server: Server) -> None:
    table = SessionTable(TIMEOUTS)
    v6 = FlowKey(UDP, ip("fd00:1::7"), 5353, ip("fd00::100"), 53)
    s = table.open(v6, 17, server, client_port=3, client_mac=bytes(range(6)), ip_version=6, now=0.0)
    assert s.key == v6 and table.lookup(v6) == s and s.client_port == 3 and s.ip_version == 6


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 40)), max_size=120))
def test_the_key_index_matches_a_dict(server: Server, ops: list[tuple[bool, int]]) -> None:
    """Opens and removals at random on a small table (so keys collide and wrap): every lookup agrees with a dict."""
    table = SessionTable(TIMEOUTS, c2s_max=17 + 2 * 40)
    model: dict[FlowKey, int] = {}
    for add, n in ops:
        key = flow(n)
        if add and key not in model and table.by_c2s(17 + 2 * n) is None:
            model[key] = make(table, server, n).c2s
        elif not add and key in model:
            s = table.lookup(key)
            assert s is not None
            table.apply(s, E.EVICTED, 0.0)
            table.remove(s)
            del model[key]
        for m in range(41):
            found = table.lookup(flow(m))
            assert (found.c2s if found else None) == model.get(flow(m))
    assert len(table) == len(model)


# -- idle deadlines ----------------------------------------------------------------------------------------------
def test_due_returns_sessions_whose_deadline_came(server: Server) -> None:
    table = SessionTable(TIMEOUTS)
    sessions = [make(table, server, i, now=float(i)) for i in range(3)]  # deadlines 10, 11, 12
    assert table.next_deadline() == 10.0
    assert table.due(9.999) == []
    assert table.due(11.0) == sessions[:2]
    assert table.due(11.5) == []
    assert table.next_deadline() == 12.0
    assert table.due(100.0) == sessions  # nothing re-armed or removed them: still due
    for s in sessions:
        table.apply(s, E.EVICTED, 100.0)
        table.remove(s)
    assert table.next_deadline() is None and table.due(1e9) == []


def test_rearming_later_is_found_after_the_earlier_deadline_passes(server: Server) -> None:
    table = SessionTable(TIMEOUTS)
    s = make(table, server)
    table.arm(s, 25.0)
    assert table.next_deadline() == 10.0  # a lower bound: the table looks again then
    assert table.due(10.0) == []
    assert table.next_deadline() == 25.0
    assert table.due(24.9) == [] and table.due(25.0) == [s]


def test_rearming_earlier_fires_then(server: Server) -> None:
    table = SessionTable(TIMEOUTS)
    s = make(table, server)
    table.arm(s, 4.0)
    assert table.next_deadline() == 4.0
    assert table.due(4.0) == [s]
    table.arm(s, 30.0)
    assert table.due(10.0) == []  # the original deadline is gone


def test_removed_sessions_are_not_due(server: Server) -> None:
    table = SessionTable(TIMEOUTS)
    a, b = make(table, server, 0), make(table, server, 1)
    table.apply(a, E.EVICTED, 0.0)
    table.remove(a)
    assert table.due(10.0) == [b]


def test_ties_come_out_in_label_order(server: Server) -> None:
    table = SessionTable(TIMEOUTS)
    sessions = [make(table, server, i) for i in range(5)]
    for s in reversed(sessions):
        table.arm(s, 7.0)
    assert table.due(7.0) == sessions


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 5), st.floats(0, 100, allow_nan=False), st.booleans()), max_size=40))
def test_deadlines_match_a_model(server: Server, ops: list[tuple[int, float, bool]]) -> None:
    """Arm (or advance the clock and collect) at random: due() gives every session whose latest deadline has come,
    earliest first, and next_deadline() is never later than the earliest pending one."""
    table = SessionTable(TIMEOUTS)
    sessions = [make(table, server, i) for i in range(6)]
    armed = dict.fromkeys(range(6), 10.0)
    clock = 0.0
    for index, value, collect in ops:
        if collect:
            clock = max(clock, value)
            due = table.due(clock)
            expected = sorted((when, i) for i, when in armed.items() if when <= clock)
            assert [sessions.index(s) for s in due] == [i for _, i in expected]
            for _, i in expected:
                table.arm(sessions[i], math.inf)  # handled: as the balancer re-arms or removes what is due
                armed[i] = math.inf
        else:
            when = max(clock, value)
            table.arm(sessions[index], when)
            armed[index] = when
    pending = [when for when in armed.values() if when < math.inf]
    nxt = table.next_deadline()
    if pending:
        assert nxt is not None and nxt <= min(pending)
        assert table.due(min(pending)) != []


# -- expiry through the balancer -------------------------------------------------------------------------------
def test_idle_session_expires_through_the_balancer() -> None:
    b = standard_balancer(servers=SERVERS[:1], fail_threshold=5)
    b.receive(0, client_tcp(SYN), 0.0)
    assert b.next_deadline() == b.config.timeouts.tcp_start
    b.on_timer(b.config.timeouts.tcp_start)
    stats = b.stats()
    assert stats.sessions_active == 0 and stats.sessions_ended == {"half_open_timeout": 1}
    assert stats.labels.in_use_count == 0 and stats.labels.quarantined_count == 1


def test_server_failing_while_several_sessions_are_due() -> None:
    b = standard_balancer(servers=SERVERS[:1])  # fail_threshold 3
    for i in range(5):
        assert b.receive(0, client_tcp(SYN, sport=40000 + i), 0.0)
    b.on_timer(20.0)  # five SYNs unanswered, all due at once
    stats = b.stats()
    assert stats.sessions_active == 0 and stats.servers[0].status == "down"
    assert stats.labels.in_use_count == 0 and sum(stats.sessions_ended.values()) == 5


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["arm", "free", "due"]), st.integers(0, 40 * 1024 - 1), st.integers(0, 400)),
        max_size=200,
    ),
    st.booleans(),
)
def test_due_finds_what_a_pass_over_every_row_finds(ops: list[tuple[str, int, int]], spread: bool) -> None:
    """The deadlines are read by blocks of rows: whatever is armed, re-armed or freed, a timer run returns exactly
    the rows a pass over every row returns (occupied, deadline come; earliest first, ties by row), and the next
    deadline is never later than the earliest one not yet due. Each row returned is armed again or freed, as the
    balancer's timer does."""
    rows = 40 * 1024  # 40 blocks: a run with most of them due takes the one pass over every row
    table = SessionTable(TIMEOUTS, c2s_max=C2S_MIN + 2 * (rows - 1))
    occupied: dict[int, float] = {}
    live = sessions_module._CODE[S.ESTABLISHED]
    for op, row, t in ops:
        pair = row if spread else row % 3000
        if op == "arm":
            if pair not in occupied:
                table.state[pair] = live
                table._count += 1
            occupied[pair] = float(t)
            table.arm(Session(table, pair), float(t))
        elif op == "free" and pair in occupied:
            table.state[pair] = 0
            table._count -= 1
            del occupied[pair]
        elif op == "due":
            now = float(t)
            expected = sorted((d, p) for p, d in occupied.items() if d <= now)
            returned = [session.pair for session in table.due(now)]
            assert returned == [p for _, p in expected]
            for p in returned:
                if p % 2:
                    table.state[p] = 0
                    table._count -= 1
                    del occupied[p]
                else:
                    occupied[p] = now + 1 + p % 7
                    table.arm(Session(table, p), occupied[p])
            nxt = table.next_deadline()
            assert not occupied or (nxt is not None and nxt <= min(occupied.values()))
    assert [s.pair for s in table.due(1e9)] == [p for _, p in sorted((d, p) for p, d in occupied.items())]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([TCP, UDP]), st.booleans(), st.sampled_from([80, 53, 443]), st.sampled_from(list(PATH))
        ),
        max_size=40,
    ),
    st.integers(0, 39),
)
def test_sessions_per_service_are_what_a_walk_over_the_table_counts(
    specs: list[tuple[int, bool, int, SessionState]], removed: int
) -> None:
    """The per-service counts read from the arrays (the status page's) are a walk over every session's key and
    state: final and removed sessions not counted, IPv4 and IPv6 apart, by protocol and destination port."""
    table = SessionTable(TIMEOUTS)
    server = Server(SERVERS[0], index=0)
    opened = []
    for n, (proto, v6, dport, state) in enumerate(specs):
        size = 16 if v6 else 4
        key = FlowKey(proto, bytes([10] * size), 1000 + n, bytes([n % 3 + 1] * size), dport)
        session = table.open(key, 17 + 2 * n, server, client_port=0, client_mac=b"\x02" * 6, ip_version=6 if v6 else 4,
                             now=0.0)  # fmt: skip
        for event in PATH[state] if proto == TCP else ():
            table.apply(session, event, 0.0)
        opened.append(session)
    if removed < len(opened) and opened[removed].state in FINAL_STATES:
        table.remove(opened[removed])
    walked: dict[tuple[bytes, int, int], int] = {}
    for session in table.sessions():
        if session.state not in FINAL_STATES:
            k = session.key
            walked[k.dst, k.proto, k.dport] = walked.get((k.dst, k.proto, k.dport), 0) + 1
    services = [(bytes([d] * size), proto, port) for d in (1, 2, 3, 4) for size in (4, 16) for proto in (TCP, UDP)
                for port in (53, 80, 443)]  # fmt: skip
    assert table.per_service(services) == {service: walked.get(service, 0) for service in services}


def test_a_block_opens_a_flow_whose_old_row_a_new_flow_of_the_block_took(server: Server) -> None:
    """A flow's session ended and its row went to a new flow opened in a block, the new key landing on the old
    flow's probe path; the old flow comes back later in the same block: it opens too (the block's keys are compared
    with what the rows hold for it, not with what a free row held last), and both are found."""
    table = SessionTable(TIMEOUTS, c2s_min=17, c2s_max=17 + 2 * 7)  # 8 rows, 16 slots

    def home(key: FlowKey) -> int:
        packed = sessions_module._KEY.pack(key.proto, len(key.src), key.sport, key.dport, key.src, key.dst)
        return hash(packed) & 15

    old = flow(0)
    new = next(flow(n) for n in range(1, 10_000) if home(flow(n)) == home(old))
    ended = make(table, server)
    table.apply(ended, E.IDLE_TIMEOUT, 1.0)
    table.remove(ended)
    table.open_block(
        [new, old], [17, 19], [server, server], client_ports=[0, 0], client_macs=b"\x02" * 12, ip_version=4, now=2.0
    )
    found = (table.lookup(new), table.lookup(old))
    assert found[0] is not None and found[1] is not None
    assert (found[0].c2s, found[1].c2s, len(table)) == (17, 19, 2)
