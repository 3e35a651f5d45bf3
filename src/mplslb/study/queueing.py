"""A queue-level simulator that drives mplslb's own balancing objects with session starts and ends.

Theory of operation
-------------------
The frame-level simulator (:mod:`mplslb.sim`) is honest down to checksums but too slow for a grid of thousands
of runs. This one keeps exactly what the balancing decision sees and drops the frames: the real
:class:`~mplslb.balancing.servers.ServerPool` (weights, status, ``active`` session counts, the response-time
EWMA), the real :class:`~mplslb.balancing.admission.AdmissionControl`, and the algorithm objects built by
:func:`~mplslb.balancing.algorithms.make_algorithm`, called with a :class:`FlowKey` per session as the balancer
calls them.

A session is a TCP connection carrying ``R`` requests one after another. It starts at the balancer (the
algorithm picks a server, ``session_started``), its first request reaches the server one client round trip
later (SYN, SYN-ACK, ACK + request), each next request one round trip after the previous response, and it
ends (``session_ended``) one round trip after its last response (FIN). The balancer's response-time samples
are what :mod:`mplslb.balancer` measures: SYN to SYN-ACK (the servers answer SYNs at once, so a server round
trip) and the first request to the first response byte (queueing plus service).

A server has ``workers`` FCFS workers of a ``speed`` (work per second); a request's work comes from the
workload, its service time is work / speed at the moment it starts, so the same seed gives every policy the
same sessions and the same work (common random numbers). Pool events add, drain, bring back up or fail a
server; a failed server's sessions are interrupted (as :meth:`Balancer.remove_server` does) and their
requests are counted apart.

Policies that are not mplslb's own live here: ``random``, and two oracles that read the servers' real queues,
which no balancer that only switches packets can see: ``oracle_jsq`` (join the server with the fewest requests
queued or in service) and ``oracle_lwl`` (least work left: the server where the session's first request
would finish first, knowing every queued request's service time). They bound what a balancer could do.
"""

from __future__ import annotations

import csv
import heapq
import ipaddress
import math
import random
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from mplslb.balancing.admission import AdmissionControl
from mplslb.balancing.algorithms import algorithm_names, make_algorithm
from mplslb.balancing.servers import Server, ServerConfig, ServerPool
from mplslb.flow import FlowKey
from mplslb.study.metrics import percentile

__all__ = [
    "ORACLES",
    "PoolEvent",
    "RunResult",
    "ServerModel",
    "Workload",
    "make_policy",
    "onoff_workload",
    "poisson_workload",
    "policy_names",
    "simulate",
    "trace_workload",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

RTT = 0.0011  # client <-> balancer <-> server round trip (the demo's 2 x (500 + 50) us)
SERVER_RTT = 0.0001  # balancer <-> server round trip: the SYN to SYN-ACK sample
SIZE_MEAN = 0.010  # mean work of a request: 10 ms on a server of speed 1
VIP = ipaddress.ip_address("10.0.0.100").packed
ORACLES = ("oracle_jsq", "oracle_lwl", "random")
_MAC = bytes.fromhex("025e00000000")


@dataclass(frozen=True)
class ServerModel:
    """A simulated server: capacity (``workers`` x ``speed``) and its balancer configuration."""

    name: str
    speed: float = 1.0
    workers: int = 2
    weight: int = 1
    max_sessions: int = 0

    @property
    def capacity(self) -> float:
        """Work per second with every worker busy."""
        return self.speed * self.workers


@dataclass(frozen=True)
class PoolEvent:
    """At ``at`` seconds: ``add`` (``model`` joins), ``drain``, ``up``, ``fail`` (removed, sessions interrupted)
    or ``speed`` (the server's speed becomes ``speed``)."""

    at: float
    action: str
    server: str
    model: ServerModel | None = None
    speed: float = 0.0


@dataclass(frozen=True)
class Workload:
    """Sessions: arrival time, client, number of requests and each request's work (``work`` is flat, session
    ``i``'s requests are ``work[first[i] : first[i] + requests[i]]``)."""

    arrivals: FloatArray
    clients: IntArray
    requests: IntArray
    work: FloatArray
    first: IntArray = field(init=False)

    def __post_init__(self) -> None:
        first = np.zeros(len(self.requests), dtype=np.int64)
        if len(self.requests) > 1:
            first[1:] = np.cumsum(self.requests)[:-1]
        object.__setattr__(self, "first", first)

    @property
    def duration(self) -> float:
        """Time of the last arrival."""
        return float(self.arrivals[-1]) if len(self.arrivals) else 0.0


def _session_shape(rng: np.random.Generator, n: int, requests_max: int) -> tuple[IntArray, FloatArray]:
    requests = rng.integers(1, requests_max + 1, size=n).astype(np.int64)
    work = rng.exponential(SIZE_MEAN, size=int(requests.sum()))
    return requests, work


def _rate_for(load: float, capacity: float, requests_max: int) -> float:
    """Sessions per second that make ``load`` of ``capacity`` with 1..requests_max requests of SIZE_MEAN."""
    return load * capacity / ((1 + requests_max) / 2 * SIZE_MEAN)


def poisson_workload(
    n: int, load: float, capacity: float, seed: int, *, clients: int = 2000, requests_max: int = 3
) -> Workload:
    """Poisson arrivals at the rate that makes ``load`` of ``capacity``; exponential work per request."""
    rng = np.random.default_rng(seed)
    rate = _rate_for(load, capacity, requests_max)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=n))
    requests, work = _session_shape(rng, n, requests_max)
    return Workload(arrivals, rng.integers(0, clients, size=n).astype(np.int64), requests, work)


def onoff_workload(
    n: int,
    load: float,
    capacity: float,
    seed: int,
    *,
    on_mean: float = 0.2,
    off_mean: float = 0.4,
    on_factor: float = 2.0,
    off_factor: float = 0.5,
    clients: int = 2000,
    requests_max: int = 3,
) -> Workload:
    """Bursty arrivals: a two-state Markov-modulated Poisson process. ON periods (exponential, mean
    ``on_mean`` s) run at ``on_factor`` x the mean rate, OFF periods at ``off_factor`` x; the factors are
    chosen so that the long-run rate (and the load) is the same as :func:`poisson_workload`'s."""
    rng = np.random.default_rng(seed)
    rate = _rate_for(load, capacity, requests_max)
    out = np.empty(n)
    t, i, on = 0.0, 0, True
    while i < n:
        period_end = t + rng.exponential(on_mean if on else off_mean)
        r = rate * (on_factor if on else off_factor)
        while i < n:
            t += rng.exponential(1.0 / r)
            if t > period_end:
                # Memoryless: the next period starts at the boundary with a fresh draw.
                t = period_end
                break
            out[i] = t
            i += 1
        on = not on
    requests, work = _session_shape(rng, n, requests_max)
    return Workload(out, rng.integers(0, clients, size=n).astype(np.int64), requests, work)


def trace_workload(path: str | Path, load: float, capacity: float, seed: int, *, limit: int = 0) -> Workload:
    """The request log (TSV with ``host``, ``time``, ``bytes``, as the NASA-HTTP trace) replayed: each request
    is a one-request session from its host; time is compressed so the mean load is ``load``; a request's work
    is 20 % fixed cost plus 80 % in proportion to the bytes served, scaled to a mean of SIZE_MEAN.

    The log has one-second timestamps, so each arrival is spread uniformly (seeded) within its second.
    """
    times: list[float] = []
    sizes: list[float] = []
    hosts: list[str] = []
    with open(path, encoding="latin-1", newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            try:
                when = float(row["time"])
            except (KeyError, TypeError, ValueError):
                continue
            raw = row.get("bytes") or ""
            times.append(when)
            sizes.append(float(raw) if raw.isdigit() else 0.0)
            hosts.append(row.get("host") or "")
            if limit and len(times) >= limit:
                break
    rng = np.random.default_rng(seed)
    t = np.asarray(times) - times[0] + rng.random(len(times))
    t.sort()
    size = np.asarray(sizes)
    work = SIZE_MEAN * (0.2 + 0.8 * size / max(float(size.mean()), 1.0))
    span = float(t[-1])
    # Compress the log's time so the mean offered work per second is load x capacity.
    scale = float(work.sum()) / (load * capacity * span)
    ids: dict[str, int] = {}
    clients = np.asarray([ids.setdefault(h, len(ids)) for h in hosts], dtype=np.int64)
    return Workload(t * scale, clients, np.ones(len(times), dtype=np.int64), work)


class Chooser(Protocol):
    """What the simulator calls for each new session (mplslb's Algorithm has this shape)."""

    def choose(self, pool: ServerPool, key: FlowKey, now: float) -> Server | None: ...


class _Queue:
    """One simulated server's workers and FCFS queue."""

    __slots__ = (
        "busy",
        "busy_time",
        "dead",
        "finishing",
        "future_work",
        "model",
        "queue",
        "queued_work",
        "served",
        "speed",
    )

    def __init__(self, model: ServerModel) -> None:
        self.model = model
        self.speed = model.speed
        self.busy = 0
        self.busy_time = 0.0
        self.dead = False
        self.finishing: list[float] = []
        self.queue: deque[tuple[int, float, float]] = deque()
        self.queued_work = 0.0
        self.future_work = 0.0
        self.served = 0

    def requests(self) -> int:
        """Requests queued or in service."""
        return self.busy + len(self.queue)

    def work_left(self, now: float) -> float:
        """Seconds of work this server still owes its sessions, per worker: the rest of the requests in service,
        the queued ones and the requests its live sessions have yet to send (what only an oracle knows)."""
        in_service = sum(f - now for f in self.finishing)
        return (in_service + (self.queued_work + self.future_work) / self.speed) / self.model.workers


class _SimState:
    """The simulator's servers, by the pool's server index; oracles read them."""

    def __init__(self) -> None:
        self.queues: dict[int, _Queue] = {}
        self.next_work = 0.0  # the arriving session's work (all its requests), for the LWL oracle


class _Random:
    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def choose(self, pool: ServerPool, key: FlowKey, now: float) -> Server | None:
        servers = pool.eligible()
        return servers[self._rng.randrange(len(servers))] if servers else None


class _OracleJSQ:
    def __init__(self, state: _SimState, seed: int) -> None:
        self._state = state
        self._rng = random.Random(seed)

    def choose(self, pool: ServerPool, key: FlowKey, now: float) -> Server | None:
        servers = pool.eligible()
        if not servers:
            return None
        queues = self._state.queues
        best = min(queues[s.index].requests() for s in servers)
        ties = [s for s in servers if queues[s.index].requests() == best]
        return ties[self._rng.randrange(len(ties))]


class _OracleLWL:
    def __init__(self, state: _SimState, seed: int) -> None:
        self._state = state
        self._rng = random.Random(seed)

    def choose(self, pool: ServerPool, key: FlowKey, now: float) -> Server | None:
        servers = pool.eligible()
        if not servers:
            return None
        # Shuffled first so that ties (idle servers of one speed) do not always go to the first server.
        self._rng.shuffle(servers)
        queues, work = self._state.queues, self._state.next_work
        return min(servers, key=lambda s: queues[s.index].work_left(now) + work / queues[s.index].speed)


def policy_names() -> list[str]:
    """Every policy the study compares: mplslb's registered algorithms, then random and the two oracles."""
    return [*algorithm_names(), *ORACLES]


def make_policy(name: str, state: _SimState, seed: int) -> Chooser:
    """Build policy ``name`` for one run (seeded where it draws random numbers)."""
    if name == "random":
        return _Random(seed)
    if name == "oracle_jsq":
        return _OracleJSQ(state, seed)
    if name == "oracle_lwl":
        return _OracleLWL(state, seed)
    if name == "power_of_two":
        return make_algorithm(name, seed=seed)
    return make_algorithm(name)


@dataclass
class RunResult:
    """What one run produced: per completed request its response time (client view), its service time and
    when it completed; per server its utilisation and requests served; refusals and interruptions."""

    response: FloatArray
    service: FloatArray
    completed_at: FloatArray
    session_of: IntArray
    utilisation: dict[str, float]
    served: dict[str, int]
    sessions: int
    refused: int
    interrupted: int
    duration: float


def _config(model: ServerModel, i: int) -> ServerConfig:
    return ServerConfig(
        model.name, bytes([10, 2, 0, 10 + i]), _MAC, 1, weight=model.weight, max_sessions=model.max_sessions
    )


def _flow_key(client: int, session: int) -> FlowKey:
    src = struct.pack("!I", 0x0B000000 + client)
    return FlowKey(6, src, 32768 + session % 28000, VIP, 80)


_ARRIVE, _REQUEST, _DONE, _END, _POOL = range(5)


def simulate(
    servers: Sequence[ServerModel],
    workload: Workload,
    policy: str,
    *,
    seed: int = 0,
    events: Sequence[PoolEvent] = (),
    max_sessions: int = 0,
    rt_alpha: float = 0.2,
) -> RunResult:
    """Run ``workload`` through ``policy`` over ``servers`` (plus pool ``events``) until every session ends.

    ``max_sessions`` is the balancer's global live-session limit (0 = none); per-server limits come from
    :attr:`ServerModel.max_sessions`. Returns the completed requests of sessions that were admitted and not
    interrupted.
    """
    pool = ServerPool(rt_alpha=rt_alpha)
    state = _SimState()
    by_name: dict[str, _Queue] = {}
    for i, model in enumerate(servers):
        server = pool.add(_config(model, i))
        q = _Queue(model)
        state.queues[server.index] = q
        by_name[model.name] = q
    chooser = make_policy(policy, state, seed)
    admission = AdmissionControl(max_sessions=max_sessions)
    n = len(workload.arrivals)
    arrivals, clients, requests, work, first = (
        workload.arrivals,
        workload.clients,
        workload.requests,
        workload.work,
        workload.first,
    )
    sess_server: list[Server | None] = [None] * n
    sess_next = [0] * n
    sess_dead = [False] * n
    live_on: dict[int, set[int]] = {}
    resp: list[float] = []
    serv: list[float] = []
    done_at: list[float] = []
    done_sess: list[int] = []
    refused = interrupted = live = 0
    heap: list[tuple[float, int, int, int]] = []
    seq = 0
    # Arrivals are already sorted: they are merged into the heap lazily, one at a time.
    next_arrival = 0
    for k, event in enumerate(events):
        heapq.heappush(heap, (event.at, -1 - k, _POOL, k))

    def start(q: _Queue, s: int, arrived: float, w: float, now: float) -> None:
        nonlocal seq
        q.busy += 1
        d = w / q.speed
        q.busy_time += d
        q.finishing.append(now + d)
        seq += 1
        heapq.heappush(heap, (now + d, seq, _DONE, s))
        pending[s] = (q, arrived, d)

    pending: dict[int, tuple[_Queue, float, float]] = {}
    now = 0.0
    while True:
        if next_arrival < n and (not heap or arrivals[next_arrival] <= heap[0][0]):
            now = float(arrivals[next_arrival])
            kind, s = _ARRIVE, next_arrival
            next_arrival += 1
        elif heap:
            now, _, kind, s = heapq.heappop(heap)
        else:
            break
        if kind == _ARRIVE:
            refusal = admission.admit(active_sessions=live, labels_free=1, now=now)
            chosen: Server | None = None
            if refusal is None:
                state.next_work = float(work[first[s] : first[s] + requests[s]].sum())
                chosen = chooser.choose(pool, _flow_key(int(clients[s]), s), now)
                if chosen is None:
                    refusal = admission.refusal_for_no_server(pool)
            if chosen is None:
                if refusal is not None:
                    admission.count(refusal)
                refused += 1
                continue
            pool.session_started(chosen)
            pool.record_response_time(chosen, SERVER_RTT)
            state.queues[chosen.index].future_work += float(work[first[s] : first[s] + requests[s]].sum())
            sess_server[s] = chosen
            live += 1
            live_on.setdefault(chosen.index, set()).add(s)
            seq += 1
            heapq.heappush(heap, (now + RTT, seq, _REQUEST, s))
        elif kind == _REQUEST:
            if sess_dead[s]:
                continue
            srv = sess_server[s]
            assert srv is not None
            q = state.queues[srv.index]
            w = float(work[first[s] + sess_next[s]])
            q.future_work -= w
            if q.busy < q.model.workers:
                start(q, s, now, w, now)
            else:
                q.queue.append((s, now, w))
                q.queued_work += w
        elif kind == _DONE:
            q, arrived, d = pending.pop(s)
            q.busy -= 1
            q.finishing.remove(now) if now in q.finishing else q.finishing.pop(0)
            if q.queue and not q.dead:
                s2, arrived2, w2 = q.queue.popleft()
                q.queued_work -= w2
                start(q, s2, arrived2, w2, now)
            if sess_dead[s]:
                continue
            q.served += 1
            srv = sess_server[s]
            assert srv is not None
            resp.append(now - arrived + RTT)
            serv.append(d)
            done_at.append(now)
            done_sess.append(s)
            if sess_next[s] == 0:
                pool.record_response_time(srv, now - arrived + SERVER_RTT)
            sess_next[s] += 1
            seq += 1
            heapq.heappush(heap, (now + RTT, seq, _REQUEST if sess_next[s] < requests[s] else _END, s))
        elif kind == _END:
            if sess_dead[s]:
                continue
            srv = sess_server[s]
            assert srv is not None
            pool.session_ended(srv)
            live_on[srv.index].discard(s)
            live -= 1
        else:
            event = events[s]
            if event.action == "add":
                assert event.model is not None
                server = pool.add(_config(event.model, len(state.queues)))
                q = _Queue(event.model)
                state.queues[server.index] = q
                by_name[event.model.name] = q
            elif event.action == "drain":
                pool.drain(event.server)
            elif event.action == "up":
                pool.mark_up(event.server)
            elif event.action == "speed":
                by_name[event.server].speed = event.speed
            elif event.action == "fail":
                server = pool.get(event.server)
                pool.remove(event.server)
                q = by_name[event.server]
                q.dead = True
                q.queue.clear()
                q.queued_work = q.future_work = 0.0
                for victim in live_on.pop(server.index, set()):
                    sess_dead[victim] = True
                    interrupted += 1
                    live -= 1
                    server.active -= 1
            else:
                raise ValueError(f"unknown pool event {event.action!r}")
    duration = max(now, 1e-9)
    names = {q.model.name: q for q in state.queues.values()}
    return RunResult(
        response=np.asarray(resp),
        service=np.asarray(serv),
        completed_at=np.asarray(done_at),
        session_of=np.asarray(done_sess, dtype=np.int64),
        utilisation={name: q.busy_time / (q.model.workers * duration) for name, q in names.items()},
        served={name: q.served for name, q in names.items()},
        sessions=n,
        refused=refused,
        interrupted=interrupted,
        duration=duration,
    )


def windowed_percentile(result: RunResult, windows: int, q: float = 99.0) -> tuple[FloatArray, FloatArray]:
    """The ``q``-th percentile of response time per time window (by completion time): window centres, values."""
    edges = np.linspace(0.0, result.duration, windows + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    idx = np.clip(np.searchsorted(edges, result.completed_at, side="right") - 1, 0, windows - 1)
    values = np.full(windows, math.nan)
    for w in range(windows):
        sel = result.response[idx == w]
        if sel.size:
            values[w] = percentile(sel, q)
    return centres, values
