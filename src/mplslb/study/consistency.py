"""Do established sessions keep their server through pool changes? Measured in the frame-level simulator.

Theory of operation
-------------------
The whole network of :mod:`mplslb.sim` (clients, the real :class:`~mplslb.balancer.Balancer`, servers) runs a
workload during which the pool changes four times: a server is added (it starts DOWN and comes UP), one is
drained, one fails (it stops answering and passive health has to notice) and one is removed. The server-side
ports are captured, and every labelled frame the balancer sends to a server is read back: its destination MAC
names the server, the IP packet under the label names the session (its 5-tuple, never rewritten). So the
servers each session's packets reached come from the simulation itself, not from the balancer's own records.

For each change, the sessions that sent packets both before and after it are the ones it could have moved.
Sessions on the server that failed or was removed cannot keep it (it is gone) and are counted apart; every
other such session should have reached one server only, since after its first packet it is switched on its
labels.

For comparison, a balancer with no session table recomputes a hash for every packet: the same sessions' flow
keys are run through mplslb's own :class:`~mplslb.balancing.algorithms.Maglev` and ``source_hash`` (modulo the
server count) on the pool as it was just before and just after the change; a session breaks when the two
differ.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mplslb.balancing.algorithms import make_algorithm
from mplslb.balancing.servers import ServerConfig, ServerPool, ServerStatus
from mplslb.config import BalancerConfig, PortConfig, VirtualService
from mplslb.flow import FlowKey
from mplslb.sim.hosts import Received
from mplslb.sim.scenario import CAPTURE_EPOCH, ServerSpec, SimConfig, SimEvent, Workload, run
from mplslb.study.metrics import consistency_fraction
from mplslb.wire.errors import WireError
from mplslb.wire.ipv4 import parse_ipv4
from mplslb.wire.ipv6 import parse_ipv6
from mplslb.wire.pcap import read_pcap

__all__ = ["CHANGES", "ChangeResult", "PolicyConsistency", "consistency_config", "measure_consistency"]

ETH_MPLS = b"\x88\x47"
SERVERS = ("web1", "web2", "web3", "web4", "web5")
# (action as the simulator names it, the study's name for it, server)
CHANGES = (
    ("up", "added", "web5"),
    ("drain", "drained", "web2"),
    ("fail", "failed", "web3"),
    ("remove", "removed", "web4"),
)
HASH_BASELINES = ("maglev", "source_hash")
# Smaller than the default table (a prime well above 100 x servers, as Maglev asks), so building one per change
# is quick; the share of keys a change moves does not depend on the size.
MAGLEV_TABLE = 1009


@dataclass
class ChangeResult:
    """One pool change as one policy lived through it."""

    change: str
    server: str
    at: float
    live: int  # sessions with packets to a server both before and after the change
    on_lost_server: int  # of those, on the server that failed or was removed (their packets stop reaching it)
    kept: int  # of the others, sessions whose packets all reached one server
    counted: int  # the others
    hash_broken: dict[str, int] = field(default_factory=dict)  # hash-only baseline: sessions moved
    hash_counted: dict[str, int] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        """Kept / counted (1.0 when nothing was counted: no session could have moved)."""
        return self.kept / self.counted if self.counted else 1.0


@dataclass
class PolicyConsistency:
    """All pool changes of one run with one algorithm."""

    policy: str
    sessions: int
    changes: list[ChangeResult]


def consistency_config(policy: str, *, sessions: int, seed: int) -> SimConfig:
    """The frame-level scenario: five servers (web5 joins later), long keep-alive sessions, four changes evenly
    spread over the run."""
    rate = 75.0
    span = sessions / rate
    servers = tuple(ServerSpec(name, workers=32, service_time=0.1) for name in SERVERS)
    events = [SimEvent(0.0, "down", "web5")]
    for k, (action, _, server) in enumerate(CHANGES):
        events.append(SimEvent(span * (k + 1) / (len(CHANGES) + 1), action, server))
    ports = (PortConfig(0, 0, 0, b"\x02\0\0\0\0\1", "client"), PortConfig(1, 1, 0, b"\x02\0\0\0\0\2", "server"))
    balancer = BalancerConfig(ports=ports, vips=(VirtualService(b"\x0a\0\0\x64"),), algorithm=policy)
    workload = Workload(clients=120, sessions=sessions, rate=rate, requests_max=20, size_mean=3000.0)
    return SimConfig(seed=seed, balancer=balancer, servers=servers, workload=workload, events=tuple(events))


def _server_frames(path: Path, macs: dict[bytes, str]) -> dict[FlowKey, list[tuple[float, str]]]:
    """Per session (5-tuple), the (time, server) of every labelled frame the balancer sent to a server."""
    flows: dict[FlowKey, list[tuple[float, str]]] = {}
    for record in read_pcap(path):
        frame = record.data
        server = macs.get(frame[0:6])
        if server is None or frame[12:14] != ETH_MPLS:
            continue
        packet = frame[18:]
        try:
            rx = Received(packet)
            ip = parse_ipv6(packet) if packet[0] >> 4 == 6 else parse_ipv4(packet)
        except (WireError, IndexError):
            continue
        key = FlowKey(rx.proto, rx.src, rx.sport, ip.dst, rx.dport)
        flows.setdefault(key, []).append((record.timestamp - CAPTURE_EPOCH, server))
    return flows


def _pool(status: dict[str, ServerStatus]) -> ServerPool:
    pool = ServerPool(ServerConfig(name, bytes([10, 2, 0, 10 + i]), bytes(6), 1) for i, name in enumerate(SERVERS))
    for name, value in status.items():
        pool.get(name).status = value
    return pool


def _statuses(changes: Sequence[tuple[str, str, str]]) -> list[dict[str, ServerStatus]]:
    """The pool's status before the first change and after each."""
    status = {"web5": ServerStatus.DOWN}
    out = [dict(status)]
    for action, _, server in changes:
        if action == "up":
            status.pop(server, None)
        elif action == "drain":
            status[server] = ServerStatus.DRAINING
        else:
            status[server] = ServerStatus.DOWN
        out.append(dict(status))
    return out


def measure_consistency(policy: str, *, sessions: int = 600, seed: int = 1) -> PolicyConsistency:
    """Run the frame-level pool-change scenario with ``policy`` and measure every change (see the module)."""
    config = consistency_config(policy, sessions=sessions, seed=seed)
    with tempfile.TemporaryDirectory(prefix="mplslb-study-") as tmp:
        capture = Path(tmp) / "consistency.pcap"
        report = run(config, capture=capture)
        macs = {bytes((0x02, 0x5E, 0, 0, 0, i)): spec.name for i, spec in enumerate(config.servers)}
        flows = _server_frames(capture.with_name("consistency-servers.pcap"), macs)
    statuses = _statuses(CHANGES)
    results: list[ChangeResult] = []
    for k, (_, change, server) in enumerate(CHANGES):
        at = config.events[k + 1].at
        live = {key: hops for key, hops in flows.items() if hops[0][0] < at < hops[-1][0]}
        lost = {key for key, hops in live.items() if hops[0][1] == server and change in ("failed", "removed")}
        kept, counted = consistency_fraction([s for _, s in hops] for key, hops in live.items() if key not in lost)
        result = ChangeResult(change, server, at, len(live), len(lost), kept, counted)
        before, after = _pool(statuses[k]), _pool(statuses[k + 1])
        for name in HASH_BASELINES:
            # A hash-only balancer recomputes the choice for every packet: before and after the change.
            params = {"table_size": MAGLEV_TABLE} if name == "maglev" else {}
            hash_before, hash_after = make_algorithm(name, **params), make_algorithm(name, **params)
            broken = total = 0
            for key in live:
                was = hash_before.choose(before, key, at)
                if was is None or (change in ("failed", "removed") and was.name == server):
                    continue
                now = hash_after.choose(after, key, at)
                total += 1
                broken += now is None or now.name != was.name
            result.hash_broken[name] = broken
            result.hash_counted[name] = total
        results.append(result)
    return PolicyConsistency(policy, len(report.results), results)
