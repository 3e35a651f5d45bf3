"""A bounded history of the daemon's snapshots, for the status page's charts.

Theory of operation
-------------------
The daemon loop builds a snapshot (:func:`mplslb.control.tables.snapshot`) every second. :meth:`StatusHistory.record`
reduces each to one small *point*: the time, the live sessions, the per-second rates of the global counters since
the previous point, and per server its live sessions and rates. Points go into a ring of ``capacity`` (300: five
minutes at one a second); the oldest falls out. Nothing here does I/O or reads a clock: the time is the
snapshot's own ``time``.

Rates are the counters' increase since the previous point divided by the time between them, by a
:class:`~mplslb.control.tables.RateTracker` with ``alpha = 1`` (no smoothing: a chart shows each second as it was;
the status tables' rates are the smoothed ones). A counter that went down (a server removed and added again)
starts over, as there. A point's rate is ``None`` where there is no previous reading (the first point, a server
just added). A snapshot less than ``min_gap`` seconds after the previous point is not recorded.

The ring is read from another thread (the HTTP server's): :meth:`points` returns a tuple rebuilt at each record,
so a reader holds an immutable view and the loop never mutates what was published; :func:`points_since` gives
the points after a time, so a page that already has the rest fetches only what is new.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from mplslb.control.tables import RateKey, RateTracker

__all__ = ["HISTORY_CAPACITY", "Point", "StatusHistory", "points_since"]

#: Five minutes at one snapshot a second.
HISTORY_CAPACITY = 300
Point = dict[str, Any]
#: (rate name, key of the snapshot's "frames") of the global counters; sessions come from "sessions"/"started".
_GLOBAL = (
    ("sessions", ""),
    ("frames_in", "in"),
    ("frames_out", "out"),
    ("fast_path", "fast_path"),
    ("slow_path", "slow_path"),
)
_SERVER = ("sessions", "packets_in", "packets_out")


def _counters(snap: Mapping[str, Any]) -> dict[RateKey, float]:
    sessions, frames = snap["sessions"], snap["frames"]
    counters: dict[RateKey, float] = {("sessions",): sessions["started"]}
    for name, key in _GLOBAL[1:]:
        counters[(name,)] = frames[key]
    for row in snap["servers"]:
        counters["server", row["name"], "sessions"] = row["total"]
        counters["server", row["name"], "packets_in"] = row["packets_in"]
        counters["server", row["name"], "packets_out"] = row["packets_out"]
    return counters


class StatusHistory:
    """The last ``capacity`` points reduced from the snapshots :meth:`record` is given."""

    def __init__(self, capacity: int = HISTORY_CAPACITY, *, min_gap: float = 0.5) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity!r}")
        if not (math.isfinite(min_gap) and min_gap > 0):
            raise ValueError(f"min_gap must be a finite number of seconds > 0, got {min_gap!r}")
        self.capacity = capacity
        self._ring: deque[Point] = deque(maxlen=capacity)
        self._rates = RateTracker(window=min_gap, alpha=1.0)
        self._seen: set[RateKey] = set()
        self._published: tuple[Point, ...] = ()

    def record(self, snap: Mapping[str, Any]) -> bool:
        """Reduce ``snap`` to a point and keep it; False (nothing kept) when it is less than ``min_gap`` seconds
        after the last point, or not after it at all."""
        now = float(snap["time"])
        if self._ring and now <= self._ring[-1]["t"]:
            return False
        counters = _counters(snap)
        first = not self._ring
        if not self._rates.update(counters, now) and not first:
            return False
        known = self._seen if not first else set()

        def rate(key: RateKey) -> float | None:
            return self._rates.rate(key) if key in known else None

        point: Point = {
            "t": now,
            "sessions": snap["sessions"]["active"],
            **{f"{name}_per_s": rate((name,)) for name, _ in _GLOBAL},
            "servers": {
                row["name"]: {
                    "status": row["status"],
                    "active": row["active"],
                    **{f"{name}_per_s": rate(("server", row["name"], name)) for name in _SERVER},
                }
                for row in snap["servers"]
            },
        }
        self._seen = set(counters)
        self._ring.append(point)
        self._published = tuple(self._ring)
        return True

    def points(self) -> tuple[Point, ...]:
        """The points, oldest first: an immutable view, safe to hand to another thread."""
        return self._published

    def __len__(self) -> int:
        return len(self._ring)


def points_since(points: Sequence[Point], since: float | None) -> Sequence[Point]:
    """The points of ``points`` (oldest first) taken after time ``since``; all of them for ``None``."""
    if since is None:
        return points
    return points[bisect.bisect_right(points, since, key=lambda p: float(p["t"])) :]
