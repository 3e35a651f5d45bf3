"""The apparatus's behaviour beyond the claims' main path: ICMP errors, unlabelled replies, timers, passive health,
label quarantine, response-time measurement."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from helpers import (
    PORT_MAC,
    SERVER_PORTS,
    VIP,
    VIP6,
    Net,
    RecordingMirror,
    client_addr,
    ether,
    handshake,
    ipv6,
    label_of,
    mac,
    make_config,
    tcp,
    udp,
)
from mplslb.balancer import TIMER_GRANULARITY, TIMER_SESSIONS, Balancer, WholeSessions
from mplslb.balancing.servers import ServerConfig
from mplslb.endpoint import ClientEndpoint
from mplslb.flow import FlowKey
from mplslb.sessions import SessionEvent, SessionState, Timeouts
from mplslb.switching.layout import ACK_KNOWN, WATCH_ALL
from mplslb.wire.ethernet import ETH_P_IP, build_ethernet
from mplslb.wire.icmp import build_icmp_unreachable
from mplslb.wire.tcp import TCPFlag

SYN, ACK, FIN, RST, PSH = (int(f) for f in (TCPFlag.SYN, TCPFlag.ACK, TCPFlag.FIN, TCPFlag.RST, TCPFlag.PSH))
ROUTER = bytes.fromhex("02aa00000001")


def test_icmp_error_about_a_session_reaches_its_server_with_the_session_label() -> None:
    net = Net()
    name, c2s = handshake(net)
    src = client_addr(0)
    # A router on the client side reports that a packet from the VIP to the client could not be delivered.
    quoted = tcp(VIP, src, 80, 40000, ACK, seq=501, ack=101)
    error = build_icmp_unreachable(bytes([10, 9, 9, 9]), VIP, quoted, code=4)
    frame = build_ethernet(bytes.fromhex("02b000000000"), net.client(0).mac, ETH_P_IP) + error
    out = net.balancer.receive(0, frame, net.now)
    assert len(out) == 1 and label_of(out[0][1]) == c2s
    assert net.deliver_to_servers(out)[0] == (name, error)
    # An error about nobody's session is dropped and counted.
    stray = build_icmp_unreachable(bytes([10, 9, 9, 9]), VIP, tcp(VIP, src, 80, 1, ACK), code=4)
    assert net.balancer.receive(0, build_ethernet(bytes.fromhex("02b000000000"), ROUTER, ETH_P_IP) + stray, 0) == []
    assert net.balancer.stats().drops["icmp_no_session"] == 1


def test_unlabelled_reply_from_the_sessions_server_gets_the_s2c_label() -> None:
    net = Net()
    name, c2s = handshake(net)
    server = net.balancer.pool.get(name).config
    reply = tcp(VIP, client_addr(0), 80, 40000, ACK, seq=501, ack=101)
    frame = build_ethernet(bytes.fromhex("02b000000002"), server.mac, ETH_P_IP) + reply
    out = net.balancer.receive(server.port_id, frame, net.now)
    assert out[0][0] == 0 and label_of(out[0][1]) == c2s + 1
    # The same reply from another server's MAC is refused.
    other = next(s.config for s in net.balancer.pool.servers if s.config.name != name)
    forged = build_ethernet(bytes.fromhex("02b000000002"), other.mac, ETH_P_IP) + reply
    assert net.balancer.receive(other.port_id, forged, net.now) == []
    assert net.balancer.stats().drops["server_wrong_source"] == 1


def test_a_mass_idle_timeout_is_taken_a_bounded_number_of_sessions_per_call() -> None:
    net = Net(make_config(timeouts=Timeouts(udp=5.0), max_sessions=0))
    b = net.balancer
    count = 2 * TIMER_SESSIONS + 100
    for flow in range(count):  # opened 1 ms apart: they idle out in the order they opened
        net.now = flow / 1000
        assert net.from_client(0, udp(client_addr(flow % 200), VIP, 10000 + flow, 53))
    assert len(b.sessions) == count
    first_due = 5.0
    now = count / 1000 + 5.0  # all of them due at once
    assert b.next_deadline() == first_due
    ended = 0
    for call in range(3):
        b.on_timer(now)
        ended = b.stats().sessions_ended.get("idle_timeout", 0)
        assert ended == min(count, (call + 1) * TIMER_SESSIONS)
        if ended < count:  # the rest wait for the next call, a turn of the loop later
            assert b.next_deadline() == now + TIMER_GRANULARITY
            now += TIMER_GRANULARITY
    assert len(b.sessions) == 0 and b.next_deadline() != now
    # The oldest went first: what is left after one call is the newest.
    net2 = Net(make_config(timeouts=Timeouts(udp=5.0), max_sessions=0))
    labels = []
    for flow in range(TIMER_SESSIONS + 10):
        net2.now = flow / 1000
        labels.append(label_of(net2.from_client(0, udp(client_addr(flow % 200), VIP, 10000 + flow, 53))[0][1]))
    net2.balancer.on_timer(100.0)
    left = [flow for flow, c2s in enumerate(labels) if net2.balancer.sessions.by_c2s(c2s) is not None]
    assert left == list(range(TIMER_SESSIONS, TIMER_SESSIONS + 10))


def test_udp_session_ends_on_idle_timeout_and_labels_wait_in_quarantine() -> None:
    net = Net(make_config(timeouts=Timeouts(udp=5.0), label_quarantine=10.0, endpoint_flow_timeout=10.0))
    b = net.balancer
    out = net.from_client(0, udp(client_addr(0), VIP, 7000, 53))
    c2s = label_of(out[0][1])
    assert c2s is not None
    net.now = 3.0
    net.from_client(0, udp(client_addr(0), VIP, 7000, 53))  # activity re-arms the deadline lazily
    assert b.next_deadline() == 5.0
    b.on_timer(5.0)
    assert b.sessions.by_c2s(c2s) is not None
    b.on_timer(8.0)
    assert b.sessions.by_c2s(c2s) is None and b.stats().sessions_ended == {"idle_timeout": 1}
    assert b.labels.is_quarantined(c2s)
    # During quarantine the pair is not handed out again; frames with it are dropped.
    for i in range(5):
        net.now = 9.0
        other = label_of(net.from_client(1, udp(client_addr(1), VIP, 7100 + i, 53))[0][1])
        assert other != c2s
    late = net.client(0).from_host(udp(client_addr(0), VIP, 7000, 53), net.now)
    assert late is not None and b.receive(0, late, net.now) != []  # unlabelled: a new session, new label


def test_tcp_start_timeouts_take_a_silent_server_down_and_interrupt_its_sessions() -> None:
    # s1 answered a session at 0 s: its unanswered SYNs count once it has answered nothing for passive_window.
    net = Net(make_config(n_servers=2, timeouts=Timeouts(tcp_start=1.0), fail_threshold=2, passive_window=2.0))
    b = net.balancer
    # An established session on s1 (port 2).
    _, live = handshake(net, 0, sport=100)
    assert b.sessions.by_c2s(live).server.config.name == "s1"  # type: ignore[union-attr]
    # Two SYNs to s1 go unanswered (s2 gets the others, round robin, and answers nothing either).
    syn_labels = []
    for i in range(4):
        out = net.from_client(1, tcp(client_addr(1), VIP, 200 + i, 80, SYN))
        syn_labels.append((net.deliver_to_servers(out)[0][0], label_of(out[0][1])))
    b.on_timer(5.0)
    statuses = {s.config.name: str(s.status) for s in b.pool.servers}
    assert statuses == {"s1": "down", "s2": "down"}
    # The established session on s1 was interrupted and its labels withdrawn.
    assert b.sessions.by_c2s(live) is None and b.switching.entry(live) is None
    # The two SYN sessions that timed out first ended half-open; the live one and the two whose timeouts took their
    # servers down were interrupted with them.
    assert b.stats().sessions_ended == {"half_open_timeout": 2, "server_down": 3}


def test_server_rst_to_syn_counts_as_a_failure_and_closes_the_session_after_the_linger() -> None:
    net = Net()
    src = client_addr(0)
    out = net.from_client(0, tcp(src, VIP, 300, 80, SYN, seq=1))
    ((name, _),) = net.deliver_to_servers(out)
    c2s = label_of(out[0][1])
    net.deliver_to_client(0, net.from_server(name, tcp(VIP, src, 80, 300, RST | ACK, seq=0, ack=2)))
    session = net.balancer.sessions.by_c2s(c2s)  # type: ignore[arg-type]
    assert session is not None and session.state is SessionState.ENDING
    assert net.balancer.pool.get(name).failures == 1
    net.balancer.on_timer(net.now + net.config.timeouts.closed_linger)  # nothing followed the RST: it closes
    assert net.balancer.sessions.by_c2s(c2s) is None and net.balancer.stats().sessions_ended == {"closed": 1}
    assert net.balancer.pool.get(name).failures == 1  # a refusal, not an unanswered SYN as well


def test_response_time_is_measured_from_syn_to_synack_and_request_to_first_byte() -> None:
    net = Net()
    src = client_addr(0, v6=True)
    out = net.from_client(0, tcp(src, VIP6, 400, 80, SYN, seq=1))
    ((name, _),) = net.deliver_to_servers(out)
    net.now = 0.010
    net.deliver_to_client(0, net.from_server(name, tcp(VIP6, src, 80, 400, SYN | ACK, seq=9, ack=2)))
    server = net.balancer.pool.get(name)
    assert server.rt_ewma is not None and abs(server.rt_ewma - 0.010) < 1e-9
    request = b"GET /index.html HTTP/1.1\r\nHost: shop.example\r\n\r\n"
    net.now = 0.011
    net.deliver_to_servers(net.from_client(0, tcp(src, VIP6, 400, 80, PSH | ACK, seq=2, ack=10, payload=request)))
    net.now = 0.061
    net.from_server(name, tcp(VIP6, src, 80, 400, PSH | ACK, seq=10, ack=2 + len(request), payload=b"HTTP/1.1 200"))
    # EWMA (alpha 0.2) of 10 ms then 50 ms.
    assert server.rt_ewma is not None and abs(server.rt_ewma - (0.8 * 0.010 + 0.2 * 0.050)) < 1e-9
    assert net.balancer.stats().l7_hosts == {"shop.example": 1}
    session = net.balancer.live_sessions()[0]
    assert not session.rt_pending  # the Host is counted; the session record keeps no per-session L7 object
    # Measurement done: later frames are no longer reported to the session manager.
    assert net.balancer.switching.watch[session.c2s] == net.balancer.switching.watch[session.s2c] == 1


def test_a_syn_on_the_port_of_an_ending_session_ends_it_and_opens_a_new_session() -> None:
    """The client reuses the flow of a session it reset (its port came back while the close lingered): that session
    ends at once ("reused") and the SYN opens a new one on new labels, balanced as any other. Another MAC's SYN on
    the flow changes nothing."""
    net = Net(make_config(timeouts=Timeouts(closed_linger=4.0)))
    b = net.balancer
    _, c2s = handshake(net, sport=500)
    src = client_addr(0)
    net.deliver_to_servers(net.from_client(0, tcp(src, VIP, 500, 80, RST, seq=101)))
    old = b.sessions.by_c2s(c2s)
    assert old is not None and old.state is SessionState.ENDING
    key = old.key
    intruder = ether(PORT_MAC[0], mac(0xEE, 1), tcp(src, VIP, 500, 80, SYN, seq=5000))
    assert b.receive(0, intruder, net.now) == [] and b.drops == {"session_wrong_source": 1}
    assert old.state is SessionState.ENDING
    net.now = 1.0
    net.client(0).flows.clear()  # a new connection: the endpoint sends its SYN unlabelled
    out = net.from_client(0, tcp(src, VIP, 500, 80, SYN, seq=9000))
    new_c2s = label_of(out[0][1])
    assert new_c2s != c2s and b.sessions.by_c2s(c2s) is None and b.labels.is_quarantined(c2s)
    assert b.stats().sessions_ended == {"reused": 1} and b.sessions.started == 2 and b.live == 1
    new = b.sessions.by_c2s(new_c2s)
    assert new is not None and new.state is SessionState.START and new.key == key


def test_a_server_added_at_run_time_takes_new_sessions_and_only_on_a_server_port() -> None:
    net = Net(make_config(n_servers=1, algorithm="round_robin"))
    b = net.balancer
    with pytest.raises(ValueError, match="not a server port"):
        b.add_server(ServerConfig("late", bytes([10, 2, 0, 9]), mac(0x5E, 9), port_id=0))
    b.add_server(ServerConfig("late", bytes([10, 2, 0, 9]), mac(0x5E, 9), port_id=SERVER_PORTS[0]))
    chosen = set()
    for i in range(4):
        out = net.from_client(0, tcp(client_addr(0), VIP, 41000 + i, 80, SYN))
        chosen.add(next(s.config.name for s in b.pool.servers if s.config.mac == out[0][1][:6]))
    assert chosen == {"s1", "late"}


def with_dstopts(packet: bytes) -> bytes:
    """The same IPv6 TCP packet with an 8-byte destination options header in front of TCP."""
    segment = packet[40:]
    return ipv6(packet[8:24], packet[24:40], 60, segment, ext=b"\x06\x00" + bytes(6))


def test_ipv6_sessions_end_on_fin_with_extension_headers_in_either_direction() -> None:
    """The client's first packet carries an extension header and the server's do not (and then the other way):
    the flags are found in each frame, never read at an offset learned from the other direction."""
    net = Net(make_config(timeouts=Timeouts(closed_linger=1.0)))
    b = net.balancer
    src = client_addr(0, True)
    out = net.from_client(0, with_dstopts(tcp(src, VIP6, 41000, 80, SYN, seq=100)))
    ((name, _),) = net.deliver_to_servers(out)
    c2s = label_of(out[0][1])
    assert c2s is not None
    net.deliver_to_client(0, net.from_server(name, tcp(VIP6, src, 80, 41000, SYN | ACK, seq=500, ack=101)))
    session = b.sessions.by_c2s(c2s)
    assert session is not None and session.state is SessionState.ANSWERED  # the client's ACK is still to come
    # Payload whose second byte has the FIN and RST bits: where a flag offset learned from the client's first
    # packet (8 bytes further) would look on the server's plain frames.
    data = tcp(VIP6, src, 80, 41000, PSH | ACK, seq=501, ack=101, payload=b"\x00\x05HTTP/1.1 200 OK\r\n")
    net.deliver_to_client(0, net.from_server(name, data))
    assert session.state is SessionState.ANSWERED  # no FIN or RST read at the wrong offset
    net.deliver_to_servers(net.from_client(0, with_dstopts(tcp(src, VIP6, 41000, 80, FIN | ACK, seq=101, ack=520))))
    assert session.state is SessionState.CLOSING_CLIENT  # its ACK completed the handshake, its FIN half-closed
    net.deliver_to_client(0, net.from_server(name, tcp(VIP6, src, 80, 41000, FIN | ACK, seq=520, ack=102)))
    assert session.state is SessionState.ENDING
    b.on_timer(net.now + 1.0)
    assert session.state is SessionState.CLOSED and session.end_reason == "closed"


def test_a_udp_flow_whose_session_died_recovers_unlabelled_after_the_fallback() -> None:
    """The balancer restarts (a new one, nothing remembered): the client's labelled datagrams are dropped as
    label_unknown until its endpoint has heard nothing for ``fallback`` seconds; then one goes unlabelled, opens a
    new session and reaches a server again."""
    net = Net()
    plain = net.client(0)
    client = net.clients[0] = ClientEndpoint(mac=plain.mac, gateway_mac=plain.gateway_mac, fallback=2.0)
    src = client_addr(0)
    first = net.from_client(0, udp(src, VIP, 7000, 53))
    ((name, _),) = net.deliver_to_servers(first)
    net.deliver_to_client(0, net.from_server(name, udp(VIP, src, 53, 7000)))
    assert client.label_for(FlowKey(17, src, 7000, VIP, 53)) is not None
    net.balancer = Balancer(net.config)  # restarted: every label unknown
    for t in (0.5, 1.0, 1.9):
        net.now = t
        assert net.from_client(0, udp(src, VIP, 7000, 53)) == []
    assert net.balancer.stats().drops == {"label_unknown": 3}
    net.now = 2.1
    out = net.from_client(0, udp(src, VIP, 7000, 53))
    assert len(net.deliver_to_servers(out)) == 1 and client.counters["fallback_unlabelled"] == 1


#: Times around a session that starts at 1.0: equal and out-of-order values come up often.
_MOMENTS = st.sampled_from([0.0, 0.5, 1.0, 1.001, 1.002, 1.003, 1.004])
_GET = b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n"
_COPIES = st.sampled_from([None, _GET, b"GET /a HTTP/1.1\r\nHo", b"\x16\x03"])


_TWINS: dict[tuple[bool, ...] | tuple[bool, bool, str], Net] = {}


def _measured_twin(l7: bool, budget: int, whole: bool, record: tuple[object, ...]) -> tuple[object, ...]:
    """A new session's state after ``measured(record)`` on a balancer with the whole-exchange path allowed or not
    (each kept across examples: the twins see the same sessions in the same order): what the session table, the
    watch bits, the server's figures and the L7 counts say."""
    net = _TWINS.get((l7, whole))
    if net is None:
        net = _TWINS[l7, whole] = Net(config=make_config(l7=l7))
        if not whole:
            net.balancer.sessions.whole_exchange = lambda *_: None  # type: ignore[method-assign]
    b = net.balancer
    net.now += 1.0
    record = tuple(t + net.now - 1.0 if isinstance(t, float) and t else t for t in record)
    sport = 1024 + b.sessions.started
    ((name, _),) = net.deliver_to_servers(net.from_client(0, tcp(client_addr(0), VIP, sport, 80, SYN, seq=1)))
    session = b.sessions.lookup(FlowKey(6, client_addr(0), sport, VIP, 80))
    assert session is not None
    b.sessions.rt_budget[session.pair] = budget
    done = b.measured(session.c2s, *record)  # type: ignore[arg-type]
    server = b.pool.get(name)
    t = b.sessions
    return (done, session.state, t.deadline[session.pair], t.request_at[session.pair], t.rt_budget[session.pair],
            t.half_open, t.live, b.next_deadline(), b.switching.watch[session.c2s], b.switching.watch[session.s2c],
            name, server.rt_ewma, server.rt_samples, server.failures, server.answered_at, dict(b.l7_hosts))  # fmt: skip


@settings(max_examples=400, deadline=None)
@example(answer=1.001, ack=1.002, request=1.003, response=1.003, over=False, copy=_GET, l7=True, budget=16)
@example(answer=1.001, ack=1.002, request=1.003, response=1.004, over=False, copy=None, l7=True, budget=16)
@example(answer=1.001, ack=1.002, request=1.003, response=1.004, over=True, copy=_GET, l7=False, budget=4)
@example(answer=1.001, ack=1.002, request=1.003, response=1.004, over=False, copy=_GET, l7=True, budget=3)
@example(answer=1.0, ack=1.002, request=1.003, response=1.004, over=False, copy=_GET, l7=True, budget=16)
@example(answer=1.002, ack=1.002, request=1.003, response=1.004, over=False, copy=_GET, l7=True, budget=16)
@given(answer=_MOMENTS, ack=_MOMENTS, request=_MOMENTS, response=_MOMENTS, over=st.booleans(), copy=_COPIES,
       l7=st.booleans(), budget=st.sampled_from([0, 1, 3, 4, 16]))  # fmt: skip
def test_a_whole_exchange_recorded_at_once_leaves_the_session_as_its_four_frames_one_by_one(
    answer: float, ack: float, request: float, response: float, over: bool, copy: bytes | None, l7: bool, budget: int
) -> None:
    """A fast path's record of a new TCP session's SYN-ACK, ACK, request and response, handed over at once, leaves
    the session, the server's figures and the L7 counts as the frame-by-frame observations do, whatever the times'
    order, the budget left, L7 analysis and the request's copy."""
    record = (answer, ack, request, response, over, copy, 64 if copy is None else len(copy))  # times: from 1.0
    assert _measured_twin(l7, budget, True, record) == _measured_twin(l7, budget, False, record)


def test_an_ordinary_exchange_is_folded_in_one_step() -> None:
    """The common record (every moment in order, the copy there) takes the whole-exchange path."""
    taken: list[tuple[float, float] | None] = []
    net = Net(config=make_config(l7=True))
    net.now = 1.0
    net.deliver_to_servers(net.from_client(0, tcp(client_addr(0), VIP, 400, 80, SYN, seq=1)))
    b = net.balancer
    whole = b.sessions.whole_exchange

    def spied(*args: Any) -> tuple[float, float] | None:
        taken.append(whole(*args))
        return taken[-1]

    b.sessions.whole_exchange = spied  # type: ignore[method-assign, assignment]
    session = b.live_sessions()[0]
    assert b.measured(session.c2s, 1.001, 1.002, 1.003, 1.004, False, _GET, len(_GET))
    assert taken and taken[0] is not None and abs(taken[0][1] - 0.001) < 1e-9
    assert session.state is SessionState.ESTABLISHED and b.l7_hosts == {"shop.example": 1}


#: One session of a poll's batch: its record's four times (offsets from its start; 0: not recorded), whether the
#: measurement is over, the request's copy, which side's FIN came first, each FIN's acknowledgment number as it
#: passed (None: none known) and how far its sequence number lies from it, and what the session went through before.
_SessionCase = tuple[tuple[float, float, float, float], bool, bytes | None, bool, int | None, int, int | None, int, str]
_PLAIN: _SessionCase = ((0.001, 0.002, 0.003, 0.004), True, _GET, False, 1020, 0, 5020, 1, "fresh")
_OFFSETS = st.sampled_from([0.0, -0.5, 0.001, 0.002, 0.003, 0.004])
_SESSION_CASES = st.one_of(
    st.just(_PLAIN),
    st.tuples(
        st.one_of(st.just(_PLAIN[0]), st.tuples(_OFFSETS, _OFFSETS, _OFFSETS, _OFFSETS)),
        st.booleans(),
        _COPIES,
        st.booleans(),
        st.sampled_from([None, 0, 1020, 0xFFFF_FFF0]),
        st.sampled_from([0, 1, 65535, 65536, -65535, 0x8000_0000]),
        st.sampled_from([None, 5020]),
        st.sampled_from([0, 1, 70000]),
        st.sampled_from(["fresh", "fresh", "budget", "answered", "gone", "udp"]),
    ),
)


def _whole_twin(l7: bool, cases: list[_SessionCase], batched: bool) -> tuple[object, ...]:
    """A balancer's sessions, servers and L7 counts after a poll hands over ``cases`` as the offload does: with
    ``batched``, :meth:`Balancer.closed` first, then what it leaves one call at a time; without, each session's
    record to ``measured`` and, once its measurement is over, its two FINs to ``ended``. Each twin is kept across
    examples (they see the same sessions in the same order)."""
    net = _TWINS.get((l7, batched, "closed"))
    if net is None:
        net = _TWINS[l7, batched, "closed"] = Net(config=make_config(l7=l7))
    b = net.balancer
    labels = []
    base = net.now = net.now + 100.0
    for i, (_, _, _, _, _, _, _, _, before) in enumerate(cases):
        net.now = base + 1.0 + i / 1000
        sport = 1024 + b.sessions.started % 60000  # a flow of its own
        packet = (udp(client_addr(i % 3), VIP, sport, 53) if before == "udp"
                  else tcp(client_addr(i % 3), VIP, sport, 80, SYN))  # fmt: skip
        ((_, frame),) = net.from_client(0, packet)
        c2s = label_of(frame)
        session = b.sessions.by_c2s(c2s)
        assert session is not None
        if before == "budget":
            b.sessions.rt_budget[session.pair] = 3
        elif before == "answered":
            assert b.measured(c2s, session.started + 0.0005, 0.0, 0.0, 0.0, False)
        elif before == "gone":
            b.sessions.apply(session, SessionEvent.IDLE_TIMEOUT, net.now)
            b._finish(session, net.now)
        labels.append((c2s, net.now))
    now = base + 2.0
    rows = []
    for (c2s, start), case in zip(labels, cases, strict=True):
        times, over, copy, client_first, ack1, far1, ack2, far2, _ = case
        moments = tuple(start + t if t else 0.0 for t in times)
        first, second = (c2s, c2s + 1) if client_first else (c2s + 1, c2s)
        fins = [(label, (ack or 0) + far, ACK_KNOWN | ack if ack is not None else 0, now + k / 10)
                for k, (label, ack, far) in enumerate(((first, ack1, far1), (second, ack2, far2)))]  # fmt: skip
        rows.append((c2s, moments, over, copy, 64 if copy is None else len(copy), fins))
    taken = 0
    if batched:
        taken = b.closed(
            WholeSessions(
                np.array([r[0] for r in rows], dtype=np.int64),
                *(np.array([r[1][k] for r in rows], dtype=np.float64) for k in range(4)),
                [r[3] for r in rows],
                [r[4] for r in rows],
                np.array([r[5][0][0] for r in rows], dtype=np.int64),
                np.array([r[5][0][1] & 0xFFFF_FFFF for r in rows], dtype=np.int64),
                np.array([r[5][0][2] for r in rows], dtype=np.int64),
                np.array([r[5][0][3] for r in rows], dtype=np.float64),
                np.array([r[5][1][1] & 0xFFFF_FFFF for r in rows], dtype=np.int64),
                np.array([r[5][1][2] for r in rows], dtype=np.int64),
                np.array([r[5][1][3] for r in rows], dtype=np.float64),
            )
        )
    watch = b.switching.watch
    for c2s, moments, over, copy, length, fins in rows[taken:]:
        if b.measured(c2s, *moments, over, copy, length) and not (watch[c2s] & WATCH_ALL or watch[c2s + 1] & WATCH_ALL):
            for label, seq, ack, at in fins:
                b.ended(label, seq & 0xFFFF_FFFF, ack, at)
    t = b.sessions
    sessions = [
        (c2s, t.state[(c2s - t.c2s_min) >> 1], t.deadline[(c2s - t.c2s_min) >> 1], t.ending_at[(c2s - t.c2s_min) >> 1],
         t.request_at[(c2s - t.c2s_min) >> 1], t.rt_budget[(c2s - t.c2s_min) >> 1], watch[c2s], watch[c2s + 1])
        for c2s, *_ in rows
    ]  # fmt: skip
    servers = [(s.name, s.active, s.total, s.rt_ewma, s.rt_samples, s.failures, s.answered_at) for s in b.pool.servers]
    due = [s.pair for s in t.due(now + 10.0**6)]
    figures = (t.live, t.half_open, dict(t.not_believed), b.next_deadline(), due, dict(b.l7_hosts))
    return taken if batched else None, sessions, servers, figures


@settings(max_examples=300, deadline=None)
@example(l7=True, cases=[_PLAIN] * 3)
@example(l7=True, cases=[_PLAIN, ((0.002, 0.002, 0.003, 0.004), *_PLAIN[1:]), _PLAIN])
@example(l7=True, cases=[((0.001, 0.0, 0.003, 0.004), *_PLAIN[1:]), _PLAIN])
@example(l7=False, cases=[_PLAIN, (_PLAIN[0], True, None, True, None, 0, None, 0, "fresh"), _PLAIN])
@given(l7=st.booleans(), cases=st.lists(_SESSION_CASES, min_size=1, max_size=6))
def test_sessions_closed_whole_in_one_call_end_as_their_records_and_fins_one_by_one(
    l7: bool, cases: list[_SessionCase]
) -> None:
    """A poll's sessions handed over whole at once (Balancer.closed: their measurement and both FINs) leave the
    session table, the watch bits, the servers' figures and counts, the FINs not believed and the L7 counts as the
    same records and FINs handed over one call at a time, whatever the times' order, the copies, the FINs' order and
    sequence numbers, and the sessions' states before; a plain close is taken whole."""
    taken, *batched = _whole_twin(l7, cases, True)
    _, *one_by_one = _whole_twin(l7, cases, False)
    assert batched == one_by_one
    plain = 0
    while plain < len(cases) and cases[plain] == _PLAIN:
        plain += 1
    assert isinstance(taken, int) and taken >= plain


_TIMER_KINDS = st.sampled_from(
    ["quiet", "quiet", "quiet", "quiet_later", "revived", "late", "half_open", "udp", "established"]
)


def _timer_twin(kinds: list[str], batched: bool, failing: bool) -> tuple[object, ...]:
    """A balancer's table, rows, labels, servers and ended traffic after one timer run over sessions of ``kinds``
    (closes whose linger passed quiet or not, closes not due yet, half-open sessions timing out, UDP flows idling
    out, established sessions), with the quiet closes judged together or (not ``batched``) one by one; ``failing``:
    one unanswered SYN takes a server down (its sessions interrupted within the run)."""
    config = make_config(timeouts=Timeouts(tcp_start=5.0, udp=5.0), max_sessions=0, l7=False)
    if failing:
        config = replace(config, fail_threshold=1, passive_window=0.0)
    net = _TWINS.get((batched, failing, "timer"))
    if net is None:
        net = _TWINS[batched, failing, "timer"] = Net(config=config)
        net.balancer.switching.add_mirror(RecordingMirror())
        if not batched:
            net.balancer._quiet = lambda pairs, now: np.zeros(pairs.size, dtype=np.bool_)  # type: ignore[method-assign]
    b = net.balancer
    for server in b.pool.servers:  # up again after the last example's failures
        b.mark_up(server.name)
    mirror = b.switching.mirrors[0]
    assert isinstance(mirror, RecordingMirror)
    mirror.told.clear()
    base = net.now = net.now + 100.0  # each example's sessions its own, on twins kept across examples
    rows = b.switching.arrays()
    first = b.sessions.started
    for i, kind in enumerate(kinds):
        net.now = base + 1.0 + i / 1000
        udp_flow = kind == "udp"
        sport = 1024 + b.sessions.started % 60000  # a flow of its own
        packet = udp(client_addr(i % 3), VIP, sport, 53) if udp_flow else tcp(client_addr(i % 3), VIP, sport, 80, SYN)
        ((_, frame),) = net.from_client(0, packet)
        c2s = label_of(frame)
        rows.packets[c2s], rows.bytes[c2s], rows.packets[c2s + 1], rows.bytes[c2s + 1] = i + 1, 100 * i, 2 * i, 7 * i
        if kind in ("udp", "half_open"):
            continue
        start = net.now
        assert b.measured(c2s, start + 0.001, start + 0.002, start + 0.003, start + 0.004, True)
        if kind == "established":
            continue
        closed = base + {"late": 4.5, "quiet_later": 4.05}.get(kind, 1.5)  # due after the half-open ones, or not
        b.ended(c2s + 1, 5020, 0, closed)
        b.ended(c2s, 1020, 0, closed + 0.001)
        rows.last_seen[c2s] = rows.last_seen[c2s + 1] = closed + (1.6 if kind == "revived" else 0.002)
    b.on_timer(base + 6.1)
    t = b.sessions
    state, end_time = np.frombuffer(t.state, dtype=np.uint8), np.frombuffer(t.end_time, dtype=np.float64)
    table = [(t.state[p], t.final_state[p], t.end_reason[p], t.end_time[p], t.deadline[p])
             for p in np.flatnonzero((state != 0) | (end_time > base)).tolist()]  # fmt: skip
    octets = b.switching.octets()[t.c2s_min : t.c2s_min + 2 * (first + len(kinds)) + 40].tobytes()
    quarantined = [b.labels.is_quarantined(t.c2s_min + 2 * pair) for pair in range(first, first + len(kinds))]
    again = (b.labels.stats(), quarantined)
    servers = [(s.name, s.active, s.total, s.failures, s.status) for s in b.pool.servers]
    traffic = [(name, vars(traffic)) for name, traffic in b._ended_traffic.items()]
    figures = (
        t.live,
        t.half_open,
        t.revived,
        dict(t.ended),
        b.switching.installed,
        b.switching.version,
        b.next_deadline(),
    )
    return table, octets, again, servers, traffic, figures, mirror.told


@settings(max_examples=60, deadline=None)
@example(kinds=["udp", "quiet", "quiet", "quiet"], failing=False)  # the servers' first closes not in their order
@example(kinds=["quiet"] * 5, failing=False)
@example(kinds=["half_open", "quiet_later", "quiet_later", "quiet_later", "revived", "quiet"], failing=True)
@given(kinds=st.lists(_TIMER_KINDS, min_size=1, max_size=9), failing=st.booleans())
def test_closes_whose_linger_passed_quiet_end_together_as_one_by_one(kinds: list[str], failing: bool) -> None:
    """A timer run ends the closes whose linger passed quiet together (the run of them between other due sessions,
    judged again after those), and leaves the session table, the label rows, the mirrors' notices in order, the
    quarantine's order, the servers and the ended traffic as the same run one session at a time, whatever else is
    due in it: revived closes, half-open and idle timeouts, a server taken down by one of them."""
    assert _timer_twin(kinds, True, failing) == _timer_twin(kinds, False, failing)
