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

Block mode (``BalancerDriver(..., block=True)``) is the zero-copy path for ports that lend whole receive-ring blocks
(``recv_block``, as :class:`~mplslb.drivers.afpacket.RingPort` does) to a balancer with ``receive_block``: on each
wake-up it takes up to ``max_blocks`` blocks from the port; for each, the balancer switches the labelled frames in
place in the ring, the driver hands every output port its frames in one go (``send_block`` for frames still lying
in the block, ``send_many`` for the frames the one-frame path produced, interleaved so that each port sends in the
order :meth:`Balancer.receive` would have), one ``flush`` per output port (one system call with a TX ring), then
gives the block back. Frames whose VLAN tag the kernel took off come as copies and go through ``receive_batch``
after the block's other frames. Ports without ``recv_block`` are read as before.
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
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np

from mplslb.balancer import TIMER_GRANULARITY

if TYPE_CHECKING:
    from mplslb.balancer import BlockResult
    from mplslb.drivers.afpacket import RxBlock

Frames = list[tuple[int, bytes]]
DEFAULT_MAX_WAIT = 1.0  # the longest the selector waits, whatever else is pending
STOP_POLL = 0.05  # how often a threading.Event given to run() is looked at
WAKEUP_READS = 64  # reads of the wake-up pipe per turn (a few bytes are all that is ever in it)
STALLED_TIMER_GAP = 0.001  # a core whose deadline does not move after on_timer is asked again this much later
DEFAULT_MAX_BLOCKS = 4  # receive-ring blocks taken from one port per wake-up in block mode
_NO_ROWS = np.zeros(0, dtype=np.int64)


class HasFileno(Protocol):
    def fileno(self) -> int: ...


class Port(Protocol):
    """What a driver needs of a port: every port in this package has this shape."""

    def fileno(self) -> int: ...
    def recv_burst(self, max_frames: int = 64, /) -> list[bytes]: ...
    def send(self, frame: bytes, /) -> int: ...


class BlockPort(Protocol):
    """A port that lends receive-ring blocks (block mode's input)."""

    def recv_block(self, max_frames: int | None = None, /) -> RxBlock | None: ...


class BulkPort(Protocol):
    """A port that sends many frames and a block's frames at once, with one flush (block mode's output)."""

    def send_many(
        self, frames: Iterable[bytes | memoryview | np.ndarray], errors: dict[str, int] | None = None, /, *,
        flush: bool = True,
    ) -> int: ...  # fmt: skip
    def send_block(
        self, buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray, errors: dict[str, int] | None = None, /, *,
        flush: bool = True,
    ) -> int: ...  # fmt: skip
    def flush(self, errors: dict[str, int] | None = None, /) -> int: ...


BlockReceiver = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float], "BlockResult"]


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
        self.wake()

    def wake(self) -> None:
        """End the selector's wait now (safe from a signal handler or another thread): a timer added there runs at
        the loop's next turn, not once the wait would have ended."""
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
        self.timer_granularity = 0.0  # after a timer fires, the next fires no sooner than this much later

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
        if fired_at is not None and deadline is not None:
            deadline = max(deadline, fired_at + self.timer_granularity)
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
    """Pumps frames between ports and the balancer: ``ports`` maps the balancer's port ids to port objects.

    ``block``: read the ports that lend ring blocks with the zero-copy block path (see the module's notes), up to
    ``max_blocks`` blocks per wake-up; it needs a balancer with ``receive_block``, and other ports are read in
    bursts as usual. Ports that send in bulk (``send_many``, ``send_block`` and ``flush``: the packet ports, through
    their TX ring or ``sendmmsg``) are written with ``send_many``, one call and one flush per port per call of
    :meth:`write`, in either mode; other ports frame by frame.
    """

    def __init__(
        self,
        balancer: BalancerCore,
        ports: Mapping[int, Port],
        loop: Loop,
        *,
        burst: int = 64,
        block: bool = False,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
    ) -> None:
        super().__init__(loop, balancer, burst)
        self.timer_granularity = TIMER_GRANULARITY
        if max_blocks < 1:
            raise ValueError("max_blocks must be at least 1")
        self.balancer = balancer
        self.ports = dict(ports)
        self.block, self.max_blocks = block, max_blocks
        receive_block = getattr(balancer, "receive_block", None) if block else None
        self._receive_block: BlockReceiver | None = receive_block if callable(receive_block) else None
        #: The ports read block by block, and every port that can send a block's frames in bulk.
        self.block_ports: dict[int, BlockPort] = {}
        self._bulk: dict[int, BulkPort] = {}
        self.blocks_read: dict[int, int] = {}  # per block port: ring blocks taken in block mode
        for port_id, port in self.ports.items():
            if self._receive_block is not None and callable(getattr(port, "recv_block", None)):
                self.block_ports[port_id] = cast(BlockPort, port)
                self.blocks_read[port_id] = 0
            if all(callable(getattr(port, name, None)) for name in ("send_many", "send_block", "flush")):
                self._bulk[port_id] = cast(BulkPort, port)
        for port_id, port in self.ports.items():
            self.frames_read[port_id] = self.frames_written[port_id] = 0
            loop.add_reader(port.fileno(), functools.partial(self.readable, port_id))
        self._rearm()

    def readable(self, port_id: int) -> None:
        """Read one burst (or, in block mode, up to ``max_blocks`` blocks) from ``port_id``, hand it to the
        balancer, send what it returns."""
        lender = self.block_ports.get(port_id)
        if lender is not None:
            self._read_blocks(port_id, lender)
            return
        frames = self.ports[port_id].recv_burst(self.burst)
        if not frames:
            return
        self._count(self.frames_read, port_id, len(frames))
        self.write(self.balancer.receive_batch([(port_id, frame) for frame in frames], self.loop.clock()))
        self._rearm()

    def write(self, out: Frames) -> None:
        """Send each ``(port id, frame)`` on its port (a bulk port's frames: gathered, then sent in one call)."""
        bulk: dict[int, list[bytes]] | None = None
        for port_id, frame in out:
            port = self.ports.get(port_id)
            if port is None:
                self._drop("unknown_port")
            elif port_id in self._bulk:
                if bulk is None:
                    bulk = {}
                bulk.setdefault(port_id, []).append(frame)
            else:
                self._send(port, port_id, frame)
        if bulk:
            for port_id, frames in bulk.items():
                self._count(self.frames_written, port_id, self._bulk[port_id].send_many(frames, self.send_errors))

    # -- block mode ---------------------------------------------------------------------------------------------
    def _read_blocks(self, port_id: int, lender: BlockPort) -> None:
        receive_block = self._receive_block
        assert receive_block is not None  # a port is in block_ports only when the balancer has receive_block
        taken = False
        for _ in range(self.max_blocks):
            block = lender.recv_block()
            if block is None:
                break
            taken = True
            self.blocks_read[port_id] += 1
            try:
                n = len(block.starts)
                self._count(self.frames_read, port_id, n + len(block.tagged))
                now = self.loop.clock()
                if n:
                    ports = np.full(n, port_id, dtype=np.int32)
                    result = receive_block(block.buf, block.starts, block.lengths, ports, now)
                    self._write_block(block.buf, block.starts, block.lengths, result.out_port, result.extra)
                if block.tagged:
                    self.write(self.balancer.receive_batch([(port_id, frame) for frame in block.tagged], now))
            finally:
                block.release()  # everything from it is sent (copied into the TX rings or socket buffers)
        if taken:
            self._rearm()

    def _write_block(
        self,
        buf: np.ndarray,
        starts: np.ndarray,
        lengths: np.ndarray,
        out_port: np.ndarray,
        extra: list[tuple[int, int, bytes]],
    ) -> None:
        """Send a switched block: per output port, its frames of the block and its extra frames in frame order."""
        rows = np.flatnonzero(out_port >= 0)
        groups: dict[int, np.ndarray] = {}
        if len(rows):
            outs = out_port[rows]
            first = int(outs[0])
            if bool((outs == first).all()):
                groups[first] = rows
            else:
                for port_id in np.unique(outs).tolist():
                    groups[port_id] = rows[outs == port_id]
        extras: dict[int, list[tuple[int, bytes]]] = {}
        for i, port_id, frame in extra:
            extras.setdefault(port_id, []).append((i, frame))
        for port_id in dict.fromkeys([*groups, *extras]):
            mine, theirs = groups.get(port_id, _NO_ROWS), extras.get(port_id, [])
            port = self.ports.get(port_id)
            if port is None:
                for _ in range(len(mine) + len(theirs)):
                    self._drop("unknown_port")
                continue
            bulk = self._bulk.get(port_id)
            if bulk is None:  # a port without bulk sending (e.g. MPLS-in-UDP): frame by frame, in order
                for frame in _in_order(buf, starts, lengths, mine, theirs):
                    self._send(port, port_id, frame)
                continue
            errors, sent, at = self.send_errors, 0, 0
            for i, frame in theirs:
                cut = int(np.searchsorted(mine, i, side="right"))
                if cut > at:
                    take = mine[at:cut]
                    sent += bulk.send_block(buf, starts[take], lengths[take], errors, flush=False)
                    at = cut
                sent += bulk.send_many([frame], errors, flush=False)
            if at < len(mine):
                take = mine[at:]
                sent += bulk.send_block(buf, starts[take], lengths[take], errors, flush=False)
            bulk.flush(errors)
            self._count(self.frames_written, port_id, sent)

    def _fire(self, now: float) -> None:
        self.write(self.balancer.on_timer(now))

    def close(self) -> None:
        """Stop listening to the ports (they stay open) and cancel the timer."""
        for port in self.ports.values():
            self.loop.remove_reader(port.fileno())
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _in_order(
    buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray, rows: np.ndarray, extra: list[tuple[int, bytes]]
) -> list[bytes]:
    """One port's frames of a block (``rows``, copied out) and its extra frames, in frame order."""
    frames: list[tuple[int, int, bytes]] = [
        (i, 0, buf[s : s + n].tobytes())
        for i, s, n in zip(rows.tolist(), starts[rows].tolist(), lengths[rows].tolist(), strict=True)
    ]
    frames += [(i, 1, frame) for i, frame in extra]
    frames.sort(key=lambda item: (item[0], item[1]))
    return [frame for _, _, frame in frames]


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
