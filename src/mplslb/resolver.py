"""Finding the real servers' MAC addresses: ARP (RFC 826) for IPv4 servers, neighbour discovery (RFC 4861) for IPv6.

Theory of operation
-------------------
A server may be configured by its IP address alone; the balancer then learns the MAC address its labelled frames go
to from the server port it sits behind. The :class:`Resolver` keeps one :class:`Neighbor` per such server, sans-I/O:
time is passed in, frames come in through :meth:`Resolver.receive` and go out as bytes from
:meth:`Resolver.on_timer`, and every change of a server's MAC is returned as a :class:`MacChange` for the balancer
to act on (a server with no MAC takes no new session; the sessions of a server whose MAC changed follow it). Each
neighbour moves as::

    INCOMPLETE --reply--> REACHABLE --reachable time passed, or a failure suspected--> STALE --reply--> REACHABLE
    INCOMPLETE, STALE --probes unanswered--> FAILED --reply--> REACHABLE

* INCOMPLETE: no MAC yet (status ``resolving``); a probe every ``retrans`` seconds, ``probes`` of them.
* REACHABLE: the MAC was confirmed within ``reachable`` seconds.
* STALE: the MAC is still used while it is confirmed again (the same probes as INCOMPLETE). Entered when the
  reachable time runs out (periodic re-resolution) and when the balancer suspects the server (:meth:`suspect`:
  passive or active health failed), since a server that stopped answering may have moved to another MAC.
* FAILED: nothing answered; the MAC is dropped (status ``unresolved``) and a probe is sent again after a backoff
  that doubles from ``retry_min`` to ``retry_max``.

A probe is an ARP request broadcast from the port (sender address: the port's own IPv4 address when configured,
else 0.0.0.0 as in an RFC 5227 probe, which a host still answers) or a neighbour solicitation to the server's
solicited-node multicast group from the port's EUI-64 link-local address. Probes are never unicast to the known
MAC: a server that moved to a new MAC answers a broadcast, so one probe finds it.

Anything a neighbour says about itself is taken, in any state (RFC 826's merge, RFC 4861's override): its replies,
its gratuitous ARP or unsolicited advertisement, its own requests. So a server whose interface changed its MAC is
re-learned from its announcement at once, or from the next probe. Like ARP itself, this trusts the server segment:
a host there that claims a server's address gets its sessions.

A well-formed ARP frame or neighbour discovery message that binds the address of a server being resolved to a MAC
is taken here (:meth:`receive` returns a list); anything else (about other hosts, malformed, not ARP or ND at all)
returns None and goes on to the rest of the balancer, which drops it under its reason as it always did.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from mplslb.neighbors import arp_request, heard, neighbor_solicitation

Frames = list[tuple[int, bytes]]
_UNSPECIFIED4 = bytes(4)
_HEAP_SLACK = 4  # the timer heap is rebuilt when it holds this many entries per neighbour


class NeighborState(StrEnum):
    INCOMPLETE = "incomplete"
    REACHABLE = "reachable"
    STALE = "stale"
    FAILED = "failed"


@dataclass(frozen=True)
class ResolverTimers:
    """How the resolver paces itself (seconds): RFC 4861's RETRANS_TIMER, MAX_MULTICAST_SOLICIT and
    REACHABLE_TIME by default, and the backoff of a failed neighbour's retries."""

    retrans: float = 1.0
    probes: int = 3
    reachable: float = 30.0
    retry_min: float = 1.0
    retry_max: float = 30.0

    def __post_init__(self) -> None:
        if min(self.retrans, self.reachable, self.retry_min) <= 0 or self.retry_min > self.retry_max:
            raise ValueError("resolver times must be > 0, with retry_min <= retry_max")
        if self.probes < 1:
            raise ValueError("probes must be >= 1")


class MacChange(NamedTuple):
    """Server ``name``'s MAC went from ``old`` to ``new`` (either may be b"": not known)."""

    name: str
    old: bytes
    new: bytes


class Neighbor:
    """One server being resolved: where it is, what is known of it, and when the resolver next acts on it."""

    __slots__ = ("address", "backoff", "changes", "deadline", "mac", "name", "port_id", "probes_sent", "state",
                 "version")  # fmt: skip

    def __init__(self, name: str, address: bytes, port_id: int, now: float, backoff: float) -> None:
        self.name, self.address, self.port_id = name, address, port_id
        self.state = NeighborState.INCOMPLETE
        self.mac = b""
        self.probes_sent = 0
        self.deadline = now  # the first probe goes out at once
        self.backoff = backoff
        self.changes = 0  # times a known MAC was replaced by another
        self.version = 0  # bumped on every reschedule: older heap entries are stale

    @property
    def status(self) -> str:
        """What ``status`` shows for the server: ``resolving``, ``unresolved``, or the state of a known MAC."""
        if self.state is NeighborState.INCOMPLETE:
            return "resolving"
        if self.state is NeighborState.FAILED:
            return "unresolved"
        return str(self.state)


class Resolver:
    """The MAC addresses of servers configured by IP address, per server port.

    ``ports`` maps each server port id to ``(port MAC, port IPv4 address or b"")``.
    """

    def __init__(self, ports: Mapping[int, tuple[bytes, bytes]], timers: ResolverTimers | None = None) -> None:
        self.ports = dict(ports)
        self.timers = timers or ResolverTimers()
        self.neighbors: dict[str, Neighbor] = {}
        self._by_place: dict[tuple[int, bytes], Neighbor] = {}
        self._heap: list[tuple[float, int, str]] = []
        self.probes_sent = 0
        self.replies = 0  # frames that told a resolved server's MAC

    # -- membership ----------------------------------------------------------------------------------------------
    def add(self, name: str, address: bytes, port_id: int, now: float) -> Neighbor:
        """Start resolving server ``name`` at ``address`` behind ``port_id``; the first probe is due ``now``."""
        if port_id not in self.ports:
            raise ValueError(f"server {name!r}: port {port_id} is not a server port the resolver can probe from")
        if len(address) not in (4, 16):
            raise ValueError(f"server {name!r}: address must be 4 or 16 bytes")
        if name in self.neighbors:
            raise ValueError(f"server {name!r} is already being resolved")
        if (port_id, address) in self._by_place:
            raise ValueError(f"server {name!r}: another server has the address on port {port_id}")
        neighbor = Neighbor(name, bytes(address), port_id, now, self.timers.retry_min)
        self.neighbors[name] = neighbor
        self._by_place[(port_id, neighbor.address)] = neighbor
        self._schedule(neighbor, now)
        return neighbor

    def remove(self, name: str) -> None:
        neighbor = self.neighbors.pop(name, None)
        if neighbor is not None:
            del self._by_place[(neighbor.port_id, neighbor.address)]
            neighbor.version += 1

    def get(self, name: str) -> Neighbor | None:
        return self.neighbors.get(name)

    # -- what the balancer tells -----------------------------------------------------------------------------------
    def suspect(self, name: str, now: float) -> None:
        """Something suggests server ``name`` may have moved (its health failed): confirm its MAC now."""
        neighbor = self.neighbors.get(name)
        if neighbor is None:
            return
        if neighbor.state is NeighborState.REACHABLE:
            neighbor.state = NeighborState.STALE
            neighbor.probes_sent = 0
            self._schedule(neighbor, now)
        elif neighbor.state is NeighborState.FAILED:
            neighbor.backoff = self.timers.retry_min
            self._schedule(neighbor, now)

    def recall(self, name: str, mac: bytes, now: float) -> bool:
        """Server ``name``'s MAC as a previous process knew it (a kept state's labels hold it): used at once as
        STALE, confirmed by probes from ``now`` (dropped if none is answered). False if ``name`` is not being
        resolved or already has a MAC."""
        neighbor = self.neighbors.get(name)
        if neighbor is None or neighbor.mac or len(mac) != 6:
            return False
        neighbor.mac = bytes(mac)
        neighbor.state = NeighborState.STALE
        neighbor.probes_sent = 0
        self._schedule(neighbor, now)
        return True

    # -- frames ----------------------------------------------------------------------------------------------------
    def receive(self, port_id: int, frame: bytes | memoryview, now: float) -> list[MacChange] | None:
        """Take an ARP or neighbour discovery frame that arrived on server port ``port_id``; returns the MAC
        changes it caused (often none). None: not such a frame about a server being resolved, the caller handles
        it."""
        binding = heard(frame)
        neighbor = self._by_place.get((port_id, binding[0])) if binding is not None else None
        if neighbor is None or binding is None:
            return None
        self.replies += 1
        return self._learn(neighbor, binding[1], now)

    def _learn(self, neighbor: Neighbor, mac: bytes, now: float) -> list[MacChange]:
        old = neighbor.mac
        neighbor.mac = mac
        neighbor.state = NeighborState.REACHABLE
        neighbor.probes_sent = 0
        neighbor.backoff = self.timers.retry_min
        self._schedule(neighbor, now + self.timers.reachable)
        if old == mac:
            return []
        if old:
            neighbor.changes += 1
        return [MacChange(neighbor.name, old, mac)]

    # -- timers ----------------------------------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap:
            deadline, version, name = heap[0]
            neighbor = self.neighbors.get(name)
            if neighbor is not None and neighbor.version == version:
                return deadline
            heapq.heappop(heap)
        return None

    def on_timer(self, now: float) -> tuple[Frames, list[MacChange]]:
        """Probe the neighbours that are due; returns the probes to send and the MACs dropped."""
        out: Frames = []
        changes: list[MacChange] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, version, name = heapq.heappop(heap)
            neighbor = self.neighbors.get(name)
            if neighbor is None or neighbor.version != version:
                continue
            self._due(neighbor, now, out, changes)
        return out, changes

    def _due(self, neighbor: Neighbor, now: float, out: Frames, changes: list[MacChange]) -> None:
        timers = self.timers
        if neighbor.state is NeighborState.REACHABLE:  # periodic re-resolution
            neighbor.state = NeighborState.STALE
            neighbor.probes_sent = 0
        if neighbor.state is NeighborState.FAILED:
            out.append(self._probe(neighbor))
            self._schedule(neighbor, now + neighbor.backoff)
            neighbor.backoff = min(neighbor.backoff * 2, timers.retry_max)
            return
        if neighbor.probes_sent < timers.probes:
            out.append(self._probe(neighbor))
            neighbor.probes_sent += 1
            self._schedule(neighbor, now + timers.retrans)
            return
        # INCOMPLETE or STALE with every probe unanswered.
        neighbor.state = NeighborState.FAILED
        if neighbor.mac:
            changes.append(MacChange(neighbor.name, neighbor.mac, b""))
            neighbor.mac = b""
        neighbor.backoff = timers.retry_min
        self._schedule(neighbor, now + neighbor.backoff)
        neighbor.backoff = min(neighbor.backoff * 2, timers.retry_max)

    def _probe(self, neighbor: Neighbor) -> tuple[int, bytes]:
        port_mac, port_ip = self.ports[neighbor.port_id]
        self.probes_sent += 1
        if len(neighbor.address) == 4:
            return neighbor.port_id, arp_request(port_mac, port_ip or _UNSPECIFIED4, neighbor.address)
        return neighbor.port_id, neighbor_solicitation(port_mac, neighbor.address)

    def _schedule(self, neighbor: Neighbor, when: float) -> None:
        neighbor.version += 1
        neighbor.deadline = when
        heapq.heappush(self._heap, (when, neighbor.version, neighbor.name))
        if len(self._heap) > _HEAP_SLACK * (len(self.neighbors) + 1):  # stale entries pile up: keep the live ones
            self._heap = [(n.deadline, n.version, n.name) for n in self.neighbors.values()]
            heapq.heapify(self._heap)


__all__ = ["MacChange", "Neighbor", "NeighborState", "Resolver", "ResolverTimers"]
