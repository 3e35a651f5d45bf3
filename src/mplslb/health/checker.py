"""Active health checks, as keepalived and HAProxy users know them: a probe per server every ``interval``,
``fall`` consecutive failures take it down, ``rise`` consecutive successes bring it back.

Theory of operation
-------------------
:class:`HealthChecker` is the sans-I/O core. Per server it keeps HAProxy's health counter and the verdict
(up/down). It says which probes are due (:meth:`~HealthChecker.due`), which in-flight probes have timed out
(:meth:`~HealthChecker.expired`) and when it next has work (:meth:`~HealthChecker.next_deadline`); a probe's
outcome goes in through :meth:`~HealthChecker.result`, which returns ``"down"`` or ``"up"`` when it flips the
verdict. Time is always passed in. Running the probes is :mod:`mplslb.health.probe`'s job; acting on a verdict
is the server state policy's (:mod:`mplslb.balancing.health_policy`).

The health counter (HAProxy's)
------------------------------
``health`` runs from 0 to ``rise + fall - 1``; the server is up when ``health >= rise``. A success adds one and,
once ``rise`` is reached, jumps to the top; a failure takes one off and, below ``rise``, drops to 0 (down). From
the top it takes ``fall`` consecutive failures to go down; from 0, ``rise`` consecutive successes to come up; a
single result of the other kind in between starts the count over. That is exactly "``fall`` consecutive
failures / ``rise`` consecutive successes".

The starting state is HAProxy's ``init-state`` (:attr:`HealthCheckConfig.init_state`). The default, ``"up"``, is
what HAProxy does for configured servers: the server is up at once (so the balancer serves it from the first
second) but its health is not yet proven (``health = rise``), so the *first* failed probe takes it down, while
``"fully-up"`` needs ``fall`` failures like a server that has been passing for a while. ``"down"`` needs one
success, ``"fully-down"`` needs ``rise``.

Scheduling: a server's next probe starts ``interval`` after its previous one *started* (not after it ended), so a
dead server flips within ``(fall - 1) * interval + timeout`` of its first failed probe, and a probe is never
started while the previous one is still in flight.
"""

from __future__ import annotations

import math
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

__all__ = ["HealthCheckConfig", "HealthChecker", "HealthState", "Transition"]

Transition = Literal["up", "down"]

KINDS = ("tcp", "http")
INIT_STATES = ("up", "fully-up", "down", "fully-down")
_TOKEN_BAD = re.compile(r"[\x00-\x20\x7f]")


def _positive_seconds(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"health check: {name} must be a finite number of seconds > 0, got {value!r}")


def _count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"health check: {name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class HealthCheckConfig:
    """How to probe servers. ``kind`` is ``"tcp"`` (a connect) or ``"http"`` (a ``GET path`` whose status must
    be ``expect_status``, an int or a tuple of ints). ``host`` is the HTTP Host header (default: the server's
    address, with the port when it is not 80). ``interval``/``timeout`` are seconds; see the module docstring for
    ``rise``, ``fall`` and ``init_state``."""

    kind: str
    port: int = 80
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    path: str = "/"
    expect_status: int | tuple[int, ...] = 200
    host: str | None = None
    init_state: str = "up"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"health check: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ValueError(f"health check: port must be an integer in 1..65535, got {self.port!r}")
        _positive_seconds("interval", self.interval)
        _positive_seconds("timeout", self.timeout)
        _count("rise", self.rise)
        _count("fall", self.fall)
        if not isinstance(self.path, str) or not self.path.startswith("/") or _TOKEN_BAD.search(self.path):
            raise ValueError(f"health check: path must start with '/', without spaces or controls, got {self.path!r}")
        if not self.path.isascii():
            raise ValueError(f"health check: path must be ASCII (percent-encode the rest), got {self.path!r}")
        statuses = self.expect_status if isinstance(self.expect_status, tuple) else (self.expect_status,)
        if not statuses or any(isinstance(s, bool) or not isinstance(s, int) or not 100 <= s <= 599 for s in statuses):
            raise ValueError(
                f"health check: expect_status must be an HTTP status (100..599) or a non-empty tuple of them, "
                f"got {self.expect_status!r}"
            )
        if self.host is not None and (
            not isinstance(self.host, str) or not self.host or not self.host.isascii() or _TOKEN_BAD.search(self.host)
        ):
            raise ValueError(f"health check: host must be a non-empty ASCII name without spaces, got {self.host!r}")
        if self.init_state not in INIT_STATES:
            raise ValueError(
                f"health check: init_state must be one of {', '.join(INIT_STATES)}, got {self.init_state!r}"
            )

    @property
    def expected(self) -> frozenset[int]:
        """The HTTP statuses that pass."""
        statuses = self.expect_status if isinstance(self.expect_status, tuple) else (self.expect_status,)
        return frozenset(statuses)

    def http_request(self, address: bytes) -> bytes:
        """The probe's request for a server at ``address`` (4 or 16 bytes)."""
        host = self.host
        if host is None:
            literal = socket.inet_ntop(socket.AF_INET6 if len(address) == 16 else socket.AF_INET, address)
            host = f"[{literal}]" if len(address) == 16 else literal
            if self.port != 80:
                host = f"{host}:{self.port}"
        return f"GET {self.path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode("ascii")


@dataclass(frozen=True)
class HealthState:
    """One server's health as the checker sees it (a row for tables and metrics)."""

    name: str
    up: bool
    health: int
    rise: int
    fall: int
    successes: int  # consecutive
    failures: int  # consecutive
    checks: int
    failed_checks: int
    in_flight: bool
    last_ok: bool | None
    last_detail: str
    last_rtt: float | None
    last_change: float | None

    @property
    def label(self) -> str:
        """``up``, ``up 1/3 failed`` (going down), ``down``, ``down 1/2 passed`` (coming up), as HAProxy's
        "UP 1/3" / "DOWN 1/2"; ``up (unchecked)`` before the first result."""
        if self.up:
            if self.checks == 0:
                return "up (unchecked)"
            return f"up {self.failures}/{self.fall} failed" if self.failures else "up"
        return f"down {self.successes}/{self.rise} passed" if self.successes else "down"


class _Entry:
    __slots__ = (
        "checks",
        "failed_checks",
        "failures",
        "health",
        "in_flight",
        "last_change",
        "last_detail",
        "last_ok",
        "last_rtt",
        "next_due",
        "started_at",
        "successes",
        "up",
    )

    def __init__(self, health: int, up: bool, next_due: float) -> None:
        self.health = health
        self.up = up
        self.next_due = next_due
        self.in_flight = False
        self.started_at = 0.0
        self.successes = 0
        self.failures = 0
        self.checks = 0
        self.failed_checks = 0
        self.last_ok: bool | None = None
        self.last_detail = ""
        self.last_rtt: float | None = None
        self.last_change: float | None = None


class HealthChecker:
    """The sans-I/O health-check state machine for a set of servers sharing one :class:`HealthCheckConfig`.

    Servers added without a time (``now=None``) are due at the first :meth:`due` call, whatever its time; their
    :meth:`next_deadline` is ``-inf``, i.e. "already due".
    """

    def __init__(self, config: HealthCheckConfig, names: Iterable[str] = (), *, now: float | None = None) -> None:
        self.config = config
        self._entries: dict[str, _Entry] = {}
        for name in names:
            self.add(name, now)

    # -- membership --------------------------------------------------------------------------------------------
    def add(self, name: str, now: float | None = None) -> None:
        """Start checking ``name``, in the configured ``init_state``; its first probe is due at ``now``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"server name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise ValueError(f"server {name!r} is already health checked")
        rise, fall = self.config.rise, self.config.fall
        health = {"up": rise, "fully-up": rise + fall - 1, "down": rise - 1, "fully-down": 0}[self.config.init_state]
        self._entries[name] = _Entry(health, health >= rise, -math.inf if now is None else now)

    def remove(self, name: str) -> bool:
        """Stop checking ``name``; a result still in flight for it is then ignored. False if it was not checked."""
        return self._entries.pop(name, None) is not None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def names(self) -> list[str]:
        """The checked servers, in the order they were added."""
        return list(self._entries)

    def _get(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"server {name!r} is not health checked") from None

    # -- verdicts ----------------------------------------------------------------------------------------------
    def is_up(self, name: str) -> bool:
        """The current verdict for ``name``."""
        return self._get(name).up

    def state(self, name: str) -> HealthState:
        """A snapshot of ``name``'s health."""
        e = self._get(name)
        cfg = self.config
        return HealthState(
            name=name,
            up=e.up,
            health=e.health,
            rise=cfg.rise,
            fall=cfg.fall,
            successes=e.successes,
            failures=e.failures,
            checks=e.checks,
            failed_checks=e.failed_checks,
            in_flight=e.in_flight,
            last_ok=e.last_ok,
            last_detail=e.last_detail,
            last_rtt=e.last_rtt,
            last_change=e.last_change,
        )

    def states(self) -> dict[str, HealthState]:
        """Every checked server's health, by name."""
        return {name: self.state(name) for name in self._entries}

    def set_down(self, name: str, now: float) -> bool:
        """Set the verdict to down (health 0) without reporting a transition, because the caller already acted
        on it (see :func:`mplslb.balancing.health_policy.reconcile`); ``rise`` passing probes then bring the server
        back. True if it was up."""
        e = self._get(name)
        was_up = e.up
        e.health = 0
        e.up = False
        e.successes = 0
        if was_up:
            e.last_change = now
        return was_up

    # -- scheduling --------------------------------------------------------------------------------------------
    def due(self, now: float) -> list[str]:
        """Servers whose next probe should start now (none with a probe in flight), earliest first."""
        due = [(e.next_due, name) for name, e in self._entries.items() if not e.in_flight and e.next_due <= now]
        due.sort()
        return [name for _, name in due]

    def started(self, name: str, now: float) -> None:
        """A probe of ``name`` started at ``now``; it times out at ``now + timeout``."""
        e = self._get(name)
        e.in_flight = True
        e.started_at = now

    def expired(self, now: float) -> list[str]:
        """In-flight probes that have run out of time; the caller ends each with a failed :meth:`result`."""
        timeout = self.config.timeout
        return [name for name, e in self._entries.items() if e.in_flight and e.started_at + timeout <= now]

    def next_deadline(self) -> float | None:
        """The earliest time there is work: a probe due, or an in-flight probe timing out. None if no server."""
        timeout = self.config.timeout
        deadlines = [e.started_at + timeout if e.in_flight else e.next_due for e in self._entries.values()]
        return min(deadlines) if deadlines else None

    # -- results -----------------------------------------------------------------------------------------------
    def result(
        self, name: str, ok: bool, now: float, *, rtt: float | None = None, detail: str = ""
    ) -> Transition | None:
        """Record one probe's outcome; returns ``"down"`` or ``"up"`` if it flipped the verdict, else None.

        A result for a server no longer checked (removed while its probe ran) is ignored.
        """
        e = self._entries.get(name)
        if e is None:
            return None
        cfg = self.config
        start = e.started_at if e.in_flight else now
        e.in_flight = False
        e.next_due = max(start + cfg.interval, now)
        e.checks += 1
        e.last_ok = ok
        e.last_detail = detail
        e.last_rtt = rtt
        top = cfg.rise + cfg.fall - 1
        if ok:
            e.successes += 1
            e.failures = 0
            if e.health < top:
                e.health += 1
                if e.health >= cfg.rise:
                    e.health = top
        else:
            e.failed_checks += 1
            e.failures += 1
            e.successes = 0
            if e.health > 0:
                e.health -= 1
                if e.health < cfg.rise:
                    e.health = 0
        up = e.health >= cfg.rise
        if up == e.up:
            return None
        e.up = up
        e.last_change = now
        return "up" if up else "down"
