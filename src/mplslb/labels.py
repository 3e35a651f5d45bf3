"""The session label managing unit (claims 1, 7, 13): label pairs, withdrawal, quarantine before reuse.

Theory of operation
-------------------
A session owns one *pair* of MPLS labels: an odd client-to-server (C2S) label and the even
server-to-client (S2C) label C2S + 1, so either endpoint finds the opposite direction's label by adding
or subtracting one (claim 14). Labels 0-15 are reserved by RFC 3032, so C2S labels are the odd numbers
in [17, 1048573]: 524,279 pairs.

Every pair is in exactly one of three states::

    free --allocate()--> in use --withdraw()--> quarantined --(quarantine seconds later)--> free

* ``free`` pairs wait in a FIFO ring. :meth:`LabelManager.allocate` takes the pair at the head and a pair
  that becomes free again joins the tail, so the pair reused next is the one idle longest.
* ``withdraw`` does not free a pair: it parks it in a second FIFO ring with the time it may be released.
  Packets of an ended session may still be in flight (or be retransmitted by a peer that missed the FIN);
  holding the labels back for ``quarantine`` seconds, then queueing them behind every other free pair,
  means such a late packet finds no session rather than somebody else's.
* The quarantine duration is constant, so release times enter the quarantine ring in non-decreasing
  order and releasing is popping its head while the head has expired: no heap, no scan.
* The quarantine is the labels' first line, not their only one: every session label is also bound to its
  session's flow and peer (:mod:`mplslb.switching.scalar`), so a late frame of an ended session is dropped
  on a reused label too. When no pair is free, the head of the quarantine ring is therefore released early
  once it has waited ``quarantine_min`` seconds (counted in :attr:`LabelManager.reused_early`): a rate of new
  sessions above ``pairs / quarantine`` a second shortens the quarantine instead of refusing sessions, down to
  ``quarantine_min``; only above ``pairs / quarantine_min`` do the pairs run out.

Both rings and the per-pair state byte are preallocated to the capacity of the range, so every operation
is O(1) (releasing is O(1) per released pair) and the memory is 17 bytes per pair whatever the load. The
unit is sans-I/O: time is passed in as ``now``; expiry happens in :meth:`LabelManager.on_timer` (or lazily
in ``allocate``), which the caller drives through :meth:`LabelManager.next_deadline`.

Running out of labels is a load condition, not an error: ``allocate`` returns ``None`` and counts it, and
the service acceptance control refuses the new session. Withdrawing a pair that is not in use is API
misuse and raises.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from mplslb.state import HEAP, Allocator
from mplslb.wire.mpls import LABEL_SPACE

__all__ = [
    "C2S_MAX",
    "C2S_MIN",
    "LABEL_SPACE",
    "PAIRS",
    "QUARANTINE_MIN",
    "LabelManager",
    "LabelStats",
    "c2s_of",
    "is_c2s",
    "is_s2c",
    "pair_of",
    "s2c_of",
]

C2S_MIN: Final = 17
"""Smallest C2S label: the first odd label above the reserved range 0-15 (RFC 3032)."""
C2S_MAX: Final = 1048573
"""Largest C2S label whose S2C partner (C2S + 1) is still below 2**20 - 1."""
S2C_MIN: Final = C2S_MIN + 1
S2C_MAX: Final = C2S_MAX + 1
PAIRS: Final = (C2S_MAX - C2S_MIN) // 2 + 1
"""Number of (C2S, S2C) pairs in one label space: 524,279."""

QUARANTINE_MIN: Final = 5.0
"""The configuration's default ``quarantine_min`` (seconds): a pair withdrawn this long ago may be reused when no other
is free. A margin for the frames still on their way when a session ends (its later frames meet the flow binding),
far shorter than the endpoints' flow timeout; at this the pairs last for 104,855 new sessions a second."""

# Per-pair state bytes.
_FREE: Final = 0
_IN_USE: Final = 1
_QUARANTINED: Final = 2


def s2c_of(c2s: int) -> int:
    """The S2C label of the pair whose C2S label is ``c2s`` (claims 7, 13: C2S + 1)."""
    return c2s + 1


def c2s_of(s2c: int) -> int:
    """The C2S label of the pair whose S2C label is ``s2c`` (S2C - 1)."""
    return s2c - 1


def is_c2s(label: int) -> bool:
    """True if ``label`` is a client-to-server label: odd and within [C2S_MIN, C2S_MAX]."""
    return C2S_MIN <= label <= C2S_MAX and label & 1 == 1


def is_s2c(label: int) -> bool:
    """True if ``label`` is a server-to-client label: even and within [C2S_MIN + 1, C2S_MAX + 1]."""
    return S2C_MIN <= label <= S2C_MAX and label & 1 == 0


def pair_of(label: int) -> int:
    """The C2S label of the pair ``label`` belongs to (``label`` may be either member).

    Raises ValueError for a label outside the session label range (a reserved label, or one beyond 2**20 - 2).
    """
    if is_c2s(label):
        return label
    if is_s2c(label):
        return label - 1
    raise ValueError(f"label {label} is not a session label (C2S odd in [{C2S_MIN}, {C2S_MAX}], S2C = C2S + 1)")


@dataclass(frozen=True, slots=True)
class LabelStats:
    """A snapshot of a :class:`LabelManager`'s counters, for display and metrics."""

    capacity: int
    in_use_count: int
    quarantined_count: int
    free_count: int
    peak: int
    allocated_total: int
    withdrawn_total: int
    exhausted: int
    reused_early: int = 0


class LabelManager:
    """Allocates C2S/S2C label pairs FIFO and quarantines withdrawn pairs before reusing them.

    ``quarantine`` is how long (seconds) a withdrawn pair waits before it may be allocated again while other pairs
    are free; ``quarantine_min`` (at most ``quarantine``; None: the same, never early) how long it waits at least
    when none is. ``c2s_min`` and ``c2s_max`` narrow the C2S range (both odd, inclusive), e.g. to split the label
    space between balancers.
    """

    __slots__ = (
        "_allocated_total",
        "_base",
        "_capacity",
        "_early",
        "_exhausted",
        "_free",
        "_free_count",
        "_free_head",
        "_in_use_count",
        "_last_release",
        "_peak",
        "_q_count",
        "_q_head",
        "_q_labels",
        "_q_release",
        "_quarantine",
        "_release",
        "_reused_early",
        "_state",
        "_withdrawn_total",
        "c2s_max",
        "c2s_min",
    )

    #: A pair's state byte while it is allocated (:attr:`pair_states`).
    IN_USE: Final = _IN_USE

    def __init__(
        self,
        *,
        quarantine: float = 60.0,
        quarantine_min: float | None = None,
        c2s_min: int = C2S_MIN,
        c2s_max: int = C2S_MAX,
        store: Allocator = HEAP,
    ) -> None:
        if not (math.isfinite(quarantine) and quarantine >= 0):
            raise ValueError(f"quarantine must be a finite number of seconds >= 0, got {quarantine!r}")
        for what, bound in (("c2s_min", c2s_min), ("c2s_max", c2s_max)):
            if not is_c2s(bound):
                raise ValueError(f"{what} must be an odd label in [{C2S_MIN}, {C2S_MAX}], got {bound!r}")
        if c2s_min > c2s_max:
            raise ValueError(f"c2s_min ({c2s_min}) must not exceed c2s_max ({c2s_max})")
        self.c2s_min: Final = c2s_min
        self.c2s_max: Final = c2s_max
        self._quarantine = float(quarantine)
        self._early = 0.0  # how much earlier than its release time a pair may go when none is free
        self.quarantine_min = quarantine if quarantine_min is None else quarantine_min
        self._reused_early = 0
        self._base = c2s_min
        capacity = (c2s_max - c2s_min) // 2 + 1
        self._capacity = capacity
        # Free ring: every pair starts free, in label order; C2S labels stored directly ('I' is >= 32 bits).
        self._free = array("I", range(c2s_min, c2s_max + 1, 2))
        self._free_head = 0
        self._free_count = capacity
        # Quarantine ring: at most every pair at once, so capacity slots never overflow.
        self._q_labels = array("I", [0]) * capacity
        self._q_release = array("d", [0.0]) * capacity
        self._q_head = 0
        self._q_count = 0
        self._last_release = -math.inf
        # Per pair, from ``store`` (see :mod:`mplslb.state`): its state, and when it leaves (left) quarantine. The
        # rings are derived from them and rebuilt by :meth:`restore`.
        self._state = store.array("labels.state", "B", capacity)
        self._release = store.array("labels.release", "d", capacity)
        self._in_use_count = 0
        self._peak = 0
        self._allocated_total = 0
        self._withdrawn_total = 0
        self._exhausted = 0

    # -- allocation ------------------------------------------------------------------------------

    def allocate(self, now: float) -> int | None:
        """Take the least recently used free pair and return its C2S label (the S2C label is C2S + 1).

        Quarantined pairs whose time has come are released first (:meth:`free_at`). Returns ``None`` when every
        pair is in use or quarantined; that is counted in :attr:`exhausted` and never raises.
        """
        if self.free_at(now) == 0:
            self._exhausted += 1
            return None
        head = self._free_head
        label = self._free[head]
        head += 1
        self._free_head = 0 if head == self._capacity else head
        self._free_count -= 1
        self._state[(label - self._base) >> 1] = _IN_USE
        self._in_use_count += 1
        if self._in_use_count > self._peak:
            self._peak = self._in_use_count
        self._allocated_total += 1
        return label

    def _release_early(self, now: float) -> bool:
        """No pair is free: release the head of the quarantine ring if it has waited ``quarantine_min`` (the pair
        quarantined longest; its session's late frames still fail its next session's flow binding). True if it
        did."""
        if not self._q_count or self._q_release[self._q_head] - self._early > now:
            return False
        label = self._q_labels[self._q_head]
        head = self._q_head + 1
        self._q_head = 0 if head == self._capacity else head
        self._q_count -= 1
        self._to_free_tail(label, (label - self._base) >> 1, now)
        self._reused_early += 1
        return True

    def _to_free_tail(self, c2s: int, index: int, now: float) -> None:
        """Put pair ``c2s`` (at ``index``) at the tail of the free ring, freed at ``now``."""
        tail = self._free_head + self._free_count
        if tail >= self._capacity:
            tail -= self._capacity
        self._free[tail] = c2s
        self._free_count += 1
        self._release[index] = now  # its place among the free pairs when the rings are rebuilt (restore)
        self._state[index] = _FREE

    def _in_use(self, c2s: int) -> int:
        """The index of the pair ``c2s``, which must be in use (else ValueError: a double withdraw, an S2C label, or a
        label this manager never handed out)."""
        if not (self.c2s_min <= c2s <= self.c2s_max and c2s & 1 == 1):
            raise ValueError(
                f"label {c2s} is not a C2S label of this manager (odd in [{self.c2s_min}, {self.c2s_max}])"
            )
        index = (c2s - self._base) >> 1
        if self._state[index] != _IN_USE:
            raise ValueError(f"label pair {c2s}/{c2s + 1} is not in use")
        return index

    def withdraw(self, c2s: int, now: float) -> None:
        """End the use of the pair ``c2s``: it is quarantined until ``now + quarantine``, then becomes free.

        Raises ValueError if ``c2s`` is not the C2S label of a pair currently in use (a double withdraw,
        an S2C label, or a label this manager never handed out).
        """
        index = self._in_use(c2s)
        # Keep the ring sorted even if the caller's clock steps back: releasing late is safe, early is not.
        release = max(now + self._quarantine, self._last_release)
        self._last_release = release
        tail = self._q_head + self._q_count
        if tail >= self._capacity:
            tail -= self._capacity
        self._q_labels[tail] = c2s
        self._q_release[tail] = release
        self._q_count += 1
        self._release[index] = release  # before the state byte: a quarantined pair always has its time
        self._state[index] = _QUARANTINED
        self._in_use_count -= 1
        self._withdrawn_total += 1

    def give_back(self, c2s: int, now: float) -> None:
        """End the use of the pair ``c2s`` that no frame can have carried (taken for a decision made ahead, which
        no SYN took): it goes straight to the tail of the free ring, without the quarantine that keeps an ended
        session's late frames from reaching the pair's next session. Raises ValueError as :meth:`withdraw` does."""
        self._to_free_tail(c2s, self._in_use(c2s), now)
        self._in_use_count -= 1
        self._withdrawn_total += 1

    def claim(self, labels: list[int]) -> list[int]:
        """Take the free pairs ``labels`` (C2S labels of this manager) as in use without allocating them: the
        sessions a restarted node finds its peers carrying on its own labels. Returns the labels taken; a pair in
        use or quarantined is left as it is. One pass over the free ring per call, so claim in batches."""
        taken = []
        for c2s in labels:
            if self.c2s_min <= c2s <= self.c2s_max and c2s & 1 == 1:
                index = (c2s - self._base) >> 1
                if self._state[index] == _FREE:
                    self._state[index] = _IN_USE
                    taken.append(c2s)
        if taken:
            capacity, head, count = self._capacity, self._free_head, self._free_count
            ring = np.frombuffer(self._free, dtype=np.uint32)
            order = ring[(head + np.arange(count)) % capacity]
            state = np.frombuffer(self._state, dtype=np.uint8)
            kept = order[state[(order.astype(np.int64) - self._base) >> 1] == _FREE]
            ring[: kept.size] = kept
            self._free_head, self._free_count = 0, int(kept.size)
            self._in_use_count += len(taken)
            self._peak = max(self._peak, self._in_use_count)
        return taken

    # -- timers ----------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest time at which a quarantined pair becomes free, or ``None`` if none is quarantined."""
        return self._q_release[self._q_head] if self._q_count else None

    def on_timer(self, now: float) -> int:
        """Move every quarantined pair whose release time is <= ``now`` to the tail of the free ring.

        Returns how many pairs were released.
        """
        capacity = self._capacity
        q_labels, q_release, free, state = self._q_labels, self._q_release, self._free, self._state
        head, count = self._q_head, self._q_count
        free_tail = self._free_head + self._free_count
        if free_tail >= capacity:
            free_tail -= capacity
        released = 0
        while count and q_release[head] <= now:
            label = q_labels[head]
            free[free_tail] = label
            state[(label - self._base) >> 1] = _FREE
            free_tail += 1
            if free_tail == capacity:
                free_tail = 0
            head += 1
            if head == capacity:
                head = 0
            count -= 1
            released += 1
        self._q_head, self._q_count = head, count
        self._free_count += released
        return released

    # -- a manager adopted from a previous process (mplslb.state) ------------------------------------------------

    @property
    def pair_states(self) -> Any:
        """The per-pair state bytes (read-only use: adoption's consistency check)."""
        return self._state

    def quarantine_pair(self, c2s: int, now: float) -> None:
        """Before :meth:`restore`: put pair ``c2s`` in quarantine from ``now`` unless it is there already (the
        arrays only; adoption's repairs)."""
        index = (c2s - self._base) >> 1
        if self._state[index] != _QUARANTINED:
            self._release[index] = now + self._quarantine
            self._state[index] = _QUARANTINED

    def restore(self) -> None:
        """Rebuild the rings from the per-pair states and release times after adopting them: quarantined pairs in
        release order, free pairs behind each other in the order they were released (never used first)."""
        state = np.frombuffer(self._state, dtype=np.uint8)
        release = np.frombuffer(self._release, dtype=np.float64)
        labels = self._base + 2 * np.arange(self._capacity, dtype=np.int64)
        quarantined = np.flatnonzero(state == _QUARANTINED)
        quarantined = quarantined[np.argsort(release[quarantined], kind="stable")]
        free = np.flatnonzero(state == _FREE)
        free = free[np.argsort(release[free], kind="stable")]
        q_count, free_count = int(quarantined.size), int(free.size)
        np.frombuffer(self._q_labels, dtype=np.uint32)[:q_count] = labels[quarantined]
        np.frombuffer(self._q_release, dtype=np.float64)[:q_count] = release[quarantined]
        np.frombuffer(self._free, dtype=np.uint32)[:free_count] = labels[free]
        self._q_head, self._q_count = 0, q_count
        self._free_head, self._free_count = 0, free_count
        self._last_release = float(release[quarantined].max()) if q_count else -math.inf
        self._in_use_count = int(np.count_nonzero(state == _IN_USE))
        self._peak = max(self._peak, self._in_use_count)

    def release_untaken(self, labels: list[int], now: float) -> int:
        """After :meth:`restore`: free at once, behind the other free pairs, the quarantined pairs among ``labels``
        that no frame can have carried (the tickets a killed process left in the kernel's queue untaken, which the
        adoption put in quarantine as pairs allocated and never used before the queue could be read). Returns how
        many; the rings are rebuilt when any is."""
        freed = 0
        for c2s in labels:
            if self.c2s_min <= c2s <= self.c2s_max and c2s & 1 == 1:
                index = (c2s - self._base) >> 1
                if self._state[index] == _QUARANTINED:
                    self._release[index] = now  # its place among the free pairs: the last released
                    self._state[index] = _FREE
                    freed += 1
        if freed:
            self.restore()
        return freed

    # -- queries ---------------------------------------------------------------------------------

    def in_use(self, label: int) -> bool:
        """True if ``label`` (either member of a pair) belongs to a pair allocated and not yet withdrawn."""
        if not (self.c2s_min <= label <= self.c2s_max + 1):
            return False
        return self._state[((label - 1 if label & 1 == 0 else label) - self._base) >> 1] == _IN_USE

    def is_quarantined(self, label: int) -> bool:
        """True if ``label`` (either member) belongs to a withdrawn pair still waiting out its quarantine."""
        if not (self.c2s_min <= label <= self.c2s_max + 1):
            return False
        return self._state[((label - 1 if label & 1 == 0 else label) - self._base) >> 1] == _QUARANTINED

    @property
    def quarantine(self) -> float:
        """Seconds a withdrawn pair waits before reuse."""
        return self._quarantine

    @property
    def capacity(self) -> int:
        """Number of pairs in this manager's range."""
        return self._capacity

    @property
    def in_use_count(self) -> int:
        """Pairs allocated and not withdrawn."""
        return self._in_use_count

    @property
    def quarantined_count(self) -> int:
        """Pairs withdrawn and not yet released."""
        return self._q_count

    def free_at(self, now: float) -> int:
        """Pairs ready to allocate at ``now``: quarantined pairs whose time has come are released first, so a
        caller asking before the timer ran sees them, and when none is free, the pair :meth:`allocate` would
        release early."""
        if self._q_count and self._q_release[self._q_head] <= now:
            self.on_timer(now)
        if self._free_count == 0:
            self._release_early(now)
        return self._free_count

    @property
    def quarantine_min(self) -> float:
        """Seconds a withdrawn pair waits at least: when no pair is free, the one quarantined longest is released
        once it has waited this long."""
        return self._quarantine - self._early

    @quarantine_min.setter
    def quarantine_min(self, seconds: float) -> None:
        if not (math.isfinite(seconds) and 0 <= seconds <= self._quarantine):
            raise ValueError(
                f"quarantine_min must be a number of seconds in [0, {self._quarantine:g}], got {seconds!r}"
            )
        self._early = self._quarantine - float(seconds)

    @property
    def reused_early(self) -> int:
        """Pairs released before their quarantine was over, because no other pair was free."""
        return self._reused_early

    @property
    def free_count(self) -> int:
        """Pairs ready to allocate (quarantine already expired but not yet released is not counted)."""
        return self._free_count

    @property
    def peak(self) -> int:
        """Highest :attr:`in_use_count` seen."""
        return self._peak

    @property
    def allocated_total(self) -> int:
        """Pairs handed out since creation."""
        return self._allocated_total

    @property
    def withdrawn_total(self) -> int:
        """Pairs withdrawn since creation (quarantined, or given back when no frame can have carried them)."""
        return self._withdrawn_total

    @property
    def exhausted(self) -> int:
        """Times :meth:`allocate` found no free pair and returned ``None``."""
        return self._exhausted

    def stats(self) -> LabelStats:
        """A consistent snapshot of the counters."""
        return LabelStats(
            capacity=self._capacity,
            in_use_count=self._in_use_count,
            quarantined_count=self._q_count,
            free_count=self._free_count,
            peak=self._peak,
            allocated_total=self._allocated_total,
            withdrawn_total=self._withdrawn_total,
            exhausted=self._exhausted,
            reused_early=self._reused_early,
        )

    def __repr__(self) -> str:
        return (
            f"LabelManager(c2s={self.c2s_min}..{self.c2s_max}, in_use={self._in_use_count}, "
            f"quarantined={self._q_count}, free={self._free_count})"
        )
