"""Service acceptance control end to end: with a limit reached, new sessions are refused with the configured
answer, and every session already accepted still completes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from helpers import VIP, VIP6, Net, client_addr, make_config, tcp, udp
from mplslb.balancing.admission import RefuseWith
from mplslb.sessions import Timeouts
from mplslb.sim.scenario import ServerSpec, SimConfig, Workload, run
from mplslb.wire.icmp import parse_icmp
from mplslb.wire.ip import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP
from mplslb.wire.ipv4 import parse_ipv4
from mplslb.wire.ipv6 import parse_ipv6
from mplslb.wire.tcp import TCPFlag, parse_tcp

SYN, ACK = int(TCPFlag.SYN), int(TCPFlag.ACK)


def loaded_run(**balancer: object) -> dict[str, int]:
    config = SimConfig(
        seed=11,
        balancer=replace(make_config(), **balancer),  # type: ignore[arg-type]
        servers=(ServerSpec("a", workers=2, service_time=0.02), ServerSpec("b", workers=2, service_time=0.02)),
        workload=Workload(clients=30, sessions=500, rate=400.0, session_timeout=5.0),
    )
    report = run(config)
    outcomes = report.outcomes()
    assert sum(outcomes.values()) == 500
    assert outcomes.get("failed", 0) == 0, "an accepted session did not complete"
    assert outcomes.get("unfinished", 0) == 0
    return {**outcomes, **{f"refused:{k}": v for k, v in report.stats.refused.items()}}


@pytest.mark.parametrize("answer", [RefuseWith.RST, RefuseWith.ICMP])
def test_global_limit_refuses_with_the_configured_answer_and_accepted_sessions_complete(answer: RefuseWith) -> None:
    got = loaded_run(max_sessions=6, refuse_with=answer)
    assert got["refused"] > 0 and got["refused:global_session_limit"] == got["refused"]
    assert got["completed"] + got["refused"] == 500


def test_refuse_with_drop_sends_nothing_and_clients_time_out() -> None:
    net = Net(make_config(max_sessions=1, refuse_with=RefuseWith.DROP))
    net.from_client(0, tcp(client_addr(0), VIP, 1000, 80, SYN))
    assert net.from_client(1, tcp(client_addr(1), VIP, 1001, 80, SYN)) == []
    assert net.balancer.stats().refused == {"global_session_limit": 1}


def test_per_server_limit_refuses_only_when_every_server_is_full() -> None:
    config = make_config(n_servers=2)
    config = replace(config, servers=tuple(replace(s, max_sessions=2) for s in config.servers))
    net = Net(config)
    for i in range(4):
        out = net.from_client(0, tcp(client_addr(0), VIP, 2000 + i, 80, SYN))
        assert out and out[0][0] in (2, 3)
    refused = net.from_client(0, tcp(client_addr(0), VIP, 2100, 80, SYN, seq=41))
    assert net.balancer.stats().refused == {"server_session_limit": 1}
    seg = parse_tcp(refused[0][1], 14 + 20)
    assert seg.flags & TCPFlag.RST and seg.ack == 42


@pytest.mark.parametrize("v6", [False, True])
def test_icmp_refusal_quotes_the_refused_packet(v6: bool) -> None:
    net = Net(make_config(max_sessions=0, refuse_with=RefuseWith.ICMP, c2s_min=17, c2s_max=19))
    vip, src = (VIP6, client_addr(0, True)) if v6 else (VIP, client_addr(0))
    for i in range(2):  # two label pairs: 17/18 and 19/20
        assert net.from_client(0, tcp(src, vip, 3000 + i, 80, SYN))[0][0] in (2, 3)
    refused = net.from_client(0, udp(src, vip, 3100, 53, b"q"))  # the label space is exhausted
    assert net.balancer.stats().refused == {"labels_exhausted": 1}
    frame = refused[0][1]
    if v6:
        ip6 = parse_ipv6(frame, 14)
        assert ip6.proto == IPPROTO_ICMPV6 and ip6.src == vip and ip6.dst == src
        icmp = parse_icmp(frame, ip6.payload_offset, ip6.end, v6=True)
    else:
        ip4 = parse_ipv4(frame, 14)
        assert ip4.proto == IPPROTO_ICMP and ip4.src == vip and ip4.dst == src
        icmp = parse_icmp(frame, ip4.payload_offset, ip4.end)
    assert icmp.is_error
    assert net.balancer.labels.stats().free_count == 0


def test_new_session_rate_limit_refuses_bursts_only() -> None:
    net = Net(make_config(max_new_per_second=2.0))
    answers = [net.from_client(0, tcp(client_addr(0), VIP, 4000 + i, 80, SYN)) for i in range(5)]
    to_servers = [a for a in answers if a and a[0][0] in (2, 3)]
    assert len(to_servers) == 2  # burst of max(1, rate) = 2
    net.now = 1.0
    assert net.from_client(0, tcp(client_addr(0), VIP, 4100, 80, SYN))[0][0] in (2, 3)
    assert net.balancer.stats().refused == {"new_session_rate_limit": 3}


def test_refusal_leaves_existing_sessions_untouched() -> None:
    net = Net(make_config(max_sessions=1))
    src = client_addr(0)
    out = net.from_client(0, tcp(src, VIP, 5000, 80, SYN, seq=1))
    ((name, _),) = net.deliver_to_servers(out)
    net.deliver_to_client(0, net.from_server(name, tcp(VIP, src, 80, 5000, SYN | ACK, seq=9, ack=2)))
    for i in range(20):
        net.from_client(1, tcp(client_addr(1), VIP, 6000 + i, 80, SYN))  # all refused
        out = net.from_client(0, tcp(src, VIP, 5000, 80, ACK, seq=2 + i, ack=10))
        assert net.deliver_to_servers(out)[0][0] == name
    assert net.balancer.stats().refused == {"global_session_limit": 20}
    assert net.balancer.fast_path == 21 and IPPROTO_TCP == 6


def test_admission_sees_pairs_whose_quarantine_ended_before_the_timer_ran() -> None:
    net = Net(
        make_config(c2s_min=17, c2s_max=19, label_quarantine=5.0, endpoint_flow_timeout=5.0, timeouts=Timeouts(udp=1.0))
    )
    b = net.balancer
    for i in range(2):
        assert net.from_client(0, udp(client_addr(0), VIP, 7000 + i, 53))[0][0] in (2, 3)
    net.now = 2.0
    b.on_timer(net.now)  # both idle: ended, their pairs quarantined until 7.0
    assert b.labels.stats().quarantined_count == 2
    net.now = 8.0  # the quarantine is over, and no timer has run since
    assert net.from_client(0, udp(client_addr(0), VIP, 7100, 53))[0][0] in (2, 3)
    assert b.stats().refused == {}


def test_label_exhaustion_is_not_charged_to_a_server_and_a_full_server_is() -> None:
    config = make_config(n_servers=1, c2s_min=17, c2s_max=17)
    net = Net(replace(config, servers=tuple(replace(s, max_sessions=5) for s in config.servers)))
    b = net.balancer
    assert net.from_client(0, tcp(client_addr(0), VIP, 2000, 80, SYN))[0][0] in (2, 3)
    net.from_client(0, tcp(client_addr(0), VIP, 2001, 80, SYN))  # no label left
    assert b.stats().refused == {"labels_exhausted": 1} and b.pool.servers[0].refused == 0
    net2 = Net(replace(config, c2s_max=99, servers=tuple(replace(s, max_sessions=1) for s in config.servers)))
    net2.from_client(0, tcp(client_addr(0), VIP, 2000, 80, SYN))
    net2.from_client(0, tcp(client_addr(0), VIP, 2001, 80, SYN))  # the server is at its limit
    assert net2.balancer.stats().refused == {"server_session_limit": 1}
    assert net2.balancer.pool.servers[0].refused == 1
