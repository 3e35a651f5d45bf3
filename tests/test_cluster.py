"""Cluster nodes: label slices, the sync wire format, replicas that carry a session after ECMP moves it."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import (
    ACK,
    FIN,
    PORT_MAC,
    RST,
    SYN,
    VIP,
    Net,
    client_addr,
    client_mac,
    label_of,
    labelled,
    make_config,
    tcp,
)
from mplslb.balancer import Balancer
from mplslb.cluster import (
    HEADER,
    KIND_HELLO,
    KIND_RECORDS,
    WIRE_STATES,
    ClusterSync,
    SessionRecord,
    SyncError,
    decode,
    encode,
    encode_record,
)
from mplslb.config import ClusterConfig, ConfigError, balancer_config_from_section, read_cluster
from mplslb.config import Section as ConfigSection
from mplslb.drivers.cluster import ClusterLink
from mplslb.drivers.loop import Loop
from mplslb.flow import FlowKey
from mplslb.labels import C2S_MAX, C2S_MIN, LabelManager
from mplslb.sessions import SessionState

KEY = b"k" * 32
ADDRESSES = {1: ("10.9.0.1", 6640), 2: ("10.9.0.2", 6640), 3: ("10.9.0.3", 6640)}


def cluster(node: int, nodes: int = 2, *, key: bytes = KEY, **overrides: object) -> ClusterConfig:
    peers = tuple(address for n, address in ADDRESSES.items() if n != node and n <= nodes)
    return ClusterConfig(node=node, nodes=nodes, peers=peers, key=key, **overrides)  # type: ignore[arg-type]


def node(n: int, nodes: int = 2, **overrides: object) -> tuple[Balancer, ClusterSync]:
    balancer = Balancer(make_config(cluster=cluster(n, nodes, **overrides)))
    return balancer, ClusterSync(balancer, balancer.config.cluster, 0.0)  # type: ignore[arg-type]


def exchange(syncs: dict[int, ClusterSync], now: float, *, rounds: int = 20) -> int:
    """Carry every datagram between the nodes until none is left (bounded); returns how many were carried."""
    carried = 0
    for _ in range(rounds):
        moved = 0
        for n, sync in syncs.items():
            for address, datagram in sync.poll(now):
                target = next((m for m, a in ADDRESSES.items() if a == address), None)
                if target in syncs:
                    syncs[target].receive(datagram, ADDRESSES[n], now)
                    moved += 1
        carried += moved
        if not moved:
            break
    return carried


# -- configuration ------------------------------------------------------------------------------------------------
def read(tmp_path: Path, text: str) -> ClusterConfig | None:
    import tomllib

    path = tmp_path / "lb.toml"
    path.write_text(text)
    return read_cluster(ConfigSection(str(path), "cluster", tomllib.loads(text).get("cluster", {})), C2S_MIN, C2S_MAX)


def test_cluster_table_read(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32).hex().encode())
    got = read(tmp_path, f'[cluster]\nnode = 2\nnodes = 3\npeers = ["10.9.0.1:6640", "[fd00::3]:7000"]\n'
                         f'sync_port = 6641\nkey_file = "{key}"\nkeepalive = 0.5\n')  # fmt: skip
    assert got is not None
    assert (got.node, got.nodes, got.sync_port, got.keepalive) == (2, 3, 6641, 0.5)
    assert got.peers == (("10.9.0.1", 6640), ("fd00::3", 7000))
    assert len(got.key) == 64 and "key=" not in repr(got)
    assert read(tmp_path, "") is None


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("node = 3\nnodes = 2", "cluster.node", "within 1..nodes"),
        ("node = 1\nnodes = 0", "cluster.nodes", "must be within 1..64"),
        ("node = 0\nnodes = 2", "cluster.node", "within 1..nodes"),
        ("nodes = 2", "cluster.node", "is required"),
        ('node = 1\nnodes = 2\npeers = ["10.9.0.2"]', "cluster.peers", "address:port"),
        ('node = 1\nnodes = 2\npeers = ["10.9.0.2:1", "10.9.0.2:1"]', "cluster.peers", "twice"),
        ('node = 1\nnodes = 2\nkey_file = "/nonexistent/key"', "cluster.key_file", "cannot read"),
        ("node = 1\nnodes = 2\nsync_port = 70000", "cluster.sync_port", "65535"),
        ("node = 1\nnodes = 2\nflush = 0", "cluster.flush", ">="),
        ("node = 1\nnodes = 2\ncolour = 1", "cluster.colour", "unknown key"),
    ],
)
def test_cluster_table_refused(tmp_path: Path, text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        read(tmp_path, "[cluster]\n" + text + "\n")
    assert caught.value.key == key and reason in caught.value.reason
    assert caught.value.source == str(tmp_path / "lb.toml")


def test_short_key_refused(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"short")
    with pytest.raises(ConfigError, match="at least 16"):
        read(tmp_path, f'[cluster]\nnode = 1\nnodes = 2\nkey_file = "{key}"\n')


def test_the_whole_file_takes_a_cluster_table(tmp_path: Path) -> None:
    import tomllib

    text = """
[[ports]]
id = 0
mac = "02:b0:00:00:00:00"
role = "client"
[[ports]]
id = 1
mac = "02:b0:00:00:00:01"
role = "server"
[[vip]]
address = "10.0.0.100"
[cluster]
node = 1
nodes = 4
"""
    config = balancer_config_from_section(ConfigSection("lb.toml", "", tomllib.loads(text)))
    assert config.cluster is not None and config.cluster.slice() == (C2S_MIN, C2S_MIN + 2 * (131069 - 1))
    balancer = Balancer(config)
    assert (balancer.labels.c2s_min, balancer.labels.c2s_max) == config.cluster.slice()
    assert balancer.sessions.rows == (C2S_MAX - C2S_MIN) // 2 + 1  # the table spans every slice


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nodes=st.integers(1, 64), c2s_min=st.integers(8, 1000), span=st.integers(0, 5000), data=st.data())
def test_slices_partition_the_label_range(nodes: int, c2s_min: int, span: int, data: st.DataObject) -> None:
    c2s_min = 2 * c2s_min + 1
    c2s_max = c2s_min + 2 * (span + nodes)
    config = ClusterConfig(node=1, nodes=nodes, c2s_min=c2s_min, c2s_max=c2s_max)
    slices = [config.slice(n) for n in range(1, nodes + 1)]
    for n, (first, last) in enumerate(slices, 1):
        assert c2s_min <= first <= last <= c2s_max and first % 2 == 1
        assert config.owner_of(first) == config.owner_of(last + 1) == n
        if n > 1:
            assert first == slices[n - 2][1] + 2  # next to each other, never overlapping
    label = data.draw(st.integers(c2s_min, slices[-1][1] + 1))
    owner = config.owner_of(label)
    first, last = slices[owner - 1]
    assert first <= label <= last + 1


# -- label claims -------------------------------------------------------------------------------------------------
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 63), max_size=40), st.integers(0, 20))
def test_claimed_pairs_are_never_allocated(claims: list[int], allocated_first: int) -> None:
    labels = LabelManager(quarantine=0.0, c2s_min=C2S_MIN, c2s_max=C2S_MIN + 2 * 63)
    before = [labels.allocate(0.0) for _ in range(allocated_first)]
    wanted = [C2S_MIN + 2 * i for i in claims]
    taken = labels.claim(wanted)
    assert set(taken) == set(wanted) - set(before)
    assert labels.in_use_count == len(set(before) | set(taken))
    rest = []
    while (label := labels.allocate(0.0)) is not None:
        rest.append(label)
    assert not set(rest) & (set(taken) | set(before))
    assert len(rest) + labels.in_use_count - len(rest) == 64
    for label in taken:  # a claimed pair ends as an allocated one does
        labels.withdraw(label, 0.0)
    labels.on_timer(1.0)
    assert sorted(labels.allocate(1.0) for _ in taken) == sorted(taken)


# -- the wire format ----------------------------------------------------------------------------------------------
addresses = st.one_of(
    st.binary(min_size=4, max_size=4).map(lambda a: (a, 4)), st.binary(min_size=16, max_size=16).map(lambda a: (a, 16))
)


@st.composite
def records(draw: st.DrawFn) -> SessionRecord:
    src, size = draw(addresses)
    dst = draw(st.binary(min_size=size, max_size=size))
    ms = st.integers(0, 10**9).map(lambda x: x / 1000.0)
    return SessionRecord(
        c2s=draw(st.integers(C2S_MIN, C2S_MAX).map(lambda x: x | 1)),
        state=draw(st.sampled_from(WIRE_STATES)),
        key=FlowKey(draw(st.sampled_from([6, 17])), src, draw(st.integers(0, 65535)), dst, draw(st.integers(0, 65535))),
        client_port=draw(st.integers(0, 65535)),
        client_mac=draw(st.binary(min_size=6, max_size=6)),
        server=draw(st.text(max_size=20)),
        idle_c2s=draw(ms),
        idle_s2c=draw(ms),
        age=draw(ms),
        request_seen=draw(st.booleans()),
    )


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records(), max_size=8), st.sampled_from([b"", KEY]), st.integers(0, 2**32 - 1))
def test_records_round_trip(batch: list[SessionRecord], key: bytes, seq: int) -> None:
    data = encode(KIND_RECORDS, 3, 77, seq, [encode_record(r) for r in batch], key=key)
    message = decode(data, key)
    assert (message.kind, message.node, message.epoch, message.seq) == (KIND_RECORDS, 3, 77, seq)
    assert len(message.records) == len(batch)
    for got, sent in zip(message.records, batch, strict=True):
        assert got._replace(idle_c2s=0, idle_s2c=0, age=0) == sent._replace(idle_c2s=0, idle_s2c=0, age=0)
        assert abs(got.age - sent.age) < 0.0011 and abs(got.idle_c2s - sent.idle_c2s) < 0.0011


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records(), min_size=1, max_size=4), st.data())
def test_damaged_datagrams_are_refused_by_name(batch: list[SessionRecord], data: st.DataObject) -> None:
    key = data.draw(st.sampled_from([b"", KEY]))
    good = encode(KIND_RECORDS, 2, 1, 1, [encode_record(r) for r in batch], key=key)
    cut = data.draw(st.integers(0, len(good) - 1))
    with pytest.raises(SyncError):
        decode(good[:cut], key)
    flipped = bytearray(good)
    at = data.draw(st.integers(0, len(good) - 1))
    flipped[at] ^= 1 << data.draw(st.integers(0, 7))
    if key:  # any change is caught by the tag (or by the header checks before it)
        with pytest.raises(SyncError):
            decode(bytes(flipped), key)
    else:
        try:
            decode(bytes(flipped), key)
        except SyncError as exc:
            assert exc.reason


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_else(data: bytes) -> None:
    for key in (b"", KEY):
        with contextlib.suppress(SyncError):
            decode(data, key)
        with contextlib.suppress(SyncError):
            decode(HEADER.pack(b"MLSC", 1, KIND_RECORDS, 1, 0, 0, 1, 3) + data)


def test_unauthenticated_and_mismatched_datagrams() -> None:
    plain = encode(KIND_HELLO, 1, 5, 1)
    with pytest.raises(SyncError, match="unauthenticated"):
        decode(plain, KEY)
    with pytest.raises(SyncError, match="unexpected_tag"):
        decode(encode(KIND_HELLO, 1, 5, 1, key=KEY), b"")
    with pytest.raises(SyncError, match="bad_tag"):
        decode(encode(KIND_HELLO, 1, 5, 1, key=b"x" * 32), KEY)


# -- two nodes, one session -----------------------------------------------------------------------------------------
def two_nodes(**overrides: object) -> tuple[Net, dict[int, Balancer], dict[int, ClusterSync]]:
    a, sync_a = node(1, **overrides)
    b, sync_b = node(2, **overrides)
    net = Net(a.config)
    net.balancer = a
    syncs = {1: sync_a, 2: sync_b}
    exchange(syncs, 0.0)
    assert sync_a.synced and sync_b.synced
    return net, {1: a, 2: b}, syncs


def open_session(net: Net, sport: int = 40000) -> tuple[str, int]:
    src = client_addr(0)
    out = net.from_client(0, tcp(src, VIP, sport, 80, SYN, seq=100))
    ((name, _),) = net.deliver_to_servers(out)
    c2s = label_of(out[0][1])
    assert c2s is not None
    replies = net.from_server(name, tcp(VIP, src, 80, sport, SYN | ACK, seq=500, ack=101))
    assert len(net.deliver_to_client(0, replies)) == 1
    acked = net.from_client(0, tcp(src, VIP, sport, 80, ACK, seq=101, ack=501))
    assert [n for n, _ in net.deliver_to_servers(acked)] == [name]
    return name, c2s


def test_a_session_opened_on_one_node_is_carried_by_the_other() -> None:
    net, nodes, syncs = two_nodes()
    a, b = nodes[1], nodes[2]
    name, c2s = open_session(net)
    first, last = a.config.cluster.slice()  # type: ignore[union-attr]
    assert first <= c2s <= last
    net.now = 0.01
    exchange(syncs, net.now)
    replica = b.sessions.by_c2s(c2s)
    assert replica is not None and replica.state is SessionState.ESTABLISHED and replica.server.name == name
    assert syncs[2].replicas() == 1 and syncs[2].applied["installed"] == 1 and not syncs[2].drops
    assert b.switching.entry(c2s) is not None and b.switching.entry(c2s + 1) is not None

    net.balancer = b  # ECMP moves the flow: every later frame reaches node 2, and it is switched frame for frame
    src = client_addr(0)
    for i in range(5):
        net.now = 1.0 + i
        out = net.from_client(0, tcp(src, VIP, 40000, 80, ACK, seq=101 + i, ack=501, payload=b"GET / HTTP/1.1\r\n"))
        assert [(n, label_of(f)) for (n, _), (_, f) in zip(net.deliver_to_servers(out), out, strict=True)] == [
            (name, c2s)
        ]
        back = net.from_server(name, tcp(VIP, src, 80, 40000, ACK, seq=501 + i, ack=120, payload=b"HTTP/1.1 200"))
        assert len(net.deliver_to_client(0, back)) == 1
    assert b.fast_path >= 10 and b.stats().drops == {}

    # The single node's protections hold on the carrying node: a forged frame under the session's labels is dropped.
    forged_mac = labelled(PORT_MAC[0], client_mac(9), c2s, tcp(src, VIP, 40000, 80, ACK, seq=1, ack=1))
    forged_ip = labelled(PORT_MAC[0], client_mac(0), c2s, tcp(client_addr(7), VIP, 40000, 80, ACK))
    forged_flow = labelled(PORT_MAC[0], client_mac(0), c2s, tcp(src, VIP, 40001, 80, ACK))
    unknown = labelled(PORT_MAC[0], client_mac(0), c2s + 200, tcp(src, VIP, 40000, 80, ACK))
    wrong_side = labelled(PORT_MAC[2], client_mac(0), c2s, tcp(src, VIP, 40000, 80, ACK))
    for port, frame in ((0, forged_mac), (0, forged_ip), (0, forged_flow), (0, unknown), (2, wrong_side)):
        assert b.receive(port, frame, net.now) == []
    drops = b.stats().drops
    assert sum(drops.values()) == 5 and drops.get("label_unknown") == 1, drops

    # The client closes through node 2: the end is synced back to node 1.
    net.now = 6.0
    net.deliver_to_servers(net.from_client(0, tcp(src, VIP, 40000, 80, FIN | ACK, seq=106, ack=506)))
    assert b.sessions.by_c2s(c2s).state is SessionState.CLOSING_CLIENT  # type: ignore[union-attr]
    exchange(syncs, net.now)
    assert a.sessions.by_c2s(c2s).state is SessionState.CLOSING_CLIENT  # type: ignore[union-attr]


def test_keepalives_keep_the_owner_alive_while_frames_pass_elsewhere() -> None:
    timeouts = make_config().timeouts
    net, nodes, syncs = two_nodes()
    a, b = nodes[1], nodes[2]
    net.balancer = a
    _, c2s = open_session(net)
    exchange(syncs, 0.0)
    net.balancer = b
    src = client_addr(0)
    step = timeouts.tcp_established / 4
    for i in range(1, 9):  # twice the idle timeout, all of it through node 2
        net.now = i * step
        net.deliver_to_servers(net.from_client(0, tcp(src, VIP, 40000, 80, ACK, seq=101, ack=501, payload=b"x")))
        exchange(syncs, net.now)
        a.on_timer(net.now)
        b.on_timer(net.now)
        assert a.sessions.by_c2s(c2s) is not None, f"the owner timed the session out at {net.now}"
    assert syncs[1].applied["refreshed"] >= 8
    sent = syncs[1].sent["records"]
    exchange(syncs, net.now + 1)  # nothing new passed on node 1: it echoes nothing back
    assert syncs[1].sent["records"] == sent
    # Silence everywhere: both copies time out as a single node's would.
    late = net.now + timeouts.tcp_established + 1
    for balancer in (a, b):
        balancer.on_timer(late)
        assert balancer.sessions.by_c2s(c2s) is None
    assert a.labels.in_use_count == 0 and a.labels.quarantined_count == 1  # the owner quarantines its pair
    assert b.labels.quarantined_count == 0


def test_a_restarted_node_is_synced_from_its_peer_and_claims_its_own_labels() -> None:
    net, _nodes, syncs = two_nodes()
    labels = [open_session(net, sport)[1] for sport in range(40000, 40010)]
    exchange(syncs, 0.0)
    assert syncs[2].replicas() == 10
    # Node 1 dies and comes back empty: it asks node 2 for a dump before it says it is synced.
    fresh, sync = node(1)
    sync.started = sync._next_keepalive = 5.0
    syncs[1] = sync
    assert not sync.synced
    carried = exchange(syncs, 5.0)
    assert carried and sync.synced and sync.applied["claimed"] == 10
    assert {s.c2s for s in fresh.live_sessions()} == set(labels)
    assert fresh.labels.in_use_count == 10
    net.balancer = fresh
    _, c2s = open_session(net, 50000)  # a new session on the restarted node takes a pair nobody holds
    assert c2s not in labels


def test_a_lone_node_is_synced_after_the_join_timeout() -> None:
    _balancer, sync = node(1, join_timeout=2.0)
    assert not sync.synced and sync.poll(0.0)  # hellos asking for a dump
    assert not sync.synced
    sync.poll(1.0)
    assert not sync.synced
    sync.poll(2.5)
    assert sync.synced
    status = sync.status(2.5)
    assert status["synced"] and status["peers"][0]["alive"] is False and status["peers"][0]["last_heard"] is None


def test_bad_datagrams_are_counted_and_change_nothing() -> None:
    _net, nodes, syncs = two_nodes()
    b = syncs[2]
    before = len(nodes[2].live_sessions())
    rng = random.Random(5)
    record = encode_record(
        SessionRecord(
            C2S_MIN, SessionState.ESTABLISHED, FlowKey(6, client_addr(0), 1, VIP, 80), 0, client_mac(0), "s1", 0, 0, 0
        )
    )
    b.receive(encode(KIND_RECORDS, 1, 1, 1, [record]), ADDRESSES[1], 1.0)  # no tag: this cluster has a key
    b.receive(encode(KIND_RECORDS, 1, 1, 1, [record], key=KEY), ("10.66.0.1", 6640), 1.0)  # not a peer
    b.receive(bytes(rng.randrange(256) for _ in range(60)), ADDRESSES[1], 1.0)
    good = encode(KIND_RECORDS, 1, syncs[1].epoch, syncs[1].seq, [record], key=KEY)  # a sequence number used
    b.receive(good, ADDRESSES[1], 1.0)
    assert b.drops == {"unauthenticated": 1, "unknown_peer": 1, "bad_magic": 1, "replayed": 1}
    assert len(nodes[2].live_sessions()) == before
    unknown = decode(encode(KIND_RECORDS, 1, 0, 0, [record])).records[0]._replace(server="nobody")
    b.apply([unknown], 1, 1.0)
    assert b.drops["unknown_server"] == 1


# -- the simulated cluster -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "change"), [(2, "remove"), (3, "remove"), (2, "add")])
def test_a_node_change_breaks_no_session_with_sync_and_every_moved_one_without(n: int, change: str) -> None:
    from mplslb.sim.cluster import node_change

    with_sync = node_change(n, change, sync=True, sessions=120)
    without = node_change(n, change, sync=False, sessions=120)
    assert with_sync.sessions == without.sessions == 120
    assert 0 < with_sync.moved == without.moved < 120  # hash-threshold: many flows move, not all
    assert with_sync.broken == 0
    assert without.broken == without.moved  # a node that did not open a session cannot switch it


def test_ecmp_is_hash_threshold() -> None:
    from mplslb.sim.cluster import HASH_RANGE, ecmp, flow_hash

    flows = range(4000)
    shares = {node: sum(1 for f in flows if ecmp(f, [1, 2, 3, 4]) == node) for node in (1, 2, 3, 4)}
    assert all(800 < share < 1200 for share in shares.values()), shares
    for flow in flows[:200]:  # the lowest quarter of the hash range is the first next hop's
        assert (ecmp(flow, [1, 2, 3, 4]) == 1) == (flow_hash(flow) < HASH_RANGE // 4)


def test_capacity_is_capped_by_one_nodes_install_rate() -> None:
    from mplslb.sim.cluster import Costs, capacity

    costs = Costs(new_alone=100e-6, new_sync=110e-6, send=1e-6, install=40e-6, refresh_send=5e-6, refresh_apply=10e-6,
                  frame_owner=2e-6, frame_replica=2e-6, records_per_session=2, sessions=1)  # fmt: skip
    totals = [capacity(costs, n).new_total for n in range(1, 65)]
    assert totals == sorted(totals) and totals[-1] < 1 / costs.install
    assert capacity(costs, 16).frames_total == pytest.approx(16 * capacity(costs, 1).frames_total)
    assert capacity(costs, 16).new_total_alone == pytest.approx(16 / costs.new_alone)


def test_the_costs_are_measured_through_the_real_paths() -> None:
    from mplslb.sim.cluster import measure_costs

    costs = measure_costs(sessions=64, frames=256, repeats=1)  # raises unless every session reached the peer
    assert costs.records_per_session == 2  # its opening and its establishment, one poll apart
    assert min(costs.new_alone, costs.new_sync, costs.install, costs.frame_owner, costs.frame_replica) > 0
    assert costs.refresh_apply > 0


def _through_second_node() -> tuple[Net, dict[int, Balancer], dict[int, ClusterSync], str, int]:
    net, nodes, syncs = two_nodes()
    name, c2s = open_session(net)
    exchange(syncs, net.now)
    net.balancer = nodes[2]
    return net, nodes, syncs, name, c2s


def test_a_close_seen_on_one_node_ends_the_session_on_both() -> None:
    net, nodes, syncs, name, c2s = _through_second_node()
    src = client_addr(0)
    net.now = 1.0
    net.deliver_to_servers(net.from_client(0, tcp(src, VIP, 40000, 80, FIN | ACK, seq=101, ack=501)))
    net.deliver_to_client(0, net.from_server(name, tcp(VIP, src, 80, 40000, FIN | ACK, seq=501, ack=102)))
    net.deliver_to_servers(net.from_client(0, tcp(src, VIP, 40000, 80, ACK, seq=102, ack=502)))
    exchange(syncs, net.now)
    for balancer in nodes.values():
        assert balancer.sessions.by_c2s(c2s).state is SessionState.ENDING  # type: ignore[union-attr]
    linger = make_config().timeouts.closed_linger
    for step in range(1, 5):  # quiet after the close: both nodes close it at the linger's end
        net.now = 1.0 + step * linger
        exchange(syncs, net.now)
        for balancer in nodes.values():
            balancer.on_timer(net.now)
    assert all(b.sessions.by_c2s(c2s) is None for b in nodes.values())
    assert nodes[1].labels.quarantined_count == 1 and nodes[2].labels.quarantined_count == 0


def test_a_forged_reset_on_one_node_is_outlived_on_both() -> None:
    net, nodes, syncs, name, c2s = _through_second_node()
    src = client_addr(0)
    net.now = 1.0
    forged = labelled(PORT_MAC[0], client_mac(0), c2s, tcp(src, VIP, 40000, 80, RST, seq=101))
    nodes[2].receive(0, forged, net.now)
    exchange(syncs, net.now)
    assert nodes[1].sessions.by_c2s(c2s).state is SessionState.ENDING  # type: ignore[union-attr]
    for step in range(1, 41):  # the session goes on both ways through node 2
        net.now = 1.0 + step * 0.1
        net.deliver_to_servers(net.from_client(0, tcp(src, VIP, 40000, 80, ACK, seq=101, ack=501, payload=b"x")))
        net.deliver_to_client(0, net.from_server(name, tcp(VIP, src, 80, 40000, ACK, seq=501, ack=102, payload=b"y")))
        if step % 5 == 0:
            exchange(syncs, net.now)
        for balancer in nodes.values():
            balancer.on_timer(net.now)
    for balancer in nodes.values():
        assert balancer.sessions.by_c2s(c2s).state is SessionState.ESTABLISHED  # type: ignore[union-attr]


def test_status_tables_show_the_node_and_its_peers() -> None:
    from rich.console import Console

    from mplslb.control.tables import cluster_tables

    _, _, syncs = two_nodes()
    console = Console(width=160, record=True)
    for table in cluster_tables(syncs[1].status(0.5)):
        console.print(table)
    text = console.export_text()
    assert "Cluster: node 1 of 2" in text and "synced" in text and "10.9.0.2:6640" in text and "alive" in text
    assert "received datagrams" in text
    assert cluster_tables(None) == []


def test_the_cluster_table_cannot_change_while_running() -> None:
    from mplslb.config import diff_configs

    running = make_config(cluster=cluster(1))
    diff = diff_configs(running, make_config(cluster=cluster(1, nodes=3)))
    assert [key for key, _ in diff.refused] == ["cluster"]
    assert not diff_configs(running, make_config(cluster=cluster(1))).refused
    assert [key for key, _ in diff_configs(running, make_config(cluster=cluster(1, key=b"o" * 32))).refused] == [
        "cluster"
    ]


def test_the_peers_can_change_while_running() -> None:
    from mplslb.config import diff_configs

    running = make_config(cluster=cluster(1, nodes=3))
    grown = make_config(cluster=replace(cluster(1, nodes=3), peers=(ADDRESSES[2], ADDRESSES[3], ("10.9.0.4", 6640))))
    diff = diff_configs(running, grown)
    assert not diff.refused and diff.settings["cluster"] == grown.cluster
    assert diff.changes == ("cluster.peers:[10.9.0.2:6640,10.9.0.3:6640]->[10.9.0.2:6640,10.9.0.3:6640,10.9.0.4:6640]",)
    balancer = Balancer(running)
    assert balancer.reconfigure(grown) == diff.changes and balancer.config.cluster == grown.cluster


def pair_of_three() -> tuple[Net, dict[int, ClusterSync]]:
    """Nodes 1 and 2 of a cluster cut in three slices, each with the other as its one peer, synced."""
    syncs = {}
    balancers = {}
    for n in (1, 2):
        config = replace(cluster(n, nodes=3), peers=(ADDRESSES[3 - n],))
        balancers[n] = Balancer(make_config(cluster=config))
        syncs[n] = ClusterSync(balancers[n], config, 0.0)
    exchange(syncs, 0.0)
    net = Net(balancers[1].config)
    net.balancer = balancers[1]
    return net, syncs


@pytest.mark.parametrize("first", ["joining_node", "reload"])
def test_a_node_added_to_the_peers_by_a_reload_gets_every_session(first: str) -> None:
    net, syncs = pair_of_three()
    labels = {open_session(net, sport)[1] for sport in range(40000, 40005)}
    exchange(syncs, 0.0)
    third, sync = node(3, nodes=3, join_timeout=2.0)
    if first == "joining_node":  # node 3 starts first: its hellos are dropped until the others know it
        syncs[3] = sync
        exchange(syncs, 0.0)
        assert syncs[1].drops == {"unknown_peer": 1} and not sync.synced
    else:  # the others know it first; it starts late and has waited out its join timeout alone
        for now in (0.0, 3.0):
            sync.poll(now)
        assert sync.synced and not third.live_sessions()
    for n in (1, 2):
        syncs[n].set_peers([ADDRESSES[m] for m in (1, 2, 3) if m != n])
        assert list(syncs[n].peers) == [ADDRESSES[m] for m in (1, 2, 3) if m != n]
    syncs[3] = sync
    for now in (3.0, 4.0):  # (node 3's next hello is due at 4 s)
        exchange(syncs, now)
    assert sync.synced and {s.c2s for s in third.live_sessions()} == labels
    assert sync.replicas() == len(labels) and third.labels.in_use_count == 0
    syncs[1].set_peers([ADDRESSES[2]])  # node 3 leaves again
    assert list(syncs[1].peers) == [ADDRESSES[2]] and syncs[1].config.peers == (ADDRESSES[2],)


def test_a_peers_list_naming_this_node_too_is_taken_without_it() -> None:
    config = ClusterConfig(node=1, nodes=2, peers=(ADDRESSES[1], ADDRESSES[2]), sync_address=ADDRESSES[1][0])
    sync = ClusterSync(Balancer(make_config(cluster=config)), config, 0.0)
    assert list(sync.peers) == [ADDRESSES[2]]


@st.composite
def peer_records(draw: st.DrawFn) -> SessionRecord:
    """A record node 2 might send: a label of its slice, any live state, a TCP or UDP flow, a known server."""
    first, last = cluster(2).slice()
    src, size = draw(addresses)
    dst = draw(st.binary(min_size=size, max_size=size))
    return SessionRecord(
        c2s=draw(st.integers(first, last).map(lambda x: x | 1)),
        state=draw(st.sampled_from(WIRE_STATES)),
        key=FlowKey(draw(st.sampled_from([6, 17])), src, draw(st.integers(1, 65535)), dst, draw(st.integers(1, 65535))),
        client_port=draw(st.integers(0, 9)),
        client_mac=draw(st.binary(min_size=6, max_size=6)),
        server=draw(st.sampled_from(["s1", "s2", "s3"])),
        idle_c2s=draw(st.floats(0, 100)),
        idle_s2c=draw(st.floats(0, 100)),
        age=draw(st.floats(0, 100)),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(peer_records(), min_size=1, max_size=6, unique_by=(lambda r: r.c2s, lambda r: r.key)))
def test_replicas_are_installed_bound_to_this_node_and_idempotently(batch: list[SessionRecord]) -> None:
    balancer, sync = node(1)
    now = 1000.0
    sync.receive(encode(KIND_RECORDS, 2, 9, 1, [encode_record(r) for r in batch], key=KEY), ADDRESSES[2], now)
    assert sync.applied["installed"] == len(batch) and not sync.drops
    client_ports = {p.port_id for p in balancer.config.ports if p.role == "client"}
    for record in batch:
        session = balancer.sessions.by_c2s(record.c2s)
        assert session is not None and session.key == record.key and session.server.name == record.server
        assert session.state is record.state and balancer.sessions.lookup(record.key) == session
        c2s_entry, s2c_entry = balancer.switching.entry(record.c2s), balancer.switching.entry(record.c2s + 1)
        assert c2s_entry is not None and s2c_entry is not None
        assert c2s_entry.in_port_id in client_ports and c2s_entry.peer == record.client_mac  # this node's port
        assert s2c_entry.in_port_id == session.server.config.port_id and s2c_entry.peer == session.server.mac
        assert c2s_entry.next_hop == session.server.mac and s2c_entry.next_hop == record.client_mac
        assert balancer.switching.last_seen[record.c2s] == pytest.approx(now - record.idle_c2s, abs=0.002)
    assert balancer.labels.in_use_count == 0  # a peer's labels are not this node's to allocate or free
    sync.receive(encode(KIND_RECORDS, 2, 9, 2, [encode_record(r) for r in batch], key=KEY), ADDRESSES[2], now + 1)
    assert len(balancer.sessions) == len(batch) and sync.applied["installed"] == len(batch)  # the same: no change
    assert sync.applied["refreshed"] == len(batch)


def test_a_label_reused_by_its_owner_replaces_the_replica_and_nobody_else_can() -> None:
    balancer, sync = node(1, nodes=3)
    first, _ = cluster(2, nodes=3).slice()
    old = SessionRecord(first, SessionState.ESTABLISHED, FlowKey(6, client_addr(0), 1000, VIP, 80), 0, client_mac(0),
                        "s1", 0, 0, 0)  # fmt: skip
    new = old._replace(key=FlowKey(6, client_addr(1), 2000, VIP, 80), client_mac=client_mac(1))
    sync.apply([old], 2, 1.0)
    sync.apply([new], 3, 1.0)  # node 3 does not own the label: its word does not replace node 2's session
    assert sync.drops == {"label_conflict": 1} and balancer.sessions.by_c2s(first).key == old.key  # type: ignore[union-attr]
    sync.apply([new], 2, 2.0)  # the owner handed the pair out again
    assert balancer.sessions.by_c2s(first).key == new.key and sync.applied["replaced"] == 1  # type: ignore[union-attr]
    assert balancer.sessions.lookup(old.key) is None and balancer.switching.entry(first).peer == client_mac(1)  # type: ignore[union-attr]


def test_the_sync_is_in_the_prometheus_metrics() -> None:
    from mplslb.control.metrics import SnapshotCollector
    from mplslb.control.tables import snapshot

    net, nodes, syncs = two_nodes()
    open_session(net)
    exchange(syncs, 0.5)
    snap = snapshot(nodes[2], now=0.5) | {"cluster": syncs[2].status(0.5)}
    metrics = {m.name: m for m in SnapshotCollector(lambda: snap).collect()}
    assert metrics["mplslb_cluster_synced"].samples[0].value == 1
    assert metrics["mplslb_cluster_replicas"].samples[0].value == 1
    assert [s.labels["peer"] for s in metrics["mplslb_cluster_peer_alive"].samples] == ["10.9.0.1:6640"]


def test_a_cluster_node_keeps_its_sessions_and_its_replicas_across_a_restart(tmp_path: Path) -> None:
    from mplslb.state import open_balancer

    config = make_config(cluster=cluster(1))
    balancer, store, _ = open_balancer(config, tmp_path, now=1.0)
    net = Net(config)
    net.balancer = balancer
    _, own = open_session(net)
    peer_label = cluster(2).slice()[0]
    sync = ClusterSync(balancer, config.cluster, 1.0)  # type: ignore[arg-type]
    replica = SessionRecord(peer_label, SessionState.ESTABLISHED, FlowKey(6, client_addr(3), 3000, VIP, 80), 0,
                            client_mac(3), "s2", 0, 0, 0)  # fmt: skip
    sync.apply([replica], 2, 1.0)
    store.close()  # the daemon killed: the next one adopts the file
    again, store, report = open_balancer(config, tmp_path, now=5.0)
    try:
        assert report is not None and report.sessions == 2, report
        assert {s.c2s for s in again.live_sessions()} == {own, peer_label}
        assert again.labels.in_use_count == 1 and again.labels.in_use(own)  # its own pair, not the peer's
        assert again.switching.entry(peer_label) is not None
    finally:
        store.close()


def test_a_state_file_of_another_node_is_not_adopted(tmp_path: Path) -> None:
    from mplslb.state import open_balancer

    _, store, _ = open_balancer(make_config(cluster=cluster(1)), tmp_path, now=1.0)
    store.close()
    _, store, report = open_balancer(make_config(cluster=cluster(2)), tmp_path, now=2.0)
    store.close()
    assert report is None


def test_the_labs_node_configurations_leave_a_slice_for_a_node_added_later(tmp_path: Path) -> None:
    from mplslb.daemon import load_daemon_config
    from mplslb.lab import Lab, LabSpec

    spec = LabSpec(nodes=3, transport="udp", server_transport="udp", cluster=True, slices=4, node_state=True)
    lab = Lab(spec, root=tmp_path)
    path = tmp_path / "n1.toml"
    path.write_text(lab.balancer_toml(node=0))
    config = load_daemon_config(path, need_interfaces=False)
    cluster = config.balancer.cluster
    assert cluster is not None and (cluster.node, cluster.nodes) == (1, 4)
    assert cluster.peers == (("10.90.2.2", 6640), ("10.90.3.2", 6640))
    assert config.state_dir == str(lab.dir / "n1.state")
    lab.members.append(3)  # what add_node does before it reloads the others
    path.write_text(lab.balancer_toml(node=0))
    grown = load_daemon_config(path, need_interfaces=False).balancer.cluster
    assert grown is not None and grown.peers[-1] == ("10.90.4.2", 6640)
    for bad in ({"slices": 2}, {"slices": 9}, {"cluster": False, "slices": 4}):
        with pytest.raises(ValueError, match="slices"):
            LabSpec(**{**vars(spec), "node_state": False, **bad})  # type: ignore[arg-type]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_node_that_stops_sends_its_last_changes_before_its_socket_closes() -> None:
    """Real UDP sockets on loopback: a session opened on node 1 after its last flush reaches node 2 as node 1's link
    closes (a daemon's stop), so node 2 carries it while node 1 is away."""
    ports = {1: free_udp_port(), 2: free_udp_port()}
    loops, links, balancers = {}, {}, {}
    for n, other in ((1, 2), (2, 1)):
        config = ClusterConfig(node=n, nodes=2, peers=(("127.0.0.1", ports[other]),), key=KEY,
                               sync_address="127.0.0.1", sync_port=ports[n])  # fmt: skip
        balancers[n] = Balancer(make_config(cluster=config))
        loops[n] = Loop(clock=lambda: 0.0)
        links[n] = ClusterLink(ClusterSync(balancers[n], config, 0.0), loops[n])  # its first flush: hellos
    try:
        net = Net(balancers[1].config)
        net.balancer = balancers[1]
        _, c2s = open_session(net)  # after node 1's last flush: its change is pending
        assert balancers[2].sessions.by_c2s(c2s) is None
        links[1].close()
        for _ in range(50):  # the datagrams are on loopback already; bounded
            links[2].readable()
            if balancers[2].sessions.by_c2s(c2s) is not None:
                break
            time.sleep(0.01)
        replica = balancers[2].sessions.by_c2s(c2s)
        assert replica is not None and replica.state is SessionState.ESTABLISHED
        assert links[1].errors == {} and not links[2].sync.drops
    finally:
        for n in (1, 2):
            links[n].close()
            loops[n].close()
