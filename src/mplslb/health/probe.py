"""Runs a :class:`~mplslb.health.checker.HealthChecker`'s probes over non-blocking sockets.

Theory of operation
-------------------
:class:`HealthProbeDriver` runs the probes the checker says are due: a TCP connect (``kind="tcp"``), or a
connect, an HTTP/1.0 ``GET`` and the response's status line (``kind="http"``). Its sockets sit in a private
selector whose own descriptor (an epoll/kqueue fd) is readable whenever a probe socket is ready, so a
selectors-based loop needs one reader and one timer for it::

    loop.add_reader(driver.fileno(), driver.on_ready)
    loop.call_at(driver.next_deadline(), tick)   # tick: driver.on_timer(now), then re-arm

:meth:`HealthProbeDriver.run_once` does the same with the driver's own selector (tests, tools). Every finished
probe goes into the checker and comes out as a :class:`ProbeResult`, with the verdict's flip if it caused one.

Probe round-trip times
----------------------
A TCP probe's RTT is its connect time (like a session's SYN to SYN-ACK); an HTTP probe's is from the request sent
to the first byte of the response (like a session's request to first response byte). Whether an RTT is fed to the
server's response-time estimate is the server state policy's call
(:func:`mplslb.balancing.health_policy.feed_probe_rtt`).
"""

from __future__ import annotations

import contextlib
import errno
import re
import selectors
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from mplslb.health.checker import HealthChecker, Transition

__all__ = ["HealthProbeDriver", "ProbeResult"]

#: The longest status line an HTTP probe waits for; a longer first line is a failed probe.
MAX_STATUS_LINE = 1024
RECV_SIZE = 4096
_STATUS_LINE = re.compile(rb"HTTP/\d\.\d (\d{3})(?:[ \t]|$)")
_CONNECT_PENDING = (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN, errno.EALREADY)


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

    def on_ready(self) -> None:
        """Advance every probe whose socket is ready; never blocks."""
        events = self._selector.select(0)
        now = self.clock()
        for key, mask in events:
            probe: _Probe = key.data
            if self._probes.get(probe.name) is probe:
                self._advance(probe, mask, now)

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
