"""The one event loop the daemon and the agents share, and the drivers that pump frames through the cores.

Theory of operation
-------------------
:class:`Loop` waits in a ``selectors`` selector until the earliest of: a registered descriptor is readable, the next
timer is due, ``until`` comes, or ``max_wait`` passes (so a ``threading.Event`` is seen promptly). Readers run
first, then the timers due at that moment. :meth:`Loop.stop` only sets a flag and writes a byte to a wake-up pipe,
so a signal handler or another thread may call it.

:class:`BalancerDriver` and :class:`EndpointDriver` are the habit of STYLE.md in code: read a burst, hand it to the
core, write everything the core returns, re-arm the timer from ``next_deadline()``. Send errors (ENOBUFS, EAGAIN,
ENETDOWN, ...) are counted by errno name, never raised: a full queue drops a frame, as a switch would.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import heapq
import itertools
import os
import selectors
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

Frames = list[tuple[int, bytes]]
DEFAULT_MAX_WAIT = 1.0  # the longest the selector waits, whatever else is pending
STOP_POLL = 0.05  # how often a threading.Event given to run() is looked at
WAKEUP_READS = 64  # reads of the wake-up pipe per turn (a few bytes are all that is ever in it)
STALLED_TIMER_GAP = 0.001  # a core whose deadline does not move after on_timer is asked again this much later


class HasFileno(Protocol):
    def fileno(self) -> int: ...


class Port(Protocol):
    """What a driver needs of a port: every port in this package has this shape."""

    def fileno(self) -> int: ...
    def recv_burst(self, max_frames: int = 64, /) -> list[bytes]: ...
    def send(self, frame: bytes, /) -> int: ...


class BalancerCore(Protocol):
    def receive_batch(self, frames: Iterable[tuple[int, bytes | memoryview]], now: float) -> Frames: ...
    def next_deadline(self) -> float | None: ...
    def on_timer(self, now: float) -> Frames: ...


class EndpointCore(Protocol):
    def from_wire(self, frame: bytes | memoryview, now: float) -> bytes | None: ...
    def from_host(self, packet: bytes | memoryview, now: float) -> bytes | None: ...
    def next_deadline(self) -> float | None: ...
    def on_timer(self, now: float) -> object: ...


def _fd(fileobj: int | HasFileno) -> int:
    return fileobj if isinstance(fileobj, int) else fileobj.fileno()


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "error").lower()


class Timer:
    """A pending call; :meth:`cancel` keeps it from running."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    """A selector loop with readers and timers on an injectable monotonic clock."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_wait: float = DEFAULT_MAX_WAIT) -> None:
        if max_wait <= 0:
            raise ValueError("max_wait must be positive")
        self.clock = clock
        self.max_wait = max_wait
        self._selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)

    def add_reader(self, fileobj: int | HasFileno, callback: Callable[[], object]) -> None:
        """Call ``callback()`` whenever ``fileobj`` is readable."""
        self._selector.register(_fd(fileobj), selectors.EVENT_READ, callback)

    def remove_reader(self, fileobj: int | HasFileno) -> None:
        self._selector.unregister(_fd(fileobj))

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        """Call ``callback()`` once the clock reaches ``when``."""
        timer = Timer(when, callback)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer:
        return self.call_at(self.clock() + delay, callback)

    def next_timer(self) -> float | None:
        """When the earliest live timer is due, or None."""
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def stop(self) -> None:
        """Make :meth:`run` return; safe from a signal handler or another thread."""
        self._stopping = True
        with contextlib.suppress(OSError):  # the pipe is full (a wake-up is pending anyway) or the loop is closed
            os.write(self._wake_w, b"\0")

    def run_once(self, timeout: float | None = None) -> None:
        """Wait at most ``timeout`` (or ``max_wait``) and no later than the next timer; run readers, then timers."""
        wait = self.max_wait if timeout is None else min(timeout, self.max_wait)
        due = self.next_timer()
        if due is not None:
            wait = min(wait, due - self.clock())
        for key, _ in self._selector.select(max(wait, 0.0)):
            if key.data is None:
                self._drain_wakeups()
            else:
                key.data()
        self._run_due()

    def run(self, stop: threading.Event | None = None, until: float | None = None) -> None:
        """Run until :meth:`stop`, until ``stop`` is set, or until the clock reaches ``until``."""
        try:
            while not self._stopping and not (stop is not None and stop.is_set()):
                timeout = self.max_wait if stop is None else min(self.max_wait, STOP_POLL)
                if until is not None:
                    left = until - self.clock()
                    if left <= 0:
                        break
                    timeout = min(timeout, left)
                self.run_once(timeout)
        finally:
            self._stopping = False

    def _run_due(self) -> None:
        """Run the timers due now; those a callback adds for now wait for the next turn (bounded work per turn)."""
        now = self.clock()
        timers = self._timers
        for _ in range(len(timers)):
            if not timers or timers[0][0] > now:
                return
            _, _, timer = heapq.heappop(timers)
            if not timer.cancelled:
                timer.cancelled = True
                timer.callback()

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError):
            for _ in range(WAKEUP_READS):
                if not os.read(self._wake_r, 512):
                    return

    def close(self) -> None:
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


class _Counted:
    """Counters and the timer re-arming both drivers share."""

    def __init__(self, loop: Loop, core: BalancerCore | EndpointCore, burst: int) -> None:
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self.loop, self.burst = loop, burst
        self._core = core
        self.frames_read: dict[int | str, int] = {}
        self.frames_written: dict[int | str, int] = {}
        self.send_errors: dict[str, int] = {}
        self.drops: dict[str, int] = {}
        self._timer: Timer | None = None
        self._deadline: float | None = None

    def _count(self, table: dict[int | str, int], key: int | str, n: int = 1) -> None:
        table[key] = table.get(key, 0) + n

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def _send(self, port: Port, key: int | str, frame: bytes) -> None:
        try:
            port.send(frame)
        except OSError as exc:
            name = _errno_name(exc)
            self.send_errors[name] = self.send_errors.get(name, 0) + 1
        else:
            self._count(self.frames_written, key)

    def _rearm(self, fired_at: float | None = None) -> None:
        deadline = self._core.next_deadline()
        if fired_at is not None and deadline is not None and deadline <= fired_at:
            self._drop("timer_stalled")
            deadline = fired_at + STALLED_TIMER_GAP
        if deadline == self._deadline and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._deadline = deadline
        self._timer = None if deadline is None else self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self.loop.clock()
        self._fire(now)
        self._rearm(fired_at=now)

    def _fire(self, now: float) -> None:
        raise NotImplementedError


class BalancerDriver(_Counted):
    """Pumps frames between ports and the balancer: ``ports`` maps the balancer's port ids to port objects."""

    def __init__(self, balancer: BalancerCore, ports: Mapping[int, Port], loop: Loop, *, burst: int = 64) -> None:
        super().__init__(loop, balancer, burst)
        self.balancer = balancer
        self.ports = dict(ports)
        for port_id, port in self.ports.items():
            self.frames_read[port_id] = self.frames_written[port_id] = 0
            loop.add_reader(port.fileno(), functools.partial(self.readable, port_id))
        self._rearm()

    def readable(self, port_id: int) -> None:
        """Read one burst from ``port_id``, hand it to the balancer, send what it returns."""
        frames = self.ports[port_id].recv_burst(self.burst)
        if not frames:
            return
        self._count(self.frames_read, port_id, len(frames))
        self.write(self.balancer.receive_batch([(port_id, frame) for frame in frames], self.loop.clock()))
        self._rearm()

    def write(self, out: Frames) -> None:
        """Send each ``(port id, frame)`` on its port."""
        for port_id, frame in out:
            port = self.ports.get(port_id)
            if port is None:
                self._drop("unknown_port")
            else:
                self._send(port, port_id, frame)

    def _fire(self, now: float) -> None:
        self.write(self.balancer.on_timer(now))

    def close(self) -> None:
        """Stop listening to the ports (they stay open) and cancel the timer."""
        for port in self.ports.values():
            self.loop.remove_reader(port.fileno())
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class EndpointDriver(_Counted):
    """Pumps packets between the host (a TUN device) and the wire through an endpoint (client or server side).

    Counters are keyed ``"host"`` and ``"wire"``.
    """

    def __init__(self, endpoint: EndpointCore, host: Port, wire: Port, loop: Loop, *, burst: int = 64) -> None:
        super().__init__(loop, endpoint, burst)
        self.endpoint, self.host, self.wire = endpoint, host, wire
        for key in ("host", "wire"):
            self.frames_read[key] = self.frames_written[key] = 0
        loop.add_reader(host.fileno(), self.host_readable)
        loop.add_reader(wire.fileno(), self.wire_readable)
        self._rearm()

    def host_readable(self) -> None:
        packets = self.host.recv_burst(self.burst)
        self._count(self.frames_read, "host", len(packets))
        now = self.loop.clock()
        for packet in packets:
            frame = self.endpoint.from_host(packet, now)
            if frame is not None:
                self._send(self.wire, "wire", frame)
        self._rearm()

    def wire_readable(self) -> None:
        frames = self.wire.recv_burst(self.burst)
        self._count(self.frames_read, "wire", len(frames))
        now = self.loop.clock()
        for frame in frames:
            packet = self.endpoint.from_wire(frame, now)
            if packet is not None:
                self._send(self.host, "host", packet)
        self._rearm()

    def _fire(self, now: float) -> None:
        self.endpoint.on_timer(now)

    def close(self) -> None:
        self.loop.remove_reader(self.host.fileno())
        self.loop.remove_reader(self.wire.fileno())
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
