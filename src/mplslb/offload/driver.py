"""The kernel offload inside the daemon's loop: what the :class:`~mplslb.drivers.loop.BalancerDriver` talks to.

Theory of operation
-------------------
:class:`OffloadedBalancer` stands where the balancer stood for the driver (same three methods) and keeps an
:class:`~mplslb.offload.xdp.XdpOffload` in step with it:

* after every batch the balancer handled (``receive_batch``) and after its timers (``on_timer``), the installs and
  withdrawals they made are applied to the kernel (:meth:`XdpOffload.sync`), so a new session's labels reach the
  kernel before the next burst is read and an ended session's labels leave it at once;
* before the balancer's timers run, the kernel's counters are folded into the table (:meth:`XdpOffload.poll`),
  so an idle timeout never fires for a session whose frames the kernel has been forwarding. A poll reads the whole
  map (about 1 ms per 4,000 entries), so timers firing close together share one: the counters may be
  :data:`TIMER_POLL_MIN` old, or :data:`POLL_BUDGET` times the last poll's duration for a very large map (a poll
  then costs at most 1/POLL_BUDGET of the loop's time); idle timeouts are seconds to minutes. A session the
  table then finds idle is judged again on its two labels' kernel counters, read for it alone
  (:meth:`XdpOffload.recount`), so a poll put off under load expires no session the kernel forwarded for;
* a timer of its own, every :data:`SYNC_INTERVAL`, applies changes made elsewhere in the loop (control commands,
  health checks that take a server down) and, every :data:`POLL_INTERVAL` (up to :data:`POLL_INTERVAL_MAX` for
  a very large map), polls the counters for the status and hands over the records and FINs.

A poll folds the counters at once; the measurements' records and the FINs it read (a busy second's thousands, a
few hundred milliseconds of Python) are handed over session by session, a chunk at a time
(:meth:`XdpOffload.poll_step`), each chunk followed by the fold of the tickets taken meanwhile and a sync (which
releases the flows of the sessions that ended). Chunks follow each other for up to :data:`POLL_STEP`, then the loop
turns (frames, commands, timers) and its next turn goes on with the rest: what waits to be read (a frame going up:
a SYN without a ticket, an RST; a control command; a health check's answer) waits for one turn's chunks, not for
the whole poll. Shorter turns, or giving way whenever something waits to be read, stretch a poll over seconds on a
nearly saturated daemon (something nearly always waits), and sessions then end late. The next poll starts once
this one is handed over.

A new session's first round trips are measured in the kernel too (:mod:`mplslb.offload.xdp`, ``measured``): its
labels enter the map with its SYN, and only the SYN reaches the balancer (RST as ever; with L7 analysis the first
request's first octets are copied in the kernel and read at the fold). Its FINs are taken in the kernel too
(``ended``, :meth:`Balancer.ended`: the first under each label, once the measurement is over). What the program
recorded reaches the session table at each poll, and, for one session, whenever anything else is about to be decided
about it (:attr:`Balancer.refresh`: a frame of it reaching the balancer, its deadline, its eviction), so the table
never decides on less than the kernel saw.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mplslb.balancer import Balancer, BlockResult
from mplslb.config import PortConfig
from mplslb.drivers.loop import Frames, Loop, Timer
from mplslb.offload.tickets import TicketDesk
from mplslb.offload.xdp import XdpOffload
from mplslb.sessions import Session
from mplslb.switching.layout import LABEL_SPACE

SYNC_INTERVAL = 0.005
#: While nothing happens between its ticks (no ticket taken, no entry written or deleted, by the tick or by
#: anything else the daemon ran), the wrapper's tick doubles its interval up to this: an idle daemon wakes a few
#: dozen times a second, not two hundred. The first tick after a ticket was taken or an entry changed goes back to
#: SYNC_INTERVAL; a burst of new sessions meanwhile is taken in the kernel under the tickets outstanding.
SYNC_INTERVAL_IDLE = 0.04
#: Seconds between two reads of the kernel's whole map (the counters, records and FINs handed over), stretched up
#: to POLL_INTERVAL_MAX while a read costs more than 1/POLL_BUDGET of that (a very large map). A client that closed
#: first uses its port again as soon as its TIME_WAIT socket may be reused (``tcp_tw_reuse``: a second later on
#: Linux, ``tcp_tw_reuse_delay``); a close's FINs are handed over before that, so that the session is ENDING and its
#: flow out of the flow map, and the new SYN takes a ticket in the kernel instead of going up to the daemon.
POLL_INTERVAL = 0.5
POLL_INTERVAL_MAX = 1.0
TIMER_POLL_MIN = 0.05
#: Seconds a poll hands over records and FINs for at most before the loop's next turn (chunks of POLL_CHUNK, each
#: followed by the tickets' fold and a sync).
POLL_STEP = 0.05
POLL_BUDGET = 20.0
#: The weight of each session's refresh in the moving average of their cost (:meth:`OffloadedBalancer._catch_up`).
REFRESH_WEIGHT = 0.05


def offload_interfaces(ports: Iterable[PortConfig]) -> dict[int, str]:
    """Port id -> interface of the ports the kernel can switch between (Ethernet ports with an interface)."""
    return {p.port_id: p.interface for p in ports if p.kind == "ethernet" and p.interface}


class OffloadedBalancer:
    """The balancer as the driver sees it, with its label switching table mirrored into the kernel."""

    def __init__(
        self,
        balancer: Balancer,
        loop: Loop,
        *,
        mode: str = "auto",
        syn_rate: int = 0,
        pins: Path | None = None,
        fresh: bool = False,
        gso: bool = False,
        tickets: bool = False,
        prealloc: bool = False,
    ) -> None:
        """``syn_rate``: unlabelled TCP SYNs a second the program passes up (0: all). ``pins``: keep the program,
        its maps and its links pinned there (bpffs) so they outlive the daemon, and adopt what a previous daemon
        pinned there unless ``fresh`` (see :mod:`mplslb.offload.xdp`). ``gso``: switch super-packets too (tc
        ingress). ``tickets``: new TCP sessions' SYNs taken in the kernel under tickets decided ahead
        (:mod:`mplslb.offload.tickets`). ``prealloc``: the label map preallocated, an element for each label of the
        balancer's range (and the flow map, one for each pair)."""
        self.balancer = balancer
        self.loop = loop
        self.offload = XdpOffload(
            balancer.switching,
            offload_interfaces(balancer.config.ports),
            mode=mode,
            clock=loop.clock,
            syn_rate=syn_rate,
            measured=balancer.measured,
            ended=balancer.ended,
            closed=balancer.closed,
            pins=pins,
            fresh=fresh,
            gso=gso,
            tickets=tickets,
            prealloc=prealloc,
            max_entries=2 * balancer.labels.capacity if prealloc else LABEL_SPACE,
        )
        self.offload.open()
        if self.offload.untaken:  # a killed daemon's tickets no SYN took: their pairs need no quarantine
            balancer.labels.release_untaken(self.offload.untaken, loop.clock())
        self.desk: TicketDesk | None = None
        if tickets:
            try:
                self.desk = TicketDesk(balancer, self.offload)
                self.desk.refill(loop.clock())
            except BaseException:
                self.offload.close()
                raise
        balancer.refresh = self._refresh
        balancer.settled = self.offload.settled
        balancer.recount = self.offload.recount
        balancer.catch_up = self._catch_up
        self._polled = loop.clock()
        self._poll_cost = 0.0  # seconds the last poll took, its steps included
        self._read_cost = 0.0  # ... its read of the map alone
        self._refresh_cost = 0.0  # seconds a session's own refresh takes (a moving average)
        self._tick_interval = SYNC_INTERVAL  # doubled while nothing happens between ticks (SYNC_INTERVAL_IDLE)
        self._last_activity = self._activity()
        self._timer: Timer | None = loop.call_at(self._polled + SYNC_INTERVAL, self._tick)
        self._step: Timer | None = None  # the next step of a poll, in the loop's next turn

    def _fold_tickets(self, now: float) -> None:
        """Before the balancer decides anything: the SYNs the kernel took are sessions (a retransmitted one then
        finds its session)."""
        if self.desk is not None:
            self.desk.fold(now)

    def _sync(self, now: float) -> None:
        """After it: its installs and withdrawals in the kernel, then tickets issued for the ones taken."""
        self.offload.sync()
        if self.desk is not None:
            self.desk.refill(now)

    def _activity(self) -> int:
        """A count that moves whenever a ticket is taken or an entry written or deleted in the kernel."""
        o = self.offload
        return o.writes + o.deletes + (self.desk.taken + self.desk.refused if self.desk is not None else 0)

    def receive_batch(self, frames: Iterable[tuple[int, bytes | memoryview]], now: float) -> Frames:
        self._fold_tickets(now)
        out = self.balancer.receive_batch(frames, now)
        self._sync(now)
        return out

    def receive_block(
        self, buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray, ports: np.ndarray, now: float
    ) -> BlockResult:
        """The balancer's block path (a driver in block mode), then the same sync as after a batch."""
        self._fold_tickets(now)
        result = self.balancer.receive_block(buf, starts, lengths, ports, now)
        self._sync(now)
        return result

    def next_deadline(self) -> float | None:
        return self.balancer.next_deadline()

    def on_timer(self, now: float) -> Frames:
        self._fold_tickets(now)
        if self._step is None and now - self._polled >= max(TIMER_POLL_MIN, POLL_BUDGET * self._poll_cost):
            self._poll(now)
        out = self.balancer.on_timer(now)
        self._sync(now)
        return out

    def _refresh(self, session: Session) -> None:
        started = time.perf_counter()
        self.offload.fold(session.c2s)
        self._refresh_cost += (time.perf_counter() - started - self._refresh_cost) * REFRESH_WEIGHT

    def _poll(self, now: float) -> None:
        """Start a poll: the counters now, the records and FINs in the loop's next turns (:meth:`poll_step`)."""
        self._polled = now
        started = time.perf_counter()
        self.offload.begin_poll()
        self._poll_cost = self._read_cost = time.perf_counter() - started
        if self.offload.polling:
            self._step = self.loop.call_at(now, self.poll_step)

    def poll_step(self) -> None:
        """Chunks of the poll's records and FINs, each followed by what the daemon does after a batch (the changes
        reach the kernel, tickets are issued again, the tickets taken meanwhile become sessions), until
        :data:`POLL_STEP` has passed."""
        self._step = None
        if self._steps(POLL_STEP):
            self._step = self.loop.call_at(self.loop.clock(), self.poll_step)

    def _steps(self, budget: float) -> bool:
        """Steps of the poll under way, each after the fold of the tickets taken meanwhile and followed by a sync,
        until it is handed over or ``budget`` seconds have passed; True while more are left."""
        started = time.perf_counter()
        while True:
            now = self.loop.clock()
            self._fold_tickets(now)
            more = self.offload.poll_step()
            self._sync(now)
            if not more or time.perf_counter() - started >= budget:
                break
        self._poll_cost += time.perf_counter() - started
        return more

    def _catch_up(self, now: float, count: int) -> bool:
        """``count`` sessions are due and each would be refreshed from the kernel: unless that costs less than the
        last poll did (sessions with nothing new in the kernel, a SYN flood's half-open ones, cost a few
        microseconds each; one whose record and FINs wait there, tens), the poll under way handed over to its end,
        then, unless one began within :data:`TIMER_POLL_MIN`, a new one read and handed over whole, now (the
        sessions' timers are then judged on what the kernel saw of them up to now). True if it caught up."""
        if count * self._refresh_cost < self._poll_cost:
            return False
        self._poll_to_end()
        if now - self._polled >= TIMER_POLL_MIN:
            self._poll(now)
            self._poll_to_end()
        return True

    def _poll_to_end(self) -> None:
        """Hand the poll under way over to its end now, rather than in the loop's next turns."""
        if self._step is not None:
            self._step.cancel()
            self._step = None
            self._steps(math.inf)

    @property
    def polling(self) -> bool:
        """A poll has records or FINs left to hand over."""
        return self._step is not None

    def _tick(self) -> None:
        now = self.loop.clock()
        self._fold_tickets(now)
        interval = max(POLL_INTERVAL, min(POLL_INTERVAL_MAX, POLL_BUDGET * self._read_cost))
        if self._step is None and now - self._polled >= interval:
            self._poll(now)
        self._sync(now)
        activity = self._activity()
        idle, self._last_activity = activity == self._last_activity, activity
        self._tick_interval = min(2 * self._tick_interval, SYNC_INTERVAL_IDLE) if idle else SYNC_INTERVAL
        self._timer = self.loop.call_at(now + self._tick_interval, self._tick)

    def close(self, *, keep: bool = False) -> None:
        """Stop the timer, fold the last counters in and detach everything from the kernel; with ``keep``, leave
        the pinned program attached and switching for the next daemon."""
        for timer in (self._timer, self._step):
            if timer is not None:
                timer.cancel()
        self._timer = self._step = None
        self.balancer.refresh = None
        self.balancer.settled = None
        self.balancer.recount = None
        self.balancer.catch_up = None
        if self.desk is not None:
            self.desk.close(self.loop.clock())
            self.offload.sync()
            self.desk = None
        self.offload.close(keep=keep)

    def stats(self) -> dict[str, Any]:
        """The offload's figures (:meth:`XdpOffload.stats`), with the tickets' (``tickets``) when they are on."""
        return self.offload.stats() | ({"tickets": self.desk.stats()} if self.desk is not None else {})
