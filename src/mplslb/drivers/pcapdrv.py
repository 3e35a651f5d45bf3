"""Replay a capture through the balancer: every Ethernet frame goes in at its capture time, every frame the balancer
sends comes out into another capture at the same time.

The capture's clock is the balancer's clock: timers due before a frame (``next_deadline()``) fire first, at their
deadline, so the replay is what the daemon would have done had the frames arrived at those times. Frames that
arrive out of time order are fed at the latest time seen (the balancer's clock never goes back) and counted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from mplslb.wire.ethernet import ETH_ALEN, ETH_HLEN
from mplslb.wire.pcap import LINKTYPE_ETHERNET, PcapWriter, read_pcap

SRC_MAC = slice(ETH_ALEN, 2 * ETH_ALEN)
#: Timers fired for one gap between frames before the replay gives up on the deadline moving forward.
MAX_TIMERS_PER_GAP = 100_000

Frames = list[tuple[int, bytes]]


class Core(Protocol):
    """What the replay needs of the balancer (anything with the sans-I/O interface)."""

    def receive(self, port: int, frame: bytes | memoryview, now: float) -> Frames: ...
    def next_deadline(self) -> float | None: ...
    def on_timer(self, now: float) -> Frames: ...


@dataclass
class ReplayCounts:
    """What a replay did."""

    records: int = 0  # records read from the capture
    fed: int = 0  # Ethernet frames handed to the balancer
    written: int = 0  # frames the balancer sent, written to the output capture
    timers: int = 0  # on_timer calls
    skipped_linktype: int = 0  # records of another link type than Ethernet
    skipped_truncated: int = 0  # frames the capture cut short (snap length) or too short for an Ethernet header
    out_of_order: int = 0  # frames stamped earlier than one before them (fed at the later time)


def replay(
    balancer: Core,
    pcap_in: str | os.PathLike[str] | BinaryIO,
    pcap_out: str | os.PathLike[str] | BinaryIO | PcapWriter,
    *,
    port_map: Mapping[bytes, int] | Callable[[bytes], int] | None = None,
    default_port: int = 0,
    drain: float = 0.0,
) -> ReplayCounts:
    """Feed every Ethernet frame of ``pcap_in`` to ``balancer`` at its timestamp; write what it sends to ``pcap_out``.

    The ingress port of a frame is ``port_map[source MAC]`` (or ``port_map(frame)`` when it is callable), else
    ``default_port``. After the last frame, timers keep firing until ``drain`` seconds past it.
    """
    counts = ReplayCounts()
    writer = pcap_out if isinstance(pcap_out, PcapWriter) else PcapWriter(pcap_out)
    if port_map is None:
        port_of: Callable[[bytes], int] = lambda frame: default_port  # noqa: E731
    elif callable(port_map):
        port_of = port_map
    else:
        mapping = port_map
        port_of = lambda frame: mapping.get(frame[SRC_MAC], default_port)  # noqa: E731

    def emit(frames: Frames, when: float) -> None:
        for _, frame in frames:
            writer.write(frame, when)
        counts.written += len(frames)

    def timers_until(now: float, floor: float | None) -> None:
        """Fire the timers due by ``now``, each at its deadline (never before ``floor``, the time already fed)."""
        previous = None
        for _ in range(MAX_TIMERS_PER_GAP):
            deadline = balancer.next_deadline()
            if deadline is None or deadline > now or deadline == previous:
                return
            previous = deadline
            when = deadline if floor is None else max(deadline, floor)
            emit(balancer.on_timer(when), when)
            counts.timers += 1

    clock: float | None = None
    try:
        for record in read_pcap(pcap_in):
            counts.records += 1
            if record.linktype != LINKTYPE_ETHERNET:
                counts.skipped_linktype += 1
                continue
            if len(record.data) < record.orig_len or len(record.data) < ETH_HLEN:
                counts.skipped_truncated += 1
                continue
            now = record.timestamp
            if clock is not None and now < clock:
                counts.out_of_order += 1
                now = clock
            timers_until(now, clock)
            clock = now
            emit(balancer.receive(port_of(record.data), record.data, now), now)
            counts.fed += 1
        if clock is not None and drain > 0:
            timers_until(clock + drain, clock)
    finally:
        if writer is not pcap_out:
            writer.close()
    return counts
