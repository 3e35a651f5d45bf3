"""The session label switching unit (claims 1, 5, 9): switch a labelled frame on its label alone.

Theory of operation
-------------------
The label switching table of claim 5 maps a label to the line card and port the frame leaves by and the next hop it
is sent to. It lives in arrays preallocated over the whole 20-bit label space and indexed by the label, so a lookup
is an index, never a hash of a header, and the memory a session adds is a few dozen bytes of array slots.

For each labelled frame :meth:`LabelSwitchingTable.switch` reads the Ethernet header (tolerating one 802.1Q tag)
and the top label stack entry (RFC 3032), then checks, in this order:

* the label is installed (``label_unknown``), it is not a reserved label 0-15 (``mpls_reserved_label``);
* the frame came in where the label is bound: the ingress port and the peer's MAC address recorded when the
  session was set up, and the IP source address of the session's sender (``label_wrong_ingress``): a client can
  never steer frames into another client's session, even from behind the same router. A session label is always
  the only entry of its stack; one with entries below it is dropped (``label_not_bottom``);
* the TTL of the entry is above 1 (``mpls_ttl_expired``), per RFC 3032 it is then decremented.

The frame leaves with its Ethernet addresses rewritten to (next hop, our port) and its label entry's TTL lowered;
the rest of the frame is not read. Two things ride along without changing that decision: per-label packet and byte
counters with the last time seen (idle timeouts and statistics), and, for labels whose ``watch`` bits ask for it, a
report to the session managing unit: for TCP sessions a FIN or RST in the one byte of TCP flags, or, while a
response time is being measured, every frame. Reports are returned in a list the caller hands to the session
manager after forwarding.
"""

from __future__ import annotations

import struct
from array import array
from typing import NamedTuple

from mplslb.wire.ethernet import ETH_P_8021Q, ETH_P_MPLS_UC

LABEL_SPACE = 1 << 20
RESERVED_LABEL_MAX = 15

#: ``watch`` bits per label.
WATCH_TCP_END = 0x01  # report frames whose TCP flags carry FIN or RST
WATCH_ALL = 0x02  # report every frame (response-time measurement in progress)
#: Passed with ``watch`` to :meth:`LabelSwitchingTable.install`; kept in its own array.
IPV6_PAYLOAD = 0x04  # the payload under the label is IPv6 (TCP header offset recorded, not derived from IHL)
_BOTTOM_OF_STACK = 0x100
_IPV4_SRC = 12
_IPV6_SRC = 8

TCP_FIN = 0x01
TCP_RST = 0x04
_TCP_FLAGS_OFFSET = 13

_ETHERTYPE = struct.Struct("!H")
_ENTRY = struct.Struct("!I")
_ETH_ADDRS = 12
_MPLS_ETHERTYPE = _ETHERTYPE.pack(ETH_P_MPLS_UC)

# Result codes of :meth:`LabelSwitchingTable.switch`: a non-negative value is the output port.
NOT_LABELLED = -1
DROPPED = -2


class SwitchEntry(NamedTuple):
    """One row of the label switching table, for display and tests (the hot path reads the arrays)."""

    label: int
    line_card: int
    port: int
    port_id: int
    next_hop: bytes
    in_port_id: int
    peer: bytes
    packets: int
    bytes: int
    last_seen: float


class FastEvent(NamedTuple):
    """A report from the fast path to the session managing unit, made after the frame was forwarded."""

    label: int
    frame: bytes | memoryview
    ip_offset: int
    tcp_flags: int
    now: float


class LabelSwitchingTable:
    """Label -> (line card, output port, next hop) in arrays indexed by label."""

    def __init__(self, port_macs: dict[int, bytes], port_places: dict[int, tuple[int, int]]) -> None:
        """``port_macs`` maps a port id to its MAC address; ``port_places`` to its (line card, port number)."""
        self._port_macs = dict(port_macs)
        self._port_places = dict(port_places)
        self.valid = bytearray(LABEL_SPACE)
        self.watch = bytearray(LABEL_SPACE)
        self.v6 = bytearray(LABEL_SPACE)
        self.out_port = array("i", [-1]) * LABEL_SPACE
        self.in_port = array("i", [-1]) * LABEL_SPACE
        self.tcp_offset = array("H", [0]) * LABEL_SPACE  # IPv6 only: IP header start -> TCP header
        self.packets = array("Q", [0]) * LABEL_SPACE
        self.bytes = array("Q", [0]) * LABEL_SPACE
        self.last_seen = array("d", [0.0]) * LABEL_SPACE
        # 12 bytes (next hop MAC + our port's MAC) written over the frame's Ethernet addresses.
        self.rewrite: list[bytes] = [b""] * LABEL_SPACE
        self.peer: list[bytes] = [b""] * LABEL_SPACE
        self.peer_ip: list[bytes] = [b""] * LABEL_SPACE
        self.installed = 0
        self.drops: dict[str, int] = {}
        #: When a list, every install (+label) and withdrawal (-label) is appended, for a driver that mirrors the
        #: table elsewhere (kernel offload) to drain with :meth:`take_changes`.
        self.changes: list[int] | None = None

    # -- control plane -------------------------------------------------------------------------------------------
    def install(
        self,
        label: int,
        *,
        out_port: int,
        next_hop: bytes,
        in_port: int,
        peer: bytes,
        peer_ip: bytes = b"",
        watch: int = 0,
        tcp_offset: int = 0,
        now: float = 0.0,
    ) -> None:
        """Install ``label``: frames arriving on ``in_port`` from ``peer`` (and, if given, IP source ``peer_ip``)
        leave by ``out_port`` to ``next_hop``."""
        if not RESERVED_LABEL_MAX < label < LABEL_SPACE:
            raise ValueError(f"label {label} is outside the usable label space")
        if out_port not in self._port_macs or in_port not in self._port_macs:
            raise ValueError(f"unknown port in install: out {out_port}, in {in_port}")
        if len(next_hop) != 6 or len(peer) != 6:
            raise ValueError("next_hop and peer must be 6-byte MAC addresses")
        if not self.valid[label]:
            self.installed += 1
        self.valid[label] = 1
        self.watch[label] = watch & (WATCH_TCP_END | WATCH_ALL)
        self.v6[label] = 1 if watch & IPV6_PAYLOAD else 0
        self.out_port[label] = out_port
        self.in_port[label] = in_port
        self.tcp_offset[label] = tcp_offset
        self.rewrite[label] = bytes(next_hop) + self._port_macs[out_port]
        self.peer[label] = bytes(peer)
        self.peer_ip[label] = bytes(peer_ip)
        self.packets[label] = 0
        self.bytes[label] = 0
        self.last_seen[label] = now
        if self.changes is not None:
            self.changes.append(label)

    def take_changes(self) -> list[int]:
        """Labels installed (positive) and withdrawn (negative) since the last call, in order."""
        changes, self.changes = self.changes or [], [] if self.changes is not None else None
        return changes

    def withdraw(self, label: int) -> None:
        """Remove ``label`` from the table: later frames with it are dropped as ``label_unknown``."""
        if self.valid[label]:
            self.installed -= 1
            if self.changes is not None:
                self.changes.append(-label)
        self.valid[label] = 0
        self.watch[label] = 0
        self.out_port[label] = -1
        self.in_port[label] = -1
        self.rewrite[label] = b""
        self.peer[label] = b""
        self.peer_ip[label] = b""

    def account(self, label: int, size: int, now: float) -> None:
        """Count a frame of ``label``'s session that went by the slow path (an unlabelled frame of it)."""
        self.packets[label] += 1
        self.bytes[label] += size
        self.last_seen[label] = now

    def port_place(self, port_id: int) -> tuple[int, int]:
        """(line card, port number) of a port id."""
        return self._port_places[port_id]

    def set_watch(self, label: int, watch: int) -> None:
        self.watch[label] = watch

    def entry(self, label: int) -> SwitchEntry | None:
        """The table row for ``label``, or None when it is not installed."""
        if not self.valid[label]:
            return None
        port_id = self.out_port[label]
        line_card, number = self._port_places[port_id]
        return SwitchEntry(
            label,
            line_card,
            number,
            port_id,
            self.rewrite[label][:6],
            self.in_port[label],
            self.peer[label],
            self.packets[label],
            self.bytes[label],
            self.last_seen[label],
        )

    def _drop(self, reason: str) -> int:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        return DROPPED

    # -- data plane ----------------------------------------------------------------------------------------------
    def switch(
        self, port: int, frame: bytes | memoryview, now: float, out: list[tuple[int, bytes]], events: list[FastEvent]
    ) -> int:
        """Switch one frame on its label. Appends ``(port, frame)`` to ``out`` and returns the output port,
        or returns :data:`NOT_LABELLED` (untouched) or :data:`DROPPED` (counted under a named reason)."""
        n = len(frame)
        if n < 18:
            return NOT_LABELLED if n < 14 or frame[12:14] != _MPLS_ETHERTYPE else self._drop("mpls_truncated")
        ethertype = (frame[12] << 8) | frame[13]
        off = 14
        if ethertype == ETH_P_8021Q:
            ethertype = (frame[16] << 8) | frame[17]
            off = 18
            if ethertype == ETH_P_MPLS_UC and n < 22:
                return self._drop("mpls_truncated")
        if ethertype != ETH_P_MPLS_UC:
            return NOT_LABELLED
        (entry,) = _ENTRY.unpack_from(frame, off)
        label = entry >> 12
        if not self.valid[label]:
            return self._drop("mpls_reserved_label" if label <= RESERVED_LABEL_MAX else "label_unknown")
        if self.in_port[label] != port or frame[6:12] != self.peer[label]:
            return self._drop("label_wrong_ingress")
        if not entry & _BOTTOM_OF_STACK:
            return self._drop("label_not_bottom")  # session labels are always the only entry
        ip = off + 4
        peer_ip = self.peer_ip[label]
        if peer_ip:
            at = ip + (_IPV6_SRC if self.v6[label] else _IPV4_SRC)
            if frame[at : at + len(peer_ip)] != peer_ip:
                return self._drop("label_wrong_ingress")
        if (entry & 0xFF) <= 1:
            return self._drop("mpls_ttl_expired")
        out_port: int = self.out_port[label]
        body = frame[ip:]
        out.append((out_port, b"".join((self.rewrite[label], _MPLS_ETHERTYPE, _ENTRY.pack(entry - 1), body))))
        self.packets[label] += 1
        self.bytes[label] += n
        self.last_seen[label] = now
        watch = self.watch[label]
        if watch:
            self._report(label, watch, frame, ip, entry, now, events)
        return out_port

    def _report(
        self,
        label: int,
        watch: int,
        frame: bytes | memoryview,
        ip: int,
        entry: int,
        now: float,
        events: list[FastEvent],
    ) -> None:
        """Peek at the TCP flags (one byte) of a watched label's frame and report it if asked to."""
        flags = 0
        if watch & WATCH_TCP_END:
            if self.v6[label]:
                at = ip + self.tcp_offset[label] + _TCP_FLAGS_OFFSET
            else:
                at = ip + (frame[ip] & 0x0F) * 4 + _TCP_FLAGS_OFFSET if len(frame) > ip else -1
            if 0 <= at < len(frame):
                flags = frame[at]
        if watch & WATCH_ALL or flags & (TCP_FIN | TCP_RST):
            events.append(FastEvent(label, frame, ip, flags, now))
