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
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from mplslb.wire.ethernet import ETH_P_8021Q, ETH_P_MPLS_UC

LABEL_SPACE = 1 << 20
RESERVED_LABEL_MAX = 15

#: ``watch`` bits per label.
WATCH_TCP_END = 0x01  # report frames whose TCP flags carry FIN or RST
WATCH_ALL = 0x02  # report every frame (response-time measurement in progress)
#: Passed with ``watch`` to :meth:`LabelSwitchingTable.install`; kept in its own array.
IPV6_PAYLOAD = 0x04  # the payload under the label is IPv6 (TCP header offset recorded, not derived from IHL)
_BOTTOM_OF_STACK = 0x100
INTERN_LIMIT = 1 << 16
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
        self._interned: dict[bytes, bytes] = {}
        self._block: BlockTables | None = None  # numpy mirrors for the block fast path, made on first use
        #: Switch one frame on its label; see :func:`_compile_switch`.
        self.switch: Callable[[int, bytes | memoryview, float, list[tuple[int, bytes]], list[FastEvent]], int] = (
            _compile_switch(self)
        )

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
        # Many labels share these values (one rewrite per next hop and port, a router's MAC for all its clients,
        # the VIP as every S2C label's source): keep one object of each, about 100 bytes less per session.
        self.rewrite[label] = self._intern(bytes(next_hop) + self._port_macs[out_port])
        self.peer[label] = self._intern(bytes(peer))
        self.peer_ip[label] = self._intern(bytes(peer_ip))
        if self._block is not None:
            self._block.install(label, self.rewrite[label], self.peer[label], self.peer_ip[label])
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
        if self._block is not None:
            self._block.withdraw(label)

    def _intern(self, value: bytes) -> bytes:
        """One shared object per distinct value; the pool is bounded (cleared when full: sharing is an economy,
        never a requirement)."""
        pool = self._interned
        if len(pool) >= INTERN_LIMIT:
            pool.clear()
        return pool.setdefault(value, value)

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


def _compile_switch(
    table: LabelSwitchingTable,
) -> Callable[[int, bytes | memoryview, float, list[tuple[int, bytes]], list[FastEvent]], int]:
    """The one-frame fast path, as a closure over the table's arrays.

    ``switch(port, frame, now, out, events)`` switches one frame on its label: it appends ``(port, frame)`` to
    ``out`` and returns the output port, or returns :data:`NOT_LABELLED` (untouched) or :data:`DROPPED` (counted
    under a named reason). The arrays are bound as the closure's own variables (they are only ever changed in
    place), which spares a dozen attribute lookups per frame on the hottest path of the balancer.
    """
    valid, in_port, peer, peer_ip_of, v6 = table.valid, table.in_port, table.peer, table.peer_ip, table.v6
    out_port_of, rewrite, packets, octets = table.out_port, table.rewrite, table.packets, table.bytes
    last_seen, watch_of, drop, report = table.last_seen, table.watch, table._drop, table._report
    tcp_offset = table.tcp_offset
    unpack_entry, pack_entry = _ENTRY.unpack_from, _ENTRY.pack
    mpls_ethertype, join = _MPLS_ETHERTYPE, b"".join

    def switch(
        port: int, frame: bytes | memoryview, now: float, out: list[tuple[int, bytes]], events: list[FastEvent]
    ) -> int:
        n = len(frame)
        if n < 18:
            return NOT_LABELLED if n < 14 or frame[12:14] != mpls_ethertype else drop("mpls_truncated")
        ethertype = (frame[12] << 8) | frame[13]
        off = 14
        if ethertype == ETH_P_8021Q:
            ethertype = (frame[16] << 8) | frame[17]
            off = 18
            if ethertype == ETH_P_MPLS_UC and n < 22:
                return drop("mpls_truncated")
        if ethertype != ETH_P_MPLS_UC:
            return NOT_LABELLED
        (entry,) = unpack_entry(frame, off)
        label = entry >> 12
        if not valid[label]:
            return drop("mpls_reserved_label" if label <= RESERVED_LABEL_MAX else "label_unknown")
        if in_port[label] != port or frame[6:12] != peer[label]:
            return drop("label_wrong_ingress")
        if not entry & _BOTTOM_OF_STACK:
            return drop("label_not_bottom")  # session labels are always the only entry
        ip = off + 4
        peer_ip = peer_ip_of[label]
        if peer_ip:
            at = ip + (_IPV6_SRC if v6[label] else _IPV4_SRC)
            if frame[at : at + len(peer_ip)] != peer_ip:
                return drop("label_wrong_ingress")
        if (entry & 0xFF) <= 1:
            return drop("mpls_ttl_expired")
        out_port: int = out_port_of[label]
        out.append((out_port, join((rewrite[label], mpls_ethertype, pack_entry(entry - 1), frame[ip:]))))
        packets[label] += 1
        octets[label] += n
        last_seen[label] = now
        watch = watch_of[label]
        if watch:
            if watch & WATCH_ALL:
                report(label, watch, frame, ip, entry, now, events)
            elif ip < n:  # TCP: only FIN and RST go to the session manager; peek at the flags byte here, inline
                at = ip + (tcp_offset[label] if v6[label] else (frame[ip] & 0x0F) * 4) + _TCP_FLAGS_OFFSET
                if at < n and frame[at] & (TCP_FIN | TCP_RST):
                    report(label, watch, frame, ip, entry, now, events)
        return out_port

    return switch


class BlockTables:
    """Numpy mirrors of the per-label rows the block fast path needs, kept in step by install/withdraw.

    The scalar path keeps bytes objects per label (cheapest to join one frame at a time); a block of frames
    needs the same facts as fixed-width arrays to gather and scatter in bulk. The arrays cost about 110 bytes per
    label over the whole label space (about 115 MB), allocated once, only when the block path is first used.
    """

    def __init__(self, table: LabelSwitchingTable) -> None:
        self.rewrite = np.zeros((LABEL_SPACE, 12), dtype=np.uint8)
        self.peer = np.zeros((LABEL_SPACE, 6), dtype=np.uint8)
        self.peer_ip4 = np.zeros((LABEL_SPACE, 4), dtype=np.uint8)
        self.peer_ip6 = np.zeros((LABEL_SPACE, 16), dtype=np.uint8)
        self.has_peer_ip = np.zeros(LABEL_SPACE, dtype=np.bool_)
        # The same rows as machine words, for blocks whose frames start 2 bytes past a 4-byte boundary (as in a
        # TPACKET ring, where the IP header is 16-byte aligned): then every field sits on a word boundary and is
        # read or written with one gather per word instead of one per byte.
        self.rewrite_w = np.zeros((LABEL_SPACE, 3), dtype=np.uint32)  # bytes 2..13 of the frame: see _aligned
        self.rewrite_h = np.zeros(LABEL_SPACE, dtype=np.uint16)  # bytes 0..1
        self.peer_w = np.zeros(LABEL_SPACE, dtype=np.uint32)  # source MAC bytes 0..3 (frame bytes 6..9)
        self.peer_h = np.zeros(LABEL_SPACE, dtype=np.uint16)  # source MAC bytes 4..5 (frame bytes 10..11)
        self.peer_ip4_w = np.zeros(LABEL_SPACE, dtype=np.uint32)
        self.peer_ip6_w = np.zeros((LABEL_SPACE, 4), dtype=np.uint32)
        # Views over the scalar path's arrays: one table, two ways to read it.
        self.valid = np.frombuffer(table.valid, dtype=np.uint8)
        self.watch = np.frombuffer(table.watch, dtype=np.uint8)
        self.v6 = np.frombuffer(table.v6, dtype=np.uint8)
        self.out_port = np.frombuffer(table.out_port, dtype=np.int32)
        self.in_port = np.frombuffer(table.in_port, dtype=np.int32)
        self.tcp_offset = np.frombuffer(table.tcp_offset, dtype=np.uint16)
        self.packets = np.frombuffer(table.packets, dtype=np.uint64)
        self.bytes = np.frombuffer(table.bytes, dtype=np.uint64)
        self.last_seen = np.frombuffer(table.last_seen, dtype=np.float64)
        self.stamp = np.zeros(LABEL_SPACE, dtype=np.int64)  # scratch for finding repeated labels in a block
        self._views = tuple(
            memoryview(a.data).cast("B")
            for a in (
                self.rewrite,
                self.peer,
                self.has_peer_ip,
                self.rewrite_h,
                self.rewrite_w,
                self.peer_w,
                self.peer_h,
                self.peer_ip4,
                self.peer_ip4_w,
                self.peer_ip6,
                self.peer_ip6_w,
            )
        )
        for label in np.flatnonzero(self.valid):
            self.install(int(label), table.rewrite[label], table.peer[label], table.peer_ip[label])

    def install(self, label: int, rewrite: bytes, peer: bytes, peer_ip: bytes) -> None:
        """Write one label's rows through byte views of the arrays (numpy item assignment per field costs about
        5 us a label; slice assignment on memoryviews about 1.5 us)."""
        rw, pe, has, rh, rww, pw, ph, p4, p4w, p6, p6w = self._views
        r = 12 * label
        rw[r : r + 12] = rewrite
        # Frame bytes 0..13 are the rewrite (12 bytes) and the ethertype, unchanged, so the words written are
        # bytes 0..1 (a half word) and 2..13 (three words) with the ethertype carried in the last one.
        rww[r : r + 10] = rewrite[2:12]
        rww[r + 10 : r + 12] = _MPLS_ETHERTYPE
        rh[2 * label : 2 * label + 2] = rewrite[0:2]
        pe[6 * label : 6 * label + 6] = peer
        pw[4 * label : 4 * label + 4] = peer[0:4]
        ph[2 * label : 2 * label + 2] = peer[4:6]
        has[label] = 1 if peer_ip else 0
        if len(peer_ip) == 4:
            p4[4 * label : 4 * label + 4] = peer_ip
            p4w[4 * label : 4 * label + 4] = peer_ip
        elif len(peer_ip) == 16:
            p6[16 * label : 16 * label + 16] = peer_ip
            p6w[16 * label : 16 * label + 16] = peer_ip

    def withdraw(self, label: int) -> None:
        self.has_peer_ip[label] = False


_ETH_ADDRS_RANGE = np.arange(_ETH_ADDRS, dtype=np.int64)
_SRC_MAC_RANGE = np.arange(6, 12, dtype=np.int64)
_IP4_RANGE = np.arange(4, dtype=np.int64)
_IP6_RANGE = np.arange(16, dtype=np.int64)
_MPLS_AT = 14  # the block path takes untagged frames; tagged ones go one at a time
_IP_AT = _MPLS_AT + 4


class BlockVerdict(NamedTuple):
    """What :meth:`LabelSwitchingTable.switch_block` did with each frame of a block."""

    out_port: np.ndarray  # per frame: the output port, or -1 when not switched here
    labels: np.ndarray  # per frame: the label read (0 when none)
    switched: np.ndarray  # per frame: True when forwarded by the block path (rewritten in place)


def _block_tables(table: LabelSwitchingTable) -> BlockTables:
    if table._block is None:
        table._block = BlockTables(table)
    return table._block


def switch_block(
    table: LabelSwitchingTable,
    buf: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    ports: np.ndarray,
    now: float,
    events: list[FastEvent],
) -> BlockVerdict:
    """Switch every frame of a block that the fast path can take, in bulk, rewriting it in place in ``buf``.

    ``buf`` is a uint8 array holding the frames; frame i is ``buf[starts[i] : starts[i] + lengths[i]]`` and arrived
    on ``ports[i]``. A frame is taken when it is an untagged MPLS frame whose label is installed, bound to that
    port, source MAC and IP source, at the bottom of its stack, with a TTL above 1: exactly the frames the scalar
    :meth:`LabelSwitchingTable.switch` would forward. Those are rewritten (Ethernet addresses, TTL - 1) where they
    lie and counted; the caller sends ``buf[start : start + length]`` to ``out_port``. Every other frame is left
    untouched for the one-at-a-time path, which drops it under its reason or analyses it. Reports for the session
    manager (FIN/RST, watched labels) are appended to ``events`` in frame order.
    """
    t = _block_tables(table)
    n = len(starts)
    starts = starts.astype(np.int64, copy=False)
    lengths = lengths.astype(np.int64, copy=False)
    if not bool((lengths >= _IP_AT).any()):  # nothing long enough to carry a label: all for the one-frame path
        return BlockVerdict(np.full(n, -1, dtype=np.int32), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.bool_))
    if _word_aligned(buf, starts):
        return _switch_aligned(t, buf, starts, lengths, ports, now, events)
    long_enough = lengths >= _IP_AT
    at = np.where(long_enough, starts, starts[np.argmax(long_enough)])  # short frames read a long one's bytes
    ethertype = (buf[at + 12].astype(np.uint32) << 8) | buf[at + 13]
    mpls = long_enough & (ethertype == ETH_P_MPLS_UC)
    entry = (
        (buf[at + 14].astype(np.uint32) << 24)
        | (buf[at + 15].astype(np.uint32) << 16)
        | (buf[at + 16].astype(np.uint32) << 8)
        | buf[at + 17]
    )
    labels = np.where(mpls, entry >> 12, 0).astype(np.int64)
    ok = mpls & (t.valid[labels] != 0) & (labels > RESERVED_LABEL_MAX)
    ok &= t.in_port[labels] == ports
    ok &= (buf[at[:, None] + _SRC_MAC_RANGE] == t.peer[labels]).all(axis=1)
    ok &= (entry & _BOTTOM_OF_STACK) != 0
    ok &= (entry & 0xFF) > 1
    v6 = t.v6[labels] != 0
    check_ip = ok & t.has_peer_ip[labels]
    if check_ip.any():
        ip4 = check_ip & ~v6 & (lengths >= _IP_AT + _IPV4_SRC + 4)
        ip6 = check_ip & v6 & (lengths >= _IP_AT + _IPV6_SRC + 16)
        good = np.zeros(n, dtype=np.bool_)
        if ip4.any():
            rows = np.flatnonzero(ip4)
            src = buf[(starts[rows] + _IP_AT + _IPV4_SRC)[:, None] + _IP4_RANGE]
            good[rows] = (src == t.peer_ip4[labels[rows]]).all(axis=1)
        if ip6.any():
            rows = np.flatnonzero(ip6)
            src = buf[(starts[rows] + _IP_AT + _IPV6_SRC)[:, None] + _IP6_RANGE]
            good[rows] = (src == t.peer_ip6[labels[rows]]).all(axis=1)
        ok &= ~check_ip | good
    rows = np.flatnonzero(ok)
    if len(rows):
        begin = starts[rows]
        buf[begin[:, None] + _ETH_ADDRS_RANGE] = t.rewrite[labels[rows]]
    return _switched(t, buf, starts, lengths, rows, labels, ok, now, events)


def _word_aligned(buf: np.ndarray, starts: np.ndarray) -> bool:
    """Do all frames start 2 bytes past a 4-byte boundary of a word-viewable buffer?"""
    return (
        buf.dtype == np.uint8
        and buf.ndim == 1
        and buf.flags.c_contiguous
        and buf.ctypes.data % 4 == 0
        and len(buf) % 4 == 0
        and bool(((starts & 3) == 2).all())
    )


def _switch_aligned(
    t: BlockTables,
    buf: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    ports: np.ndarray,
    now: float,
    events: list[FastEvent],
) -> BlockVerdict:
    """:func:`switch_block` for word-aligned frames: the same checks and rewrite, one gather or scatter per word.

    With a frame starting at s = 4k + 2: the ethertype is the half word at s + 12, the label entry the word at
    s + 14, the source MAC the word at s + 6 and the half word at s + 10, the IPv4 source the word at s + 30,
    the IPv6 source the four words from s + 26; the rewritten addresses are the half word at s and the three
    words from s + 2 (the last one carries the unchanged ethertype).
    """
    n = len(starts)
    half = buf.view(np.uint16)
    word = buf.view(np.uint32)
    big_half = buf.view(">u2")
    big_word = buf.view(">u4")
    long_enough = lengths >= _IP_AT
    at = np.where(long_enough, starts, starts[np.argmax(long_enough)])  # short frames read a long one's bytes
    mpls = long_enough & (big_half[(at + 12) >> 1] == ETH_P_MPLS_UC)
    entry = big_word[(at + 14) >> 2].astype(np.uint32)
    labels = np.where(mpls, entry >> 12, 0).astype(np.int64)
    ok = mpls & (t.valid[labels] != 0) & (labels > RESERVED_LABEL_MAX)
    ok &= t.in_port[labels] == ports
    ok &= word[(at + 6) >> 2] == t.peer_w[labels]
    ok &= half[(at + 10) >> 1] == t.peer_h[labels]
    ok &= (entry & _BOTTOM_OF_STACK) != 0
    ok &= (entry & 0xFF) > 1
    v6 = t.v6[labels] != 0
    check_ip = ok & t.has_peer_ip[labels]
    if check_ip.any():
        ip4 = check_ip & ~v6 & (lengths >= _IP_AT + _IPV4_SRC + 4)
        good = np.zeros(n, dtype=np.bool_)
        good[ip4] = word[(starts[ip4] + _IP_AT + _IPV4_SRC) >> 2] == t.peer_ip4_w[labels[ip4]]
        ip6 = check_ip & v6 & (lengths >= _IP_AT + _IPV6_SRC + 16)
        if ip6.any():
            rows6 = np.flatnonzero(ip6)
            first = (starts[rows6] + _IP_AT + _IPV6_SRC) >> 2
            src = word[first[:, None] + np.arange(4)]
            good[rows6] = (src == t.peer_ip6_w[labels[rows6]]).all(axis=1)
        ok &= ~check_ip | good
    rows = np.flatnonzero(ok)
    if len(rows):
        begin = starts[rows]
        taken = labels[rows]
        half[begin >> 1] = t.rewrite_h[taken]
        first_word = (begin + 2) >> 2
        words = t.rewrite_w[taken]
        word[first_word] = words[:, 0]
        word[first_word + 1] = words[:, 1]
        word[first_word + 2] = words[:, 2]
    return _switched(t, buf, starts, lengths, rows, labels, ok, now, events)


def _switched(
    t: BlockTables,
    buf: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    rows: np.ndarray,
    labels: np.ndarray,
    ok: np.ndarray,
    now: float,
    events: list[FastEvent],
) -> BlockVerdict:
    """What both block variants do once the switched frames (``rows``) have their addresses rewritten: the TTL,
    the counters, the reports for watched labels, the verdict."""
    taken = labels[rows]
    if len(rows):
        buf[starts[rows] + 17] -= 1  # the TTL byte of the label entry (checked > 1 above)
        _count(t, taken, lengths[rows], now)
        watch = t.watch[taken]
        watched = np.flatnonzero(watch)
        if len(watched):
            _block_reports(t, buf, starts, lengths, rows[watched], taken[watched], watch[watched], now, events)
    out_port = np.full(len(starts), -1, dtype=np.int32)
    out_port[rows] = t.out_port[taken]
    return BlockVerdict(out_port, labels, ok)


def _count(t: BlockTables, taken: np.ndarray, lengths: np.ndarray, now: float) -> None:
    """Per-label packets, bytes and last-seen for the switched frames.

    A fancy-index add counts a label that repeats within the block once, and ``np.add.at`` is slow (about 100 ns
    an element), so: a stamp picks one occurrence of each label (whichever the scatter kept), those are added
    with plain fancy indexing (their labels are distinct), and only the other occurrences go through ``add.at``.
    """
    stamp = t.stamp
    order = np.arange(len(taken), dtype=np.int64)
    stamp[taken] = order
    first = stamp[taken] == order
    sizes = lengths.astype(np.uint64)
    if bool(first.all()):
        t.packets[taken] += np.uint64(1)
        t.bytes[taken] += sizes
    else:
        once = taken[first]
        t.packets[once] += np.uint64(1)
        t.bytes[once] += sizes[first]
        again = ~first
        np.add.at(t.packets, taken[again], np.uint64(1))
        np.add.at(t.bytes, taken[again], sizes[again])
    t.last_seen[taken] = now


def _block_reports(
    t: BlockTables,
    buf: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    rows: np.ndarray,
    labels: np.ndarray,
    watch: np.ndarray,
    now: float,
    events: list[FastEvent],
) -> None:
    """The scalar path's ``_report`` for the watched frames of a block: peek at the TCP flags, report FIN/RST and
    every frame of labels whose response time is being measured."""
    begin = starts[rows]
    end = begin + lengths[rows]
    ip = begin + _IP_AT
    v4_offset = (buf[np.minimum(ip, end - 1)] & 0x0F).astype(np.int64) * 4
    offset = np.where(t.v6[labels] != 0, t.tcp_offset[labels].astype(np.int64), v4_offset)
    flag_at = ip + offset + _TCP_FLAGS_OFFSET
    peek = ((watch & WATCH_TCP_END) != 0) & (flag_at < end) & (ip < end)
    flags = np.where(peek, buf[np.where(peek, flag_at, 0)], 0)
    report = ((watch & WATCH_ALL) != 0) | ((flags & (TCP_FIN | TCP_RST)) != 0)
    for k in np.flatnonzero(report):
        b, e = int(begin[k]), int(end[k])
        events.append(FastEvent(int(labels[k]), buf[b:e].tobytes(), _IP_AT, int(flags[k]), now))
