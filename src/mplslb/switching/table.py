"""The label switching table of claim 5: label -> (line card, output port, next hop), in rows indexed by label.

Theory of operation
-------------------
The table lives in rows preallocated over the whole 20-bit label space and indexed by the label, so a lookup is an
index, never a hash of a header, and a session adds no object of its own. One row per label holds what a frame reads
and counts, the flow binding and peer IP included, on two adjacent cache lines
(:data:`~mplslb.switching.layout.ROW_SIZE` octets: see the ``ROW_*`` offsets), and its ``generation`` too, which tells
whoever holds a decision made from the table (the block path's caller, the kernel offload) whether it still
stands. Readers see each field indexed by label (:class:`RowField`, :class:`RowBytes`, :class:`RowMacs`: the MACs
as byte strings, made from the row's integers) or a whole row at once (:meth:`~LabelSwitchingTable.row`). The table
owns the rows: the fast paths in this package read and count through them, and everything outside reads them and
changes them only through the table's methods:

* the control plane: :meth:`~LabelSwitchingTable.install`, :meth:`~LabelSwitchingTable.withdraw`,
  :meth:`~LabelSwitchingTable.set_watch`, :meth:`~LabelSwitchingTable.repoint` (a neighbour's new MAC);
* sending on a label from the slow path: :meth:`~LabelSwitchingTable.send` attaches the session label (claim 15)
  to an unlabelled frame of the session, addresses it to the label's next hop and counts it;
* activity that happened elsewhere: :meth:`~LabelSwitchingTable.fold_counters` adds what the kernel offload
  forwarded; the ``ack_stores`` (the kernel offload) hold the last acknowledgment number of the labels switched
  there (:meth:`~LabelSwitchingTable.last_ack`).

The last acknowledgment number per label. For a TCP session's labels (watched for FIN and RST) every path that
forwards a TCP segment with ACK set and RST clear records its acknowledgment number in ``acks`` (with
:data:`~mplslb.switching.layout.ACK_KNOWN` set): one word written per frame, next to the counters. It tells how far
the receiving end had got when it last spoke, so the session manager can judge whether an RST or FIN travelling
the other way carries a sequence number the endpoint could have sent (:meth:`~LabelSwitchingTable.in_window`; see
:mod:`mplslb.sessions`). Only TCP segments count: an IPv4 packet of another protocol or a fragment past the first
writes nothing, nor does an IPv6 packet whose TCP header does not follow the fixed header. A label switched
elsewhere (in the kernel) has its number kept there, in the same way: that store is the one to read while the
label is in it, and what the slow path sends on such a label is written through to it (:class:`AckStore`), so
the number read is always the last frame's, whichever path forwarded it.

Each row binds the label to where its frames may come from (ingress port, peer MAC, IP source) and, for a session
label, to the session's flow as that direction carries it: the IP destination and the TCP or UDP ports. A label
pair is reused by later sessions, possibly to the same server, whose agent may still send a late frame of the old
flow: the flow binding keeps that frame from reaching the new session's client (see
:mod:`~mplslb.switching.scalar` for the exact rule).

Copies of the rows kept elsewhere (the kernel offload's map, later other programs) are :class:`Mirror` objects:
the table tells each one every install, withdrawal and watch change, in order, as they happen.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from types import ModuleType
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import numpy as np

from mplslb.state import HEAP, Allocator
from mplslb.switching.layout import (
    ACK_KNOWN,
    ETH_ALEN,
    ETH_P_MPLS_UC,
    FLOW_MAX,
    GENERATION_MASK,
    IPV4_ADDR_LEN,
    IPV6_ADDR_LEN,
    IPV6_PAYLOAD,
    L4_PORTS_LEN,
    LABEL_SHIFT,
    LABEL_SPACE,
    LABELLED_HEAD,
    MPLS_BOS,
    PEER_IP_MAX,
    RESERVED_LABEL_MAX,
    REWRITE,
    ROW,
    ROW_ACKS,
    ROW_BINDING,
    ROW_BYTES,
    ROW_FLOW,
    ROW_FLOW_LEN,
    ROW_GENERATION,
    ROW_IN_PORT,
    ROW_LAST_SEEN,
    ROW_OUT_PORT,
    ROW_PACKETS,
    ROW_PAIR,
    ROW_PEER,
    ROW_PEER_IP,
    ROW_PEER_IP_LEN,
    ROW_QUAD_SHIFT,
    ROW_REWRITE,
    ROW_REWRITE_TAIL,
    ROW_SHIFT,
    ROW_SIZE,
    ROW_V6,
    ROW_VALID,
    ROW_WATCH,
    ROW_WORD_SHIFT,
    WATCH_BITS,
    WATCH_TCP_END,
)
from mplslb.wire.mpls import TC_SHIFT

#: The ethertype of a labelled frame, as it lies on the wire.
MPLS_ETHERTYPE = ETH_P_MPLS_UC.to_bytes(2, "big")
#: The drop reason of a frame outside its label's session flow.
WRONG_FLOW = "label_wrong_flow"
_SEQ_MASK = (1 << 32) - 1
_PORTS = struct.Struct("!HH")
_PORT_MAX = 0xFFFF
_WORD_SIZE, _QUAD_SIZE = 4, 8
_REWRITE_LEN = REWRITE.size  # the two MACs a labelled frame leaves with
_pack_head = LABELLED_HEAD.pack
_unpack_row = ROW.unpack_from
_pack_binding = ROW_BINDING.pack_into
_pack_pair = ROW_PAIR.pack_into
#: An IPv4 flow key's octets as the reverse flow's key orders them: destination, source, then the ports swapped.
_REVERSED_V4 = [4, 5, 6, 7, 0, 1, 2, 3, 10, 11, 8, 9]
#: A label's row (:data:`~mplslb.switching.layout.ROW_SIZE` octets) as numpy sees it.
ROW_DTYPE = np.dtype(
    {
        "names": [
            *("valid", "watch", "v6", "flow_len", "in_port", "out_port", "generation"),
            *("packets", "bytes", "last_seen", "acks"),
        ],
        "formats": [np.uint8] * 4 + [np.int32] * 3 + [np.uint64, np.uint64, np.float64, np.uint64],
        "offsets": [ROW_VALID, ROW_WATCH, ROW_V6, ROW_FLOW_LEN]
        + [at * _WORD_SIZE for at in (ROW_IN_PORT, ROW_OUT_PORT, ROW_GENERATION)]
        + [at * _QUAD_SIZE for at in (ROW_PACKETS, ROW_BYTES, ROW_LAST_SEEN, ROW_ACKS)],
        "itemsize": ROW_SIZE,
    }
)
_T = TypeVar("_T", int, float)


def flow_key(src: bytes, dst: bytes, ports: tuple[int, int]) -> bytes:
    """A label's flow key (see :func:`flow_parts`): its packets' IP source and destination and their two ports."""
    return bytes(src) + bytes(dst) + _PORTS.pack(*ports)


def flow_parts(key: bytes) -> tuple[bytes, bytes]:
    """(IP destination, ports) of a label's flow key: IP source, IP destination and the two ports, back to back as
    they lie in a packet without IP options or IPv6 extension headers."""
    if not key:
        return b"", b""
    size = (len(key) - L4_PORTS_LEN) // 2
    return key[size : 2 * size], key[2 * size :]


class SwitchEntry(NamedTuple):
    """One row of the label switching table, for display and tests (the hot path reads the rows)."""

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


class LabelRow(NamedTuple):
    """One label's row read at once (:meth:`LabelSwitchingTable.row`): what a copy of it elsewhere (the kernel
    offload's map entry) is written from."""

    watch: int
    v6: int
    in_port: int
    out_port: int
    acks: int
    rewrite: bytes
    peer: bytes
    peer_ip: bytes
    flow: bytes


class FastEvent(NamedTuple):
    """A report from a fast path to the session managing unit, made after the frame was forwarded."""

    label: int
    frame: bytes | memoryview
    ip_offset: int
    tcp_flags: int
    now: float


class Mirror(Protocol):
    """A copy of the table's rows kept elsewhere, told of every change as it is made."""

    def installed(self, label: int) -> None:
        """``label`` was installed (or reinstalled with new values)."""

    def withdrawn(self, label: int) -> None:
        """``label`` was withdrawn."""

    def watch_changed(self, label: int) -> None:
        """``label``'s watch bits changed."""


class AckStore(Protocol):
    """Where else labels' acknowledgment numbers are kept (the kernel offload's map), for the labels switched there."""

    def ack(self, label: int) -> int | None:
        """``ACK_KNOWN | `` the last acknowledgment number of ``label`` (0: none yet) if it is kept here, else
        None."""

    def record_ack(self, label: int, ack: int) -> None:
        """The slow path sent a frame on ``label`` that carried ``ack`` (``ACK_KNOWN | ``): keep it if ``label``
        is kept here."""


class Arrays(NamedTuple):
    """Numpy views over the table's per-label arrays, for the block path and for readers (the kernel offload)."""

    valid: np.ndarray
    watch: np.ndarray
    v6: np.ndarray
    out_port: np.ndarray
    in_port: np.ndarray
    packets: np.ndarray
    bytes: np.ndarray
    last_seen: np.ndarray
    generation: np.ndarray
    bound: np.ndarray
    acks: np.ndarray


@functools.lru_cache(maxsize=1024)  # few distinct values: one per next hop and port
def _rewrite_fields(next_hop: bytes, port_mac: bytes) -> tuple[int, int]:
    """A rewrite (``next_hop``, then our port's MAC) as the row keeps it: (``ROW_REWRITE``, ``ROW_REWRITE_TAIL``),
    octets 0-7 and 8-11 as big-endian integers, the second signed (a 32-bit word)."""
    head: tuple[int, int] = REWRITE.unpack(next_hop + port_mac)
    return head


_GENERATION_WORD = struct.Struct("=i")


def write_pair_py(
    rows: memoryview,
    c2s: int,
    client_port: int,
    server_port: int,
    client_mac: bytes,
    server_mac: bytes,
    client_port_mac: bytes,
    server_port_mac: bytes,
    key: tuple[int, bytes, int, bytes, int],
    c2s_watch: int,
    s2c_watch: int,
    c2s_seen: float,
    s2c_seen: float,
) -> int:
    """Write a session's two rows in ``rows`` (the table's): C2S ``c2s`` from ``client_mac`` on ``client_port`` to
    ``server_mac`` on ``server_port``, bound to the flow ``key`` (protocol, source, source port, destination,
    destination port, as the client sent it), and S2C ``c2s + 1`` back, bound to the reverse flow; ``*_port_mac``
    are our ports' MACs, ``*_watch`` the labels' watch bits (with ``IPV6_PAYLOAD``), ``*_seen`` their last-seen
    times. Counters and acknowledgment numbers start again, generations go on; each row is invalid while its fields
    change and valid last. Returns how many of the two labels were installed before. The caller checks the label and
    the ports (:meth:`LabelSwitchingTable.install_pair`). The reference: the native build (``_fast.install_pair``)
    does exactly this, octet for octet, and is used where it is built."""
    _, src, sport, dst, dport = key
    if len(client_mac) != ETH_ALEN or len(server_mac) != ETH_ALEN:
        raise ValueError("next_hop and peer must be 6-byte MAC addresses")
    size = IPV6_ADDR_LEN if c2s_watch & IPV6_PAYLOAD else IPV4_ADDR_LEN
    if len(src) != size or len(dst) != size or (s2c_watch ^ c2s_watch) & IPV6_PAYLOAD:
        raise ValueError("a flow binding needs peer_ip and dst_ip, of the label's IP version")
    if not (0 <= sport <= _PORT_MAX and 0 <= dport <= _PORT_MAX):
        raise ValueError(f"ports {(sport, dport)} are not two ports of 0-65535")
    src, dst = bytes(src), bytes(dst)
    at = c2s << ROW_SHIFT
    rebound: int = rows[at] + rows[at + ROW_SIZE]
    if rebound:  # invalid while their fields change (see mplslb.state)
        rows[at] = rows[at + ROW_SIZE] = 0
    # Both rows at once, still invalid: counters and acknowledgment numbers start again, generations go on.
    generation = at + 4 * ROW_GENERATION
    v6 = 1 if c2s_watch & IPV6_PAYLOAD else 0
    flow_len = 2 * size + L4_PORTS_LEN
    to_server, to_server_tail = _rewrite_fields(bytes(server_mac), server_port_mac)
    to_client, to_client_tail = _rewrite_fields(bytes(client_mac), client_port_mac)
    _pack_pair(
        rows, at,
        0, c2s_watch & WATCH_BITS, v6, client_port, server_port, to_server_tail, 0, 0, c2s_seen, 0,
        int.from_bytes(client_mac, "big"), to_server, src + dst + _PORTS.pack(sport, dport), flow_len,
        size, src, (_GENERATION_WORD.unpack_from(rows, generation)[0] + 1) & GENERATION_MASK,
        0, s2c_watch & WATCH_BITS, v6, server_port, client_port, to_client_tail, 0, 0, s2c_seen, 0,
        int.from_bytes(server_mac, "big"), to_client, dst + src + _PORTS.pack(dport, sport), flow_len,
        size, dst, (_GENERATION_WORD.unpack_from(rows, generation + ROW_SIZE)[0] + 1) & GENERATION_MASK,
    )  # fmt: skip
    rows[at + ROW_VALID] = rows[at + ROW_SIZE + ROW_VALID] = 1  # last: the entries are complete
    return rebound


def send_py(
    hot: tuple[Any, ...],
    label: int,
    frame: bytes | memoryview,
    ip_offset: int,
    ip_end: int,
    now: float,
    out: list[tuple[int, bytes]],
    ttl: int,
    tc: int,
    ack: int,
) -> bool:
    """:meth:`LabelSwitchingTable.send` on the table's rows (``hot``, :attr:`LabelSwitchingTable.hot`): the packet
    appended to ``out`` with its output port and counted for ``label``, ``ack`` recorded in the label's row when
    its session is TCP's; True when it was. The reference: the native build (``_fast.send``) does exactly this and
    is used where it is built."""
    rows, words, quads, floats, _ = hot
    entry = (label << LABEL_SHIFT) | (tc << TC_SHIFT) | MPLS_BOS | ttl
    q, w = label << ROW_QUAD_SHIFT, label << ROW_WORD_SHIFT
    head = _pack_head(quads[q + ROW_REWRITE], words[w + ROW_REWRITE_TAIL], ETH_P_MPLS_UC, entry)
    out.append((words[w + ROW_OUT_PORT], b"".join((head, frame[ip_offset:ip_end]))))
    quads[q + ROW_PACKETS] += 1
    quads[q + ROW_BYTES] += len(frame)
    floats[q + ROW_LAST_SEEN] = now
    if ack >= 0 and rows[(label << ROW_SHIFT) + ROW_WATCH] & WATCH_TCP_END:
        quads[q + ROW_ACKS] = ACK_KNOWN | ack
        return True
    return False


#: What writes a session's two rows and sends a packet under its label: the references above, or their native
#: builds once :mod:`~mplslb.switching.scalar` has bound them (:func:`use_native`).
_write_pair: Callable[..., int] = write_pair_py
_send: Callable[..., bool] = send_py


def use_native(native: ModuleType | None) -> None:
    """Write sessions' rows and send packets under their labels with the native module ``native``'s
    ``install_pair`` and ``send``, or with the references again (None)."""
    global _write_pair, _send
    _write_pair, _send = (write_pair_py, send_py) if native is None else (native.install_pair, native.send)


class RowField(Generic[_T]):
    """One field of every label's row, indexed by label like an array: for the control plane, readers and tests.
    The fast paths index the row views themselves (:attr:`LabelSwitchingTable.hot`)."""

    __slots__ = ("_at", "_shift", "_view")

    def __init__(self, view: memoryview[Any], shift: int, at: int) -> None:
        self._view, self._shift, self._at = view, shift, at

    def __getitem__(self, label: int) -> _T:
        return self._view[(label << self._shift) + self._at]  # type: ignore[no-any-return]

    def __setitem__(self, label: int, value: _T) -> None:
        self._view[(label << self._shift) + self._at] = value

    def __len__(self) -> int:
        return LABEL_SPACE


class RowBytes:
    """A byte string of every label's row (its flow key, its peer IP), indexed by label like a list of bytes: for
    the control plane, readers and tests. The fast paths read the row itself."""

    __slots__ = ("_at", "_length_at", "_most", "_rows")

    def __init__(self, rows: memoryview, at: int, length_at: int, most: int) -> None:
        self._rows, self._at, self._length_at, self._most = rows, at, length_at, most

    def __getitem__(self, label: int) -> bytes:
        row = label << ROW_SHIFT
        start = row + self._at
        return bytes(self._rows[start : start + self._rows[row + self._length_at]])

    def __setitem__(self, label: int, value: bytes) -> None:
        if len(value) > self._most:
            raise ValueError(f"{len(value)} octets do not fit in a row's {self._most}")
        row = label << ROW_SHIFT
        start = row + self._at
        self._rows[start : start + len(value)] = value
        self._rows[row + self._length_at] = len(value)

    def __len__(self) -> int:
        return LABEL_SPACE


class RowMacs:
    """The MACs of every label's row as byte strings, indexed by label like a list: the rewrite (the next hop's MAC
    and our port's, 12 octets) or the peer MAC (6), b"" for a label not installed. The row keeps them as
    big-endian integers (``ROW_REWRITE`` and ``ROW_REWRITE_TAIL``, ``ROW_PEER``): the fast path packs and
    compares them as such."""

    __slots__ = ("_quads", "_rewrite", "_rows", "_words")

    def __init__(self, rows: memoryview, words: memoryview, quads: memoryview, *, rewrite: bool) -> None:
        self._rows, self._words, self._quads, self._rewrite = rows, words, quads, rewrite

    def __getitem__(self, label: int) -> bytes:
        if not self._rows[(label << ROW_SHIFT) + ROW_VALID]:
            return b""
        quad = label << ROW_QUAD_SHIFT
        if self._rewrite:
            tail = self._words[(label << ROW_WORD_SHIFT) + ROW_REWRITE_TAIL]
            return REWRITE.pack(self._quads[quad + ROW_REWRITE], tail)
        return int(self._quads[quad + ROW_PEER]).to_bytes(ETH_ALEN, "big")

    def __len__(self) -> int:
        return LABEL_SPACE


class LabelSwitchingTable:
    """Label -> (line card, output port, next hop) in rows indexed by label.

    The arrays are public for reading; nothing outside :mod:`mplslb.switching` writes them.
    """

    def __init__(
        self, port_macs: dict[int, bytes], port_places: dict[int, tuple[int, int]], *, store: Allocator = HEAP
    ) -> None:
        """``port_macs`` maps a port id to its MAC address; ``port_places`` to its (line card, port number). The
        per-label arrays come from ``store`` (see :mod:`mplslb.state`)."""
        self._port_macs = dict(port_macs)
        self._port_places = dict(port_places)
        #: One row per label (:data:`~mplslb.switching.layout.ROW_SIZE` octets at ``label << ROW_SHIFT``), and the
        #: same memory as 32-bit words, 64-bit words and 64-bit floats (see ``ROW_*`` for each field's offset).
        self.rows = store.records("switching.rows", ROW_DTYPE, LABEL_SPACE, {"in_port": -1, "out_port": -1})
        self.words = self.rows.cast("i")
        self.quads = self.rows.cast("Q")
        self.floats = self.rows.cast("d")
        self._rows_2d: np.ndarray | None = None
        self.valid: RowField[int] = RowField(self.rows, ROW_SHIFT, ROW_VALID)
        self.watch: RowField[int] = RowField(self.rows, ROW_SHIFT, ROW_WATCH)
        self.v6: RowField[int] = RowField(self.rows, ROW_SHIFT, ROW_V6)
        self.in_port: RowField[int] = RowField(self.words, ROW_WORD_SHIFT, ROW_IN_PORT)
        self.out_port: RowField[int] = RowField(self.words, ROW_WORD_SHIFT, ROW_OUT_PORT)
        self.packets: RowField[int] = RowField(self.quads, ROW_QUAD_SHIFT, ROW_PACKETS)
        self.bytes: RowField[int] = RowField(self.quads, ROW_QUAD_SHIFT, ROW_BYTES)
        self.last_seen: RowField[float] = RowField(self.floats, ROW_QUAD_SHIFT, ROW_LAST_SEEN)
        #: ACK_KNOWN | the last acknowledgment number of the label's TCP segments, 0 before any (module docstring).
        self.acks: RowField[int] = RowField(self.quads, ROW_QUAD_SHIFT, ROW_ACKS)
        #: Where else labels' frames are switched and their acknowledgment numbers kept (the kernel offload).
        self.ack_stores: list[AckStore] = []
        #: 12 octets (next hop MAC + our port's MAC) written over the frame's Ethernet addresses; the peer MAC.
        self.rewrite = RowMacs(self.rows, self.words, self.quads, rewrite=True)
        self.peer = RowMacs(self.rows, self.words, self.quads, rewrite=False)
        self.peer_ip = RowBytes(self.rows, ROW_PEER_IP, ROW_PEER_IP_LEN, PEER_IP_MAX)
        # The flow binding (see the module docstring) as one key per label (see :func:`flow_parts`), b"" when
        # unbound; ``bound`` (the key's length) says the same for the block path.
        self.flow = RowBytes(self.rows, ROW_FLOW, ROW_FLOW_LEN, FLOW_MAX)
        self.bound: RowField[int] = RowField(self.rows, ROW_SHIFT, ROW_FLOW_LEN)
        # In a persistent store the rows outlive the process (see :meth:`restore`).
        self._persistent = store.persistent
        self.installed = 0
        #: Bumped by every install and withdrawal (``version`` in all): a caller holding a decision made from the
        #: table (the block path's) can tell whether it still stands.
        self.generation: RowField[int] = RowField(self.words, ROW_WORD_SHIFT, ROW_GENERATION)
        self.version = 0
        self.drops: dict[str, int] = {}
        self.mirrors: list[Mirror] = []
        self._arrays: Arrays | None = None
        #: What the one-frame path reads per frame, in one tuple (see :func:`mplslb.switching.scalar.switch_frame`).
        self.hot = (self.rows, self.words, self.quads, self.floats, self.drops)

    # -- the control plane -----------------------------------------------------------------------------------------
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
        now: float = 0.0,
        dst_ip: bytes = b"",
        ports: tuple[int, int] | None = None,
    ) -> None:
        """Install ``label``: frames arriving on ``in_port`` from ``peer`` (and, if given, IP source ``peer_ip``)
        leave by ``out_port`` to ``next_hop``.

        The flow binding of a session label: its packets go from ``peer_ip`` to ``dst_ip`` and, when TCP or UDP,
        from port ``ports[0]`` to ``ports[1]`` (the session's flow as this direction carries it)."""
        port_macs = self._port_macs
        if not RESERVED_LABEL_MAX < label < LABEL_SPACE:
            raise ValueError(f"label {label} is outside the usable label space")
        if out_port not in port_macs or in_port not in port_macs:
            raise ValueError(f"unknown port in install: out {out_port}, in {in_port}")
        if len(next_hop) != ETH_ALEN or len(peer) != ETH_ALEN:
            raise ValueError("next_hop and peer must be 6-byte MAC addresses")
        if len(peer_ip) > PEER_IP_MAX:
            raise ValueError("peer_ip must be an IPv4 or IPv6 address")
        if type(peer_ip) is not bytes:
            peer_ip = bytes(peer_ip)
        if ports is None:
            if dst_ip:
                raise ValueError("a flow binding needs the session's ports")
            flow = b""
        else:
            size = IPV6_ADDR_LEN if watch & IPV6_PAYLOAD else IPV4_ADDR_LEN
            if len(peer_ip) != size or len(dst_ip) != size:
                raise ValueError("a flow binding needs peer_ip and dst_ip, of the label's IP version")
            if len(ports) != 2 or not (0 <= ports[0] <= _PORT_MAX and 0 <= ports[1] <= _PORT_MAX):
                raise ValueError(f"ports {ports} are not two ports of 0-65535")
            flow = peer_ip + bytes(dst_ip) + _PORTS.pack(*ports)
        self._put(label, out_port, bytes(next_hop), in_port, peer, peer_ip, watch, now, flow)

    def install_pair(
        self,
        c2s: int,
        *,
        client_port: int,
        client_mac: bytes,
        server_port: int,
        server_mac: bytes,
        key: tuple[int, bytes, int, bytes, int],
        c2s_watch: int,
        s2c_watch: int,
        c2s_seen: float,
        s2c_seen: float,
    ) -> None:
        """A session's two labels at once, as :meth:`install` would install them one after the other: C2S ``c2s``
        from ``client_mac`` on ``client_port`` to ``server_mac`` on ``server_port``, bound to the flow ``key``
        (protocol, source, source port, destination, destination port, as the client sent it); S2C ``c2s + 1``
        back, bound to the reverse flow. ``*_watch`` are the labels' watch bits (with ``IPV6_PAYLOAD``), ``*_seen``
        their last-seen times."""
        port_macs = self._port_macs
        if not RESERVED_LABEL_MAX < c2s < LABEL_SPACE - 1:
            raise ValueError(f"label pair {c2s} is outside the usable label space")
        if client_port not in port_macs or server_port not in port_macs:
            raise ValueError(f"unknown port in install: out {server_port}, in {client_port}")
        rebound = _write_pair(
            self.rows, c2s, client_port, server_port, client_mac, server_mac, port_macs[client_port],
            port_macs[server_port], key, c2s_watch, s2c_watch, c2s_seen, s2c_seen,
        )  # fmt: skip
        self.installed += 2 - rebound
        self.version += 2
        for mirror in self.mirrors:
            mirror.installed(c2s)
            mirror.installed(c2s + 1)

    def install_pairs(
        self,
        c2s: np.ndarray,
        *,
        client_ports: np.ndarray,
        client_macs: np.ndarray,
        server_ports: np.ndarray,
        server_macs: np.ndarray,
        flows: np.ndarray,
        c2s_watch: int,
        s2c_watch: int,
        seen: float,
    ) -> None:
        """Many IPv4 sessions' label pairs at once, leaving the rows, counts and version as :meth:`install_pair`
        called for each in turn leaves them: C2S ``c2s[i]`` from ``client_macs[i]`` (rows of 6 octets) on
        ``client_ports[i]`` to ``server_macs[i]`` on ``server_ports[i]``, bound to the flow ``flows[i]`` (12
        octets as the client sent them: IP source, IP destination, source port, destination port), S2C back; both
        last seen at ``seen``. Checked for all before anything is written; for a table no mirror watches."""
        n = len(c2s)
        if self.mirrors:
            raise RuntimeError("install_pairs is for a table no mirror watches")
        c2s = np.asarray(c2s, dtype=np.int64)
        if n and not (c2s.min() > RESERVED_LABEL_MAX and c2s.max() < LABEL_SPACE - 1):
            raise ValueError("a label pair is outside the usable label space")
        labels = np.empty(2 * n, dtype=np.int64)
        labels[0::2], labels[1::2] = c2s, c2s + 1
        ordered = np.sort(labels)
        if (ordered[1:] == ordered[:-1]).any():
            raise ValueError("install_pairs got a label twice")
        if client_macs.shape != (n, ETH_ALEN) or server_macs.shape != (n, ETH_ALEN) or flows.shape != (n, 12):
            raise ValueError("install_pairs needs a 6-octet MAC of each side and a 12-octet IPv4 flow per pair")
        if (c2s_watch | s2c_watch) & IPV6_PAYLOAD:
            raise ValueError("install_pairs installs IPv4 sessions only")
        ports = np.concatenate((client_ports, server_ports)).tolist()
        unknown = set(ports) - self._port_macs.keys()
        if unknown:
            raise ValueError(f"unknown port in install: {sorted(unknown)}")
        if not n:
            return
        rec = np.zeros((2 * n, ROW_SIZE), dtype=np.uint8)
        words, quads, floats = rec.view(np.int32), rec.view(np.uint64), rec.view(np.float64)
        rec[:, ROW_WATCH] = np.tile([c2s_watch & WATCH_BITS, s2c_watch & WATCH_BITS], n)
        words[0::2, ROW_IN_PORT] = words[1::2, ROW_OUT_PORT] = client_ports
        words[0::2, ROW_OUT_PORT] = words[1::2, ROW_IN_PORT] = server_ports
        # The rewrite: the next hop's MAC and our port's, big-endian integers as _rewrite_fields makes them.
        port_macs = self._port_macs
        rewrite = np.empty((2 * n, 12), dtype=np.uint8)
        rewrite[0::2, :ETH_ALEN], rewrite[1::2, :ETH_ALEN] = server_macs, client_macs
        rewrite[:, ETH_ALEN:] = np.frombuffer(b"".join(port_macs[port] for port in words[:, ROW_OUT_PORT].tolist()),
                                              dtype=np.uint8).reshape(2 * n, ETH_ALEN)  # fmt: skip
        quads[:, ROW_REWRITE] = rewrite[:, :8].copy().view(">u8")[:, 0]
        words[:, ROW_REWRITE_TAIL] = rewrite[:, 8:].copy().view(">i4")[:, 0]
        peer = np.zeros((2 * n, 8), dtype=np.uint8)
        peer[0::2, 2:], peer[1::2, 2:] = client_macs, server_macs
        quads[:, ROW_PEER] = peer.view(">u8")[:, 0]
        floats[:, ROW_LAST_SEEN] = seen
        flow = ROW_FLOW
        rec[0::2, flow : flow + 12] = flows
        rec[1::2, flow : flow + 12] = flows[:, _REVERSED_V4]
        rec[:, ROW_FLOW_LEN] = 2 * IPV4_ADDR_LEN + L4_PORTS_LEN
        rec[:, ROW_PEER_IP_LEN] = IPV4_ADDR_LEN
        rec[0::2, ROW_PEER_IP : ROW_PEER_IP + IPV4_ADDR_LEN] = flows[:, :IPV4_ADDR_LEN]
        rec[1::2, ROW_PEER_IP : ROW_PEER_IP + IPV4_ADDR_LEN] = flows[:, IPV4_ADDR_LEN : 2 * IPV4_ADDR_LEN]
        table = self.octets()
        old = table[labels]
        words[:, ROW_GENERATION] = (old.view(np.int32)[:, ROW_GENERATION] + 1) & GENERATION_MASK
        self.installed += int(np.count_nonzero(old[:, ROW_VALID] == 0))
        table[labels, ROW_VALID] = 0  # rebound ones: invalid while their fields change (see mplslb.state)
        table[labels] = rec  # still invalid: every field first
        table[labels, ROW_VALID] = 1  # last: the entries are complete
        self.version += 2 * n

    def octets(self) -> np.ndarray:
        """The rows as a (label, octet) numpy array (a view, made once)."""
        if self._rows_2d is None:
            self._rows_2d = np.frombuffer(self.rows, dtype=np.uint8).reshape(LABEL_SPACE, ROW_SIZE)
        return self._rows_2d

    def _put(
        self, label: int, out_port: int, next_hop: bytes, in_port: int, peer: bytes, peer_ip: bytes, watch: int,
        now: float, flow: bytes,
    ) -> None:  # fmt: skip
        """Write a checked entry (:meth:`install`)."""
        rows = self.rows
        at = label << ROW_SHIFT
        if rows[at]:
            rows[at] = 0  # rebound: invalid while its fields change (see mplslb.state)
        else:
            self.installed += 1
        # The row at once, still invalid: counters and acknowledgment number start again.
        v6 = 1 if watch & IPV6_PAYLOAD else 0
        head, tail = _rewrite_fields(next_hop, self._port_macs[out_port])
        ROW.pack_into(rows, at, 0, watch & WATCH_BITS, v6, in_port, out_port, tail, 0, 0, now, 0,
                      int.from_bytes(peer, "big"), head)  # fmt: skip
        _pack_binding(rows, at + ROW_FLOW, flow, len(flow), len(peer_ip), peer_ip)
        words, generation_at = self.words, (label << ROW_WORD_SHIFT) + ROW_GENERATION
        words[generation_at] = (words[generation_at] + 1) & GENERATION_MASK
        rows[at + ROW_VALID] = 1  # last: the entry is complete
        self.version += 1
        for mirror in self.mirrors:
            mirror.installed(label)

    def withdraw(self, label: int) -> None:
        """Remove ``label`` from the table: later frames with it are dropped as ``label_unknown``."""
        rows, at = self.rows, label << ROW_SHIFT
        was = rows[at + ROW_VALID]
        if was:
            self.installed -= 1
        rows[at + ROW_VALID] = 0
        rows[at + ROW_WATCH] = 0
        words, word = self.words, label << ROW_WORD_SHIFT
        words[word + ROW_OUT_PORT] = -1
        words[word + ROW_IN_PORT] = -1
        _pack_binding(rows, at + ROW_FLOW, b"", 0, 0, b"")
        if was:
            words[word + ROW_GENERATION] = (words[word + ROW_GENERATION] + 1) & GENERATION_MASK
            self.version += 1
            for mirror in self.mirrors:
                mirror.withdrawn(label)

    def withdraw_pairs(self, c2s: np.ndarray) -> None:
        """:meth:`withdraw` for both labels of each pair in ``c2s``, in that order, the rows written at once."""
        labels = np.empty(2 * c2s.size, dtype=np.intp)
        labels[0::2], labels[1::2] = c2s, c2s + 1
        octets = self.octets()
        words = octets.view(np.int32)
        was = octets[labels, ROW_VALID] != 0
        octets[labels, ROW_VALID] = 0
        octets[labels, ROW_WATCH] = 0
        words[labels, ROW_OUT_PORT] = -1
        words[labels, ROW_IN_PORT] = -1
        octets[labels, ROW_FLOW : ROW_FLOW + ROW_BINDING.size] = 0
        withdrawn = labels[was]
        words[withdrawn, ROW_GENERATION] = (words[withdrawn, ROW_GENERATION] + 1) & GENERATION_MASK
        count = int(withdrawn.size)
        self.installed -= count
        self.version += count
        if self.mirrors:
            for label in withdrawn.tolist():
                for mirror in self.mirrors:
                    mirror.withdrawn(label)

    def restore(self) -> None:
        """After adopting the rows from a persistent store (:mod:`mplslb.state`): withdraw the labels bound to a
        port this table does not have, write each rewrite's second half again from our port's MAC (the port's MAC
        may have changed with the restart), and count the installed labels; the rows hold the rest."""
        if not self._persistent:
            raise ValueError("restore needs a persistent store")
        labels = np.flatnonzero(self.arrays().valid)
        for label in labels.tolist():
            port = self.out_port[label]
            if port not in self._port_macs or self.in_port[label] not in self._port_macs:
                self.withdraw(label)  # bound to a port this table does not have: never forwarded
                continue
            self._row_rewrite(label, self.next_hop_of(label))
        self.installed = int(np.count_nonzero(self.arrays().valid))

    def next_hop_of(self, label: int) -> bytes:
        """The next hop MAC of an installed ``label``."""
        return self.rewrite[label][:ETH_ALEN]

    def repoint(self, label: int, *, next_hop: bytes | None = None, peer: bytes | None = None) -> None:
        """An installed ``label``'s neighbour moved to another MAC: its frames now go to ``next_hop`` and/or are
        taken from ``peer``. Port, watch bits and counters stay; mirrors are told as for a reinstall."""
        if not self.valid[label]:
            return
        for mac in (next_hop, peer):
            if mac is not None and len(mac) != ETH_ALEN:
                raise ValueError("next_hop and peer must be 6-byte MAC addresses")
        self.valid[label] = 0  # invalid while its fields change (see mplslb.state)
        if next_hop is not None:
            self._row_rewrite(label, bytes(next_hop))
        if peer is not None:
            self.quads[(label << ROW_QUAD_SHIFT) + ROW_PEER] = int.from_bytes(peer, "big")
        self.valid[label] = 1
        self.generation[label] = (self.generation[label] + 1) & GENERATION_MASK
        self.version += 1
        for mirror in self.mirrors:
            mirror.installed(label)

    def set_watch(self, label: int, watch: int) -> None:
        """Set ``label``'s watch bits (:data:`~mplslb.switching.layout.WATCH_TCP_END`, ``WATCH_ALL``)."""
        watch &= WATCH_BITS
        if self.watch[label] != watch:
            self.watch[label] = watch
            for mirror in self.mirrors:
                mirror.watch_changed(label)

    def clear_watch(self, label: int, bits: int) -> None:
        """Clear ``bits`` of ``label``'s watch bits."""
        self.set_watch(label, self.watch[label] & ~bits)

    def add_mirror(self, mirror: Mirror) -> None:
        """Tell ``mirror`` of every change from now on (it copies what is installed already itself)."""
        self.mirrors.append(mirror)

    def remove_mirror(self, mirror: Mirror) -> None:
        if mirror in self.mirrors:
            self.mirrors.remove(mirror)

    def _row_rewrite(self, label: int, next_hop: bytes) -> None:
        """Write ``label``'s rewrite into its row: ``next_hop`` and the MAC of its output port."""
        head, tail = _rewrite_fields(next_hop, self._port_macs[self.out_port[label]])
        self.quads[(label << ROW_QUAD_SHIFT) + ROW_REWRITE] = head
        self.words[(label << ROW_WORD_SHIFT) + ROW_REWRITE_TAIL] = tail

    # -- sending and counting --------------------------------------------------------------------------------------
    def send(
        self,
        label: int,
        frame: bytes | memoryview,
        ip_offset: int,
        ip_end: int,
        now: float,
        out: list[tuple[int, bytes]],
        *,
        ttl: int,
        tc: int = 0,
        ack: int = -1,
    ) -> None:
        """The session label attaching unit (claim 15): send the IP packet ``frame[ip_offset:ip_end]`` of
        ``label``'s session by the label's port, to its next hop, under one label stack entry (bottom of stack,
        ``ttl``, ``tc``), without any Ethernet padding; count it for the label, and record ``ack`` (a TCP
        segment's acknowledgment number, ACK set and RST clear; -1: none) for a TCP session's label."""
        if _send(self.hot, label, frame, ip_offset, ip_end, now, out, ttl, tc, ack):
            for store in self.ack_stores:
                store.record_ack(label, ACK_KNOWN | ack)

    def send_many(
        self, labels: np.ndarray, packets: np.ndarray, lengths: np.ndarray, now: float, *, ttl: np.ndarray,
        tc: np.ndarray,
    ) -> np.ndarray:  # fmt: skip
        """:meth:`send` for many IP packets of one length at once (``packets``, a row each, under distinct
        ``labels``; ``lengths``: the frames they came in, counted), recording no acknowledgment number: the frames
        to send, a row each, to each label's output port (``out_port``)."""
        table = self.octets()
        quads, words = table.view(np.uint64), table.view(np.int32)
        head = np.empty((len(labels), LABELLED_HEAD.size), dtype=np.uint8)
        # The row keeps the rewrite's octets as big-endian integers (_rewrite_fields): written back as octets.
        head[:, :_QUAD_SIZE] = quads[labels, ROW_REWRITE].astype(">u8")[:, None].view(np.uint8)
        head[:, _QUAD_SIZE:_REWRITE_LEN] = words[labels, ROW_REWRITE_TAIL].astype(">i4")[:, None].view(np.uint8)
        head[:, _REWRITE_LEN : _REWRITE_LEN + 2] = np.frombuffer(MPLS_ETHERTYPE, dtype=np.uint8)
        entry = (labels.astype(np.uint32) << LABEL_SHIFT) | (tc.astype(np.uint32) << TC_SHIFT) | MPLS_BOS | ttl
        head[:, _REWRITE_LEN + 2 :] = entry.astype(">u4")[:, None].view(np.uint8)
        quads[labels, ROW_PACKETS] += 1
        quads[labels, ROW_BYTES] += lengths.astype(np.uint64)
        table.view(np.float64)[labels, ROW_LAST_SEEN] = now
        return np.concatenate((head, packets), axis=1)

    def fold_counters(self, labels: np.ndarray, packets: np.ndarray, octets: np.ndarray, seen: np.ndarray) -> None:
        """Add frames forwarded elsewhere (the kernel): per label in ``labels`` (distinct), ``packets`` frames of
        ``octets`` bytes, the last at ``seen`` (the table's clock); last-seen times only move forward."""
        a = self.arrays()
        a.packets[labels] += packets.astype(np.uint64, copy=False)
        a.bytes[labels] += octets.astype(np.uint64, copy=False)
        a.last_seen[labels] = np.maximum(a.last_seen[labels], seen)

    def last_ack(self, label: int) -> int:
        """``ACK_KNOWN | `` the acknowledgment number of the last frame forwarded on ``label`` by any path (from the
        store that keeps the label, if one does), or 0 when none is known."""
        for store in self.ack_stores:
            ack = store.ack(label)
            if ack is not None:
                self.acks[label] = ack
                return ack
        return self.acks[label]

    @staticmethod
    def in_windows(seqs: np.ndarray, acks: np.ndarray, window: int) -> np.ndarray:
        """:meth:`in_window` for segments whose ``acks`` are given (``ACK_KNOWN |`` the number, 0: none), as a
        mask."""
        inside: np.ndarray = (acks == 0) | (((seqs - acks + window) & _SEQ_MASK) <= 2 * window)
        return inside

    def in_window(self, label: int, seq: int | None, window: int, ack: int | None = None) -> bool:
        """Could a TCP segment with sequence number ``seq`` (None: unreadable) have been sent to the end whose
        acknowledgments travel on ``label``: is it within ``window`` of the last one, either way (``ack``, as
        :meth:`last_ack` gives it, when the caller knows which one that was)? True when no acknowledgment is known
        yet (nothing to judge by)."""
        if ack is None:
            ack = self.last_ack(label)
        if not ack:
            return True
        if seq is None:
            return False
        return ((seq - ack + window) & _SEQ_MASK) <= 2 * window

    # -- reading ---------------------------------------------------------------------------------------------------
    def arrays(self) -> Arrays:
        """Numpy views over the per-label arrays (no copy; made once)."""
        if self._arrays is None:
            rows = np.frombuffer(self.rows, dtype=ROW_DTYPE)
            self._arrays = Arrays(
                rows["valid"],
                rows["watch"],
                rows["v6"],
                rows["out_port"],
                rows["in_port"],
                rows["packets"],
                rows["bytes"],
                rows["last_seen"],
                rows["generation"],
                rows["flow_len"],
                rows["acks"],
            )
        return self._arrays

    def row(self, label: int) -> LabelRow:
        """``label``'s row, read at once (one unpack instead of a call per field)."""
        rows, at = self.rows, label << ROW_SHIFT
        _, watch, v6, in_port, out_port, tail, _, _, _, acks, peer, head = _unpack_row(rows, at)
        flow_at, peer_ip_at = at + ROW_FLOW, at + ROW_PEER_IP
        return LabelRow(
            watch, v6, in_port, out_port, acks, REWRITE.pack(head, tail), peer.to_bytes(ETH_ALEN, "big"),
            bytes(rows[peer_ip_at : peer_ip_at + rows[at + ROW_PEER_IP_LEN]]),
            bytes(rows[flow_at : flow_at + rows[at + ROW_FLOW_LEN]]),
        )  # fmt: skip

    def port_place(self, port_id: int) -> tuple[int, int]:
        """(line card, port number) of a port id."""
        return self._port_places[port_id]

    def port_mac(self, port_id: int) -> bytes:
        return self._port_macs[port_id]

    def last_active(self, *labels: int) -> float:
        """The latest time a frame of any of ``labels`` was switched or sent."""
        floats = self.floats
        return max([floats[(label << ROW_QUAD_SHIFT) + ROW_LAST_SEEN] for label in labels])

    def traffic(self, label: int) -> tuple[int, int]:
        """(packets, bytes) switched or sent on ``label`` since it was installed."""
        return self.packets[label], self.bytes[label]

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
            self.rewrite[label][:ETH_ALEN],
            self.in_port[label],
            self.peer[label],
            self.packets[label],
            self.bytes[label],
            self.last_seen[label],
        )
