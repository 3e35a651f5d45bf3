"""What a forger on a client's Ethernet segment cannot do to the sessions of others: end them, enter them, fill the
table with half-open sessions, take a server down with unanswered SYNs, or get a late frame into a reused label's
new session. The last part is a stateful property test over the balancer core, run through the one-frame, batch
and block paths, and through the kernel offload's XDP program (root and clang) with the balancer behind it."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from helpers import (
    ACK,
    CLIENT_PORTS,
    FIN,
    PORT_MAC,
    PSH,
    RST,
    SYN,
    VIP,
    Net,
    client_addr,
    client_mac,
    ether,
    handshake,
    label_of,
    labelled,
    mac,
    make_config,
    pack,
    tcp,
)
from mplslb.agents import AgentConfig
from mplslb.analyzer import PacketAnalyzer
from mplslb.balancer import Balancer, Frames
from mplslb.balancing.admission import Refusal
from mplslb.balancing.servers import ServerStatus
from mplslb.config import BalancerConfig, ConfigError, Section, balancer_config_from_section
from mplslb.drivers.loop import Loop
from mplslb.drivers.netns import entered
from mplslb.endpoint import ENDPOINT_FLOW_TIMEOUT, ClientEndpoint, ServerEndpoint
from mplslb.flow import FlowKey
from mplslb.labels import QUARANTINE_MIN
from mplslb.offload import bpf
from mplslb.offload.driver import OffloadedBalancer
from mplslb.sessions import SessionState, Timeouts
from mplslb.switching import WATCH_ALL, LabelSwitchingTable
from mplslb.switching.layout import ACK_KNOWN, ETH_P_MPLS_UC, ETH_TYPE, LSE_AT
from mplslb.wire.mpls import ENTRY
from test_block import listed
from test_offload import KERNEL_MARKS, needs_kernel, on_veths, veth_namespaces

ATTACKER = mac(0xEE, 1)  # another host on client 0's segment (port 0)
LINGER = 2.0
TIMEOUTS = Timeouts(tcp_start=5.0, closed_linger=LINGER)


def established(net: Net, sport: int = 40000) -> tuple[str, int]:
    name, c2s = handshake(net, sport=sport)
    session = net.balancer.sessions.by_c2s(c2s)
    assert session is not None and session.state is SessionState.ESTABLISHED
    return name, c2s


def exchange(net: Net, name: str, sport: int = 40000) -> None:
    """A request and its answer on client 0's session from ``sport``, through the endpoints (labelled)."""
    src = client_addr(0)
    out = net.from_client(0, tcp(src, VIP, sport, 80, PSH | ACK, seq=200, ack=501, payload=b"GET / HTTP/1.1\r\n\r\n"))
    assert [n for n, _ in net.deliver_to_servers(out)] == [name]
    back = net.from_server(name, tcp(VIP, src, 80, sport, PSH | ACK, seq=501, ack=218, payload=b"HTTP/1.1 200"))
    assert len(net.deliver_to_client(0, back)) == 1


def forged(src_mac: bytes, flags: int, *, sport: int = 40000, port: int = 0, label: int | None = None) -> bytes:
    """A segment of client 0's flow from ``sport`` sent by ``src_mac`` on ``port``, unlabelled or under ``label``."""
    packet = tcp(client_addr(0), VIP, sport, 80, flags, seq=101)
    if label is None:
        return ether(PORT_MAC[port], src_mac, packet)
    return labelled(PORT_MAC[port], src_mac, label, packet)


# -- 1a: unlabelled frames of a session pass the binding of its labels --------------------------------------------
@pytest.mark.parametrize("flags", [RST, FIN | ACK, SYN, ACK], ids=["rst", "fin", "syn", "ack"])
def test_unlabelled_frames_of_a_session_from_another_mac_or_port_are_dropped(flags: int) -> None:
    net = Net(make_config(timeouts=TIMEOUTS))
    b = net.balancer
    _, c2s = established(net)
    session = b.sessions.by_c2s(c2s)
    assert session is not None
    assert b.receive(0, forged(ATTACKER, flags), net.now) == []  # another MAC on the client's segment
    assert b.receive(1, forged(client_mac(0), flags, port=1), net.now) == []  # the client's MAC on another port
    assert b.stats().drops["session_wrong_source"] == 2
    assert session.state is SessionState.ESTABLISHED and b.sessions.started == 1  # not ended, not restarted


def test_a_spoofed_syn_of_an_ending_sessions_flow_does_not_restart_it() -> None:
    net = Net(make_config(timeouts=TIMEOUTS))
    b = net.balancer
    name, c2s = established(net)
    net.deliver_to_servers(net.from_client(0, tcp(client_addr(0), VIP, 40000, 80, RST | ACK, seq=101, ack=501)))
    assert b.receive(0, forged(ATTACKER, SYN), net.now) == []
    assert b.stats().drops["session_wrong_source"] == 1 and b.sessions.started == 1
    session = b.sessions.by_c2s(c2s)
    assert session is not None and session.state is SessionState.ENDING and session.server.name == name


# -- 1b: no RST or FIN ends a session on its own word ------------------------------------------------------------
@pytest.mark.parametrize("labelled_spoof", [False, True], ids=["unlabelled", "labelled"])
def test_a_forged_rst_from_the_clients_mac_ends_nothing_while_traffic_continues(labelled_spoof: bool) -> None:
    """The forger copies everything of the client's (port, MAC, address, even its label): the RST reaches the
    server, the session goes ENDING, but the endpoints keep talking, so the linger revives it. Once the traffic
    stops after another RST, the session closes."""
    net = Net(make_config(timeouts=TIMEOUTS))
    b = net.balancer
    name, c2s = established(net)
    spoof = forged(client_mac(0), RST, label=c2s if labelled_spoof else None)
    out = b.receive(0, spoof, net.now)
    assert len(out) == 1 and label_of(out[0][1]) == c2s  # it is the client's own word, as far as anyone can tell
    session = b.sessions.by_c2s(c2s)
    assert session is not None and session.state is SessionState.ENDING
    assert b.pool.get(name).active == 0 and b.live == 0  # counted off meanwhile: most ending sessions are over
    net.now = 1.5  # past the grace (half the linger): the endpoints go on
    exchange(net, name)
    b.on_timer(LINGER)
    assert session.state is SessionState.ESTABLISHED and b.sessions.revived == 1
    assert b.pool.get(name).active == 1 and b.live == 1
    assert b.switching.entry(c2s) is not None and b.switching.entry(c2s + 1) is not None
    net.now = 3.0
    exchange(net, name)  # still carried
    b.receive(0, spoof, net.now)
    b.on_timer(net.now + LINGER)  # nothing after this RST: believed
    assert b.sessions.by_c2s(c2s) is None and b.switching.entry(c2s) is None and b.labels.is_quarantined(c2s)
    assert b.stats().sessions_ended == {"closed": 1}


def test_a_real_close_frees_the_labels_at_the_lingers_end() -> None:
    net = Net(make_config(timeouts=TIMEOUTS))
    b = net.balancer
    name, c2s = established(net)
    src = client_addr(0)
    net.deliver_to_servers(net.from_client(0, tcp(src, VIP, 40000, 80, FIN | ACK, seq=101, ack=501)))
    net.now = 0.01
    net.deliver_to_client(0, net.from_server(name, tcp(VIP, src, 80, 40000, FIN | ACK, seq=501, ack=102)))
    net.now = 0.02
    net.deliver_to_servers(net.from_client(0, tcp(src, VIP, 40000, 80, ACK, seq=102, ack=502)))  # the last ACK
    session = b.sessions.by_c2s(c2s)
    assert session is not None and session.state is SessionState.ENDING
    assert b.next_deadline() == pytest.approx(0.01 + LINGER)
    b.on_timer(0.01 + LINGER)
    assert b.sessions.by_c2s(c2s) is None and b.live == 0 and b.labels.is_quarantined(c2s)
    assert b.switching.entry(c2s) is None and b.switching.entry(c2s + 1) is None
    assert b.stats().sessions_ended == {"closed": 1} and b.sessions.revived == 0


def test_a_forged_fin_pair_does_not_cut_a_session_whose_data_goes_on() -> None:
    net = Net(make_config(timeouts=TIMEOUTS))
    b = net.balancer
    name, c2s = established(net)
    b.receive(0, forged(client_mac(0), FIN | ACK, label=c2s), net.now)
    session = b.sessions.by_c2s(c2s)
    assert session is not None and session.state is SessionState.CLOSING_CLIENT
    net.now = 30.0
    exchange(net, name)  # a half-close is legal: the server's data flows on
    net.now = 31.0
    out = net.from_server(name, tcp(VIP, client_addr(0), 80, 40000, FIN | ACK, seq=600, ack=102))
    assert session.state is SessionState.ENDING
    net.deliver_to_client(0, out)
    net.now = 33.0
    exchange(net, name)  # the client never sent FIN: it goes on
    b.on_timer(31.0 + LINGER)
    assert session.state is SessionState.ESTABLISHED and b.sessions.revived == 1


# -- 1c: an RST or closing FIN must carry a sequence number the other end could expect -----------------------------
SERVER_ACK = 0xFFFF_FF00  # the server's acknowledgment number in these tests: near the wrap of the sequence space
WINDOW = 65535  # limits.rst_window's default
PATHS = ("one", "batch", "block")


def take(b: Balancer, path: str, frames: list[tuple[int, bytes]], now: float) -> Frames:
    """``frames`` through one of the balancer's three paths."""
    if path == "one":
        return [sent for port, frame in frames for sent in b.receive(port, frame, now)]
    if path == "batch":
        return b.receive_batch(frames, now)
    buf, starts, lengths, ports = pack(frames)
    return listed(b.receive_block(buf, starts, lengths, ports, now), buf, starts, lengths)


def idle_session(net: Net, server_ack: int = SERVER_ACK) -> tuple[str, int]:
    """An established session whose last exchange was the server's segment acknowledging ``server_ack``."""
    name, c2s = established(net)
    src = client_addr(0)
    back = net.from_server(name, tcp(VIP, src, 80, 40000, PSH | ACK, seq=501, ack=server_ack, payload=b"HTTP/1.1"))
    assert len(net.deliver_to_client(0, back)) == 1
    return name, c2s


def in_window(seq: int, ack: int, window: int = WINDOW) -> bool:
    return ((seq - ack + window) % (1 << 32)) <= 2 * window


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("labelled_spoof", [False, True], ids=["unlabelled", "labelled"])
def test_a_forged_rst_with_a_wrong_seq_on_an_idle_session_changes_nothing(labelled_spoof: bool, path: str) -> None:
    """The forger copies the client's port, MAC, address, ports and label, but not the sequence number it cannot
    see: the RST is forwarded (the server's stack judges it too) and counted, and the session, idle for the whole
    linger and beyond, stays ESTABLISHED. The same RST with the sequence number the server expects is believed and
    closes the session at the linger's end."""
    net = Net(make_config(timeouts=TIMEOUTS))
    b = net.balancer
    name, c2s = idle_session(net)
    session = b.sessions.by_c2s(c2s)
    assert session is not None
    label = c2s if labelled_spoof else None
    wrong = tcp(client_addr(0), VIP, 40000, 80, RST, seq=(SERVER_ACK + 3 * WINDOW) % (1 << 32))
    wrong_frame = (
        labelled(PORT_MAC[0], client_mac(0), c2s, wrong) if label else ether(PORT_MAC[0], client_mac(0), wrong)
    )
    out = take(b, path, [(0, wrong_frame)], net.now)
    assert len(out) == 1 and label_of(out[0][1]) == c2s  # forwarded as the client's own
    assert session.state is SessionState.ESTABLISHED and b.live == 1
    assert b.stats().not_believed == {"rst_out_of_window": 1, "revived": 0}
    net.now = 10 * LINGER  # idle all along
    b.on_timer(net.now)
    assert session.state is SessionState.ESTABLISHED and b.switching.entry(c2s) is not None
    exchange(net, name)  # and it carries a request
    # The right sequence number (the server's last ACK, or anything within the window of it) is believed.
    right = tcp(client_addr(0), VIP, 40000, 80, RST, seq=218)  # the server's last ACK now (exchange's answer)
    right_frame = (
        labelled(PORT_MAC[0], client_mac(0), c2s, right) if label else ether(PORT_MAC[0], client_mac(0), right)
    )
    take(b, path, [(0, right_frame)], net.now)
    assert session.state is SessionState.ENDING
    b.on_timer(net.now + LINGER)
    assert b.sessions.by_c2s(c2s) is None and b.stats().sessions_ended == {"closed": 1}
    assert b.stats().not_believed == {"rst_out_of_window": 1, "revived": 0}


@settings(max_examples=60, deadline=None)
@given(
    server_ack=st.integers(0, (1 << 32) - 1),
    offset=st.one_of(st.integers(-2 * WINDOW, 2 * WINDOW), st.integers(0, (1 << 32) - 1)),
    labelled_spoof=st.booleans(),
    path=st.sampled_from(PATHS),
)
def test_an_rst_is_believed_exactly_when_its_seq_is_within_the_window_of_the_servers_last_ack(
    server_ack: int, offset: int, labelled_spoof: bool, path: str
) -> None:
    net = Net(make_config(timeouts=TIMEOUTS))
    b = net.balancer
    _, c2s = idle_session(net, server_ack)
    seq = (server_ack + offset) % (1 << 32)
    packet = tcp(client_addr(0), VIP, 40000, 80, RST | ACK, seq=seq, ack=501)
    frame = (
        labelled(PORT_MAC[0], client_mac(0), c2s, packet)
        if labelled_spoof
        else ether(PORT_MAC[0], client_mac(0), packet)
    )
    assert len(take(b, path, [(0, frame)], net.now)) == 1
    believed = in_window(seq, server_ack)
    session = b.sessions.by_c2s(c2s)
    assert session is not None
    assert session.state is (SessionState.ENDING if believed else SessionState.ESTABLISHED)
    assert b.sessions.not_believed == ({} if believed else {"rst_out_of_window": 1})
    b.on_timer(net.now + LINGER)
    assert (b.sessions.by_c2s(c2s) is None) == believed


@pytest.mark.parametrize("path", PATHS)
def test_a_servers_rst_is_judged_by_the_clients_last_ack(path: str) -> None:
    net = Net(make_config(timeouts=TIMEOUTS))
    b = net.balancer
    name, c2s = established(net)  # the client's last ACK: 501
    src = client_addr(0)
    far = net.server_port[name], net.servers[name].from_host(tcp(VIP, src, 80, 40000, RST, seq=501 + 2 * WINDOW), 0.0)
    near = net.server_port[name], net.servers[name].from_host(tcp(VIP, src, 80, 40000, RST, seq=501), 0.0)
    assert far[1] is not None and near[1] is not None
    take(b, path, [far], net.now)  # type: ignore[list-item]
    session = b.sessions.by_c2s(c2s)
    assert session is not None and session.state is SessionState.ESTABLISHED
    take(b, path, [near], net.now)  # type: ignore[list-item]
    assert session.state is SessionState.ENDING and b.sessions.not_believed == {"rst_out_of_window": 1}


@pytest.mark.parametrize("path", PATHS)
def test_a_closing_fin_with_a_wrong_seq_changes_nothing_and_a_client_first_fin_is_judged_too(path: str) -> None:
    """After the server's FIN (CLOSING_SERVER), the client's FIN would end the session: a forged one far from the
    server's last ACK is counted and changes nothing; the real one closes. A client's first FIN ends nothing but
    would cut the session's idle life to tcp_closing: a forged one is counted and changes nothing, the real one
    half-closes. A server's first FIN (from its own port and MAC) is taken as it comes."""
    net = Net(make_config(timeouts=TIMEOUTS))
    b = net.balancer
    name, c2s = established(net)  # the server's last ACK: 101
    src = client_addr(0)
    session = b.sessions.by_c2s(c2s)
    assert session is not None
    first = labelled(PORT_MAC[0], client_mac(0), c2s, tcp(src, VIP, 40000, 80, FIN | ACK, seq=1 << 31, ack=501))
    take(b, path, [(0, first)], net.now)
    assert session.state is SessionState.ESTABLISHED and b.sessions.not_believed == {"fin_out_of_window": 1}
    unlabelled = ether(PORT_MAC[0], client_mac(0), tcp(src, VIP, 40000, 80, FIN | ACK, seq=101 + 3 * WINDOW))
    take(b, path, [(0, unlabelled)], net.now)
    assert session.state is SessionState.ESTABLISHED and b.sessions.not_believed == {"fin_out_of_window": 2}
    real_first = labelled(PORT_MAC[0], client_mac(0), c2s, tcp(src, VIP, 40000, 80, FIN | ACK, seq=101, ack=501))
    take(b, path, [(0, real_first)], net.now)
    assert session.state is SessionState.CLOSING_CLIENT
    net1 = Net(make_config(timeouts=TIMEOUTS))
    name, c2s = established(net1)
    session = net1.balancer.sessions.by_c2s(c2s)
    assert session is not None
    far_fin = net1.from_server(name, tcp(VIP, src, 80, 40000, FIN | ACK, seq=501 + 5 * WINDOW, ack=101))
    net1.deliver_to_client(0, far_fin)
    assert session.state is SessionState.CLOSING_SERVER and net1.balancer.sessions.not_believed == {}
    net2 = Net(make_config(timeouts=TIMEOUTS))
    b = net2.balancer
    name, c2s = established(net2)
    session = b.sessions.by_c2s(c2s)
    assert session is not None
    fin = net2.from_server(name, tcp(VIP, src, 80, 40000, FIN | ACK, seq=501, ack=101))
    net2.deliver_to_client(0, fin)
    assert session.state is SessionState.CLOSING_SERVER
    forged_fin = labelled(PORT_MAC[0], client_mac(0), c2s, tcp(src, VIP, 40000, 80, FIN | ACK, seq=101 + 5 * WINDOW))
    take(b, path, [(0, forged_fin)], net2.now)
    assert session.state is SessionState.CLOSING_SERVER and b.sessions.not_believed == {"fin_out_of_window": 1}
    real = labelled(PORT_MAC[0], client_mac(0), c2s, tcp(src, VIP, 40000, 80, FIN | ACK, seq=101, ack=502))
    take(b, path, [(0, real)], net2.now)
    assert session.state is SessionState.ENDING


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rst_at", [1, 2], ids=["between", "after"])
def test_an_rst_is_judged_by_the_acknowledgment_numbers_that_went_before_it(path: str, rst_at: int) -> None:
    """Two server segments acknowledging 1000 and then far beyond, and the client's RST at 1000 between or after
    them, in one batch or block: judged by the ACK before it, as frame by frame; the label keeps the last ACK.
    The response time is measured first, so the server's segments are switched without reports (in a block, both
    counted at once before the RST that comes after them)."""
    net = Net(make_config(timeouts=TIMEOUTS))
    b = net.balancer
    name, c2s = established(net)
    net.now = 1.0
    exchange(net, name)
    assert not b.switching.watch[c2s + 1] & WATCH_ALL
    src = client_addr(0)
    far = 1000 + 10 * WINDOW
    server = [
        (net.server_port[name], net.servers[name].from_host(tcp(VIP, src, 80, 40000, ACK, seq=501, ack=ack), 0.0))
        for ack in (1000, far)
    ]
    rst = (0, labelled(PORT_MAC[0], client_mac(0), c2s, tcp(src, VIP, 40000, 80, RST, seq=1000)))
    frames = [*server[:rst_at], rst, *server[rst_at:]]
    assert len(take(b, path, frames, net.now)) == 3  # type: ignore[arg-type]
    session = b.sessions.by_c2s(c2s)
    assert session is not None
    assert session.state is (SessionState.ENDING if rst_at == 1 else SessionState.ESTABLISHED)
    assert b.switching.acks[c2s + 1] == ACK_KNOWN | far


def test_a_forged_rst_with_a_wrong_seq_does_not_start_an_ending_sessions_linger_again() -> None:
    """A close repeated while ENDING starts the linger again; a forged one far from the server's last ACK does not
    (it would keep a closed session's labels as long as the forger likes), and is counted."""
    net = Net(make_config(timeouts=TIMEOUTS))
    b = net.balancer
    _, c2s = idle_session(net, 1000)
    src = client_addr(0)
    b.receive(0, labelled(PORT_MAC[0], client_mac(0), c2s, tcp(src, VIP, 40000, 80, RST, seq=1000)), net.now)
    session = b.sessions.by_c2s(c2s)
    assert session is not None and session.state is SessionState.ENDING
    net.now = 1.5
    b.receive(
        0, labelled(PORT_MAC[0], client_mac(0), c2s, tcp(src, VIP, 40000, 80, RST, seq=1000 + 9 * WINDOW)), net.now
    )
    assert b.sessions.ending_at[session.pair] == 0.0 and b.sessions.not_believed == {"rst_out_of_window": 1}
    b.on_timer(LINGER)  # the first RST's linger: nothing of the endpoints' after it
    assert b.sessions.by_c2s(c2s) is None and b.stats().sessions_ended == {"closed": 1}


def test_before_the_other_end_acknowledged_anything_an_rst_is_taken_as_it_comes() -> None:
    """A session whose server has not acknowledged anything yet (no ACK on the S2C label): nothing to judge by."""
    net = Net(make_config(timeouts=TIMEOUTS))
    b = net.balancer
    _, c2s = established(net)
    b.switching.acks[c2s + 1] = 0  # as if the server's SYN-ACK had gone by unseen
    rst = labelled(PORT_MAC[0], client_mac(0), c2s, tcp(client_addr(0), VIP, 40000, 80, RST, seq=12345))
    b.receive(0, rst, net.now)
    session = b.sessions.by_c2s(c2s)
    assert session is not None and session.state is SessionState.ENDING and b.sessions.not_believed == {}


def test_the_window_is_the_configured_one_and_wraps_around_the_sequence_space() -> None:
    table = make_balancer_table()
    label = 1001
    for ack, seq, window, believed in [
        (0xFFFF_FFF0, 0x10, 0x20, True),  # across the wrap, within the window
        (0xFFFF_FFF0, 0x11, 0x20, False),
        (0x10, 0xFFFF_FFF0, 0x20, True),
        (0x10, 0xFFFF_FFEF, 0x20, False),
        (5000, 5000, 0, True),  # a window of 0: only the exact sequence number
        (5000, 5001, 0, False),
        (5000, None, WINDOW, False),  # a segment whose sequence number cannot be read
    ]:
        table.acks[label] = ACK_KNOWN | ack
        assert table.in_window(label, seq, window) is believed, (ack, seq, window)
    table.acks[label] = 0
    assert table.in_window(label, None, WINDOW) and table.in_window(label, 7, 0)


def make_balancer_table() -> LabelSwitchingTable:
    return Balancer(make_config()).switching


@pytest.mark.parametrize("value", [-1, 1 << 31, "wide"], ids=["negative", "beyond-half-the-space", "not-a-number"])
def test_the_rst_window_is_validated_at_load(value: object) -> None:
    top = Section("lb.toml", "", {"limits": {"rst_window": value}})
    with pytest.raises(ConfigError, match=r"lb.toml: limits.rst_window: "):
        balancer_config_from_section(top, default_ports=make_config().ports, default_vips=make_config().vips)
    with pytest.raises(ValueError, match="rst_window"):
        make_config(rst_window=-1)


def test_the_rst_window_is_read_and_applies_on_reload() -> None:
    top = Section("lb.toml", "", {"limits": {"rst_window": 0}})
    config = balancer_config_from_section(top, default_ports=make_config().ports, default_vips=make_config().vips)
    assert config.rst_window == 0
    net = Net(make_config(timeouts=TIMEOUTS))
    b = net.balancer
    _, c2s = idle_session(net, 1000)
    assert b.reconfigure(replace(b.config, rst_window=0)) == ("limits.rst_window:65535->0",)
    near = labelled(PORT_MAC[0], client_mac(0), c2s, tcp(client_addr(0), VIP, 40000, 80, RST, seq=1001))
    b.receive(0, near, net.now)  # one off: not the exact sequence number the server expects
    session = b.sessions.by_c2s(c2s)
    assert session is not None and session.state is SessionState.ESTABLISHED
    exact = labelled(PORT_MAC[0], client_mac(0), c2s, tcp(client_addr(0), VIP, 40000, 80, RST, seq=1000))
    b.receive(0, exact, net.now)
    assert session.state is SessionState.ENDING


# -- 2: half-open sessions --------------------------------------------------------------------------------------
def test_a_tcp_session_is_established_only_when_the_client_completes_the_handshake() -> None:
    net = Net(make_config(timeouts=TIMEOUTS))
    b = net.balancer
    src = client_addr(0)
    out = net.from_client(0, tcp(src, VIP, 40000, 80, SYN, seq=100))
    ((name, _),) = net.deliver_to_servers(out)
    c2s = label_of(out[0][1])
    assert c2s is not None
    session = b.sessions.by_c2s(c2s)
    assert session is not None and b.sessions.half_open == 1
    net.deliver_to_client(0, net.from_server(name, tcp(VIP, src, 80, 40000, SYN | ACK, seq=500, ack=101)))
    assert session.state is SessionState.ANSWERED and b.sessions.half_open == 1
    assert b.switching.watch[c2s] & 2  # the client's side is watched until its ACK is seen
    net.deliver_to_servers(net.from_client(0, tcp(src, VIP, 40000, 80, ACK, seq=101, ack=501)))
    assert session.state is SessionState.ESTABLISHED and b.sessions.half_open == 0
    assert b.switching.watch[c2s] & 2  # the request is still to be timed
    net.now = 1.0
    exchange(net, name)
    assert b.switching.watch[c2s] == 1  # FIN/RST only from now on


def test_a_half_open_session_lives_tcp_start_from_its_syn_whatever_it_sends_and_is_no_server_failure() -> None:
    net = Net(make_config(timeouts=TIMEOUTS, fail_threshold=1))
    b = net.balancer
    src = client_addr(0)
    out = net.from_client(0, tcp(src, VIP, 40000, 80, SYN, seq=100))
    ((name, _),) = net.deliver_to_servers(out)
    c2s = label_of(out[0][1])
    net.deliver_to_client(0, net.from_server(name, tcp(VIP, src, 80, 40000, SYN | ACK, seq=500, ack=101)))
    for t in (1.0, 2.0, 3.0, 4.0):  # the server's retransmissions, a client that never ACKs
        net.now = t
        net.deliver_to_client(0, net.from_server(name, tcp(VIP, src, 80, 40000, SYN | ACK, seq=500, ack=101)))
        net.deliver_to_servers(net.from_client(0, tcp(src, VIP, 40000, 80, RST, seq=101)))  # ignored: half-open
    b.on_timer(5.0)
    assert b.sessions.by_c2s(c2s) is None and b.stats().sessions_ended == {"half_open_timeout": 1}  # type: ignore
    assert b.pool.get(name).status is ServerStatus.UP and b.pool.get(name).failures == 0


def test_half_open_sessions_are_bounded_and_the_oldest_is_evicted_first() -> None:
    config = make_config(n_servers=1, timeouts=TIMEOUTS, c2s_min=17, c2s_max=17 + 2 * 99, half_open_share=0.1)
    b = Balancer(config)
    assert b.max_half_open == 10
    live = Net(config)
    live.balancer = b
    name, c2s = established(live, sport=1000)  # an established session is never evicted
    first_labels = []
    for i in range(40):
        flood = ether(PORT_MAC[0], ATTACKER, tcp(bytes([10, 9, i // 250, i % 250 + 1]), VIP, 2000 + i, 80, SYN))
        out = b.receive(0, flood, 0.001 * i)
        assert len(out) == 1 and b.sessions.half_open <= 10
        first_labels.append(label_of(out[0][1]))
    assert b.sessions.half_open == 10 and b.stats().sessions_ended == {"half_open_evicted": 30}
    # The survivors are the last ten SYNs; the first thirty went, oldest first.
    assert {s.c2s for s in b.live_sessions() if s.state is SessionState.START} == set(first_labels[30:])
    session = b.sessions.by_c2s(c2s)
    assert session is not None and session.state is SessionState.ESTABLISHED
    server = b.pool.get(name)
    assert server.failures == 0 and server.status is ServerStatus.UP  # evictions are nobody's failure


def test_a_refused_syn_evicts_no_half_open_session() -> None:
    config = make_config(n_servers=1, timeouts=TIMEOUTS, c2s_min=17, c2s_max=17 + 2 * 19, half_open_share=0.1)
    b = Balancer(replace(config, max_new_per_second=1.0))
    assert b.max_half_open == 2
    for i, t in enumerate((0.0, 1.0)):
        b.receive(0, spoofed_syn(i), t)
    assert b.sessions.half_open == 2
    assert b.receive(0, spoofed_syn(2), 1.1) != []  # refused (RST): the rate's token is not there yet
    assert b.admission.refused[Refusal.RATE_LIMIT] == 1
    assert b.sessions.half_open == 2 and b.stats().sessions_ended == {}
    b.receive(0, spoofed_syn(3), 2.1)  # admitted: now the oldest makes room
    assert b.sessions.half_open == 2 and b.stats().sessions_ended == {"half_open_evicted": 1}


def test_the_half_open_share_is_validated_at_load() -> None:
    top = Section("lb.toml", "", {"limits": {"half_open_share": 0.0}})
    with pytest.raises(ConfigError, match=r"lb.toml: limits.half_open_share: must be in \(0, 1\]"):
        balancer_config_from_section(top, default_ports=make_config().ports, default_vips=make_config().vips)
    with pytest.raises(ValueError, match="half_open_share"):
        make_config(half_open_share=1.5)


def spoofed_syn(i: int, port: int = 0) -> bytes:
    """A SYN from a made-up source address: nobody will ever answer it."""
    src = bytes([10, 200 + (i >> 16) % 50, (i >> 8) & 0xFF, i & 0xFF])
    return ether(PORT_MAC[port], ATTACKER, tcp(src, VIP, 1024 + i % 60000, 80, SYN))


def test_unanswered_spoofed_syns_among_answered_sessions_do_not_take_the_server_down() -> None:
    """10,000 SYNs the server never sees answered (lost to a flood or an overloaded path) while it answers a new
    session every 2 s: it is alive, and stays UP."""
    net = Net(make_config(n_servers=1, timeouts=TIMEOUTS, fail_threshold=3))
    b = net.balancer
    server = b.pool.get("s1")
    sent = 0
    for step in range(100):  # 20 s in steps of 0.2 s
        net.now = 0.2 * step
        for _ in range(100):
            b.receive(0, spoofed_syn(sent), net.now)
            sent += 1
        if step % 10 == 0:
            net.client(0).flows.clear()
            established(net, sport=30000 + step)
        b.on_timer(net.now)
    assert sent == 10_000
    b.on_timer(net.now + TIMEOUTS.tcp_start)
    assert server.status is ServerStatus.UP and server.failures >= 1000  # the unanswered SYNs were counted


def test_a_server_that_answers_nothing_still_goes_down() -> None:
    net = Net(make_config(n_servers=1, timeouts=TIMEOUTS, fail_threshold=3))
    b = net.balancer
    for i in range(3):
        b.receive(0, spoofed_syn(i), 0.0)
    b.on_timer(TIMEOUTS.tcp_start)
    server = b.pool.get("s1")
    assert server.status is ServerStatus.DOWN and str(server.down_reason) == "no_reply"


def test_a_server_that_stopped_answering_goes_down_once_the_passive_window_passes() -> None:
    net = Net(make_config(n_servers=1, timeouts=TIMEOUTS, fail_threshold=3, passive_window=10.0))
    b = net.balancer
    established(net)  # answered at 0 s
    server = b.pool.get("s1")
    for i in range(3):
        b.receive(0, spoofed_syn(i), 1.0)
    b.on_timer(6.0)
    assert server.status is ServerStatus.UP  # answered 6 s ago: not judged yet
    b.receive(0, spoofed_syn(3), 6.0)
    b.on_timer(11.0)
    assert server.status is ServerStatus.DOWN


def test_with_active_checks_unanswered_syns_only_make_the_server_suspect() -> None:
    net = Net(make_config(n_servers=1, timeouts=TIMEOUTS, fail_threshold=3))
    b = net.balancer
    b.confirm_passive = True  # as the daemon sets it when [health_check] is configured
    for i in range(5):
        b.receive(0, spoofed_syn(i), 0.0)
    b.on_timer(TIMEOUTS.tcp_start)
    server = b.pool.get("s1")
    assert server.status is ServerStatus.UP and server.suspected == 3


# -- 3: the label quarantine outlasts the endpoints' memory of a label ---------------------------------------------
def test_a_quarantine_shorter_than_the_endpoints_flow_timeout_is_rejected_at_load() -> None:
    base = make_config()
    top = Section("lb.toml", "", {"labels": {"quarantine": 10.0, "endpoint_flow_timeout": 30.0}})
    with pytest.raises(ConfigError) as info:
        balancer_config_from_section(top, default_ports=base.ports, default_vips=base.vips)
    assert (info.value.source, info.value.key) == ("lb.toml", "labels.quarantine")
    assert "shorter than the endpoints' flow timeout 30" in info.value.reason
    ok = Section("lb.toml", "", {"labels": {"quarantine": 30.0, "endpoint_flow_timeout": 30.0}})
    assert balancer_config_from_section(ok, default_ports=base.ports, default_vips=base.vips).label_quarantine == 30
    with pytest.raises(ValueError, match="shorter than the endpoints' flow timeout"):
        replace(base, label_quarantine=1.0)


def test_the_default_quarantine_covers_the_agents_default_flow_timeout() -> None:
    assert BalancerConfig.label_quarantine >= BalancerConfig.endpoint_flow_timeout == ENDPOINT_FLOW_TIMEOUT
    assert AgentConfig.flow_timeout == ENDPOINT_FLOW_TIMEOUT
    assert ServerEndpoint(mac=mac(0x5E, 1), vips=[VIP]).flow_timeout == ENDPOINT_FLOW_TIMEOUT
    assert ClientEndpoint(mac=client_mac(0), gateway_mac=PORT_MAC[0]).flow_timeout == ENDPOINT_FLOW_TIMEOUT


def test_a_server_that_keeps_sending_on_a_withdrawn_label_does_not_reach_the_labels_next_session() -> None:
    """The server endpoint refreshes its flow with every frame it sends, so a server that goes on sending on a flow
    whose session ended keeps its label past the quarantine; when the label comes back for client 1's session,
    the stale frame (to client 0's address) must not be switched to client 1."""
    config = make_config(n_servers=1, c2s_min=17, c2s_max=19, label_quarantine=3.0, endpoint_flow_timeout=3.0,
                         timeouts=Timeouts(closed_linger=1.0))  # fmt: skip
    net = Net(config)
    net.servers["s1"] = ServerEndpoint(mac=config.servers[0].mac, vips=[VIP], flow_timeout=3.0)
    b = net.balancer
    _, old = established(net)
    src = client_addr(0)
    net.deliver_to_servers(net.from_client(0, tcp(src, VIP, 40000, 80, RST | ACK, seq=101, ack=501)))
    b.on_timer(1.0)
    assert b.sessions.by_c2s(old) is None  # closed; its labels in quarantine until 4 s
    net.now = 1.0
    handshake(net, 1, sport=40001)  # the other pair
    stale = tcp(VIP, src, 80, 40000, PSH | ACK, seq=501, ack=102, payload=b"late")
    for t in (2.5, 3.9):
        net.now = t
        assert net.from_server("s1", stale) == []  # label_unknown, but the endpoint's flow is refreshed
    b.on_timer(4.0)
    net.now = 4.1
    _, reused = handshake(net, 1, sport=40002)
    assert reused == old
    net.now = 4.5
    assert net.from_server("s1", stale) == []  # not switched to client 1


def test_a_pair_reused_before_its_quarantine_is_over_takes_none_of_its_old_sessions_late_frames() -> None:
    """No pair free: the one quarantined longest goes to the next session once it has waited the quarantine's
    minimum, though both endpoints still hold it for the old flow (their flow timeout, the full quarantine, is far
    off). The old flow's late frames, both ways, reach nobody (the labels' flow binding); the new session's pass."""
    config = make_config(n_servers=1, c2s_min=17, c2s_max=17, label_quarantine=60.0, endpoint_flow_timeout=60.0,
                         label_quarantine_min=2.0, timeouts=Timeouts(closed_linger=1.0))  # fmt: skip
    net = Net(config)
    b = net.balancer
    _, old = established(net)
    src, other = client_addr(0), client_addr(1)
    net.deliver_to_servers(net.from_client(0, tcp(src, VIP, 40000, 80, RST | ACK, seq=101, ack=501)))
    b.on_timer(1.0)
    assert b.sessions.by_c2s(old) is None and b.labels.is_quarantined(old)  # withdrawn at 1 s
    net.now = 2.5
    net.from_client(1, tcp(other, VIP, 40001, 80, SYN, seq=100))  # 1.5 s into the quarantine: refused
    assert b.stats().refused == {"labels_exhausted": 1} and b.labels.reused_early == 0
    net.now = 3.0
    _, reused = handshake(net, 1, sport=40001)
    assert reused == old and b.labels.reused_early == 1
    late_c2s = tcp(src, VIP, 40000, 80, PSH | ACK, seq=101, ack=501, payload=b"late")
    assert net.from_client(0, late_c2s) == []  # client 0's endpoint still sends the old flow on the pair's C2S label
    late_s2c = tcp(VIP, src, 80, 40000, PSH | ACK, seq=501, ack=101, payload=b"late")
    assert net.from_server("s1", late_s2c) == []  # and the server's on its S2C label
    assert b.stats().drops.get("label_wrong_flow", 0) + b.stats().drops.get("label_wrong_ingress", 0) == 2
    reply = net.from_server("s1", tcp(VIP, other, 80, 40001, PSH | ACK, seq=501, ack=101, payload=b"ok"))
    assert len(net.deliver_to_client(1, reply)) == 1


def test_the_quarantines_minimum_is_checked_at_load_and_taken_live() -> None:
    base = make_config()
    top = Section("lb.toml", "", {"labels": {"quarantine": 60.0, "quarantine_min": 61.0}})
    with pytest.raises(ConfigError) as info:
        balancer_config_from_section(top, default_ports=base.ports, default_vips=base.vips)
    assert (info.value.source, info.value.key) == ("lb.toml", "labels.quarantine_min")
    assert "must not exceed quarantine (60 s)" in info.value.reason
    loaded = balancer_config_from_section(
        Section("lb.toml", "", {"labels": {"quarantine": 60.0}}), default_ports=base.ports, default_vips=base.vips
    )
    assert loaded.label_quarantine_min == QUARANTINE_MIN
    b = Balancer(base)
    assert b.labels.quarantine_min == QUARANTINE_MIN
    assert "labels.quarantine_min:5.0->1.0" in b.reconfigure(replace(base, label_quarantine_min=1.0))
    assert b.labels.quarantine_min == 1.0


# -- 5: no frame of one session ever reaches another's endpoint ---------------------------------------------------
QUARANTINE = 3.0  # = the endpoints' flow timeout: the shortest the configuration accepts
TRUST_CONFIG = make_config(
    n_servers=2,
    c2s_min=17,
    c2s_max=17 + 2 * 3,  # 4 label pairs: labels come back as soon as their quarantine is over
    label_quarantine=QUARANTINE,
    endpoint_flow_timeout=QUARANTINE,
    half_open_share=0.5,
    timeouts=Timeouts(tcp_start=2.0, tcp_established=30.0, tcp_closing=10.0, udp=5.0, closed_linger=1.0),
    fail_threshold=1000,  # server health is not what this machine is about
)
CLIENT_COUNT = 3
CLIENTS = st.integers(0, CLIENT_COUNT - 1)
SPORTS = (40000, 40001, 40002)
SERVER_FLAGS = (SYN | ACK, PSH | ACK, FIN | ACK, RST | ACK)
CLIENT_FLAGS = (SYN, ACK, PSH | ACK, FIN | ACK, RST)
#: Acknowledgment numbers the endpoints send, and sequence numbers forgers pick: near the other end's and far.
ACKS = (101, 501, 0x8000_0101)
FORGED_SEQS = (101, 500, 0x8000_0100, 0xFFFF_0000)
#: A session the machine opens first: (client, source port, the acknowledgment number of its server's answer).
OPENED = st.tuples(CLIENTS, st.sampled_from(SPORTS), st.sampled_from(ACKS))
_ANALYZER = PacketAnalyzer(l7=False)


@dataclass
class Sent:
    port: int
    frame: bytes
    at: float
    flow: FlowKey  # the flow of the session it belongs to, as the client sends it


def session_flow(frame: bytes) -> FlowKey:
    """The flow a frame of the machine's (labelled or not) belongs to, as the client sends it."""
    mpls = frame[ETH_TYPE : ETH_TYPE + 2] == ETH_P_MPLS_UC.to_bytes(2, "big")
    key = _ANALYZER.analyze_ip(frame, LSE_AT + (ENTRY.size if mpls else 0)).key
    return key if key.dport == 80 else key.reversed()


@dataclass
class World:
    """The endpoints around the balancers (real endpoint agents' logic), and the flows their hosts know."""

    now: float = 1.0
    clients: dict[int, ClientEndpoint] = field(default_factory=dict)
    servers: dict[str, object] = field(default_factory=dict)
    client_flows: list[tuple[int, FlowKey]] = field(default_factory=list)  # (client, its flow to the VIP)
    server_flows: list[tuple[str, FlowKey]] = field(default_factory=list)  # (server, the flow as the client sent it)
    history: list[Sent] = field(default_factory=list)


class TrustMachine(RuleBasedStateMachine):
    """Sessions open, talk, close, reset (really and forged), time out and come back on reused labels, with late
    frames replayed, recent and stale; three balancers take the same frames (one by one, as a batch, as a block) and
    must agree, and every frame a balancer forwards must carry the flow of the session its label names."""

    config = TRUST_CONFIG

    @initialize(opened=st.lists(OPENED, min_size=1, max_size=3))
    def setup(self, opened: list[tuple[int, int, int]]) -> None:
        """The balancers, the endpoints and the first sessions (whatever rules an example leaves out)."""
        self.make_balancers()
        self.world = World()
        for i in range(CLIENT_COUNT):
            port = CLIENT_PORTS[i % 2]
            self.world.clients[i] = ClientEndpoint(
                mac=client_mac(i), gateway_mac=PORT_MAC[port], flow_timeout=QUARANTINE, fallback=2.0
            )
        for s in TRUST_CONFIG.servers:
            self.world.servers[s.name] = ServerEndpoint(mac=s.mac, vips=[VIP], flow_timeout=QUARANTINE)
        self.server_of_mac = {s.mac: s for s in TRUST_CONFIG.servers}
        for i, sport, ack in opened:
            self.establish(i, sport, ack)

    def make_balancers(self) -> None:
        self.one, self.batch, self.block = (Balancer(self.config) for _ in range(3))

    # -- sending ---------------------------------------------------------------------------------------------------
    def sessions(self, b: Balancer) -> dict[int, tuple[FlowKey, int, bytes]]:
        return {s.c2s: (s.key, s.client_port, s.client_mac) for s in b.live_sessions()}

    def send(self, frames: list[tuple[int, bytes]]) -> None:
        if not frames:
            return
        now = self.world.now
        before = self.sessions(self.one)
        expected = self.through_the_paths(frames, now)
        after = self.sessions(self.one)
        for port, frame in expected:
            self.check_delivery(port, frame, before, after)
        self.world.history += [Sent(port, frame, now, session_flow(frame)) for port, frame in frames]
        self.deliver(expected)

    def through_the_paths(self, frames: list[tuple[int, bytes]], now: float) -> Frames:
        """``frames`` through every path; what they forward, which must be what the one-frame path forwards."""
        expected: Frames = []
        for port, frame in frames:
            expected += self.one.receive(port, frame, now)
        assert self.batch.receive_batch(frames, now) == expected
        buf, starts, lengths, ports = pack(frames)
        assert listed(self.block.receive_block(buf, starts, lengths, ports, now), buf, starts, lengths) == expected
        return expected

    def check_delivery(self, port: int, frame: bytes, before: dict, after: dict) -> None:  # type: ignore[type-arg]
        label = label_of(frame)
        if label is None:
            return  # a refusal to a client, from the virtual IP
        a = _ANALYZER.analyze_ip(frame, 14 + ENTRY.size)
        c2s = label if label & 1 else label - 1
        owner = after.get(c2s) or before.get(c2s)
        assert owner is not None, f"label {label} forwarded without a session"
        key, client_port, client_mac_ = owner
        if label & 1:
            assert a.key == key, f"C2S label {label} carried {a.key} into the session of {key}"
        elif a.key != key.reversed() or (port, frame[:6]) != (client_port, client_mac_):
            raise S2CCrossDelivery(f"S2C label {label} carried {a.key} to the client of {key}")

    def deliver(self, frames: Frames) -> None:
        now = self.world.now
        for port, frame in frames:
            server = self.server_of_mac.get(frame[:6])
            if server is not None:
                assert port == server.port_id
                packet = self.world.servers[server.name].from_wire(frame, now)  # type: ignore[attr-defined]
                if packet is not None:
                    key = _ANALYZER.analyze_ip(packet, 0).key
                    if (server.name, key) not in self.world.server_flows:
                        self.world.server_flows.append((server.name, key))
                continue
            for client in self.world.clients.values():
                if frame[:6] == client.mac:
                    client.from_wire(frame, now)

    # -- rules -----------------------------------------------------------------------------------------------------
    @rule(i=CLIENTS, sport=st.sampled_from(SPORTS))
    def connect(self, i: int, sport: int) -> None:
        key = FlowKey(6, client_addr(i), sport, VIP, 80)
        if (i, key) not in self.world.client_flows:
            self.world.client_flows.append((i, key))
        self.client_sends(i, key, SYN)

    @rule(i=CLIENTS, sport=st.sampled_from(SPORTS), ack=st.sampled_from(ACKS))
    def establish(self, i: int, sport: int, ack: int) -> None:
        """A whole handshake, the client's request and the server's first answer acknowledging ``ack``: an open
        session to judge RSTs and FINs on, its response time measured (with the offload, its FINs are the
        kernel's to take)."""
        self.connect(i, sport)
        key = FlowKey(6, client_addr(i), sport, VIP, 80)
        k = next((k for k, (_, flow) in enumerate(self.world.server_flows) if flow == key), None)
        if k is None:
            return  # refused, or its labels still in quarantine
        for flags in (SYN | ACK, PSH | ACK):
            sent = self.server_frame(k, flags, ack if flags & PSH else 101)
            if sent is not None:
                self.send([sent])
            if flags & SYN:
                self.client_sends(i, key, ACK, 501)
                self.client_sends(i, key, PSH | ACK, 501)  # the request, which the server's answer times

    def client_sends(self, i: int, key: FlowKey, flags: int, ack: int = 500) -> None:
        payload = b"GET / HTTP/1.1\r\n\r\n" if flags & PSH else b""
        packet = tcp(key.src, key.dst, key.sport, key.dport, flags, seq=100, ack=ack, payload=payload)
        frame = self.world.clients[i].from_host(packet, self.world.now)
        assert frame is not None
        self.send([(CLIENT_PORTS[i % 2], frame)])

    @precondition(lambda self: self.world.client_flows)
    @rule(k=st.integers(0, 50), flags=st.sampled_from(CLIENT_FLAGS), ack=st.sampled_from(ACKS))
    def client_segment(self, k: int, flags: int, ack: int) -> None:
        i, key = self.world.client_flows[k % len(self.world.client_flows)]
        self.client_sends(i, key, flags, ack)

    def server_frame(self, k: int, flags: int, ack: int = 101) -> tuple[int, bytes] | None:
        name, key = self.world.server_flows[k % len(self.world.server_flows)]
        payload = b"HTTP/1.1 200 OK\r\n" if flags & PSH else b""
        packet = tcp(VIP, key.src, 80, key.sport, flags, seq=500, ack=ack, payload=payload)
        frame = self.world.servers[name].from_host(packet, self.world.now)  # type: ignore[attr-defined]
        port = next(s.port_id for s in TRUST_CONFIG.servers if s.name == name)
        return None if frame is None else (port, frame)

    @precondition(lambda self: self.world.server_flows)
    @rule(k=st.integers(0, 50), flags=st.sampled_from(SERVER_FLAGS), ack=st.sampled_from(ACKS))
    def server_segment(self, k: int, flags: int, ack: int) -> None:
        sent = self.server_frame(k, flags, ack)
        if sent is not None:
            self.send([sent])

    @precondition(lambda self: self.world.client_flows and self.world.server_flows)
    @rule(ks=st.lists(st.tuples(st.booleans(), st.integers(0, 50), st.sampled_from(ACKS)), min_size=2, max_size=8))
    def burst(self, ks: list[tuple[bool, int, int]]) -> None:
        """Data both ways on several flows at once: one batch, one block."""
        frames = []
        for from_client, k, ack in ks:
            if from_client:
                i, key = self.world.client_flows[k % len(self.world.client_flows)]
                packet = tcp(key.src, key.dst, key.sport, 80, PSH | ACK, seq=101, ack=ack, payload=b"more")
                frame = self.world.clients[i].from_host(packet, self.world.now)
                if frame is not None:
                    frames.append((CLIENT_PORTS[i % 2], frame))
            else:
                sent = self.server_frame(k, PSH | ACK, ack)
                if sent is not None:
                    frames.append(sent)
        self.send(frames)

    @precondition(lambda self: self.world.client_flows)
    @rule(
        k=st.integers(0, 50),
        kind=st.sampled_from(["other_mac", "client_mac", "labelled", "syn_other_mac", "labelled_fin"]),
        seq=st.sampled_from(FORGED_SEQS),
    )
    def forge(self, k: int, kind: str, seq: int) -> None:
        """Another host of client 0's segment forges a segment of a flow of any client, at a sequence number near
        the server's acknowledgments or far from them."""
        i, key = self.world.client_flows[k % len(self.world.client_flows)]
        port = CLIENT_PORTS[i % 2]
        flags = SYN if kind == "syn_other_mac" else FIN | ACK if kind == "labelled_fin" else RST
        packet = tcp(key.src, key.dst, key.sport, 80, flags, seq=seq)
        src_mac = client_mac(i) if kind in ("client_mac", "labelled", "labelled_fin") else ATTACKER
        label = self.world.clients[i].label_for(key) if kind in ("labelled", "labelled_fin") else None
        frame = (
            ether(PORT_MAC[port], src_mac, packet)
            if label is None
            else labelled(PORT_MAC[port], src_mac, label, packet)
        )
        self.send([(port, frame)])

    @precondition(lambda self: self.world.history)
    @rule(k=st.integers(0, 200))
    def replay(self, k: int) -> None:
        """A late copy of a frame sent less than the quarantine ago (delayed on the way)."""
        recent = [s for s in self.world.history if self.world.now - s.at < QUARANTINE]
        if recent:
            late = recent[k % len(recent)]
            self.send([(late.port, late.frame)])

    @precondition(lambda self: self.world.history)
    @rule(k=st.integers(0, 200))
    def replay_stale(self, k: int) -> None:
        """A late copy of a frame of a session that has ended, however long ago (its labels may serve another
        session by now)."""
        live = {s.key for s in self.one.live_sessions()}
        stale = [s for s in self.world.history if s.flow not in live]
        if stale:
            late = stale[k % len(stale)]
            self.send([(late.port, late.frame)])

    # Times are multiples of 1/8 s: sums exact, so every path sees the same deadlines come at the same step.
    @rule(dt=st.sampled_from([0.25, 0.625, 1.125, 2.5, 4.0]))
    def advance(self, dt: float) -> None:
        now = self.world.now = self.world.now + dt
        self.timers(now)
        for endpoint in (*self.world.clients.values(), *self.world.servers.values()):
            endpoint.on_timer(now)  # type: ignore[attr-defined]

    def timers(self, now: float) -> None:
        for b in (self.one, self.batch, self.block):
            b.on_timer(now)

    @invariant()
    def the_paths_agree(self) -> None:
        if not hasattr(self, "one"):
            return
        a, b, c = (x.stats() for x in (self.one, self.batch, self.block))
        for other in (b, c):
            assert (a.sessions_active, a.sessions_ended, a.drops, a.labels, a.not_believed) == (
                other.sessions_active,
                other.sessions_ended,
                other.drops,
                other.labels,
                other.not_believed,
            )
        acks = self.one.switching.arrays().acks
        assert all(np.array_equal(acks, x.switching.arrays().acks) for x in (self.batch, self.block))
        states = [[(s.c2s, s.state) for s in x.live_sessions()] for x in (self.one, self.batch, self.block)]
        assert states[0] == states[1] == states[2]
        assert self.one.sessions.half_open <= self.one.max_half_open


TRUST_SETTINGS = settings(
    max_examples=int(os.environ.get("MPLSLB_TRUST_EXAMPLES", "8")),  # a campaign: MPLSLB_TRUST_EXAMPLES=500
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class S2CCrossDelivery(AssertionError):
    """A server's frame reached the client of another session."""


class TrustMachineWithoutL7(TrustMachine):
    config = replace(TRUST_CONFIG, l7=False)


class TrustMachineReusingEarly(TrustMachine):
    """The machine with a pair reused as soon as none is free (a quarantine of no minimum): the endpoints go on
    sending the labels their flows learned, which by then may name other sessions."""

    config = replace(TRUST_CONFIG, label_quarantine_min=0.0)
    reused = 0  # pairs reused early, over every example

    def teardown(self) -> None:
        if hasattr(self, "one"):
            TrustMachineReusingEarly.reused += self.one.labels.reused_early


def test_no_frame_reaches_another_session_on_pairs_reused_early() -> None:
    """A few examples, always the same (``MPLSLB_TRUST_EXAMPLES`` more, at random); pairs are reused early in
    them."""
    TrustMachineReusingEarly.reused = 0
    run_state_machine_as_test(
        TrustMachineReusingEarly,
        settings=settings(
            TRUST_SETTINGS,
            max_examples=int(os.environ.get("MPLSLB_TRUST_EXAMPLES", "4")),
            derandomize="MPLSLB_TRUST_EXAMPLES" not in os.environ,
        ),
    )
    assert TrustMachineReusingEarly.reused >= 1


TestNoFrameReachesAnotherSession = TrustMachine.TestCase
TestNoFrameReachesAnotherSession.settings = TRUST_SETTINGS
TestNoFrameReachesAnotherSessionWithoutL7 = TrustMachineWithoutL7.TestCase
TestNoFrameReachesAnotherSessionWithoutL7.settings = TRUST_SETTINGS


def through_the_kernel(
    core: OffloadedBalancer, lb: str, frames: list[tuple[int, bytes]], now: float, seen: Counter[int] | None = None
) -> Frames:
    """``frames`` as the daemon takes them with the kernel offload, one after the other: each through the XDP
    program first (``BPF_PROG_TEST_RUN`` on the ports in namespace ``lb``); a frame it redirects leaves as the
    program left it, by the port of its label's entry, and one it passes up goes to the balancer (untouched).
    ``seen`` counts the program's verdicts."""
    port_of = {ifindex: port for port, ifindex in core.offload.ifindex.items()}
    out: Frames = []
    for port, frame in frames:
        with entered(lb):
            run = core.offload.run(frame, port)
        if seen is not None:
            seen[run.retval] += 1
        if run.retval == bpf.XDP_REDIRECT:
            label = label_of(frame)
            entry = core.offload.lookup(label) if label is not None else None
            assert entry is not None
            out.append((port_of[entry[0]], run.data))
        else:
            assert run.retval == bpf.XDP_PASS and run.data == frame
            out += core.receive_batch([(port, frame)], now)
    return out


class KernelTrustMachine(TrustMachine):
    """The machine with the daemon's kernel offload (:class:`OffloadedBalancer`, on veth ports in namespace ``lb``):
    every frame goes through the XDP program first, and what it passes up to the balancer; what leaves must be what
    the one-frame path forwards, frame for frame, and the sessions, drops, closes not believed and each label's
    last acknowledgment number (read where the session manager reads it: the kernel's entry while the label is
    there) must be the one-frame path's, once the FINs the kernel took are folded in (as the daemon folds them
    before it decides anything about their sessions). The kernel's times are the machine's: its clock stands still
    between two advances, and the kernel's counters and records are polled at the end of each period (before the
    timers, as the daemon polls), so they land in the period they happened in."""

    def __init__(self, lb: str, config: BalancerConfig, seen: Counter[int]) -> None:
        super().__init__()
        self.lb = lb
        self.config = config
        self.seen = seen
        self.kernel_now = World.now

    def make_balancers(self) -> None:
        self.one = Balancer(self.config)
        with entered(self.lb):
            self.core = OffloadedBalancer(Balancer(self.config), Loop(clock=lambda: self.kernel_now))
        self.polled = True

    def teardown(self) -> None:
        if hasattr(self, "core"):
            self.core.close()
            self.seen[FINS_TAKEN] += self.core.offload.fins
            self.seen[REUSED_EARLY] += self.core.balancer.labels.reused_early

    def through_the_paths(self, frames: list[tuple[int, bytes]], now: float) -> Frames:
        expected: Frames = []
        for sent in frames:
            if self.may_evict(sent[1]):
                self.core.offload.poll()
            want = self.one.receive(*sent, now)
            assert through_the_kernel(self.core, self.lb, [sent], now, self.seen) == want
            expected += want
        self.polled = False
        return expected

    def may_evict(self, frame: bytes) -> bool:
        """Is ``frame`` a new session's SYN with the half-open sessions' share used up? The balancer counts a
        session as half-open until what the kernel recorded of its handshake is folded in (at a poll, or when
        anything is decided about that session): a younger session whose handshake only the kernel saw may make
        the SYN evict the oldest half-open one early, up to a poll interval. The machine polls first."""
        b = self.core.balancer
        if frame[ETH_TYPE : ETH_TYPE + 2] == ETH_P_MPLS_UC.to_bytes(2, "big"):
            return False
        return _ANALYZER.analyze(frame).tcp_flags == SYN and b.sessions.half_open >= b.max_half_open

    def timers(self, now: float) -> None:
        self.core.offload.poll()  # the period that ends, at its time
        self.kernel_now = now
        self.core.on_timer(now)
        self.one.on_timer(now)
        self.polled = True

    @invariant()
    def the_paths_agree(self) -> None:
        if not hasattr(self, "core"):
            return
        self.core.offload.fold_fins()  # each session's measurement record before its FINs
        ours, theirs = self.core.balancer, self.one
        a, b = ours.stats(), theirs.stats()
        assert (a.sessions_active, a.sessions_ended, a.drops, a.labels, a.not_believed) == (
            b.sessions_active,
            b.sessions_ended,
            b.drops,
            b.labels,
            b.not_believed,
        )
        offload, table = self.core.offload, ours.switching
        for label in np.flatnonzero(theirs.switching.arrays().valid).tolist():
            kept = offload.ack(label)
            assert (table.acks[label] if kept is None else kept) == theirs.switching.acks[label], label
        if self.polled:  # what only the kernel saw of a session's handshake and request is folded in by now
            states = [[(s.c2s, s.state) for s in b.live_sessions()] for b in (ours, theirs)]
            assert states[0] == states[1]
            assert a.l7_hosts == b.l7_hosts
        assert ours.sessions.half_open <= ours.max_half_open


#: The key of ``seen`` that counts the FINs the kernel took (and the machine folded in).
FINS_TAKEN = -1
REUSED_EARLY = -2  # pairs reused before their quarantine's end, in the kernel's balancer
#: Examples of the kernel machine: a few, always the same, in ``make test``; a campaign sets more (random ones).
KERNEL_EXAMPLES = int(os.environ.get("MPLSLB_TRUST_KERNEL_EXAMPLES", "0"))


@pytest.fixture(scope="module")
def veths() -> Iterator[str]:
    """The balancer's namespace with the ports p0..p3 (veth pairs), for the kernel path's tests."""
    with veth_namespaces() as (lb, _):
        yield lb


@pytest.fixture
def kernel(veths: str, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> str:
    """The namespace of the ports the offload attaches to; the program is built once, in a directory of the run."""
    monkeypatch.setenv("MPLSLB_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "xdp"))
    return veths


@needs_kernel
@pytest.mark.parametrize(("l7", "quarantine_min"), [(True, QUARANTINE), (False, QUARANTINE), (True, 0.0)],
                         ids=["l7", "no-l7", "l7-reused-early"])  # fmt: skip
def test_no_frame_reaches_another_session_through_the_kernel(kernel: str, l7: bool, quarantine_min: float) -> None:
    """The machine through the kernel offload, with L7 analysis (the first request copied in the kernel, its Host
    counted at the fold) and without; a few examples, always the same (MPLSLB_TRUST_KERNEL_EXAMPLES=200: a campaign
    of random ones)."""
    config = on_veths(replace(TRUST_CONFIG, l7=l7, label_quarantine_min=quarantine_min))
    seen: Counter[int] = Counter()
    run_state_machine_as_test(
        lambda: KernelTrustMachine(kernel, config, seen),
        settings=settings(
            TRUST_SETTINGS, max_examples=KERNEL_EXAMPLES or 5, derandomize=not KERNEL_EXAMPLES, database=None
        ),
    )
    assert seen[bpf.XDP_REDIRECT] >= 10 and seen[bpf.XDP_PASS] >= 10, seen  # both ways, often
    assert seen[FINS_TAKEN] >= 1, seen  # FINs taken in the kernel, and folded in
    assert (seen[REUSED_EARLY] >= 1) == (quarantine_min < QUARANTINE), seen


# -- 5b: a label pair reused at once ------------------------------------------------------------------------------
REUSE_CONFIG = make_config(
    n_servers=1,
    c2s_min=17,
    c2s_max=17,  # one label pair
    label_quarantine=0.0,  # no quarantine: the pair goes to the next session at once
    endpoint_flow_timeout=0.0,
)


class Way:
    """One of the ways frames go through a balancer of ``config``: the three userspace paths, and the kernel's
    (the daemon's offload on veth ports in namespace ``lb``, its clock the one given to :meth:`take`)."""

    def __init__(self, path: str, config: BalancerConfig, lb: str = "") -> None:
        self.path, self.lb, self.now = path, lb, 0.0
        self.core: OffloadedBalancer | None = None
        if path == "kernel":
            with entered(lb):
                self.core = OffloadedBalancer(Balancer(on_veths(config)), Loop(clock=lambda: self.now))
            self.balancer = self.core.balancer
        else:
            self.balancer = Balancer(config)

    def take(self, frames: list[tuple[int, bytes]], now: float) -> Frames:
        self.now = now
        if self.core is None:
            return take(self.balancer, self.path, frames, now)
        return through_the_kernel(self.core, self.lb, frames, now)

    def traffic(self, label: int) -> tuple[int, int]:
        if self.core is not None:
            self.core.offload.poll()
        return self.balancer.switching.traffic(label)


@pytest.fixture(params=[*PATHS, pytest.param("kernel", marks=KERNEL_MARKS)])
def way(request: pytest.FixtureRequest) -> Iterator[Way]:
    path = request.param
    made = Way(path, REUSE_CONFIG, request.getfixturevalue("kernel") if path == "kernel" else "")
    yield made
    if made.core is not None:
        made.core.close()


class TestALabelPairReusedAtOnce:
    """A session's labels withdrawn and given to the next session at once (no quarantine, one label pair): its
    server taken down and up again by the operator, and the next SYN takes the pair before anything else happens
    (before the kernel offload's next sync too). In every path, the kernel's included, nothing of the ended session
    reaches the new one: neither its late frames, nor its acknowledgment numbers, nor its counters."""

    @pytest.mark.parametrize("same_client", [False, True], ids=["other-client", "same-client"])
    def test_nothing_of_the_ended_session_reaches_the_new_one(self, way: Way, same_client: bool) -> None:
        server = REUSE_CONFIG.servers[0]
        old, new = client_addr(0), client_addr(0 if same_client else 1)
        new_port = 0 if same_client else 1

        def from_client(i: int, label: int | None, packet: bytes) -> tuple[int, bytes]:
            port = CLIENT_PORTS[i % 2]
            if label is None:
                return port, ether(PORT_MAC[port], client_mac(i), packet)
            return port, labelled(PORT_MAC[port], client_mac(i), label, packet)

        def from_server(label: int, packet: bytes) -> tuple[int, bytes]:
            return server.port_id, labelled(PORT_MAC[server.port_id], server.mac, label, packet)

        ((_, syn),) = way.take([from_client(0, None, tcp(old, VIP, 40000, 80, SYN, seq=100))], 1.0)
        c2s = label_of(syn)
        assert c2s == 17
        old_answer = from_server(c2s + 1, tcp(VIP, old, 80, 40000, SYN | ACK, seq=500, ack=101))
        old_ack = from_client(0, c2s, tcp(old, VIP, 40000, 80, ACK, seq=101, ack=501))
        assert [port for port, _ in way.take([old_answer, old_ack], 1.0)] == [0, server.port_id]
        b = way.balancer
        assert (b.switching.last_ack(c2s), b.switching.last_ack(c2s + 1)) == (ACK_KNOWN | 501, ACK_KNOWN | 101)
        b.mark_down(server.name, 2.0)  # the operator's commands: the session is interrupted, its labels withdrawn
        b.mark_up(server.name)
        new_syn = from_client(new_port, None, tcp(new, VIP, 40001, 80, SYN, seq=7000))
        ((_, syn),) = way.take([new_syn], 2.0)
        assert label_of(syn) == c2s and b.stats().sessions_ended == {"server_down": 1}
        assert b.switching.last_ack(c2s) == b.switching.last_ack(c2s + 1) == 0  # nothing to judge by yet
        assert way.traffic(c2s) == (1, len(new_syn[1])) and way.traffic(c2s + 1) == (0, 0)
        # The ended session's late frames, both ways, reach nobody; the new session's answer reaches its client.
        assert way.take([old_answer, old_ack], 2.0) == []
        wrong = {"label_wrong_flow": 2} if same_client else {"label_wrong_flow": 1, "label_wrong_ingress": 1}
        assert b.stats().drops == wrong
        answer = from_server(c2s + 1, tcp(VIP, new, 80, 40001, SYN | ACK, seq=900, ack=7001))
        ((port, frame),) = way.take([answer], 2.0)
        assert port == new_port and frame[:6] == client_mac(new_port)
        assert b.switching.last_ack(c2s + 1) == ACK_KNOWN | 7001
        assert way.traffic(c2s + 1) == (1, len(answer[1]))
        # The new session's client completes the handshake; an RST at the number its server expects is believed.
        done = from_client(new_port, c2s, tcp(new, VIP, 40001, 80, ACK, seq=7001, ack=901))
        assert len(way.take([done], 2.0)) == 1
        rst = from_client(new_port, c2s, tcp(new, VIP, 40001, 80, RST, seq=7001))
        assert len(way.take([rst], 2.0)) == 1
        session = b.sessions.by_c2s(c2s)
        assert session is not None and session.state is SessionState.ENDING and b.sessions.not_believed == {}


# -- 4: the clients of a server that went down are reset -----------------------------------------------------------
@pytest.mark.parametrize("reset", [True, False], ids=["reset_on_down", "silent"])
def test_a_client_of_a_server_gone_down_gets_an_exact_rst_once_its_endpoint_falls_back(reset: bool) -> None:
    """The session is interrupted and its labels withdrawn; the client's endpoint, hearing nothing, sends unlabelled
    after its fallback; that segment belongs to no session, and the balancer answers it as a host answers a
    segment of no connection: an RST whose seq is the segment's ACK (the client's RCV.NXT, accepted exactly)."""
    net = Net(make_config(timeouts=TIMEOUTS, reset_on_down=reset))
    b = net.balancer
    plain = net.client(0)
    net.clients[0] = ClientEndpoint(mac=plain.mac, gateway_mac=plain.gateway_mac, fallback=2.0)
    name, _ = established(net)
    b.mark_down(name, net.now)
    src = client_addr(0)
    assert net.from_client(0, tcp(src, VIP, 40000, 80, PSH | ACK, seq=101, ack=501, payload=b"GET /")) == []
    net.now = 2.5  # the endpoint falls back: unlabelled
    out = net.from_client(0, tcp(src, VIP, 40000, 80, PSH | ACK, seq=101, ack=501, payload=b"GET /"))
    assert b.stats().drops["tcp_no_session"] == 1
    if not reset:
        assert out == [] and b.resets_sent == 0
        return
    ((port, frame),) = out
    assert port == 0 and frame[:6] == client_mac(0) and b.resets_sent == 1
    seg = _ANALYZER.analyze(frame)
    assert seg.key == FlowKey(6, VIP, 80, src, 40000) and seg.tcp_flags == RST and seg.tcp_seq == 501
    # An RST of no session is never answered.
    assert net.from_client(0, tcp(src, VIP, 40000, 80, RST, seq=101)) == [] and b.resets_sent == 1


def test_reset_on_down_is_read_from_the_health_table() -> None:
    base = make_config()
    top = Section("lb.toml", "", {"health": {"reset_on_down": True}})
    assert balancer_config_from_section(top, default_ports=base.ports, default_vips=base.vips).reset_on_down
    bad = Section("lb.toml", "", {"health": {"reset_on_down": "yes"}})
    with pytest.raises(ConfigError, match=r"lb\.toml: health\.reset_on_down: expected bool"):
        balancer_config_from_section(bad, default_ports=base.ports, default_vips=base.vips)
