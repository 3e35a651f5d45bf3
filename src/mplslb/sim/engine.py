"""The simulated network's engine: a discrete-event clock and Ethernet segments between nodes.

Theory of operation
-------------------
Simulated time only moves through :class:`EventLoop`: callbacks are scheduled at a time and run in time order
(ties in scheduling order), so a run with the same seed is the same run. A :class:`Segment` is one Ethernet
broadcast domain (a switch with its MAC table filled in): a frame sent on it reaches the attachment that owns the
destination MAC address after the segment's latency, or is lost if no one owns it. Taps see every frame sent on a
segment, which is how the demo captures the balancer's ports.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

Receiver = Callable[[bytes, float], None]
Tap = Callable[[int, bytes, float], None]


class EventLoop:
    """A discrete-event scheduler over simulated seconds."""

    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self.events_run = 0

    def at(self, when: float, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` at simulated time ``when`` (never in the past)."""
        self._seq += 1
        heapq.heappush(self._queue, (max(when, self.now), self._seq, fn, args))

    def after(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        self.at(self.now + delay, fn, *args)

    def run(self, until: float, *, max_events: int = 50_000_000) -> None:
        """Run events up to simulated time ``until`` (bounded in count too)."""
        queue = self._queue
        while queue and queue[0][0] <= until and self.events_run < max_events:
            when, _, fn, args = heapq.heappop(queue)
            self.now = when
            self.events_run += 1
            fn(*args)
        self.now = max(self.now, until)

    def pending(self) -> int:
        return len(self._queue)


class Segment:
    """An Ethernet segment: delivers a frame to the owner of its destination MAC after ``latency`` seconds."""

    def __init__(self, loop: EventLoop, name: str, *, latency: float = 50e-6) -> None:
        self.loop = loop
        self.name = name
        self.latency = latency
        self._owners: dict[bytes, Receiver] = {}
        self.taps: list[Tap] = []
        self.frames = 0
        self.lost = 0
        self.tap_id = -1  # set by whoever taps this segment (the balancer port it belongs to)

    def attach(self, mac: bytes, receiver: Receiver) -> None:
        if mac in self._owners:
            raise ValueError(f"{self.name}: MAC {mac.hex(':')} attached twice")
        self._owners[mac] = receiver

    def send(self, frame: bytes) -> None:
        self.frames += 1
        now = self.loop.now
        for tap in self.taps:
            tap(self.tap_id, frame, now)
        receiver = self._owners.get(frame[0:6])
        if receiver is None:
            self.lost += 1
            return
        self.loop.at(now + self.latency, receiver, frame, now + self.latency)
