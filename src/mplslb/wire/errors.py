"""The error family of the wire codecs.

Every decoder either returns its result or raises a subclass of :class:`WireError`. The ``reason`` is a short
snake_case name; the balancer counts dropped frames under it.
"""

from __future__ import annotations


class WireError(ValueError):
    """A frame (or file) that does not decode. ``reason`` names why, for drop counters."""

    reason: str

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
