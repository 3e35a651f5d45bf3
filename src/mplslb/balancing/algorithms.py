"""The load balancing algorithm unit (claim 4): pick the server for a new session.

Theory of operation
-------------------
An algorithm is a small object with one job, :meth:`Algorithm.choose`: given the server pool, the new
session's flow key and the time, return an eligible server (see :attr:`Server.eligible`) or ``None`` when
there is none. Algorithms are registered by name (as aioquic does for congestion control), so the
configuration names one and :func:`make_algorithm` builds it with its keyword parameters.

The state an algorithm keeps between choices is small and deterministic: the index of the last server
chosen (round robin, and the tie-break rotation of the least-loaded family), per-server current weights
(smooth weighted round robin), a seeded PRNG (power of two choices), or a lookup table (Maglev) rebuilt
only when :attr:`ServerPool.version` says membership, status or weight changed. Nothing reads the clock or
an unseeded random source, and hashes are keyed BLAKE2b, never Python's per-process ``hash()``, so two
balancers (or two runs) with the same configuration make the same choices.

Each choice costs O(servers) (the eligible list) or, for Maglev, O(1) expected.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import struct
from abc import ABC, abstractmethod
from array import array
from collections.abc import Callable
from operator import attrgetter
from typing import Any, ClassVar, TypeVar

from mplslb.balancing.servers import Server, ServerPool
from mplslb.flow import FlowKey

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "LeastConnections",
    "Maglev",
    "PowerOfTwo",
    "ResponseTime",
    "RoundRobin",
    "ShortestExpectedDelay",
    "SourceHash",
    "WeightedLeastConnections",
    "WeightedRoundRobin",
    "algorithm_names",
    "flow_hash",
    "make_algorithm",
    "register",
]


_FLOW_TAIL = struct.Struct("!BHHBB")
_by_index = attrgetter("index")


def _hash64(data: bytes, person: bytes) -> int:
    """A 64-bit hash that is the same in every process; ``person`` keeps different uses independent."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=person).digest(), "big")


def flow_hash(key: FlowKey) -> int:
    """A stable 64-bit hash of the whole 5-tuple."""
    # Lengths are hashed too, so an IPv4 and an IPv6 key can never serialize to the same bytes.
    tail = _FLOW_TAIL.pack(key.proto, key.sport, key.dport, len(key.src), len(key.dst))
    return _hash64(key.src + key.dst + tail, b"mplslb-flow")


def _first_after(servers: list[Server], last_index: int) -> int:
    """Position in ``servers`` (sorted by index) of the first server after ``last_index``, cyclically."""
    pos = bisect.bisect_right(servers, last_index, key=_by_index)
    return 0 if pos == len(servers) else pos


class Algorithm(ABC):
    """A load balancing algorithm. Subclasses set ``name`` and implement :meth:`choose`."""

    name: ClassVar[str]
    #: The choice reads the session's flow key: no session can be decided before its first packet comes (the
    #: kernel offload's tickets, ``offload_syn``, are not issued).
    keyed: ClassVar[bool] = False

    @abstractmethod
    def choose(self, pool: ServerPool, key: FlowKey, now: float) -> Server | None:
        """The server for a new session with flow ``key`` at time ``now``, among eligible servers only.

        Returns ``None`` when no server is eligible. Does not count the session: the caller does that
        (``pool.session_started``) once the session is really admitted.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


ALGORITHMS: dict[str, type[Algorithm]] = {}
"""Algorithm classes by configuration name."""

_AlgorithmClass = TypeVar("_AlgorithmClass", bound=type[Algorithm])


def register(cls: _AlgorithmClass) -> _AlgorithmClass:
    """Class decorator: make ``cls`` available to :func:`make_algorithm` under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute 'name' to be registered")
    existing = ALGORITHMS.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(f"algorithm name {name!r} is already registered by {existing.__name__}")
    ALGORITHMS[name] = cls
    return cls


def algorithm_names() -> list[str]:
    """The registered algorithm names, sorted."""
    return sorted(ALGORITHMS)


def make_algorithm(name: str, **params: Any) -> Algorithm:
    """Build the algorithm registered as ``name`` with keyword ``params``.

    Raises ValueError for an unknown name (listing the valid ones) or parameters the algorithm does not take.
    """
    cls = ALGORITHMS.get(name)
    if cls is None:
        raise ValueError(f"unknown load balancing algorithm {name!r}; valid: {', '.join(algorithm_names())}")
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for algorithm {name!r}: {exc}") from None


def _fewer_sessions(a: Server, b: Server) -> bool:
    return a.active < b.active


def _fewer_sessions_per_weight(a: Server, b: Server) -> bool:
    """``a.active / a.weight < b.active / b.weight`` without division, as IPVS compares."""
    return a.active * b.weight < b.active * a.weight


def _shorter_expected_delay(a: Server, b: Server) -> bool:
    """``(a.active + 1) / a.weight < (b.active + 1) / b.weight`` without division, as IPVS compares."""
    return (a.active + 1) * b.weight < (b.active + 1) * a.weight


class _Rotating(Algorithm):
    """Base for algorithms that rotate through servers by index, remembering the last one chosen."""

    def __init__(self) -> None:
        self._last = -1

    def _chosen(self, server: Server) -> Server:
        self._last = server.index
        return server

    def _least(self, pool: ServerPool, better: Callable[[Server, Server], bool]) -> Server | None:
        """The eligible server no other beats (``better(a, b)``: ``a`` beats ``b``); ties go to the first in
        rotation after the last one chosen."""
        servers = pool.eligible()
        if not servers:
            return None
        n = len(servers)
        start = _first_after(servers, self._last)
        best = servers[start]
        for i in range(1, n):
            server = servers[(start + i) % n]
            if better(server, best):
                best = server
        return self._chosen(best)


@register
class RoundRobin(_Rotating):
    """Each eligible server in turn, by index. N servers and k*N sessions give k each."""

    name = "round_robin"

    def choose(self, pool: ServerPool, key: FlowKey, now: float) -> Server | None:
        server = pool.next_eligible(self._last)
        if server is not None:
            self._last = server.index
        return server


@register
class WeightedRoundRobin(Algorithm):
    """Smooth weighted round robin (nginx): weights 1:2:3 give exactly 1, 2, 3 of every 6 sessions.

    Each choice adds every eligible server's weight to its current weight, picks the highest (first by
    index on a tie) and subtracts the total from it. Picks of a server are spread evenly through the cycle
    instead of coming in bursts. Current weights reset when the pool's membership, status or weights change.
    """

    name = "weighted_round_robin"

    def __init__(self) -> None:
        self._current: dict[int, int] = {}
        self._version = -1

    def choose(self, pool: ServerPool, key: FlowKey, now: float) -> Server | None:
        servers = pool.eligible()
        if not servers:
            return None
        if pool.version != self._version:
            # Stale credit from an old configuration would distort the new ratios, so start over.
            self._current.clear()
            self._version = pool.version
        current = self._current
        total = 0
        best: Server | None = None
        best_current = 0
        for server in servers:
            value = current.get(server.index, 0) + server.weight
            current[server.index] = value
            total += server.weight
            if best is None or value > best_current:
                best, best_current = server, value
        assert best is not None
        current[best.index] = best_current - total
        return best


@register
class LeastConnections(_Rotating):
    """The eligible server with the fewest active sessions; ties rotate instead of favouring the first."""

    name = "least_connections"

    def choose(self, pool: ServerPool, key: FlowKey, now: float) -> Server | None:
        return self._least(pool, _fewer_sessions)


@register
class WeightedLeastConnections(_Rotating):
    """The eligible server with the fewest active sessions per unit of weight (IPVS ``wlc``).

    Compared as IPVS does, without division: ``a`` beats ``b`` when ``a.active * b.weight <
    b.active * a.weight``. Ties rotate.
    """

    name = "weighted_least_connections"

    def choose(self, pool: ServerPool, key: FlowKey, now: float) -> Server | None:
        return self._least(pool, _fewer_sessions_per_weight)


@register
class ResponseTime(_Rotating):
    """The eligible server with the smallest expected wait: ``rt_ewma * (active + 1) / weight``.

    A server with no response time sample yet is chosen before any measured one (the least loaded of them
    first), so every server gets measured instead of an early fast sample locking the others out. Ties
    rotate.
    """

    name = "response_time"

    def choose(self, pool: ServerPool, key: FlowKey, now: float) -> Server | None:
        servers = pool.eligible()
        if not servers:
            return None
        n = len(servers)
        start = _first_after(servers, self._last)
        best: Server | None = None
        best_unmeasured = False
        best_score = math.inf
        for i in range(n):
            server = servers[(start + i) % n]
            rt = server.rt_ewma
            if rt is None:
                score = server.active / server.weight
                if not best_unmeasured or score < best_score:
                    best, best_unmeasured, best_score = server, True, score
            elif not best_unmeasured:
                score = rt * (server.active + 1) / server.weight
                if best is None or score < best_score:
                    best, best_score = server, score
        assert best is not None
        return self._chosen(best)


@register
class ShortestExpectedDelay(_Rotating):
    """IPVS ``sed``: the eligible server with the smallest ``(active + 1) / weight``; ties rotate.

    The ``+ 1`` counts the new session itself: it is the delay the new session expects on a server whose
    weight is its capacity. Compared with ``weighted_least_connections`` (``active / weight``) it differs when
    servers are idle or nearly so: with 0 sessions everywhere wlc picks whichever comes next in rotation, even a
    weight-1 server, while sed picks the largest weight, where the session is served fastest. The study measured
    a lower p99 than wlc with unequal capacities, and the same choice with equal weights.
    """

    name = "shortest_expected_delay"

    def choose(self, pool: ServerPool, key: FlowKey, now: float) -> Server | None:
        return self._least(pool, _shorter_expected_delay)


class _ServiceList:
    """The in-service servers (UP, weight > 0) of a pool, rebuilt only when the pool's version changes."""

    def __init__(self) -> None:
        self.pool: ServerPool | None = None
        self.version = -1
        self.members: list[Server] = []

    def refresh(self, pool: ServerPool) -> bool:
        """Bring the list up to date; True if it was rebuilt."""
        if pool is self.pool and pool.version == self.version:
            return False
        self.pool, self.version = pool, pool.version
        self.members = [server for server in pool if server.in_service]
        return True


@register
class SourceHash(Algorithm):
    """The same client address goes to the same server (persistence without session state).

    The client address is hashed onto the list of in-service servers (UP, weight > 0), which changes only
    with membership, status or weight. A client whose server is momentarily full or overloaded goes to the
    next eligible server in the list, so other clients keep their mapping. Weights only gate membership here;
    ``maglev`` hashes with weights and with minimal disruption when servers come and go.
    """

    keyed = True

    name = "source_hash"

    def __init__(self) -> None:
        self._service = _ServiceList()

    def choose(self, pool: ServerPool, key: FlowKey, now: float) -> Server | None:
        self._service.refresh(pool)
        members = self._service.members
        n = len(members)
        if n == 0:
            return None
        start = _hash64(key.src, b"mplslb-source") % n
        for i in range(n):
            server = members[(start + i) % n]
            if server.eligible:
                return server
        return None


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


@register
class Maglev(Algorithm):
    """Maglev consistent hashing (Eisenbud et al., NSDI 2016) with Katran's weighted table population.

    Every in-service server (UP, weight > 0) gets a preference permutation of the ``table_size`` slots
    (prime) from two independent hashes of its name: ``offset`` and ``skip``. Servers take turns claiming
    their next preferred free slot; a server of weight w takes a turn in w of every ``max weight`` rounds,
    so table shares follow the weights. The flow's 5-tuple hash indexes the table. Removing one of N servers
    moves only about 1/N of the keys, and almost only those of the removed server.

    Servers are ordered by name before population, so the table depends only on the set of (name, weight),
    not on configuration order. The table is rebuilt only when the pool's version changes. If the server a
    key maps to is not eligible (full or overloaded), the following slots are tried until an eligible one is
    found: the overflow spreads like the table itself. With more in-service servers than slots, the servers
    that get no slot take no sessions (keep ``table_size`` well above 100 x servers).
    """

    keyed = True

    name = "maglev"

    def __init__(self, *, table_size: int = 65537) -> None:
        if isinstance(table_size, bool) or not isinstance(table_size, int) or not _is_prime(table_size):
            raise ValueError(f"maglev table_size must be a prime number, got {table_size!r}")
        self.table_size = table_size
        self._service = _ServiceList()
        self._table = array("i", [-1]) * table_size

    @property
    def table(self) -> array[int]:
        """The lookup table: positions into :attr:`members`, or -1 where empty (only with no servers)."""
        return self._table

    @property
    def members(self) -> list[Server]:
        """The servers in the table, in population (name) order."""
        return self._service.members

    def _rebuild(self) -> None:
        size = self.table_size
        members = self._service.members = sorted(self._service.members, key=attrgetter("name"))
        table = array("i", [-1]) * size
        self._table = table
        n = len(members)
        if n == 0:
            return
        weights = [server.weight for server in members]
        max_weight = max(weights)
        # Position of each server's next preference: offset + j * skip (mod size) walked incrementally.
        cursor: list[int] = []
        skips: list[int] = []
        for server in members:
            name = server.name.encode()
            cursor.append(_hash64(name, b"maglev-offset") % size)
            skips.append(_hash64(name, b"maglev-skip") % (size - 1) + 1)
        credit = [0] * n
        filled = 0
        while True:
            for i in range(n):
                credit[i] += weights[i]
                if credit[i] < max_weight:
                    continue
                credit[i] -= max_weight
                slot, skip = cursor[i], skips[i]
                # skip is coprime with the prime size, so the walk visits every slot and finds a free one.
                while table[slot] >= 0:
                    slot += skip
                    if slot >= size:
                        slot -= size
                table[slot] = i
                slot += skip
                cursor[i] = slot - size if slot >= size else slot
                filled += 1
                if filled == size:
                    return

    def choose(self, pool: ServerPool, key: FlowKey, now: float) -> Server | None:
        if self._service.refresh(pool):
            self._rebuild()
        members = self._service.members
        if not members:
            return None
        table = self._table
        size = self.table_size
        slot = flow_hash(key) % size
        server = members[table[slot]]
        if server.eligible:
            return server
        if not any(member.eligible for member in members):
            return None
        while True:
            slot += 1
            if slot == size:
                slot = 0
            server = members[table[slot]]
            if server.eligible:
                return server


@register
class PowerOfTwo(Algorithm):
    """Power of two random choices: the less loaded (active per weight) of two random eligible servers.

    The PRNG is ``random.Random(seed)``, so a run is reproducible.
    """

    name = "power_of_two"

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed
        self._rng = random.Random(seed)

    def choose(self, pool: ServerPool, key: FlowKey, now: float) -> Server | None:
        servers = pool.eligible()
        n = len(servers)
        if n <= 1:
            return servers[0] if servers else None
        i = self._rng.randrange(n)
        j = self._rng.randrange(n - 1)
        if j >= i:
            j += 1
        a, b = servers[i], servers[j]
        return b if b.active * a.weight < a.active * b.weight else a

    def __repr__(self) -> str:
        return f"PowerOfTwo(seed={self.seed})"
