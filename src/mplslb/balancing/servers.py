"""The server configuration/state managing unit (claim 4): what servers exist and whether they take sessions.

Theory of operation
-------------------
A :class:`ServerConfig` is the frozen, validated description of a server from the configuration. The pool
wraps each in a mutable :class:`Server` that carries its live state: a status, a current weight, session
counts, passive health and a response time estimate. Status moves as::

    UP <--drain()/mark_up()--> DRAINING
    UP, DRAINING --mark_down() or passive health's verdict--> DOWN --mark_up()--> UP
    UP, DRAINING, DOWN --retire()--> REMOVING --last session ends--> (out of the pool)

Passive health judges what the server answered, never what it did not see: ``fail_threshold`` consecutive
failures are needed, and unanswered SYNs count only while the server has answered none of its new sessions for
``passive_window`` seconds (a SYN flood or an overloaded path loses SYNs of a server that still answers the rest).
When an active check runs, unanswered SYNs only make the server suspect and the check decides.

A DOWN server carries a :class:`DownReason`, and the reason decides what may bring it back: an operator's
``admin`` down stays until an operator acts, a ``removed`` server is gone, and a down for its health (the active
check's ``health_check``, passive health's ``no_reply`` and ``refused``) is lifted when the active check passes
(:attr:`DownReason.lifted_by_check`). Acting on health verdicts is :mod:`mplslb.balancing.health_policy`.

Removing a server the gentle way (:meth:`ServerPool.retire`) is a drain that ends in removal: the server is
*leaving*, takes no new session, and leaves the pool when its last session ends (at once if it has none). Nothing
brings a leaving server back: a passing health check does not, and a DOWN on the way out (its sessions then
interrupted) only speeds its exit. :meth:`ServerPool.remove` takes a server out at once.

DRAINING, REMOVING and DOWN servers keep the sessions they already serve (those are switched on their labels and never
come back here); they only stop receiving new ones. A server takes a new session when it is *eligible*: UP,
weight > 0, below its own session limit, and not overloaded (its response time estimate above the pool's
``rt_limit``). Refusing new sessions to a slow server protects the sessions it is already serving (claim 4,
service acceptance control).

Response time is an exponentially weighted moving average of the samples fed in by whoever measures them
(the session manager times SYN to SYN-ACK and request to first response byte; health probes can report
theirs too). Probes matter for an overloaded server: with no new sessions it would otherwise never get a
fresh sample. Coming back UP from DOWN forgets the old estimate, which described a server that failed.

:attr:`ServerPool.version` grows on every change of membership, status, weight or MAC, so algorithms can rebuild
derived structures (a Maglev table) lazily. Session counts and overload change per session and do not bump
it: algorithms read eligibility live.

The unit is sans-I/O: nothing here reads a clock or touches the network.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["DownReason", "Server", "ServerConfig", "ServerPool", "ServerStatus"]


class ServerStatus(StrEnum):
    """Administrative/health status of a server."""

    UP = "up"
    DRAINING = "draining"
    DOWN = "down"
    REMOVING = "removing"  # draining, then out of the pool when its last session ends


class DownReason(StrEnum):
    """Why a server is DOWN; the value is what snapshots, metrics and tables show.

    ``ADMIN``: an operator took it down. ``HEALTH_CHECK``: its active health check failed. ``NO_REPLY`` and
    ``REFUSED``: passive health, its SYNs went unanswered or were answered with RST. ``REMOVED``: it left the pool.
    """

    ADMIN = "admin"
    HEALTH_CHECK = "health_check"
    NO_REPLY = "no_reply"
    REFUSED = "refused"
    REMOVED = "removed"

    @property
    def passive(self) -> bool:
        """The balancer's passive health took the server down, from what its sessions showed."""
        return self is DownReason.NO_REPLY or self is DownReason.REFUSED

    @property
    def lifted_by_check(self) -> bool:
        """A passing active health check brings the server back: it is down for its health (the check's own
        verdict, or passive health), not by an operator's decision or a removal."""
        return self is DownReason.HEALTH_CHECK or self.passive


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """A server as configured.

    ``address`` is the server's real IP address (4 or 16 bytes), used for health checks and display; packets
    reach it by ``mac`` on the balancer port ``port_id``. An empty ``mac`` means the balancer resolves it from the
    address (:mod:`mplslb.resolver`). ``max_sessions`` 0 means no per-server limit.
    """

    name: str
    address: bytes
    mac: bytes
    port_id: int
    weight: int = 1
    max_sessions: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"server name must be a non-empty string, got {self.name!r}")
        where = f"server {self.name!r}"
        if not isinstance(self.address, bytes) or len(self.address) not in (4, 16):
            raise ValueError(f"{where}: address must be 4 (IPv4) or 16 (IPv6) bytes, got {self.address!r}")
        if not isinstance(self.mac, bytes) or len(self.mac) not in (0, 6):
            raise ValueError(f"{where}: mac must be 6 bytes (or empty: resolved), got {self.mac!r}")
        for field_name in ("port_id", "weight", "max_sessions"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}: {field_name} must be an integer >= 0, got {value!r}")


class Server:
    """The live state of one configured server. Created by :class:`ServerPool`, changed through it."""

    __slots__ = (
        "_rt_limit",
        "active",
        "answered_at",
        "config",
        "down_reason",
        "failures",
        "index",
        "leaving",
        "mac",
        "refused",
        "rt_ewma",
        "rt_samples",
        "status",
        "suspected",
        "total",
        "weight",
    )

    def __init__(self, config: ServerConfig, index: int, *, rt_limit: float = 0.0) -> None:
        self.config = config
        self.index = index
        self.status = ServerStatus.UP
        self.weight = config.weight
        self.active = 0
        self.total = 0
        self.refused = 0
        self.failures = 0
        self.answered_at = -math.inf  # when passive health last saw the server answer a new session
        self.suspected = 0  # passive failures left to the active health check to confirm
        self.rt_ewma: float | None = None
        self.rt_samples = 0
        self.down_reason: DownReason | None = None
        self.leaving = False  # retired: leaves the pool when its last session ends
        #: The MAC its frames go to now: the configured one, or as resolved (b"": not known, no new sessions).
        self.mac = config.mac
        self._rt_limit = rt_limit

    @property
    def name(self) -> str:
        """The configured name."""
        return self.config.name

    @property
    def overloaded(self) -> bool:
        """True if the response time estimate exceeds the pool's ``rt_limit`` (when one is set)."""
        rt = self.rt_ewma
        return self._rt_limit > 0 and rt is not None and rt > self._rt_limit

    @property
    def full(self) -> bool:
        """True if the server has reached its own session limit."""
        limit = self.config.max_sessions
        return limit != 0 and self.active >= limit

    @property
    def in_service(self) -> bool:
        """UP with a weight > 0 and a known MAC: meant to take sessions, even if momentarily full or overloaded."""
        return self.status is ServerStatus.UP and self.weight > 0 and bool(self.mac)

    @property
    def eligible(self) -> bool:
        """True if the server may take a new session now: in service, not :attr:`full`, not :attr:`overloaded`
        (both read here without their own calls: this is asked of every server for every new session)."""
        if self.status is not ServerStatus.UP or self.weight <= 0 or not self.mac:
            return False
        limit = self.config.max_sessions
        if limit != 0 and self.active >= limit:
            return False
        rt = self.rt_ewma
        return not (self._rt_limit > 0 and rt is not None and rt > self._rt_limit)

    def __repr__(self) -> str:
        return (
            f"Server({self.config.name!r}, index={self.index}, status={self.status.value}, "
            f"weight={self.weight}, active={self.active})"
        )


class ServerPool:
    """The set of servers behind the balancer and their live state.

    ``fail_threshold`` consecutive passive failures take a server DOWN, but unanswered SYNs (``NO_REPLY``) only
    when the server has answered none of its new sessions for ``passive_window`` seconds. ``rt_alpha`` is the
    EWMA smoothing factor in (0, 1]. ``rt_limit`` > 0 (seconds) stops new sessions to a server whose estimate
    exceeds it.
    """

    def __init__(
        self,
        configs: Iterable[ServerConfig] = (),
        *,
        fail_threshold: int = 3,
        rt_alpha: float = 0.2,
        rt_limit: float = 0.0,
        passive_window: float = 10.0,
    ) -> None:
        if not (math.isfinite(passive_window) and passive_window >= 0):
            raise ValueError(f"passive_window must be a finite number of seconds >= 0, got {passive_window!r}")
        self.passive_window = passive_window
        if isinstance(fail_threshold, bool) or not isinstance(fail_threshold, int) or fail_threshold < 1:
            raise ValueError(f"fail_threshold must be an integer >= 1, got {fail_threshold!r}")
        if not (0.0 < rt_alpha <= 1.0):
            raise ValueError(f"rt_alpha must be in (0, 1], got {rt_alpha!r}")
        if not (math.isfinite(rt_limit) and rt_limit >= 0):
            raise ValueError(f"rt_limit must be a finite number of seconds >= 0 (0 = off), got {rt_limit!r}")
        self.fail_threshold = fail_threshold
        self.rt_alpha = rt_alpha
        self._rt_limit = rt_limit
        self.version = 0
        # Kept in index order (indices only grow), which is the order algorithms rotate in.
        self._servers: list[Server] = []
        self._indices: list[int] = []  # each server's index, in the same order: what next_eligible bisects
        self._by_name: dict[str, Server] = {}
        self._next_index = 0
        #: Told of every change of a server's status (the driver logs it); the core itself never logs.
        self.on_status: Callable[[Server], None] | None = None
        for config in configs:
            self.add(config)

    # -- membership ---------------------------------------------------------------------------------------

    def add(self, config: ServerConfig) -> Server:
        """Add a server (UP, with its configured weight). Raises ValueError if the name is taken."""
        if config.name in self._by_name:
            raise ValueError(f"duplicate server name {config.name!r}")
        server = Server(config, self._next_index, rt_limit=self._rt_limit)
        # Indices are never reused, so an index seen in a session record never names a different server.
        self._next_index += 1
        self._servers.append(server)
        self._indices.append(server.index)
        self._by_name[config.name] = server
        self.version += 1
        return server

    def remove(self, name: str) -> Server:
        """Remove a server from the pool; it is marked DOWN (its live sessions may still end on it)."""
        server = self.get(name)
        del self._by_name[name]
        at = self._servers.index(server)
        del self._servers[at], self._indices[at]
        if server.status is not ServerStatus.DOWN:
            server.status = ServerStatus.DOWN
            server.down_reason = DownReason.REMOVED
            self._told(server)
        self.version += 1
        return server

    def retire(self, name: str) -> bool:
        """Remove a server once its sessions are over: it takes no new session (status REMOVING, or DOWN if it is)
        and leaves the pool when its last session ends. True if it left at once (it had no session)."""
        server = self.get(name)
        if server.active == 0:
            self.remove(name)
            return True
        if not server.leaving:
            server.leaving = True
            if server.status is not ServerStatus.DOWN:
                server.status = ServerStatus.REMOVING
                self._told(server)
            self.version += 1
        return False

    def update(self, config: ServerConfig) -> bool:
        """Take a server's new weight and session limit (``config`` names a server in the pool and keeps its
        address, MAC and port). True if anything changed."""
        server = self.get(config.name)
        old = server.config
        if (old.address, old.mac, old.port_id) != (config.address, config.mac, config.port_id):
            raise ValueError(f"server {config.name!r}: address, mac and port cannot change in place")
        changed = old != config or server.weight != config.weight
        server.config = config
        self.set_weight(config.name, config.weight)
        return changed

    def get(self, name: str) -> Server:
        """The server called ``name``. Raises KeyError naming it if there is none."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no server named {name!r}") from None

    @property
    def servers(self) -> list[Server]:
        """All servers, in a stable order (the order they were added)."""
        return list(self._servers)

    def eligible(self) -> list[Server]:
        """The servers that may take a new session now, in stable order."""
        return [server for server in self._servers if server.eligible]

    def next_eligible(self, after: int) -> Server | None:
        """The first server that may take a new session now, in index order from the first whose index is above
        ``after`` and round to the start; None when none may. Asks only as many servers as it passes over."""
        servers = self._servers
        n = len(servers)
        start = bisect.bisect_right(self._indices, after)
        for at in range(start, start + n):
            server = servers[at - n if at >= n else at]
            if server.eligible:
                return server
        return None

    def __len__(self) -> int:
        return len(self._servers)

    def __iter__(self) -> Iterator[Server]:
        return iter(self._servers)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def rt_limit(self) -> float:
        """The response time (seconds) above which a server takes no new session; 0: no limit."""
        return self._rt_limit

    # -- administration -----------------------------------------------------------------------------------

    def set_weight(self, name: str, weight: int) -> None:
        """Set the current weight; 0 keeps the server's sessions but sends it no new ones."""
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise ValueError(f"weight must be an integer >= 0, got {weight!r}")
        server = self.get(name)
        if server.weight != weight:
            server.weight = weight
            self.version += 1

    def set_health_settings(self, *, fail_threshold: int, rt_alpha: float, rt_limit: float) -> None:
        """Change the passive-health threshold, the response-time smoothing and the overload limit (as the
        constructor checks them); every server, present and future, uses the new values."""
        probe = ServerPool(fail_threshold=fail_threshold, rt_alpha=rt_alpha, rt_limit=rt_limit)
        self.fail_threshold, self.rt_alpha, self._rt_limit = probe.fail_threshold, probe.rt_alpha, probe._rt_limit
        for server in self._servers:
            server._rt_limit = rt_limit
        self.version += 1

    def set_mac(self, name: str, mac: bytes) -> None:
        """The MAC a server's frames go to now (as resolved; b"": unknown, so it takes no new session)."""
        server = self.get(name)
        if server.mac != mac:
            self.version += 1  # in or out of service, or where its frames go
        server.mac = mac

    def drain(self, name: str) -> bool:
        """Stop new sessions to an UP server while its existing ones finish. True if the status changed."""
        server = self.get(name)
        if server.status is not ServerStatus.UP:
            return False
        server.status = ServerStatus.DRAINING
        self.version += 1
        self._told(server)
        return True

    def mark_down(self, name: str, reason: DownReason) -> bool:
        """Take a server DOWN, recording why. True if the status changed."""
        return self._take_down(self.get(name), reason)

    def mark_up(self, name: str) -> bool:
        """Bring a DRAINING or DOWN server back UP. True if the status changed. A leaving server stays out."""
        server = self.get(name)
        if server.status is ServerStatus.UP or server.leaving:
            return False
        if server.status is ServerStatus.DOWN:
            # The old estimate and failure streak describe the server that failed, not the one coming back.
            server.rt_ewma = None
            server.rt_samples = 0
            server.failures = 0
            server.down_reason = None
        server.status = ServerStatus.UP
        self.version += 1
        self._told(server)
        return True

    def _take_down(self, server: Server, reason: DownReason) -> bool:
        if server.status is ServerStatus.DOWN:
            return False
        server.status = ServerStatus.DOWN
        server.down_reason = reason
        self.version += 1
        self._told(server)
        return True

    def _told(self, server: Server) -> None:
        if self.on_status is not None:
            self.on_status(server)

    # -- sessions and measurements ------------------------------------------------------------------------

    def session_started(self, server: Server) -> None:
        """Count a new session assigned to ``server``."""
        server.active += 1
        server.total += 1

    def session_ended(self, server: Server) -> None:
        """Count the end of one of ``server``'s sessions. Raises ValueError if it has none."""
        if server.active <= 0:
            raise ValueError(f"server {server.name!r} has no active session to end")
        server.active -= 1
        if server.leaving and server.active == 0 and self._by_name.get(server.name) is server:
            self.remove(server.name)

    def session_withdrawn(self, server: Server) -> None:
        """Take back a session counted by :meth:`session_started` that never began (a ticket given back unused)."""
        server.total -= 1
        self.session_ended(server)

    def session_resumed(self, server: Server) -> None:
        """Count again a session of ``server`` that was counted off as ending but went on."""
        server.active += 1

    def session_refused(self, server: Server) -> None:
        """Count a new session refused because ``server``, in service, was at its session limit or overloaded."""
        server.refused += 1

    def record_response_time(self, server: Server, seconds: float) -> None:
        """Feed one response time sample (seconds) into the server's EWMA; the first sample sets it."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"response time must be a finite number of seconds >= 0, got {seconds!r}")
        if server.rt_ewma is None:
            server.rt_ewma = float(seconds)
        else:
            server.rt_ewma += self.rt_alpha * (seconds - server.rt_ewma)
        server.rt_samples += 1

    def record_success(self, server: Server, now: float | None = None) -> None:
        """A session or probe succeeded (at ``now``: the server answered): the consecutive failure count starts
        over."""
        server.failures = 0
        if now is not None:
            server.answered_at = max(server.answered_at, now)

    def record_failure(
        self, server: Server, reason: DownReason, now: float | None = None, *, confirm: bool = False
    ) -> bool:
        """Passive health: count a failure (e.g. an unanswered SYN, reason ``NO_REPLY``).

        Returns True if this failure took the server DOWN: ``fail_threshold`` consecutive failures and, for
        ``NO_REPLY`` at ``now``, no answer to any new session for ``passive_window`` seconds (a server answering
        some of its SYNs is alive: the rest were lost to a flood or an overloaded path, not to the server). With
        ``confirm`` (an active health check runs) an unanswered SYN only makes the server suspect (counted in
        :attr:`Server.suspected`) and the check's verdict decides.
        """
        server.failures += 1
        if server.failures < self.fail_threshold:
            return False
        if reason is DownReason.NO_REPLY:
            if now is not None and now - server.answered_at < self.passive_window:
                return False
            if confirm:
                server.suspected += 1
                return False
        return self._take_down(server, reason)
