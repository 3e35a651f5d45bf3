"""A whole simulated network: clients, the balancer with its line cards and ports, servers; a workload; events.

Theory of operation
-------------------
:func:`build` lays out the network from a :class:`SimConfig`: line card 0 holds the client-side ports, line card
1 the server-side ports, each port on its own Ethernet segment. Clients are spread over the client segments and
servers over the server segments. The balancer sits in a :class:`BalancerNode`, the only place that calls the
sans-I/O :class:`~mplslb.balancer.Balancer`: frames in, frames out, and its timer re-armed after every call.

:func:`run` draws session arrivals (a Poisson process, or the request times of an HTTP log), plays the scheduled
events (a server failing, recovering, draining, changing weight), runs the event loop until every session has
ended, and returns a :class:`SimReport`. All randomness comes from one seeded ``random.Random``, so a config and
seed give the same run.
"""

from __future__ import annotations

import csv
import ipaddress
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from mplslb.balancer import TIMER_GRANULARITY, Balancer, BalancerStats
from mplslb.balancing.servers import ServerConfig
from mplslb.config import BalancerConfig, PortConfig, VirtualService
from mplslb.sim.engine import EventLoop, Segment, Tap
from mplslb.sim.hosts import ClientHost, ServerHost, SessionResult
from mplslb.wire.ip import IPPROTO_TCP, IPPROTO_UDP
from mplslb.wire.pcap import PcapWriter

VIP4 = ipaddress.ip_address("10.0.0.100").packed
VIP6 = ipaddress.ip_address("fd00::100").packed
HTTP_PORT = 80
DNS_PORT = 53
CAPTURE_EPOCH = 1_700_000_000.0  # simulated time 0 in the capture's timestamps
EVENT_ACTIONS = ("fail", "recover", "drain", "weight", "remove", "down", "up")


def _mac(kind: int, index: int) -> bytes:
    return bytes((0x02, kind, 0, 0, (index >> 8) & 0xFF, index & 0xFF))


@dataclass(frozen=True)
class ServerSpec:
    """A simulated server: its balancing settings and its capacity."""

    name: str = "server"
    weight: int = 1
    max_sessions: int = 0
    workers: int = 8
    service_time: float = 0.010  # mean seconds per request (exponential)


@dataclass(frozen=True)
class SimEvent:
    """Something that happens to a server at a simulated time."""

    at: float
    action: str
    server: str
    weight: int = 0

    def __post_init__(self) -> None:
        if self.action not in EVENT_ACTIONS:
            raise ValueError(f"action must be one of {', '.join(EVENT_ACTIONS)}, got {self.action!r}")


@dataclass(frozen=True)
class Workload:
    """Who asks for what, and when."""

    clients: int = 60
    sessions: int = 3000
    rate: float = 400.0  # new sessions per simulated second (Poisson)
    udp_fraction: float = 0.15
    ipv6_fraction: float = 0.25
    requests_max: int = 3  # requests per session, uniform in [1, requests_max]
    size_mean: float = 6000.0  # response bytes (exponential), when no trace gives them
    session_timeout: float = 8.0  # a client gives up on a session after this long
    hosts: tuple[str, ...] = ("www.example.com", "api.example.com", "img.example.com")
    trace: str = ""  # an HTTP request log (TSV with host/time/bytes) to take arrivals, clients and sizes from
    trace_speedup: float = 50.0  # the log's time is compressed by this factor


@dataclass(frozen=True)
class SimConfig:
    seed: int = 1
    balancer: BalancerConfig | None = None  # servers, ports and VIPs are filled in by build()
    servers: tuple[ServerSpec, ...] = (
        ServerSpec("web1"),
        ServerSpec("web2"),
        ServerSpec("web3"),
        ServerSpec("web4"),
    )
    workload: Workload = field(default_factory=Workload)
    events: tuple[SimEvent, ...] = ()
    client_ports: int = 2
    server_ports: int = 2
    client_latency: float = 500e-6  # one way, client to balancer
    server_latency: float = 50e-6  # one way, balancer to server
    max_sim_time: float = 600.0


@dataclass
class SimReport:
    config: SimConfig
    stats: BalancerStats
    results: list[SessionResult]
    sim_time: float
    wall_time: float
    events_run: int
    capture: str | None
    server_served: dict[str, int]
    endpoint_drops: dict[str, int]
    labels_peak_in_use: int = 0
    applied_events: list[str] = field(default_factory=list)

    def outcomes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.outcome or "unfinished"] = out.get(r.outcome or "unfinished", 0) + 1
        return out


class BalancerNode:
    """The balancer on the simulated network: segments in, ``Balancer.receive``, segments out, timers."""

    def __init__(self, loop: EventLoop, balancer: Balancer, segments: dict[int, Segment]) -> None:
        self.loop = loop
        self.balancer = balancer
        self.segments = segments
        self._timer: float | None = None
        self._not_before = 0.0  # the balancer's timers run at most every TIMER_GRANULARITY, as in the daemon
        for port_id, segment in segments.items():
            segment.tap_id = port_id
            segment.attach(balancer.ports[port_id].mac, self._receiver(port_id))

    def _receiver(self, port_id: int):  # type: ignore[no-untyped-def]
        def receive(frame: bytes, now: float) -> None:
            self._send(self.balancer.receive(port_id, frame, now))
            self._arm()

        return receive

    def _send(self, frames: list[tuple[int, bytes]]) -> None:
        for port_id, frame in frames:
            self.segments[port_id].send(frame)

    def _arm(self) -> None:
        deadline = self.balancer.next_deadline()
        if deadline is not None:
            deadline = max(deadline, self._not_before)
        if deadline is not None and (self._timer is None or deadline < self._timer):
            self._timer = deadline
            self.loop.at(deadline, self._fire, deadline)

    def _fire(self, deadline: float) -> None:
        if self._timer != deadline:
            return
        self._timer = None
        self._not_before = self.loop.now + TIMER_GRANULARITY
        self._send(self.balancer.on_timer(self.loop.now))
        self._arm()


@dataclass
class Network:
    loop: EventLoop
    balancer: Balancer
    node: BalancerNode
    clients: list[ClientHost]
    servers: dict[str, ServerHost]
    segments: dict[int, Segment]
    results: list[SessionResult]


def balancer_config_for(config: SimConfig) -> BalancerConfig:
    """The balancer's config in the simulated network: the user's settings plus the generated ports and VIPs."""
    ports = [PortConfig(i, 0, i, _mac(0xB0, i), "client", f"lc0/p{i}") for i in range(config.client_ports)]
    ports += [
        PortConfig(config.client_ports + i, 1, i, _mac(0xB1, i), "server", f"lc1/p{i}")
        for i in range(config.server_ports)
    ]
    servers = tuple(
        ServerConfig(
            name=spec.name,
            address=ipaddress.ip_address(f"10.2.0.{10 + i}").packed,
            mac=_mac(0x5E, i),
            port_id=config.client_ports + i % config.server_ports,
            weight=spec.weight,
            max_sessions=spec.max_sessions,
        )
        for i, spec in enumerate(config.servers)
    )
    vips = (VirtualService(VIP4, (HTTP_PORT,), (DNS_PORT,)), VirtualService(VIP6, (HTTP_PORT,), (DNS_PORT,)))
    base = config.balancer or BalancerConfig(ports=tuple(ports), vips=vips)
    return replace(base, ports=tuple(ports), vips=vips, servers=servers)


def build(config: SimConfig, rng: random.Random) -> Network:
    loop = EventLoop()
    bconfig = balancer_config_for(config)
    balancer = Balancer(bconfig)
    segments = {
        p.port_id: Segment(
            loop,
            p.name,
            latency=config.client_latency if p.role == "client" else config.server_latency,
        )
        for p in bconfig.ports
    }
    node = BalancerNode(loop, balancer, segments)
    client_ports = [p for p in bconfig.ports if p.role == "client"]
    results: list[SessionResult] = []
    clients = []
    for i in range(config.workload.clients):
        port = client_ports[i % len(client_ports)]
        clients.append(
            ClientHost(
                loop,
                segments[port.port_id],
                name=f"client{i}",
                mac=_mac(0xC0, i),
                addr4=ipaddress.ip_address(f"10.1.{i // 250}.{i % 250 + 1}").packed,
                addr6=ipaddress.ip_address(f"fd00:1::{i + 1:x}").packed,
                gateway_mac=port.mac,
                rng=random.Random(rng.getrandbits(64)),
                results=results,
            )
        )
    servers = {}
    for spec, server_config in zip(config.servers, bconfig.servers, strict=True):
        servers[spec.name] = ServerHost(
            loop,
            segments[server_config.port_id],
            name=spec.name,
            mac=server_config.mac,
            vips=[VIP4, VIP6],
            workers=spec.workers,
            service_time=spec.service_time,
            rng=random.Random(rng.getrandbits(64)),
        )
    return Network(loop, balancer, node, clients, servers, segments, results)


@dataclass(frozen=True)
class Arrival:
    at: float
    client: int
    size: int


def _poisson_arrivals(workload: Workload, rng: random.Random) -> Iterator[Arrival]:
    t = 0.0
    for _ in range(workload.sessions):
        t += rng.expovariate(workload.rate)
        yield Arrival(t, rng.randrange(workload.clients), max(0, int(rng.expovariate(1.0 / workload.size_mean))))


def trace_arrivals(path: str | Path, workload: Workload) -> Iterator[Arrival]:
    """Arrivals from an HTTP log in TSV (columns host, time, bytes, as in the NASA-HTTP trace): each request is a
    session, its host picks the client (stable hash), its size is the bytes served; time is compressed."""
    with open(path, encoding="latin-1", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        first: float | None = None
        count = 0
        for row in reader:
            if count >= workload.sessions:
                return
            try:
                when = float(row["time"])
                size = int(row["bytes"]) if row.get("bytes", "").isdigit() else 0
            except (KeyError, ValueError):
                continue
            first = when if first is None else first
            client = int.from_bytes(row["host"].encode("latin-1")[-8:].rjust(8, b"\0"), "big") % workload.clients
            count += 1
            yield Arrival((when - first) / workload.trace_speedup + 0.001 * (count % 1000) / 1000, client, size)


def run(config: SimConfig, *, capture: str | Path | None = None) -> SimReport:
    """Run the simulation to the end of its workload and return what happened."""
    rng = random.Random(config.seed)
    net = build(config, rng)
    loop, workload = net.loop, config.workload
    writers: list[PcapWriter] = []
    if capture is not None:
        # Two files, so each TCP segment appears once per file: the client-side ports (where the first packet
        # of a session arrives unlabelled) and the server-side ports.
        client_path = Path(capture)
        server_path = client_path.with_name(f"{client_path.stem}-servers{client_path.suffix}")
        writers = [PcapWriter(client_path), PcapWriter(server_path)]
        for port_id, segment in net.segments.items():
            segment.taps.append(_capture_tap(writers[0 if net.balancer.ports[port_id].role == "client" else 1]))
    applied: list[str] = []
    for event in config.events:
        loop.at(event.at, _apply_event, net, event, applied)
    arrivals = trace_arrivals(workload.trace, workload) if workload.trace else _poisson_arrivals(workload, rng)
    session_rng = random.Random(rng.getrandbits(64))
    last_arrival = 0.0
    for arrival in arrivals:
        last_arrival = arrival.at
        loop.at(arrival.at, _start_session, net, workload, arrival, session_rng)
    started = time.perf_counter()
    horizon = min(config.max_sim_time, last_arrival + workload.session_timeout + 1.0)
    loop.run(horizon)
    # Let timers finish closing sessions (lingering labels, quarantine), bounded.
    loop.run(min(config.max_sim_time, horizon + 5.0))
    wall = time.perf_counter() - started
    for w in writers:
        w.close()
    drops: dict[str, int] = {}
    endpoints = [c.endpoint for c in net.clients] + [s.endpoint for s in net.servers.values()]
    for endpoint in endpoints:
        for reason, count in endpoint.drops.items():
            drops[reason] = drops.get(reason, 0) + count
    return SimReport(
        config=config,
        stats=net.balancer.stats(),
        results=net.results,
        sim_time=loop.now,
        wall_time=wall,
        events_run=loop.events_run,
        capture=str(capture) if capture is not None else None,
        server_served={name: host.served for name, host in net.servers.items()},
        endpoint_drops=drops,
        applied_events=applied,
    )


def _capture_tap(writer: PcapWriter) -> Tap:
    def tap(_port: int, frame: bytes, now: float) -> None:
        writer.write(frame, CAPTURE_EPOCH + now)

    return tap


def _start_session(net: Network, workload: Workload, arrival: Arrival, rng: random.Random) -> None:
    client = net.clients[arrival.client]
    udp = rng.random() < workload.udp_fraction
    v6 = rng.random() < workload.ipv6_fraction
    client.open(
        proto=IPPROTO_UDP if udp else IPPROTO_TCP,
        vip=VIP6 if v6 else VIP4,
        vport=DNS_PORT if udp else HTTP_PORT,
        requests=1 + rng.randrange(max(1, workload.requests_max)),
        host=workload.hosts[rng.randrange(len(workload.hosts))] if workload.hosts else "localhost",
        size=min(arrival.size, 1200) if udp else arrival.size,
        timeout=workload.session_timeout,
    )


def _apply_event(net: Network, event: SimEvent, applied: list[str]) -> None:
    now = net.loop.now
    host = net.servers.get(event.server)
    if host is None:
        raise ValueError(f"event at {event.at}: no server {event.server!r}")
    balancer = net.balancer
    if event.action == "fail":
        host.failed = True  # the host stops answering; passive health has to notice
    elif event.action == "recover":
        host.failed = False
        balancer.mark_up(event.server)
    elif event.action == "drain":
        balancer.drain(event.server)
    elif event.action == "weight":
        balancer.set_weight(event.server, event.weight)
    elif event.action == "remove":
        balancer.remove_server(event.server, now)
    elif event.action == "down":
        balancer.mark_down(event.server, now)
    elif event.action == "up":
        balancer.mark_up(event.server)
    applied.append(
        f"t={now:.2f}s {event.action} {event.server}" + (f" {event.weight}" if event.action == "weight" else "")
    )
    net.node._arm()


__all__ = [
    "BalancerNode",
    "ServerSpec",
    "SimConfig",
    "SimEvent",
    "SimReport",
    "Workload",
    "build",
    "run",
]
