"""Active health checks, as keepalived and HAProxy users know them: a probe per server every ``interval``,
``fall`` consecutive failures take it down, ``rise`` consecutive successes bring it back.

Theory of operation
-------------------
Three layers, each usable alone:

* :class:`HealthChecker` is the sans-I/O core. Per server it keeps HAProxy's health counter and the verdict
  (up/down). It says which probes are due (:meth:`~HealthChecker.due`), which in-flight probes have timed out
  (:meth:`~HealthChecker.expired`) and when it next has work (:meth:`~HealthChecker.next_deadline`); a probe's
  outcome goes in through :meth:`~HealthChecker.result`, which returns ``"down"`` or ``"up"`` when it flips the
  verdict. Time is always passed in.
* :class:`HealthProbeDriver` runs the probes with non-blocking sockets: a TCP connect (``kind="tcp"``), or a
  connect, an HTTP/1.0 ``GET`` and the response's status line (``kind="http"``). Its sockets sit in a private
  selector whose own descriptor (an epoll/kqueue fd) is readable whenever a probe socket is ready, so a
  selectors-based loop needs one reader and one timer for it::

      loop.add_reader(driver.fileno(), driver.on_ready)
      loop.call_at(driver.next_deadline(), tick)   # tick: driver.on_timer(now), then re-arm

  :meth:`HealthProbeDriver.run_once` does the same with the driver's own selector (tests, tools).
* :func:`apply_result`, :func:`apply_transition` and :func:`reconcile` tie the verdicts to a
  :class:`~mplslb.balancer.Balancer`.

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

Probe round-trip times
----------------------
A TCP probe's RTT is its connect time (like a session's SYN to SYN-ACK); an HTTP probe's is from the request sent
to the first byte of the response (like a session's request to first response byte). :func:`apply_result` feeds
it to the server's response-time estimate only when sessions cannot: when the server has no estimate yet (just
configured, or just back up, which forgets the old one), or when it is *overloaded* (its estimate is above the
pool's ``rt_limit``, so it takes no new session and would otherwise never get a fresh sample and stay excluded
for ever). Otherwise sessions, which measure the real traffic, are the only source: a probe to a cheap health URL
would drag the estimate toward a path users do not take.
"""

from __future__ import annotations

import contextlib
import errno
import math
import re
import selectors
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from mplslb.balancing.servers import ServerStatus

if TYPE_CHECKING:
    from mplslb.balancer import Balancer

__all__ = [
    "HEALTH_CHECK_REASON",
    "INIT_STATES",
    "PASSIVE_REASONS",
    "HealthCheckConfig",
    "HealthChecker",
    "HealthProbeDriver",
    "HealthState",
    "ProbeResult",
    "Transition",
    "apply_result",
    "apply_transition",
    "feed_probe_rtt",
    "reconcile",
]

Transition = Literal["up", "down"]

KINDS = ("tcp", "http")
INIT_STATES = ("up", "fully-up", "down", "fully-down")
#: The reason a server taken down by a failing active check carries (``Server.down_reason``).
HEALTH_CHECK_REASON = "health_check"
#: Reasons the balancer's passive health (unanswered SYN, RST to a SYN) takes a server down with. Active checks
#: bring such a server back; a server an operator took down ("admin") stays down until the operator says so.
PASSIVE_REASONS = frozenset({"no_reply", "refused"})
#: The longest status line an HTTP probe waits for; a longer first line is a failed probe.
MAX_STATUS_LINE = 1024
RECV_SIZE = 4096
_STATUS_LINE = re.compile(rb"HTTP/\d\.\d (\d{3})(?:[ \t]|$)")
_TOKEN_BAD = re.compile(r"[\x00-\x20\x7f]")
_CONNECT_PENDING = (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN, errno.EALREADY)


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

    def set_down(self, name: str, now: float | None = None) -> bool:
        """Set the verdict to down (health 0) without reporting a transition, because the caller already acted
        on it (see :func:`reconcile`); ``rise`` passing probes then bring the server back. True if it was up."""
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


@dataclass(frozen=True)
class ProbeResult:
    """What the driver reports for each finished probe."""

    name: str
    ok: bool
    at: float
    rtt: float | None
    detail: str
    transition: Transition | None


class _Probe:
    __slots__ = ("buf", "name", "out", "phase", "rtt", "sent_at", "sock", "started")

    def __init__(self, name: str, sock: socket.socket, started: float, out: bytes) -> None:
        self.name = name
        self.sock = sock
        self.started = started
        self.out = out
        self.buf = b""
        self.phase = "connect"
        self.sent_at = started
        self.rtt: float | None = None


def _errname(code: int) -> str:
    return errno.errorcode.get(code, str(code))


class HealthProbeDriver:
    """Runs one :class:`HealthChecker`'s probes over non-blocking sockets.

    ``address_of(name)`` gives a server's address (4 or 16 bytes, or None if it has gone) when its probe is due;
    ``clock`` is read when sockets become ready (use the balancer's clock); every finished probe goes through
    ``checker.result`` and is then passed to ``on_result``. Network errors are failed probes: nothing but what
    ``on_result`` itself raises comes out of :meth:`on_ready` or :meth:`on_timer`.
    """

    def __init__(
        self,
        checker: HealthChecker,
        address_of: Callable[[str], bytes | None],
        *,
        on_result: Callable[[ProbeResult], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.checker = checker
        self.address_of = address_of
        self.on_result = on_result
        self.clock = clock
        self._selector: selectors.BaseSelector = selectors.DefaultSelector()
        self._probes: dict[str, _Probe] = {}

    # -- loop integration --------------------------------------------------------------------------------------
    def fileno(self) -> int:
        """A descriptor that is readable while some probe socket is ready: register it as one reader and call
        :meth:`on_ready` when it fires. Needs an epoll/kqueue selector (Linux, BSD, macOS)."""
        fileno = getattr(self._selector, "fileno", None)
        if fileno is None:
            raise RuntimeError(f"{type(self._selector).__name__} has no descriptor to register; use run_once()")
        return int(fileno())

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` next has work (a probe due or timing out)."""
        return self.checker.next_deadline()

    def on_ready(self, now: float | None = None) -> None:
        """Advance every probe whose socket is ready; never blocks."""
        events = self._selector.select(0)
        when = self.clock() if now is None else now
        for key, mask in events:
            probe: _Probe = key.data
            if self._probes.get(probe.name) is probe:
                self._advance(probe, mask, when)

    def on_timer(self, now: float) -> None:
        """Fail probes that timed out, then start the probes that are due."""
        for name in self.checker.expired(now):
            self._finish(name, False, now, None, f"timeout after {self.checker.config.timeout:g}s")
        for name in self.checker.due(now):
            try:
                address = self.address_of(name)
            except Exception as exc:  # a lookup that fails must not stop the other probes
                address = None
                detail = f"no address: {exc}"
            else:
                detail = "no address"
            if address is None:
                self.checker.started(name, now)
                self._finish(name, False, now, None, detail)
            else:
                self.start_probe(name, address, now)

    def run_once(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds (less if a deadline comes first) for probe sockets, then do the work:
        a loop of its own, for tests and tools."""
        deadline = self.next_deadline()
        wait = max(0.0, timeout)
        if deadline is not None:
            wait = min(wait, max(0.0, deadline - self.clock()))
        if self._probes:
            self._selector.select(wait)
        elif wait > 0:
            time.sleep(wait)  # nothing to select on; some selectors refuse an empty set
        self.on_ready()
        self.on_timer(self.clock())

    # -- probes ------------------------------------------------------------------------------------------------
    def start_probe(self, name: str, address: bytes, now: float) -> None:
        """Start probing ``name`` at ``address`` (4 or 16 bytes) now; a probe of it still running is dropped."""
        self.cancel(name)
        self.checker.started(name, now)
        cfg = self.checker.config
        if len(address) not in (4, 16):
            self._finish(name, False, now, None, f"bad address {address!r}")
            return
        family = socket.AF_INET6 if len(address) == 16 else socket.AF_INET
        target = (socket.inet_ntop(family, address), cfg.port)
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            self._finish(name, False, now, None, f"socket: {exc.strerror or exc}")
            return
        try:
            sock.setblocking(False)
            # Close with a RST, as HAProxy does: a probe leaves no TIME_WAIT behind on the balancer.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            code = sock.connect_ex(target)
        except OSError as exc:
            sock.close()
            self._finish(name, False, now, None, f"connect: {exc.strerror or exc}")
            return
        if code not in _CONNECT_PENDING:
            sock.close()
            self._finish(name, False, now, None, f"connect: {_errname(code)}")
            return
        out = cfg.http_request(address) if cfg.kind == "http" else b""
        probe = _Probe(name, sock, now, out)
        self._probes[name] = probe
        if code == 0:
            self._connected(probe, now)
        else:
            self._selector.register(sock, selectors.EVENT_WRITE, probe)

    def cancel(self, name: str) -> None:
        """Drop ``name``'s running probe, if any, without a result (the checker still counts it in flight)."""
        probe = self._probes.pop(name, None)
        if probe is not None:
            self._close(probe)

    def remove(self, name: str) -> None:
        """Stop checking ``name``: drop its probe and take it out of the checker."""
        self.cancel(name)
        self.checker.remove(name)

    def close(self) -> None:
        """Drop every running probe and release the selector."""
        for name in list(self._probes):
            self.cancel(name)
        self._selector.close()

    @property
    def in_flight(self) -> list[str]:
        """Servers with a probe socket open."""
        return list(self._probes)

    def _close(self, probe: _Probe) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(probe.sock)
        probe.sock.close()

    def _finish(self, name: str, ok: bool, now: float, rtt: float | None, detail: str) -> None:
        self.cancel(name)
        transition = self.checker.result(name, ok, now, rtt=rtt, detail=detail)
        if self.on_result is not None:
            self.on_result(ProbeResult(name, ok, now, rtt, detail, transition))

    def _advance(self, probe: _Probe, mask: int, now: float) -> None:
        try:
            if probe.phase == "connect":
                code = probe.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    self._finish(probe.name, False, now, None, f"connect: {_errname(code)}")
                    return
                self._connected(probe, now)
            elif probe.phase == "send":
                self._send(probe, now)
            else:
                self._receive(probe, now)
        except OSError as exc:
            self._finish(probe.name, False, now, None, f"{probe.phase}: {exc.strerror or exc}")

    def _connected(self, probe: _Probe, now: float) -> None:
        if self.checker.config.kind == "tcp":
            self._finish(probe.name, True, now, now - probe.started, "connected")
            return
        probe.phase = "send"
        self._send(probe, now)

    def _send(self, probe: _Probe, now: float) -> None:
        try:
            sent = probe.sock.send(probe.out)
        except BlockingIOError:
            sent = 0
        probe.out = probe.out[sent:]
        events = selectors.EVENT_WRITE
        if not probe.out:
            probe.phase = "receive"
            probe.sent_at = now
            events = selectors.EVENT_READ
        try:
            self._selector.modify(probe.sock, events, probe)
        except KeyError:
            self._selector.register(probe.sock, events, probe)

    def _receive(self, probe: _Probe, now: float) -> None:
        try:
            data = probe.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        if data:
            if probe.rtt is None:
                probe.rtt = now - probe.sent_at
            probe.buf += data
            if b"\n" not in probe.buf and len(probe.buf) < MAX_STATUS_LINE:
                return
        elif not probe.buf:
            self._finish(probe.name, False, now, None, "closed before the status line")
            return
        rtt = probe.rtt
        line = probe.buf.split(b"\n", 1)[0].rstrip(b"\r")
        match = _STATUS_LINE.match(line)
        if match is None:
            self._finish(probe.name, False, now, rtt, f"bad status line {line[:40]!r}")
            return
        status = int(match.group(1))
        self._finish(probe.name, status in self.checker.config.expected, now, rtt, f"HTTP {status}")


# -- tying verdicts to the balancer ----------------------------------------------------------------------------
def apply_transition(balancer: Balancer, name: str, transition: Transition, now: float) -> bool:
    """Act on a verdict flip. ``"down"``: the server is marked down (reason ``health_check``), which interrupts
    its sessions and withdraws their labels, unless it is already down for another reason. ``"up"``: a server
    that is down because of its health (active or passive) is marked up; one an operator took down stays down.
    Returns True if the balancer changed. A server no longer in the balancer is ignored."""
    if name not in balancer.pool:
        return False
    server = balancer.pool.get(name)
    if transition == "down":
        if server.status is ServerStatus.DOWN:
            return False
        balancer.mark_down(name, now, HEALTH_CHECK_REASON)
        return True
    if server.status is ServerStatus.DOWN and (
        server.down_reason == HEALTH_CHECK_REASON or server.down_reason in PASSIVE_REASONS
    ):
        balancer.mark_up(name)
        return True
    return False


def feed_probe_rtt(balancer: Balancer, name: str, rtt: float) -> bool:
    """Feed a passing probe's RTT into the server's response-time estimate when sessions cannot refresh it: no
    estimate yet, or overloaded (see the module docstring). True if fed."""
    if name not in balancer.pool or not (math.isfinite(rtt) and rtt >= 0):
        return False
    server = balancer.pool.get(name)
    if server.status is not ServerStatus.UP or not (server.rt_ewma is None or server.overloaded):
        return False
    balancer.pool.record_response_time(server, rtt)
    return True


def apply_result(balancer: Balancer, result: ProbeResult) -> None:
    """The driver's ``on_result`` for a daemon: apply the transition, feed the RTT when it is wanted."""
    if result.transition is not None:
        apply_transition(balancer, result.name, result.transition, result.at)
    if result.ok and result.rtt is not None:
        feed_probe_rtt(balancer, result.name, result.rtt)


def reconcile(balancer: Balancer, checker: HealthChecker, now: float) -> list[str]:
    """Line the checker up with what happened in the balancer meanwhile; call it once per loop tick.

    * A server the balancer's passive health took down (unanswered SYNs, RST to SYN) while its verdict is up:
      the verdict drops to down, so ``rise`` passing probes bring it back (HAProxy's ``observe layer4`` with
      ``on-error mark-down``).
    * A server an operator marked up while its verdict is down: it goes down again (reason ``health_check``);
      the operational state follows the checks, as in HAProxy.

    Returns the names it changed.
    """
    changed = []
    for name in checker.names:
        if name not in balancer.pool:
            continue
        server = balancer.pool.get(name)
        up = checker.is_up(name)
        if up and server.status is ServerStatus.DOWN and server.down_reason in PASSIVE_REASONS:
            checker.set_down(name, now)
            changed.append(name)
        elif not up and server.status is not ServerStatus.DOWN:
            balancer.mark_down(name, now, HEALTH_CHECK_REASON)
            changed.append(name)
    return changed
