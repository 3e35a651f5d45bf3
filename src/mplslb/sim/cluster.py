"""N balancer nodes behind an ECMP router, simulated with the real core: what a node change breaks, what N nodes carry.

Theory of operation
-------------------
Each node is a real :class:`~mplslb.balancer.Balancer` with ``[cluster] node = i`` and, with sync, a real
:class:`~mplslb.cluster.ClusterSync` whose datagrams are carried to every other node's (in process, no loss). The
router is Linux's hash-threshold multipath: a flow's 31-bit hash picks the node whose equal share of the hash range
holds it, in the order of the next hops, so when a node leaves or joins the shares move and many flows change node
(not only the leaving node's: RFC 2992). Servers sit on one segment behind every node; a server answers through the
node its session's last frame came from.

:func:`node_change` opens ``sessions`` TCP sessions through the ECMP set of ``n`` nodes (SYN, SYN-ACK, ACK, each
session's frames through its node), lets the sync settle, then either removes one node (killed: it takes nothing
more) or adds one (it joins and, with sync, is dumped to before the router takes it), and sends one request and one
answer of every session through the node ECMP now picks. A session is broken when either frame does not reach its
destination under its labels. Without sync the baseline is the stateless design: a node that did not open a
session has no state for it (Maglev and Katran then rely on their consistent hash picking the same server, which
still loses the sessions whose server set changed; with mplslb's labels the new node cannot even switch them).

:func:`measure_costs` times the operations in CPU time (``time.process_time``, user and system) on this machine:
a new session's handshake on its owner (alone, and with 1-3 peers: the records it encodes, and sending them over a
real UDP socket, per peer), the install of those records at a peer (receiving included), a label-switched frame on
the owner and on a replica.
:func:`capacity` turns them into rates for N = 1..16 on one core per node: frames scale with N (a replica is an
ordinary row of the label switching table), new sessions do not, because every node installs every session:
``R = N / (c_new(N-1) + (N-1) * c_install)``, which tends to ``1 / c_install`` (one node's install rate) however
many nodes there are. The per-peer sending cost beyond 3 peers is extrapolated linearly from the measured 0-3.
"""

from __future__ import annotations

import functools
import socket
import statistics
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace

from mplslb.balancer import Balancer
from mplslb.balancing.servers import ServerConfig
from mplslb.cluster import KIND_RECORDS, ClusterSync
from mplslb.config import BalancerConfig, ClusterConfig, PortConfig, VirtualService
from mplslb.flow import FlowKey
from mplslb.wire.ethernet import ETH_P_IP, ETH_P_MPLS_UC, build_ethernet
from mplslb.wire.ip import IPPROTO_TCP
from mplslb.wire.ipv4 import build_ipv4
from mplslb.wire.mpls import pack_entry
from mplslb.wire.tcp import build_tcp

VIP = bytes((10, 0, 0, 100))
ROUTER_MAC = bytes((0x02, 0xEC, 0, 0, 0, 1))  # the ECMP router's MAC on the client segment, shared by every node
CLIENT_PORT, SERVER_PORT = 0, 1
SYN, ACK, FIN = 0x02, 0x10, 0x01
SERVERS = 4
MAX_NODES = 17  # the simulated label space is cut in this many slices, so N = 16 can still add one
HASH_RANGE = 1 << 31
JOIN_TIMEOUT = 0.5
CHUNK = 64  # datagrams sent before they are read back, in measure_costs
FLUSH_SESSIONS = 32  # sessions between two flushes of the sync in measure_costs (a busy node's 5 ms)
PEER = "10.77.0.2"  # the peer whose copy of the datagrams measure_costs sends and installs


def _mac(kind: int, node: int, index: int = 0) -> bytes:
    return bytes((0x02, kind, 0, 0, node, index))


def server_configs() -> tuple[ServerConfig, ...]:
    return tuple(
        ServerConfig(f"s{i + 1}", bytes((10, 2, 0, i + 1)), _mac(0x5E, 0, i + 1), port_id=SERVER_PORT)
        for i in range(SERVERS)
    )


def node_config(node: int, *, sync: bool, nodes: int = MAX_NODES) -> BalancerConfig:
    """Node ``node``'s configuration: its own port MACs, the shared VIP and servers, its label slice."""
    ports = (
        PortConfig(CLIENT_PORT, 0, 0, _mac(0xB0, node, 0), "client", "uplink"),
        PortConfig(SERVER_PORT, 1, 0, _mac(0xB0, node, 1), "server", "servers"),
    )
    peers = tuple((f"10.77.0.{n}", 6640) for n in range(1, nodes + 1) if n != node) if sync else ()
    return BalancerConfig(
        ports=ports,
        vips=(VirtualService(VIP, (80,), ()),),
        servers=server_configs(),
        cluster=ClusterConfig(node=node, nodes=nodes, peers=peers),
    )


# -- frames ----------------------------------------------------------------------------------------------------------
def client_ip(flow: int) -> bytes:
    return (0x0A400000 + flow).to_bytes(4, "big")


def sport(flow: int) -> int:
    return 1024 + flow % 64000


def _packet(src: bytes, dst: bytes, sp: int, dp: int, flags: int, payload: bytes = b"") -> bytes:
    segment = build_tcp(src, dst, sp, dp, seq=1000, ack=1, flags=flags, payload=payload)
    return build_ipv4(src, dst, IPPROTO_TCP, len(segment)) + segment


def client_frame(flow: int, node_mac: bytes, flags: int, label: int | None = None, payload: bytes = b"") -> bytes:
    packet = _packet(client_ip(flow), VIP, sport(flow), 80, flags, payload)
    if label is None:
        return build_ethernet(node_mac, ROUTER_MAC, ETH_P_IP) + packet
    return build_ethernet(node_mac, ROUTER_MAC, ETH_P_MPLS_UC) + pack_entry(label, 0, True, 64) + packet


def server_frame(flow: int, node_mac: bytes, server_mac: bytes, label: int, flags: int, payload: bytes = b"") -> bytes:
    packet = _packet(VIP, client_ip(flow), 80, sport(flow), flags, payload)
    return build_ethernet(node_mac, server_mac, ETH_P_MPLS_UC) + pack_entry(label, 0, True, 64) + packet


def top_label(frame: bytes) -> int | None:
    if frame[12:14] != ETH_P_MPLS_UC.to_bytes(2, "big"):
        return None
    return int.from_bytes(frame[14:17], "big") >> 4


# -- the router ------------------------------------------------------------------------------------------------------
def flow_hash(flow: int) -> int:
    """The router's 31-bit hash of a session's flow (its outer header's 5-tuple)."""
    return zlib.crc32(client_ip(flow) + VIP + sport(flow).to_bytes(2, "big") + b"\x00\x50\x06") & (HASH_RANGE - 1)


def ecmp(flow: int, next_hops: list[int]) -> int:
    """Hash-threshold (Linux fib_select_multipath): equal shares of the hash range, in next-hop order."""
    return next_hops[flow_hash(flow) * len(next_hops) // HASH_RANGE]


# -- the cluster -----------------------------------------------------------------------------------------------------
class Cluster:
    """Nodes, their syncs (carried in process) and the ECMP set."""

    def __init__(self, n: int, *, sync: bool) -> None:
        self.sync = sync
        self.nodes: dict[int, Balancer] = {}
        self.syncs: dict[int, ClusterSync] = {}
        self.now = 1.0
        for node in range(1, n + 1):
            self.add(node)
        self.join()
        self.ecmp = sorted(self.nodes)

    def add(self, node: int) -> None:
        balancer = Balancer(node_config(node, sync=self.sync))
        self.nodes[node] = balancer
        if self.sync:
            config = balancer.config.cluster
            assert config is not None
            self.syncs[node] = ClusterSync(balancer, replace(config, join_timeout=JOIN_TIMEOUT), self.now)

    def join(self) -> None:
        """Let the nodes exchange their dumps; the peers configured but not there are given up after the join
        timeout."""
        self.settle()
        self.now += JOIN_TIMEOUT
        self.settle()

    def remove(self, node: int) -> None:
        del self.nodes[node]
        self.syncs.pop(node, None)
        self.ecmp.remove(node)

    def settle(self, rounds: int = 50) -> int:
        """Carry sync datagrams between the nodes until none is left (bounded); returns how many."""
        carried = 0
        addresses = {f"10.77.0.{n}": n for n in range(1, MAX_NODES + 1)}
        for _ in range(rounds):
            moved = 0
            for n, sync in list(self.syncs.items()):
                for (host, _), datagram in sync.poll(self.now):
                    target = self.syncs.get(addresses[host])
                    if target is not None:
                        target.receive(datagram, (f"10.77.0.{n}", 6640), self.now)
                        moved += 1
            carried += moved
            if not moved:
                break
        return carried

    def port_mac(self, node: int, port: int) -> bytes:
        return self.nodes[node].ports[port].mac


@dataclass
class Opened:
    flow: int
    label: int
    server_mac: bytes


def open_sessions(cluster: Cluster, flows: range) -> list[Opened]:
    """Each flow's handshake through the node ECMP picks; the sessions that opened, with their labels."""
    opened = []
    for flow in flows:
        node = ecmp(flow, cluster.ecmp)
        b, mac = cluster.nodes[node], cluster.port_mac(node, CLIENT_PORT)
        out = b.receive(CLIENT_PORT, client_frame(flow, mac, SYN), cluster.now)
        label = top_label(out[0][1]) if out else None
        if label is None:
            continue
        server_mac = out[0][1][0:6]
        smac = cluster.port_mac(node, SERVER_PORT)
        b.receive(SERVER_PORT, server_frame(flow, smac, server_mac, label + 1, SYN | ACK), cluster.now)
        b.receive(CLIENT_PORT, client_frame(flow, mac, ACK, label), cluster.now)
        opened.append(Opened(flow, label, server_mac))
    cluster.settle()
    return opened


def carried(cluster: Cluster, session: Opened) -> bool:
    """One request and its answer through the node ECMP picks now: True if both reach the far side."""
    node = ecmp(session.flow, cluster.ecmp)
    b = cluster.nodes[node]
    request = client_frame(session.flow, cluster.port_mac(node, CLIENT_PORT), ACK, session.label, b"GET /")
    out = b.receive(CLIENT_PORT, request, cluster.now)
    if len(out) != 1 or out[0][1][0:6] != session.server_mac or top_label(out[0][1]) != session.label:
        return False
    smac = cluster.port_mac(node, SERVER_PORT)
    back = b.receive(SERVER_PORT, server_frame(session.flow, smac, session.server_mac, session.label + 1, ACK, b"OK"),
                     cluster.now)  # fmt: skip
    return len(back) == 1 and back[0][1][0:6] == ROUTER_MAC and top_label(back[0][1]) == session.label + 1


@dataclass(frozen=True)
class ChangeResult:
    """What one node change did to the established sessions."""

    nodes: int
    change: str  # "remove" or "add"
    sync: bool
    sessions: int
    moved: int  # sessions whose node changed
    broken: int  # sessions whose request or answer did not get through after the change
    sync_datagrams: int  # carried for the whole run
    replicas: int  # on the node that carried the most


def node_change(n: int, change: str, *, sync: bool, sessions: int = 1000) -> ChangeResult:
    """``sessions`` established on ``n`` nodes, then one node removed (the middle one) or one added: see the
    module docstring."""
    cluster = Cluster(n, sync=sync)
    opened = open_sessions(cluster, range(sessions))
    before = {s.flow: ecmp(s.flow, cluster.ecmp) for s in opened}
    cluster.now += 0.5
    if change == "remove":
        if n < 2:
            raise ValueError("removing a node needs at least two")
        cluster.remove(cluster.ecmp[(n - 1) // 2])
    elif change == "add":
        cluster.add(n + 1)
        cluster.join()  # the new node is dumped to, and only then announced
        if sync and not cluster.syncs[n + 1].synced:
            raise RuntimeError("the joining node did not get its peers' dumps")
        cluster.ecmp.append(n + 1)
    else:
        raise ValueError(f"change must be 'remove' or 'add', got {change!r}")
    cluster.now += 0.5
    moved = sum(1 for s in opened if ecmp(s.flow, cluster.ecmp) != before[s.flow])
    broken = sum(1 for s in opened if not carried(cluster, s))
    datagrams = sum(s.sent["datagrams"] for s in cluster.syncs.values())
    replicas = max((s.replicas() for s in cluster.syncs.values()), default=0)
    return ChangeResult(n, change, sync, len(opened), moved, broken, datagrams, replicas)


# -- costs and capacity ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Costs:
    """Seconds of one core per operation, measured here."""

    new_alone: float  # a new session's handshake on a balancer with no sync
    new_sync: float  # the same on a node with peers: its records encoded too (not yet sent)
    send: float  # sending a new session's records to one peer (their share of the datagrams)
    install: float  # at one peer: receiving and installing a new session's records
    refresh_send: float  # a keep-alive record of an active session, encoded (sent like the others)
    refresh_apply: float  # the same applied at a peer
    frame_owner: float  # a label-switched frame on the node that opened the session
    frame_replica: float  # the same frame on a peer holding the replica
    records_per_session: float  # records a new session sends (its opening and its establishment)
    sessions: int

    def owner_cost(self, peers: int) -> float:
        """The owner's CPU per new session with ``peers`` peers: the records are encoded once and sent to each."""
        return self.new_alone if peers == 0 else self.new_sync + peers * self.send


def _timed(work: Callable[[], object]) -> float:
    """CPU seconds (this process's, user and system) that ``work`` took: the machine may be shared."""
    t0 = time.process_time()
    work()
    return time.process_time() - t0


def _handshake(cluster: Cluster, flows: range, polls: Callable[[], None] | None = None) -> float:
    """Open ``flows`` on node 1 (SYN; then SYN-ACK and ACK), frames built beforehand; ``polls`` is called every
    :data:`FLUSH_SESSIONS` sessions in each phase (the sync's flushes). Returns the seconds spent in the balancer
    and the polls."""
    b = cluster.nodes[1]
    mac, smac, now = cluster.port_mac(1, CLIENT_PORT), cluster.port_mac(1, SERVER_PORT), cluster.now
    syns = [client_frame(flow, mac, SYN) for flow in flows]
    outs: list[list[tuple[int, bytes]]] = []
    receive = b.receive

    def first() -> None:
        for i, frame in enumerate(syns, 1):
            outs.append(receive(CLIENT_PORT, frame, now))
            if polls is not None and i % FLUSH_SESSIONS == 0:
                polls()
        if polls is not None:
            polls()

    spent = _timed(first)
    later = []
    for flow, out in zip(flows, outs, strict=True):
        label = top_label(out[0][1])
        assert label is not None
        later.append(
            (server_frame(flow, smac, out[0][1][0:6], label + 1, SYN | ACK), client_frame(flow, mac, ACK, label))
        )

    def second() -> None:
        for i, (answer, ack) in enumerate(later, 1):
            receive(SERVER_PORT, answer, now)
            receive(CLIENT_PORT, ack, now)
            if polls is not None and i % FLUSH_SESSIONS == 0:
                polls()
        if polls is not None:
            polls()

    return spent + _timed(second)


def measure_costs(sessions: int = 2000, frames: int = 20000, repeats: int = 3) -> Costs:
    """Time each operation over ``sessions`` sessions (and ``frames`` frames), ``repeats`` times: the median of
    each (see the module docstring)."""
    runs = [_measure_once(sessions, frames) for _ in range(repeats)]
    fields = ("new_alone", "new_sync", "send", "install", "refresh_send", "refresh_apply", "frame_owner",
              "frame_replica", "records_per_session")  # fmt: skip
    return Costs(**{name: statistics.median(getattr(r, name) for r in runs) for name in fields}, sessions=sessions)


def _measure_once(sessions: int, frames: int) -> Costs:
    flows = range(sessions)
    new_alone = _handshake(Cluster(1, sync=False), flows) / sessions
    cluster = Cluster(2, sync=True)
    sync, peer = cluster.syncs[1], cluster.syncs[2]
    sync.poll(cluster.now)  # the hellos out of the way
    outgoing: list[bytes] = []

    def polls() -> None:
        outgoing.extend(d for (host, _), d in sync.poll(cluster.now) if host == PEER)

    new_sync = _handshake(cluster, flows, polls) / sessions
    sent = received = 0.0
    taken = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(1.0)
        target = rx.getsockname()
        for start in range(0, len(outgoing), CHUNK):  # in chunks the socket's buffer holds
            chunk = outgoing[start : start + CHUNK]
            sent += _timed(functools.partial(_send_all, tx, chunk, target))
            t0 = time.process_time()
            for _ in chunk:
                try:
                    data, _ = rx.recvfrom(65535)
                except TimeoutError:
                    break
                taken += 1
                peer.receive(data, ("10.77.0.1", 6640), cluster.now)
            received += time.process_time() - t0
    if taken != len(outgoing) or peer.applied["installed"] != sessions:
        raise RuntimeError(f"the peer installed {peer.applied['installed']} of {sessions} sessions")
    records = sync.sent["records"] / sessions
    labels = [int(c2s) for c2s in cluster.nodes[1].sessions.c2s_min + 2 * cluster.nodes[1].sessions.occupied()[0]]
    keepalives: list[bytes] = []
    refresh_send = _timed(lambda: keepalives.extend(sync._datagrams(KIND_RECORDS, sync._encoded(labels, cluster.now))))
    before = peer.applied["refreshed"]
    refresh_apply = _timed(functools.partial(_receive_all, peer, keepalives, cluster.now))
    if peer.applied["refreshed"] - before != len(labels):
        raise RuntimeError("the peer did not take every keep-alive")
    frame_owner, frame_replica = _frame_costs(cluster, flows, frames)
    return Costs(
        new_alone,
        new_sync,
        sent / sessions,
        received / sessions,
        refresh_send / len(labels),
        refresh_apply / len(labels),
        frame_owner,
        frame_replica,
        records,
        sessions,
    )


def _frame_costs(cluster: Cluster, flows: range, frames: int) -> tuple[float, float]:
    """A request frame of an established session on its owner (node 1), then on its replica (node 2), each session's
    first request sent before the timing (the owner watches it for the response time, once)."""
    owner = cluster.nodes[1]
    labels = {}
    for flow in flows:
        session = owner.sessions.lookup(_key(flow))
        assert session is not None
        labels[flow] = session.c2s
    batches = {}
    for node in (1, 2):
        mac = cluster.port_mac(node, CLIENT_PORT)
        first = [client_frame(flow, mac, ACK, labels[flow], b"GET / HTTP/1.1\r\n") for flow in flows]
        for frame in first:
            cluster.nodes[node].receive(CLIENT_PORT, frame, cluster.now)
        batches[node] = [first[i % len(first)] for i in range(frames)]
    spent: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(3):  # in turns, so both see the same machine
        for node in (1, 2):
            b, batch = cluster.nodes[node], batches[node]
            receive, now = b.receive, cluster.now
            before = b.fast_path
            spent[node].append(_timed(functools.partial(_feed, receive, batch, now)))
            if b.fast_path - before != frames:
                raise RuntimeError(f"node {node} switched {b.fast_path - before} of {frames} frames")
    return min(spent[1]) / frames, min(spent[2]) / frames


def _send_all(sock: socket.socket, datagrams: list[bytes], target: tuple[str, int]) -> None:
    for datagram in datagrams:
        sock.sendto(datagram, target)


def _receive_all(sync: ClusterSync, datagrams: list[bytes], now: float) -> None:
    for datagram in datagrams:
        sync.receive(datagram, ("10.77.0.1", 6640), now)


def _feed(receive: Callable[[int, bytes, float], object], frames: list[bytes], now: float) -> None:
    for frame in frames:
        receive(CLIENT_PORT, frame, now)


def _key(flow: int) -> FlowKey:
    return FlowKey(IPPROTO_TCP, client_ip(flow), sport(flow), VIP, 80)


@dataclass(frozen=True)
class Capacity:
    nodes: int
    new_total: float  # new sessions/s the cluster takes at most, with sync
    new_per_node: float
    new_total_alone: float  # the same without sync (no node can carry another's sessions)
    frames_total: float  # label-switched frames/s at most
    frames_per_node: float


def capacity(costs: Costs, nodes: int) -> Capacity:
    """Rates on one core per node (see the module docstring)."""
    peers = nodes - 1
    per_session = costs.owner_cost(peers) + peers * costs.install  # CPU seconds, summed over the cluster
    new_total = nodes / per_session
    frame = max(costs.frame_owner, costs.frame_replica)
    return Capacity(nodes, new_total, new_total / nodes, nodes / costs.new_alone, nodes / frame, 1 / frame)


__all__ = [
    "Capacity",
    "ChangeResult",
    "Cluster",
    "Costs",
    "capacity",
    "ecmp",
    "flow_hash",
    "measure_costs",
    "node_change",
]
