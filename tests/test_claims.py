"""One test per claim of the specification, each tracing what the claim says through the system.

Step-by-step traces use the hand-carried network ``Net`` of ``helpers``; whole-run checks use the simulator.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import replace

import pytest

from helpers import VIP, VIP6, Net, client_addr, handshake, label_of, make_config, tcp, udp
from mplslb.analyzer import PacketAnalyzer
from mplslb.balancing.admission import RefuseWith
from mplslb.labels import C2S_MAX, C2S_MIN
from mplslb.sessions import SessionState, Timeouts
from mplslb.sim.scenario import ServerSpec, SimConfig, SimEvent, Workload, run
from mplslb.wire.ethernet import ETH_P_MPLS_UC
from mplslb.wire.mpls import parse_stack
from mplslb.wire.tcp import TCPFlag, parse_tcp

SYN, ACK, FIN, RST, PSH = (int(f) for f in (TCPFlag.SYN, TCPFlag.ACK, TCPFlag.FIN, TCPFlag.RST, TCPFlag.PSH))


def sim(**kw: object) -> SimConfig:
    workload = Workload(clients=20, sessions=kw.pop("sessions", 300), rate=200.0, session_timeout=4.0)  # type: ignore[arg-type]
    base = SimConfig(seed=3, workload=workload)
    return replace(base, **kw)  # type: ignore[arg-type]


def test_claim_1_apparatus_has_five_units_and_switches_labelled_packets() -> None:
    net = Net()
    b = net.balancer
    # The five units of claim 1, each its own object.
    assert {type(u).__name__ for u in (b.analyzer, b.algorithm, b.switching, b.sessions, b.labels)} == {
        "PacketAnalyzer", "RoundRobin", "LabelSwitchingTable", "SessionTable", "LabelManager",
    }  # fmt: skip
    name, c2s = handshake(net)
    assert b.slow_path == 1  # the SYN was analysed
    # The client's next packets (the handshake's ACK, then this one) carry the label and are switched without
    # analysis.
    out = net.from_client(0, tcp(client_addr(0), VIP, 40000, 80, ACK, seq=101, ack=501))
    assert label_of(out[0][1]) == c2s
    assert net.deliver_to_servers(out)[0][0] == name
    assert (b.slow_path, b.fast_path) == (1, 3)


def test_claim_2_existing_session_unlabelled_packets_go_to_its_server() -> None:
    net = Net()
    src = client_addr(0)
    first = net.from_client(0, udp(src, VIP, 5000, 53, b"one"))
    second = net.from_client(0, udp(src, VIP, 5000, 53, b"two"))  # no reply yet: still unlabelled
    servers = [n for n, _ in net.deliver_to_servers(first + second)]
    assert servers[0] == servers[1]
    assert label_of(first[0][1]) == label_of(second[0][1])
    assert len(net.balancer.sessions) == 1 and net.balancer.sessions.started == 1
    assert net.balancer.slow_path == 2


def test_claim_2_label_inspecting_unit_sends_labelled_frames_to_switching_only(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net()
    handshake(net)
    calls = []
    real = PacketAnalyzer.analyze
    monkeypatch.setattr(PacketAnalyzer, "analyze", lambda self, f: calls.append(f) or real(self, f))
    net.from_client(0, tcp(client_addr(0), VIP, 40000, 80, ACK, seq=101, ack=501))
    assert calls == []
    net.from_client(1, tcp(client_addr(1), VIP, 40001, 80, SYN))
    assert len(calls) == 1


def test_claim_3_session_label_is_an_mpls_label() -> None:
    net = Net()
    out = net.from_client(0, tcp(client_addr(0), VIP, 40000, 80, SYN))
    frame = out[0][1]
    assert struct.unpack_from("!H", frame, 12)[0] == ETH_P_MPLS_UC
    entries, end = parse_stack(frame, 14)
    assert len(entries) == 1 and entries[0].s and C2S_MIN <= entries[0].label <= C2S_MAX
    assert frame[end] >> 4 == 4  # the IP packet follows the label stack


@pytest.mark.parametrize(
    ("algorithm", "check"),
    [
        ("round_robin", lambda counts: max(counts.values()) - min(counts.values()) <= 1),
        ("least_connections", lambda counts: len(counts) == 3),
        (
            "weighted_round_robin",
            lambda counts: counts["s1"] * 3 == counts["s3"] and counts["s2"] * 3 == counts["s3"] * 2,
        ),
    ],
)
def test_claim_4_algorithm_unit_round_robin_least_connections_weights(algorithm: str, check: object) -> None:
    config = make_config(algorithm=algorithm)
    servers = tuple(replace(s, weight=w) for s, w in zip(config.servers, (1, 2, 3), strict=True))
    net = Net(replace(config, servers=servers))
    chosen = Counter()
    for i in range(60):
        out = net.from_client(i % 7, tcp(client_addr(i % 7), VIP, 41000 + i, 80, SYN))
        chosen[net.deliver_to_servers(out)[0][0]] += 1
    assert sum(chosen.values()) == 60
    assert check(chosen)  # type: ignore[operator]


def test_claim_4_algorithm_unit_response_time_prefers_the_faster_server() -> None:
    fast, slow = ServerSpec("fast", workers=8, service_time=0.002), ServerSpec("slow", workers=8, service_time=0.05)
    report = run(sim(servers=(fast, slow), balancer=replace(make_config(), algorithm="response_time")))
    rows = {r.name: r for r in report.stats.servers}
    assert rows["fast"].rt_ms is not None and rows["slow"].rt_ms is not None
    assert rows["fast"].rt_ms < rows["slow"].rt_ms  # measured from the sessions' own frames
    assert rows["fast"].total > 2 * rows["slow"].total


def test_claim_4_server_state_management_down_server_gets_no_new_sessions() -> None:
    net = Net()
    net.balancer.mark_down("s2", net.now)
    chosen = set()
    for i in range(12):
        out = net.from_client(0, tcp(client_addr(0), VIP, 42000 + i, 80, SYN))
        chosen.add(net.deliver_to_servers(out)[0][0])
    assert chosen == {"s1", "s3"}
    # Real-time state monitoring: a server that stops answering is taken down by passive health.
    report = run(
        sim(
            events=(SimEvent(1.0, "fail", "web2"),),
            balancer=replace(make_config(), timeouts=Timeouts(tcp_start=0.5), passive_window=0.5),
        )
    )
    assert {r.name: r.status for r in report.stats.servers}["web2"] == "down"


def test_claim_4_service_acceptance_control_refuses_new_session_when_limit_reached() -> None:
    net = Net(make_config(max_sessions=2, refuse_with=RefuseWith.RST))
    handshake(net, 0, sport=1000)
    handshake(net, 1, sport=1001)
    refused = net.from_client(0, tcp(client_addr(0), VIP, 1002, 80, SYN, seq=7))
    assert len(refused) == 1 and refused[0][0] == 0  # back out of the client's port, not to a server
    answer = net.deliver_to_client(0, refused)[0]
    seg = parse_tcp(answer, 20)
    assert seg.flags & RST and seg.ack == 8 and answer[12:16] == VIP


def test_claim_5_label_switching_table_holds_line_card_port_and_next_hop() -> None:
    net = Net()
    name, c2s = handshake(net)
    row = net.balancer.switching.entry(c2s)
    server = net.balancer.pool.get(name).config
    assert row is not None
    assert (row.line_card, row.port_id, row.next_hop) == (1, server.port_id, server.mac)
    back = net.balancer.switching.entry(c2s + 1)
    assert back is not None and (back.line_card, back.port_id) == (0, 0)
    # Switching follows the table: a labelled frame leaves by the port the table names.
    out = net.from_client(0, tcp(client_addr(0), VIP, 40000, 80, ACK, seq=101, ack=501))
    assert out[0][0] == row.port_id and out[0][1][0:6] == row.next_hop


def test_claim_6_session_start_end_and_interruption() -> None:
    net = Net(make_config(timeouts=Timeouts(closed_linger=1.0)))
    b = net.balancer
    name, c2s = handshake(net)
    session = b.sessions.by_c2s(c2s)
    assert session is not None and session.state is SessionState.ESTABLISHED  # start recognised, then established
    src = client_addr(0)
    net.deliver_to_servers(net.from_client(0, tcp(src, VIP, 40000, 80, FIN | ACK, seq=101, ack=501)))
    assert session.state is SessionState.CLOSING_CLIENT  # the client closed its side
    net.deliver_to_client(0, net.from_server(name, tcp(VIP, src, 80, 40000, FIN | ACK, seq=501, ack=102)))
    assert session.state is SessionState.ENDING  # end ("determination") recognised, believed once quiet
    net.from_client(0, tcp(src, VIP, 40000, 80, ACK, seq=102, ack=502))  # the last ACK still passes
    net.now = 2.0
    b.on_timer(net.now)
    assert b.sessions.by_c2s(c2s) is None and not b.labels.in_use(c2s)  # deleted from the table
    # Interruption: a server taken away interrupts its sessions and withdraws their labels.
    name2, c2s2 = handshake(net, 1, sport=40001)
    s2 = b.sessions.by_c2s(c2s2)
    assert s2 is not None
    b.remove_server(name2, net.now)
    assert s2.state is SessionState.INTERRUPTED and b.sessions.by_c2s(c2s2) is None
    assert b.switching.entry(c2s2) is None and b.switching.entry(c2s2 + 1) is None


def test_claim_7_c2s_odd_and_s2c_is_c2s_plus_one_for_every_session() -> None:
    net = Net()
    for i in range(40):
        _, c2s = handshake(net, i % 5, sport=43000 + i, v6=i % 3 == 0)
        assert c2s % 2 == 1 and C2S_MIN <= c2s <= C2S_MAX
        entry = net.balancer.switching.entry(c2s + 1)
        assert entry is not None  # the S2C label is C2S + 1, installed with it
    labels = [s.c2s for s in net.balancer.live_sessions()]
    assert len(set(labels)) == 40


def test_claim_8_the_eight_steps_of_the_method() -> None:
    net = Net()
    b = net.balancer
    src = client_addr(0)
    # Step 1: the balancer recognises a new session by analysing the header and assigns a C2S label.
    out = net.from_client(0, tcp(src, VIP, 40000, 80, SYN, seq=100))
    assert b.sessions.started == 1
    # Step 2: it assigns a server, attaches the C2S label and sends the packet to that server.
    c2s = label_of(out[0][1])
    assert c2s is not None and c2s % 2 == 1
    ((name, _),) = net.deliver_to_servers(out)
    assert b.sessions.by_c2s(c2s).server.config.name == name  # type: ignore[union-attr]
    # Step 3: the server derives the S2C label from the received one, by itself.
    assert net.servers[name].label_for((6, VIP, 80, src, 40000)) == c2s + 1  # type: ignore[arg-type]
    # Step 4: the server answers with the S2C label attached.
    server_frame = net.servers[name].from_host(tcp(VIP, src, 80, 40000, SYN | ACK, seq=500, ack=101), net.now)
    assert server_frame is not None and label_of(server_frame) == c2s + 1
    # Step 5: the balancer label-switches it to the client using the label's value.
    to_client = b.receive(net.server_port[name], server_frame, net.now)
    assert label_of(to_client[0][1]) == c2s + 1 and b.fast_path == 1
    # Step 6: the client derives the C2S label (S2C - 1) by itself.
    net.deliver_to_client(0, to_client)
    assert net.client(0).label_for((6, src, 40000, VIP, 80)) == c2s  # type: ignore[arg-type]
    # Step 7: the client sends with the C2S label attached.
    frame = net.client(0).from_host(
        tcp(src, VIP, 40000, 80, ACK | PSH, seq=101, ack=501, payload=b"GET / HTTP/1.1\r\n\r\n"), net.now
    )
    assert frame is not None and label_of(frame) == c2s
    # Step 8: the balancer label-switches it to the destination server, determined by the label alone.
    out = b.receive(0, frame, net.now)
    assert net.deliver_to_servers(out)[0][0] == name and b.fast_path == 2 and b.slow_path == 1


def test_claim_9_labelled_packets_are_fast_switched_without_analysis(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net()
    name, _ = handshake(net)

    def refuse(*_: object) -> None:
        raise AssertionError("a labelled packet was analysed")

    monkeypatch.setattr(PacketAnalyzer, "analyze", refuse)
    monkeypatch.setattr(net.balancer.algorithm, "choose", refuse)
    for k in range(10):
        out = net.from_client(0, tcp(client_addr(0), VIP, 40000, 80, ACK, seq=101 + k, ack=501))
        assert net.deliver_to_servers(out)[0][0] == name


def test_claim_10_only_unlabelled_packets_are_analysed(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net()
    analysed: list[bytes] = []
    real = PacketAnalyzer.analyze
    monkeypatch.setattr(PacketAnalyzer, "analyze", lambda self, f: analysed.append(bytes(f)) or real(self, f))
    for i in range(5):
        handshake(net, i, sport=44000 + i)
        net.from_client(i, tcp(client_addr(i), VIP, 44000 + i, 80, ACK, seq=101, ack=501))
    assert len(analysed) == 5  # one SYN per session; SYN-ACKs and ACKs were labelled
    assert all(label_of(f) is None for f in analysed)


def test_claim_11_acceptance_decided_only_for_unlabelled_packets() -> None:
    report = run(sim(sessions=400, balancer=replace(make_config(), max_sessions=8, refuse_with=RefuseWith.RST)))
    outcomes = report.outcomes()
    assert outcomes.get("refused", 0) > 0 and report.stats.refused["global_session_limit"] == outcomes["refused"]
    # Every session that was accepted completed: labelled packets of accepted sessions are never refused.
    assert outcomes.get("failed", 0) == 0
    assert outcomes["completed"] + outcomes["refused"] == 400


def test_claim_12_servers_answer_from_the_vip_and_the_balancer_never_rewrites_addresses() -> None:
    net = Net()
    src = client_addr(0)
    packet = tcp(src, VIP, 40000, 80, SYN, seq=100)
    out = net.from_client(0, packet)
    ((name, delivered),) = net.deliver_to_servers(out)
    assert delivered == packet  # the server receives the client's packet byte for byte, addressed to the VIP
    reply = tcp(VIP, src, 80, 40000, SYN | ACK, seq=5, ack=101)
    assert net.deliver_to_client(0, net.from_server(name, reply)) == [reply]
    # A server may not answer from its real address: the endpoint refuses it.
    real = net.balancer.pool.get(name).config.address
    assert net.servers[name].from_host(tcp(real, src, 80, 40000, ACK), net.now) is None
    assert net.servers[name].drops["not_from_vip"] == 1


def test_claim_13_s2c_is_assigned_automatically_as_c2s_plus_one() -> None:
    net = Net()
    for i in range(10):
        out = net.from_client(i, udp(client_addr(i, v6=i % 2 == 1), VIP6 if i % 2 else VIP, 6000 + i, 53))
        ((name, _),) = net.deliver_to_servers(out)
        c2s = label_of(out[0][1])
        v6 = i % 2 == 1
        reply = net.servers[name].from_host(udp(VIP6 if v6 else VIP, client_addr(i, v6), 53, 6000 + i, b"a"), net.now)
        assert reply is not None and label_of(reply) == c2s + 1  # type: ignore[operator]


def test_claim_14_no_signalling_labels_learned_from_data_frames_only() -> None:
    report = run(sim(sessions=150), capture=None)
    assert report.outcomes() == {"completed": 150}
    net = Net()
    name, c2s = handshake(net)
    # Only data frames were exchanged; the labels each side uses are exactly L+1 (server) and M-1 (client).
    assert net.servers[name].counters == {"from_wire": 2, "from_host": 1}  # the SYN and the handshake's ACK
    assert net.client(0).label_for((6, client_addr(0), 40000, VIP, 80)) == c2s  # type: ignore[arg-type]


def test_claim_15_label_attached_per_mpls_header_configuration() -> None:
    net = Net()
    out = net.from_client(0, tcp(client_addr(0), VIP, 40000, 80, SYN, ttl=57, tos=0xB8))
    frame = out[0][1]
    (entry,) = struct.unpack_from("!I", frame, 14)
    label, tc, s, ttl = entry >> 12, (entry >> 9) & 7, (entry >> 8) & 1, entry & 0xFF
    assert label % 2 == 1 and s == 1 and ttl == 57 and tc == 0xB8 >> 5
