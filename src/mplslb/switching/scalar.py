"""The one-frame fast path: switch a labelled frame on its label alone (claims 1, 5, 9).

Theory of operation
-------------------
:func:`switch_frame` reads the Ethernet header (tolerating one 802.1Q tag) and the top label stack entry (RFC 3032),
then checks, in this order:

* the label is installed (``label_unknown``), it is not a reserved label 0-15 (``mpls_reserved_label``);
* the frame came in where the label is bound: the ingress port and the peer's MAC address recorded when the
  session was set up (``label_wrong_ingress``); a session label is always the only entry of its stack, one with
  entries below it is dropped (``label_not_bottom``); and the IP source address of the session's sender
  (``label_wrong_ingress``): a client can never steer frames into another client's session, even from behind
  the same router;
* the frame belongs to the label's session flow, for labels installed with one (``label_wrong_flow``, see below);
* the TTL of the entry is above 1 (``mpls_ttl_expired``), per RFC 3032 it is then decremented.

The flow check. A label pair is reused by later sessions, possibly to the same server, and a server agent may
still send a late frame of the old flow under it: the ingress binding passes it (same port, MAC, and the VIP as
source), so the rest of the flow decides. A session label is bound to its session's flow as its direction carries
it (C2S: client to VIP, S2C: VIP to client; the addresses and the two ports), and a frame passes when:

* the packet under the label holds its whole fixed IP header (IPv4: 20 bytes, IPv6: 40), and its IP destination
  is the flow's (its source is the ingress binding's IP source, checked before);
* when the packet's protocol (IPv4: its protocol field; IPv6: the header after any extension headers) is TCP or
  UDP: its source and destination ports (after the IHL in IPv4) are the flow's; a packet too short to hold them
  fails;
* any other packet carries no ports, and is checked by its addresses only: an ICMP error (or any other protocol),
  an IPv4 fragment with a non-zero offset, an IPv6 one past its fragment header.

The protocol itself is not bound: a TCP segment and a UDP datagram with the session's addresses and ports are the
session's client's either way. Nearly every frame is a plain one (IPv4 without options, or IPv6 with TCP or UDP
right after the fixed header), and for it the whole check, IP source included, is one comparison of the octets from
the IP source to the ports with the label's precomputed ``key``; the rule above decides the others. IPv6 extension
headers are walked here only (:func:`~mplslb.wire.ipv6.parse_ipv6`: a walk that fails, fails the check); the block
path and the kernel leave such frames to this path, so the three agree.

The frame leaves with its Ethernet addresses rewritten to (next hop, our port) and its label entry's TTL lowered;
nothing past the IP and TCP/UDP headers is read. Two things ride along without changing that decision: per-label
packet and byte counters with the last time seen (idle timeouts and statistics), and, for labels whose ``watch``
bits ask for it, a report to the session managing unit: for TCP sessions a FIN or RST in the one byte of TCP flags
(IPv4: after its IHL; IPv6: right after the fixed header when TCP follows it, else the frame is reported with
``TCP_FLAGS_UNKNOWN`` and the session manager reads it), or, while a response time is being measured, every frame.
Reports are appended to ``events``; the caller hands them to the session manager after forwarding. The same
peek records a TCP segment's acknowledgment number in the label's ``acks`` (ACK set, RST clear; IPv4 only when
its protocol is TCP and it is no fragment past the first, see :mod:`~mplslb.switching.table`).

Every offset comes from :mod:`~mplslb.switching.layout`; the block path (:mod:`~mplslb.switching.block`) and the
kernel program make the same checks in the same order, and tests compare the three frame for frame.
"""

from __future__ import annotations

import importlib
import os
import struct
from types import ModuleType

from mplslb.switching import layout
from mplslb.switching.layout import (
    ACK_KNOWN,
    ENTRY,
    ETH_P_8021Q,
    ETH_P_MPLS_UC,
    ETH_TYPE,
    FRAG_OFFSET_MASK,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV4_ADDR_LEN,
    IPV4_DST,
    IPV4_FRAG_AT,
    IPV4_HLEN,
    IPV4_IHL_MASK,
    IPV4_IHL_UNIT,
    IPV4_PLAIN,
    IPV4_PROTO,
    IPV4_SRC,
    IPV6_ADDR_LEN,
    IPV6_DST,
    IPV6_HLEN,
    IPV6_NEXT_HEADER,
    IPV6_SRC,
    L4_PORTS_LEN,
    LABEL_SHIFT,
    LABELLED_HEAD,
    LABELLED_MIN,
    LSE_AT,
    LSE_LEN,
    MPLS_BOS,
    MPLS_TTL_MASK,
    RESERVED_LABEL_MAX,
    ROW_ACKS,
    ROW_BYTES,
    ROW_FLOW,
    ROW_FLOW_LEN,
    ROW_IN_PORT,
    ROW_LAST_SEEN,
    ROW_OUT_PORT,
    ROW_PACKETS,
    ROW_PEER,
    ROW_PEER_IP,
    ROW_PEER_IP_LEN,
    ROW_QUAD_SHIFT,
    ROW_REWRITE,
    ROW_REWRITE_TAIL,
    ROW_SHIFT,
    ROW_V6,
    ROW_WATCH,
    ROW_WORD_SHIFT,
    TCP_ACK,
    TCP_ACK_AT,
    TCP_END,
    TCP_FLAGS,
    TCP_FLAGS_UNKNOWN,
    TCP_RST,
    VLAN_HLEN,
    VLAN_TYPE,
    WATCH_ALL,
    WATCH_TCP_END,
)
from mplslb.switching.table import MPLS_ETHERTYPE, WRONG_FLOW, FastEvent, use_native
from mplslb.wire.errors import WireError
from mplslb.wire.ipv6 import EXTENSION_HEADERS, parse_ipv6

# Results of :func:`switch_frame`: a non-negative value is the output port.
NOT_LABELLED = -1
DROPPED = -2

_unpack_entry = ENTRY.unpack_from
#: An untagged frame's first LABELLED_MIN octets as the fast path reads them: source MAC (two octets and four),
#: ethertype, top label stack entry.
_unpack_head = struct.Struct("!6xHIHI").unpack_from
_pack_head = LABELLED_HEAD.pack
_join = b"".join
_new = tuple.__new__  # a NamedTuple's own constructor, without its Python-level call
_VLAN_LSE_AT = LSE_AT + VLAN_HLEN
_REPORTED = TCP_END | TCP_FLAGS_UNKNOWN
_FRAG_HI = FRAG_OFFSET_MASK >> 8  # the offset's bits in the first octet of flags + offset
_FRAG_LO = FRAG_OFFSET_MASK & 0xFF
_PORTED = (IPPROTO_TCP, IPPROTO_UDP)
_NO_PORT = -1
_WALK_FAILED = -2
_V4_KEY_END = IPV4_SRC + 2 * IPV4_ADDR_LEN + L4_PORTS_LEN  # IPV4_SRC .. the ports of a header without options
_V6_KEY_END = IPV6_SRC + 2 * IPV6_ADDR_LEN + L4_PORTS_LEN
_V4_DST_IN_KEY = slice(IPV4_ADDR_LEN, 2 * IPV4_ADDR_LEN)
_V6_DST_IN_KEY = slice(IPV6_ADDR_LEN, 2 * IPV6_ADDR_LEN)
_ACK_RST = TCP_ACK | TCP_RST
_ACK_BEFORE_FLAGS = TCP_FLAGS - TCP_ACK_AT
_unpack_ack = struct.Struct("!I").unpack_from


def _drop(drops: dict[str, int], reason: str) -> int:
    drops[reason] = drops.get(reason, 0) + 1
    return DROPPED


def _upper_layer(frame: bytes | memoryview, ip: int) -> tuple[int, int]:
    """(protocol, offset) of the header after an IPv6 packet's extension headers; :data:`_NO_PORT` as the
    protocol for a fragment past its first one, :data:`_WALK_FAILED` when the walk fails."""
    try:
        packet = parse_ipv6(frame, ip, allow_truncated=True)
    except WireError:
        return _WALK_FAILED, 0
    if packet.fragment is not None and packet.fragment[0]:
        return _NO_PORT, 0
    return packet.proto, packet.payload_offset


def in_flow(frame: bytes | memoryview, ip: int, v6: int, key: bytes) -> bool:
    """Does the packet at ``ip`` belong to the flow of ``key`` (:func:`~mplslb.switching.table.flow_parts`; the
    module docstring's rule, the IP source aside)?"""
    n = len(frame)
    if v6:
        if n < ip + IPV6_HLEN or frame[ip + IPV6_DST : ip + IPV6_DST + IPV6_ADDR_LEN] != key[_V6_DST_IN_KEY]:
            return False
        proto = frame[ip + IPV6_NEXT_HEADER]
        at = ip + IPV6_HLEN
        if proto in EXTENSION_HEADERS:
            proto, at = _upper_layer(frame, ip)
            if proto == _WALK_FAILED:
                return False
    else:
        if n < ip + IPV4_HLEN or frame[ip + IPV4_DST : ip + IPV4_DST + IPV4_ADDR_LEN] != key[_V4_DST_IN_KEY]:
            return False
        if frame[ip + IPV4_FRAG_AT] & _FRAG_HI or frame[ip + IPV4_FRAG_AT + 1] & _FRAG_LO:
            return True  # a fragment past the first: no ports in it
        proto = frame[ip + IPV4_PROTO]
        at = ip + (frame[ip] & IPV4_IHL_MASK) * IPV4_IHL_UNIT
    if proto != IPPROTO_TCP and proto != IPPROTO_UDP:
        return True
    return frame[at : at + L4_PORTS_LEN] == key[-L4_PORTS_LEN:]


def switch_frame(
    hot: tuple,  # type: ignore[type-arg]  # LabelSwitchingTable.hot: the row views and drops, in one tuple
    port: int,
    frame: bytes | memoryview,
    now: float,
    out: list[tuple[int, bytes]],
    events: list[FastEvent],
) -> int:
    """Switch one frame that arrived on ``port``: append ``(out_port, frame)`` to ``out`` and return the output
    port, or return :data:`NOT_LABELLED` (untouched: for the packet analyzing unit) or :data:`DROPPED` (counted
    in the table's ``drops`` under a named reason). ``hot`` is the table's :attr:`~LabelSwitchingTable.hot`:
    the typed views of the table's rows (a label's row is two adjacent cache lines) and its drop counters,
    unpacked into locals here, which spares a dozen attribute lookups per frame."""
    rows, words, quads, floats, drops = hot
    n = len(frame)
    if n < LABELLED_MIN:
        if n < LSE_AT or frame[ETH_TYPE : ETH_TYPE + 2] != MPLS_ETHERTYPE:
            return NOT_LABELLED
        return _drop(drops, "mpls_truncated")
    src_high, src_low, ethertype, entry = _unpack_head(frame)
    lse = LSE_AT
    if ethertype == ETH_P_8021Q:
        ethertype = (frame[VLAN_TYPE] << 8) | frame[VLAN_TYPE + 1]
        lse = _VLAN_LSE_AT
        if ethertype == ETH_P_MPLS_UC:
            if n < lse + LSE_LEN:
                return _drop(drops, "mpls_truncated")
            (entry,) = _unpack_entry(frame, lse)
    if ethertype != ETH_P_MPLS_UC:
        return NOT_LABELLED
    label = entry >> LABEL_SHIFT
    row = label << ROW_SHIFT
    if not rows[row]:
        return _drop(drops, "mpls_reserved_label" if label <= RESERVED_LABEL_MAX else "label_unknown")
    word = label << ROW_WORD_SHIFT
    quad = label << ROW_QUAD_SHIFT
    if words[word + ROW_IN_PORT] != port or quads[quad + ROW_PEER] != (src_high << 32 | src_low):
        return _drop(drops, "label_wrong_ingress")
    if not entry & MPLS_BOS:
        return _drop(drops, "label_not_bottom")  # session labels are always the only entry
    ip = lse + LSE_LEN
    bound = rows[row + ROW_FLOW_LEN]
    v6 = rows[row + ROW_V6]
    # A plain packet of the label's flow: IP source, destination and ports in one comparison (the docstring).
    if not bound or (
        frame[ip + IPV6_SRC : ip + _V6_KEY_END] != rows[row + ROW_FLOW : row + ROW_FLOW + bound]
        or frame[ip + IPV6_NEXT_HEADER] not in _PORTED
        if v6
        else frame[ip + IPV4_SRC : ip + _V4_KEY_END] != rows[row + ROW_FLOW : row + ROW_FLOW + bound]
        or frame[ip] != IPV4_PLAIN
    ):
        size = rows[row + ROW_PEER_IP_LEN]
        if size:
            at = ip + (IPV6_SRC if v6 else IPV4_SRC)
            if frame[at : at + size] != rows[row + ROW_PEER_IP : row + ROW_PEER_IP + size]:
                return _drop(drops, "label_wrong_ingress")
        if bound and not in_flow(frame, ip, v6, bytes(rows[row + ROW_FLOW : row + ROW_FLOW + bound])):
            return _drop(drops, WRONG_FLOW)
    if (entry & MPLS_TTL_MASK) <= 1:
        return _drop(drops, "mpls_ttl_expired")
    out_port: int = words[word + ROW_OUT_PORT]
    head = _pack_head(quads[quad + ROW_REWRITE], words[word + ROW_REWRITE_TAIL], ETH_P_MPLS_UC, entry - 1)
    out.append((out_port, _join((head, frame[ip:]))))
    quads[quad + ROW_PACKETS] += 1
    quads[quad + ROW_BYTES] += n
    floats[quad + ROW_LAST_SEEN] = now
    watch = rows[row + ROW_WATCH]
    if watch:
        # The TCP flags: IPv4 after the IHL, IPv6 right after the fixed header when TCP follows it; otherwise
        # (extension headers) the session manager reads the frame itself.
        flags = 0
        if watch & WATCH_TCP_END and ip < n:
            if v6:
                at = ip + IPV6_HLEN + TCP_FLAGS
                if ip + IPV6_NEXT_HEADER < n and frame[ip + IPV6_NEXT_HEADER] != IPPROTO_TCP:
                    at, flags = n, TCP_FLAGS_UNKNOWN
            else:
                at = ip + (frame[ip] & IPV4_IHL_MASK) * IPV4_IHL_UNIT + TCP_FLAGS
            if at < n:
                flags = frame[at]
                # A TCP segment's acknowledgment number (the table's docstring): not an RST's, nor another
                # protocol's octets in an IPv4 packet under a TCP session's label.
                if flags & _ACK_RST == TCP_ACK and (
                    v6
                    or (
                        frame[ip + IPV4_PROTO] == IPPROTO_TCP
                        and not (frame[ip + IPV4_FRAG_AT] & _FRAG_HI or frame[ip + IPV4_FRAG_AT + 1] & _FRAG_LO)
                    )
                ):
                    quads[quad + ROW_ACKS] = ACK_KNOWN | _unpack_ack(frame, at - _ACK_BEFORE_FLAGS)[0]
        if watch & WATCH_ALL or flags & _REPORTED:
            events.append(_new(FastEvent, (label, frame, ip, flags, now)))
    return out_port


#: The reference one-frame path, in Python: the native one (below) must do exactly what it does, frame for frame.
switch_frame_py = switch_frame


#: The native build (``mplslb.switching._fast``) when it is in use, else None: the block path
#: (:mod:`~mplslb.switching.block`) takes its ``switch_block`` and ``count_rows`` from it too.
native: ModuleType | None = None


def _bind_native() -> str:
    """Put the C build of :func:`switch_frame` (``mplslb.switching._fast``, made at install from ``_fast.c``) in
    its place, bound to this module's numbers and reference; return which path is in use, ``"native"`` or
    ``"python"`` (and why). ``MPLSLB_FAST_PATH=python`` keeps the reference."""
    global switch_frame, native
    if os.environ.get("MPLSLB_FAST_PATH", "native") == "python":
        return "python (MPLSLB_FAST_PATH=python)"
    try:
        _fast = importlib.import_module("mplslb.switching._fast")
    except ImportError as exc:  # not built (no C compiler at install), or built for another Python
        return f"python (no native build: {exc})"
    _fast.bind(switch_frame_py, FastEvent, native_numbers(), NATIVE_REASONS)
    switch_frame = _fast.switch_frame  # the same parameters, positional only (_fast.pyi)
    use_native(_fast)  # the table's writers too
    native = _fast
    return "native"


#: The layout's numbers the native path reads, by their names in :mod:`~mplslb.switching.layout`.
_NATIVE_LAYOUT = """
    LABELLED_MIN LSE_AT LSE_LEN ETH_P_MPLS_UC ETH_P_8021Q LABEL_SHIFT RESERVED_LABEL_MAX ROW_SIZE ROW_SHIFT
    ROW_WORD_SHIFT ROW_QUAD_SHIFT ROW_VALID ROW_WATCH ROW_V6 ROW_IN_PORT ROW_OUT_PORT ROW_REWRITE_TAIL ROW_PACKETS
    ROW_BYTES ROW_LAST_SEEN ROW_ACKS ROW_PEER ROW_REWRITE ROW_FLOW ROW_FLOW_LEN ROW_PEER_IP ROW_PEER_IP_LEN MPLS_BOS
    MPLS_TTL_MASK IPV4_SRC IPV4_PLAIN IPV4_PROTO IPV4_FRAG_AT IPV4_IHL_MASK IPV4_IHL_UNIT IPV6_SRC IPV6_NEXT_HEADER
    IPV6_HLEN IPPROTO_TCP IPPROTO_UDP TCP_FLAGS TCP_ACK TCP_FLAGS_UNKNOWN WATCH_TCP_END WATCH_ALL ACK_KNOWN ETH_SRC
    ETH_TYPE IPV4_DST IPV6_DST IPV4_ADDR_LEN IPV6_ADDR_LEN L4_PORTS_LEN ROW_GENERATION LSE_TTL WATCH_BITS
    IPV6_PAYLOAD GENERATION_MASK TC_SHIFT
""".split()  # noqa: SIM905


def native_numbers() -> dict[str, int]:
    """Every number the native path reads, by the name it gives it: the layout's, and this module's own."""
    numbers = {name: int(getattr(layout, name)) for name in _NATIVE_LAYOUT}
    numbers.update(
        V4_KEY_END=_V4_KEY_END,
        V6_KEY_END=_V6_KEY_END,
        FRAG_HI=_FRAG_HI,
        FRAG_LO=_FRAG_LO,
        ACK_RST=_ACK_RST,
        ACK_BEFORE_FLAGS=_ACK_BEFORE_FLAGS,
        REPORTED=_REPORTED,
    )
    return numbers


#: The drops the native path counts itself (the others it leaves to the reference), by the name it gives each.
NATIVE_REASONS = {
    "reserved": "mpls_reserved_label",
    "unknown": "label_unknown",
    "ingress": "label_wrong_ingress",
    "not_bottom": "label_not_bottom",
    "ttl": "mpls_ttl_expired",
}

#: Which one-frame path :func:`switch_frame` is: ``"native"``, or ``"python"`` with the reason.
FAST_PATH = _bind_native()

__all__ = ["DROPPED", "FAST_PATH", "NOT_LABELLED", "in_flow", "switch_frame", "switch_frame_py"]
