"""A flow's 5-tuple, as the session table, the algorithms and the endpoints key on it."""

from __future__ import annotations

from typing import NamedTuple


class FlowKey(NamedTuple):
    """The 5-tuple of a packet as sent: ``src`` is the sender. Addresses are 4 or 16 bytes."""

    proto: int
    src: bytes
    sport: int
    dst: bytes
    dport: int

    def reversed(self) -> FlowKey:
        """The key of the same flow's packets in the other direction."""
        return FlowKey(self.proto, self.dst, self.dport, self.src, self.sport)
