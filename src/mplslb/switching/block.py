"""The block fast path: a whole block of frames lying in one buffer, switched in bulk with numpy
(:func:`switch_block_np`, the reference), or in C by the native build (:func:`switch_block`).

Theory of operation
-------------------
:func:`switch_block` takes what a TPACKET_V3 ring block holds (many frames in one buffer, with their starts, lengths
and ingress ports) and makes, for all of them at once, exactly the checks the one-frame path
(:func:`~mplslb.switching.scalar.switch_frame`) makes: label installed and not reserved, bound to the ingress port,
source MAC and IP source, bottom of stack, the session's flow (IP destination and ports, see
:mod:`~mplslb.switching.scalar`), TTL above 1. The flow is checked here on plain packets only (IPv4 without options,
IPv6 with TCP or UDP right after the fixed header: one comparison of the destination and the ports); any other
packet under a flow-bound label (an ICMP error, a fragment, IP options, IPv6 extension headers) is left to the
one-frame path, which applies the whole rule. The frames that pass are rewritten where they lie
(Ethernet addresses, TTL - 1) and counted; every other frame is left untouched for the one-frame path, which drops
it under its reason or hands it to the packet analyzing unit. Reports for the session manager (FIN/RST, watched
labels) are appended in frame order, and the acknowledgment numbers of a TCP session's segments are recorded as the
one-frame path records them (the last of each label in the block wins, as frame order would have it).

Every per-label fact comes from the label's row of the table itself, copied once per block (:class:`Gathered`: one
pass over the block's labels, then every field read from the copy); nothing is kept for the block path between
blocks, so an install costs it nothing. The counters are written back sorted by label (:func:`_count`). Where every
frame starts 2 bytes past a 4-byte boundary (a TPACKET ring, which aligns the IP header to 16 bytes) every field sits
on a word boundary and a word-wide variant reads and writes one word per gather instead of one byte.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Literal, NamedTuple

import numpy as np

from mplslb.switching import scalar
from mplslb.switching.layout import (
    ACK_KNOWN,
    ETH_ADDRS,
    ETH_ALEN,
    ETH_P_MPLS_UC,
    ETH_SRC,
    ETH_TYPE,
    FRAG_OFFSET_MASK,
    IP_AT,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV4_ADDR_LEN,
    IPV4_DST,
    IPV4_FRAG_AT,
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
    LSE_AT,
    LSE_TTL,
    MPLS_BOS,
    MPLS_TTL_MASK,
    RESERVED_LABEL_MAX,
    ROW_FLOW,
    ROW_FLOW_LEN,
    ROW_GENERATION,
    ROW_IN_PORT,
    ROW_OUT_PORT,
    ROW_PEER,
    ROW_PEER_IP,
    ROW_PEER_IP_LEN,
    ROW_REWRITE,
    ROW_REWRITE_TAIL,
    ROW_V6,
    ROW_VALID,
    ROW_WATCH,
    TCP_ACK,
    TCP_ACK_AT,
    TCP_END,
    TCP_FLAGS,
    TCP_FLAGS_UNKNOWN,
    TCP_RST,
    WATCH_ALL,
    WATCH_TCP_END,
)
from mplslb.switching.table import FastEvent, LabelSwitchingTable


class BlockTables:
    """The table's rows as numpy views, and the counters the block path writes.

    Nothing is copied ahead: a block gathers its frames' rows when it comes (:meth:`gather`), so an install is seen at
    once and a session costs the block path no memory of its own.
    """

    def __init__(self, table: LabelSwitchingTable) -> None:
        arrays = table.arrays()
        self.packets, self.bytes, self.last_seen, self.acks = (
            arrays.packets,
            arrays.bytes,
            arrays.last_seen,
            arrays.acks,
        )
        #: The rows as octets, one row per label.
        self.octets = table.octets()

    def gather(self, labels: np.ndarray) -> Gathered:
        """A copy of each label's row, in the order given."""
        octets = np.take(self.octets, labels, axis=0)
        return Gathered(octets, octets.view(np.uint32), octets.view(np.int32), octets.view(np.uint64))


class Gathered(NamedTuple):
    """The rows of a block's frames' labels, one per frame, copied from the table in one pass: a frame at a label
    unrelated to the last one's then misses the cache for its row once, not once per field (the fields are read from
    the copy). The row keeps the rewrite and the peer MAC as big-endian integers (the one-frame path packs and
    compares them as such) and the peer IP and flow key as the octets of the wire; the word-wide variant reads the
    latter as machine words, as it reads the frame."""

    octets: np.ndarray  # (frames, ROW_SIZE) uint8
    words: np.ndarray  # the same as 32-bit words
    signed: np.ndarray  # the same as signed 32-bit words (the ports)
    quads: np.ndarray  # the same as 64-bit words


_VIEWS: weakref.WeakKeyDictionary[LabelSwitchingTable, BlockTables] = weakref.WeakKeyDictionary()
# Where the block path finds a label's facts in its row, as octets (and as 32-bit words, /4): the peer IP, and the
# flow key's IP destination and ports (they follow the IP source in a plain packet, as in the key).
_PEER_IP4 = slice(ROW_PEER_IP, ROW_PEER_IP + IPV4_ADDR_LEN)
_PEER_IP6 = slice(ROW_PEER_IP, ROW_PEER_IP + IPV6_ADDR_LEN)
_PEER_IP_WORD = ROW_PEER_IP // 4
_PEER_IP6_WORDS = slice(_PEER_IP_WORD, _PEER_IP_WORD + IPV6_ADDR_LEN // 4)


_ETH_ADDRS_RANGE = np.arange(ETH_ADDRS, dtype=np.int64)
_SAVED_RANGE = np.arange(IP_AT, dtype=np.int64)  # what a rewrite may change: the Ethernet header and the entry
_SRC_MAC_RANGE = np.arange(ETH_SRC, ETH_SRC + ETH_ALEN, dtype=np.int64)
_IP4_RANGE = np.arange(IPV4_ADDR_LEN, dtype=np.int64)
_IP6_RANGE = np.arange(IPV6_ADDR_LEN, dtype=np.int64)
_V4_FLOW_LEN = IPV4_ADDR_LEN + L4_PORTS_LEN  # destination and ports, from IPV4_DST in a packet without options
_V6_FLOW_LEN = IPV6_ADDR_LEN + L4_PORTS_LEN  # from IPV6_DST, TCP or UDP right after the fixed header
_V4_FLOW_RANGE = np.arange(_V4_FLOW_LEN, dtype=np.int64)
_V6_FLOW_RANGE = np.arange(_V6_FLOW_LEN, dtype=np.int64)
_V6_FLOW_WORDS = np.arange(_V6_FLOW_LEN // 4, dtype=np.int64)
_V4_FLOW = slice(ROW_FLOW + IPV4_ADDR_LEN, ROW_FLOW + IPV4_ADDR_LEN + _V4_FLOW_LEN)
_V6_FLOW = slice(ROW_FLOW + IPV6_ADDR_LEN, ROW_FLOW + IPV6_ADDR_LEN + _V6_FLOW_LEN)
_V4_FLOW_WORDS = slice(_V4_FLOW.start // 4, _V4_FLOW.stop // 4)
_V6_FLOW_ROW_WORDS = slice(_V6_FLOW.start // 4, _V6_FLOW.stop // 4)
_MAC_SHIFT = 8 * (8 - ETH_ALEN)  # a MAC as a big-endian integer, moved up to fill a 64-bit word
# The block path takes untagged frames (label entry at LSE_AT, packet at IP_AT); tagged ones go one at a time.


#: What :func:`switch_block` counts: every switched frame (True), none (False: the caller counts them with
#: :func:`count_rows`), or the block's lead (:func:`lead_of`).
Count = bool | Literal["lead"]
_NATIVE_COUNT = {False: 0, True: 1, "lead": 2}


class BlockVerdict(NamedTuple):
    """What :func:`switch_block` did with each frame of a block."""

    out_port: np.ndarray  # per frame: the output port, or -1 when not switched here
    labels: np.ndarray  # per frame: the label read (0 when none)
    switched: np.ndarray  # per frame: True when forwarded by the block path (rewritten in place)
    acks: np.ndarray  # per frame: ACK_KNOWN | the acknowledgment number to record for its label, or 0
    generations: np.ndarray  # per frame: its label's generation when it was decided (see LabelSwitchingTable)


def block_tables(table: LabelSwitchingTable) -> BlockTables:
    """The table's :class:`BlockTables`, made on first use."""
    views = _VIEWS.get(table)
    if views is None:
        views = _VIEWS[table] = BlockTables(table)
    return views


def _wire(values: np.ndarray, dtype: str) -> np.ndarray:
    """Big-endian integers as rows of their octets, in wire order (``dtype``: ``">u8"`` or ``">u4"``)."""
    return values.astype(dtype).view(np.uint8).reshape(len(values), -1)


def switch_block(
    table: LabelSwitchingTable,
    buf: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    ports: np.ndarray,
    now: float,
    events: list[FastEvent],
    *,
    count: Count = True,
    report_rows: list[int] | None = None,
    saved: np.ndarray | None = None,
) -> BlockVerdict:
    """Switch every frame of a block that the fast path can take, rewriting it in place in ``buf``: what
    :func:`switch_block_np` says, done in C by the native build when it is in use
    (:data:`~mplslb.switching.scalar.FAST_PATH`) and ``buf`` is a writable, contiguous uint8 array, frame by frame;
    by :func:`switch_block_np`, the reference, otherwise. Both give the same verdict, buffer, counts and reports
    (``tests/test_fast_native.py``)."""
    native = scalar.native
    if native is None or not (
        buf.dtype == np.uint8 and buf.ndim == 1 and buf.flags.c_contiguous and buf.flags.writeable
    ):
        return switch_block_np(
            table, buf, starts, lengths, ports, now, events, count=count, report_rows=report_rows, saved=saved
        )
    n = len(starts)
    verdict = BlockVerdict(
        np.empty(n, dtype=np.int32),
        np.empty(n, dtype=np.int64),
        np.empty(n, dtype=np.bool_),
        np.empty(n, dtype=np.uint64),
        np.empty(n, dtype=np.int32),
    )
    native.switch_block(
        table.rows, buf, np.ascontiguousarray(starts, dtype=np.int64), np.ascontiguousarray(lengths, dtype=np.int64),
        np.ascontiguousarray(ports, dtype=np.int64), now, events, report_rows, _NATIVE_COUNT[count], *verdict, saved,
    )  # fmt: skip
    return verdict


def switch_block_np(
    table: LabelSwitchingTable,
    buf: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    ports: np.ndarray,
    now: float,
    events: list[FastEvent],
    *,
    count: Count = True,
    report_rows: list[int] | None = None,
    saved: np.ndarray | None = None,
) -> BlockVerdict:
    """Switch every frame of a block that the fast path can take, in bulk, rewriting it in place in ``buf``.

    ``buf`` is a uint8 array holding the frames; frame i is ``buf[starts[i] : starts[i] + lengths[i]]`` and arrived
    on ``ports[i]``. A frame is taken when it is an untagged MPLS frame whose label is installed, bound to that
    port, source MAC and IP source, at the bottom of its stack, with a TTL above 1: exactly the frames
    :func:`~mplslb.switching.scalar.switch_frame` would forward. Those are rewritten (Ethernet addresses, TTL - 1)
    where they lie and counted; the caller sends ``buf[start : start + length]`` to ``out_port``. Every other frame
    is left untouched for the one-at-a-time path, which drops it under its reason or analyses it. Reports for the
    session manager (FIN/RST, watched labels) are appended to ``events`` in frame order (and each one's frame
    index to ``report_rows`` when given). ``count=False`` leaves the per-label counters to the caller
    (:func:`count_rows`), which counts frames in order with what else it does to the table; ``count="lead"`` counts
    the block's lead (:func:`lead_of`) and leaves the others to the caller. ``saved``, an
    (n, IP_AT) uint8 array, gets the first IP_AT octets of each frame switched as they were before the rewrite
    (to put a frame back as it came); its other rows are left as they were.
    """
    t = block_tables(table)
    n = len(starts)
    starts = starts.astype(np.int64, copy=False)
    lengths = lengths.astype(np.int64, copy=False)
    if not bool((lengths >= IP_AT).any()):  # nothing long enough to carry a label: all for the one-frame path
        return BlockVerdict(
            np.full(n, -1, dtype=np.int32),
            np.zeros(n, dtype=np.int64),
            np.zeros(n, dtype=np.bool_),
            np.zeros(n, dtype=np.uint64),
            np.zeros(n, dtype=np.int32),
        )
    if word_aligned(buf, starts):
        return _switch_aligned_block(t, buf, starts, lengths, ports, now, events, count, report_rows, saved)
    long_enough = lengths >= IP_AT
    at = np.where(long_enough, starts, starts[np.argmax(long_enough)])  # short frames read a long one's bytes
    ethertype = (buf[at + ETH_TYPE].astype(np.uint32) << 8) | buf[at + ETH_TYPE + 1]
    mpls = long_enough & (ethertype == ETH_P_MPLS_UC)
    entry = (
        (buf[at + LSE_AT].astype(np.uint32) << 24)
        | (buf[at + LSE_AT + 1].astype(np.uint32) << 16)
        | (buf[at + LSE_AT + 2].astype(np.uint32) << 8)
        | buf[at + LSE_AT + 3]
    )
    labels = np.where(mpls, entry >> LABEL_SHIFT, 0).astype(np.int64)
    r = t.gather(labels)
    ok = mpls & (r.octets[:, ROW_VALID] != 0) & (labels > RESERVED_LABEL_MAX)
    ok &= r.signed[:, ROW_IN_PORT] == ports
    peer = _wire(r.quads[:, ROW_PEER] << np.uint64(_MAC_SHIFT), ">u8")[:, :ETH_ALEN]
    ok &= (buf[at[:, None] + _SRC_MAC_RANGE] == peer).all(axis=1)
    ok &= (entry & MPLS_BOS) != 0
    ok &= (entry & MPLS_TTL_MASK) > 1
    v6 = r.octets[:, ROW_V6] != 0
    check_ip = ok & (r.octets[:, ROW_PEER_IP_LEN] != 0)
    if check_ip.any():
        ip4 = check_ip & ~v6 & (lengths >= IP_AT + IPV4_SRC + IPV4_ADDR_LEN)
        ip6 = check_ip & v6 & (lengths >= IP_AT + IPV6_SRC + IPV6_ADDR_LEN)
        good = np.zeros(n, dtype=np.bool_)
        if ip4.any():
            rows = np.flatnonzero(ip4)
            src = buf[(starts[rows] + IP_AT + IPV4_SRC)[:, None] + _IP4_RANGE]
            good[rows] = (src == r.octets[rows, _PEER_IP4]).all(axis=1)
        if ip6.any():
            rows = np.flatnonzero(ip6)
            src = buf[(starts[rows] + IP_AT + IPV6_SRC)[:, None] + _IP6_RANGE]
            good[rows] = (src == r.octets[rows, _PEER_IP6]).all(axis=1)
        ok &= ~check_ip | good
    _check_flow(r, buf, starts, lengths, ok, None)
    rows = np.flatnonzero(ok)
    if len(rows):
        begin = starts[rows]
        head, tail = r.quads[rows, ROW_REWRITE], r.words[rows, ROW_REWRITE_TAIL]
        if saved is not None:
            saved[rows] = buf[begin[:, None] + _SAVED_RANGE]
        buf[begin[:, None] + _ETH_ADDRS_RANGE] = np.hstack((_wire(head, ">u8"), _wire(tail, ">u4")))
    return _switched(t, r, buf, starts, lengths, rows, labels, ok, now, events, count, report_rows)


def word_aligned(buf: np.ndarray, starts: np.ndarray) -> bool:
    """Do all frames start 2 bytes past a 4-byte boundary of a word-viewable buffer?"""
    return (
        buf.dtype == np.uint8
        and buf.ndim == 1
        and buf.flags.c_contiguous
        and buf.ctypes.data % 4 == 0
        and len(buf) % 4 == 0
        and bool(((starts & 3) == 2).all())
    )


def _switch_aligned_block(
    t: BlockTables,
    buf: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    ports: np.ndarray,
    now: float,
    events: list[FastEvent],
    count: Count,
    report_rows: list[int] | None,
    saved: np.ndarray | None,
) -> BlockVerdict:
    """:func:`switch_block` for word-aligned frames: the same checks and rewrite, one gather or scatter per word.

    With a frame starting at s = 4k + 2: the ethertype is the half word at s + 12, the label entry the word at
    s + 14, the source MAC the word at s + 6 and the half word at s + 10, the IPv4 source the word at s + 30,
    the IPv6 source the four words from s + 26; the rewritten addresses are the half word at s and the three
    words from s + 2 (the last one carries the unchanged ethertype).
    """
    n = len(starts)
    word = buf.view(np.uint32)
    big_half = buf.view(">u2")
    big_word = buf.view(">u4")
    long_enough = lengths >= IP_AT
    at = np.where(long_enough, starts, starts[np.argmax(long_enough)])  # short frames read a long one's bytes
    mpls = long_enough & (big_half[(at + ETH_TYPE) >> 1] == ETH_P_MPLS_UC)
    entry = big_word[(at + LSE_AT) >> 2].astype(np.uint32)
    labels = np.where(mpls, entry >> LABEL_SHIFT, 0).astype(np.int64)
    r = t.gather(labels)
    ok = mpls & (r.octets[:, ROW_VALID] != 0) & (labels > RESERVED_LABEL_MAX)
    ok &= r.signed[:, ROW_IN_PORT] == ports
    peer = r.quads[:, ROW_PEER]
    ok &= big_word[(at + ETH_SRC) >> 2] == peer >> np.uint64(16)
    ok &= big_half[(at + ETH_SRC + 4) >> 1] == peer & np.uint64(0xFFFF)
    ok &= (entry & MPLS_BOS) != 0
    ok &= (entry & MPLS_TTL_MASK) > 1
    v6 = r.octets[:, ROW_V6] != 0
    check_ip = ok & (r.octets[:, ROW_PEER_IP_LEN] != 0)
    if check_ip.any():
        ip4 = check_ip & ~v6 & (lengths >= IP_AT + IPV4_SRC + IPV4_ADDR_LEN)
        good = np.zeros(n, dtype=np.bool_)
        good[ip4] = word[(starts[ip4] + IP_AT + IPV4_SRC) >> 2] == r.words[ip4, _PEER_IP_WORD]
        ip6 = check_ip & v6 & (lengths >= IP_AT + IPV6_SRC + IPV6_ADDR_LEN)
        if ip6.any():
            rows6 = np.flatnonzero(ip6)
            first = (starts[rows6] + IP_AT + IPV6_SRC) >> 2
            src = word[first[:, None] + np.arange(4)]
            good[rows6] = (src == r.words[rows6, _PEER_IP6_WORDS]).all(axis=1)
        ok &= ~check_ip | good
    _check_flow(r, buf, starts, lengths, ok, word)
    rows = np.flatnonzero(ok)
    if len(rows):
        begin = starts[rows]
        head, tail = r.quads[rows, ROW_REWRITE], r.words[rows, ROW_REWRITE_TAIL]
        tail = tail.astype(np.uint64)
        if saved is not None:
            saved[rows] = buf[begin[:, None] + _SAVED_RANGE]
        big_half[begin >> 1] = head >> np.uint64(48)
        first_word = (begin + 2) >> 2
        big_word[first_word] = (head >> np.uint64(16)) & np.uint64(0xFFFFFFFF)
        big_word[first_word + 1] = ((head & np.uint64(0xFFFF)) << np.uint64(16)) | (tail >> np.uint64(16))
        big_word[first_word + 2] = ((tail & np.uint64(0xFFFF)) << np.uint64(16)) | np.uint64(ETH_P_MPLS_UC)
    return _switched(t, r, buf, starts, lengths, rows, labels, ok, now, events, count, report_rows)


def _check_flow(
    r: Gathered,
    buf: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    ok: np.ndarray,
    word: np.ndarray | None,
) -> None:
    """Clear ``ok`` for the frames under a flow-bound label that are not plain packets of its flow (the IP source
    is checked with the ingress binding): the one-frame path takes them. ``word``: the buffer's word view, when
    the frames are word-aligned."""
    rows = np.flatnonzero(ok & (r.octets[:, ROW_FLOW_LEN] != 0))
    if not rows.size:
        return
    ip = starts[rows] + IP_AT
    end = starts[rows] + lengths[rows]
    v6 = r.octets[rows, ROW_V6] != 0
    good = np.zeros(rows.size, dtype=np.bool_)
    four = np.flatnonzero(~v6 & (end >= ip + IPV4_DST + _V4_FLOW_LEN))
    if four.size:
        at, frames = ip[four], rows[four]
        if word is not None:
            first = (at + IPV4_DST) >> 2
            flow = r.words[frames, _V4_FLOW_WORDS]
            same = (word[first] == flow[:, 0]) & (word[first + 1] == flow[:, 1])
        else:
            same = (buf[(at + IPV4_DST)[:, None] + _V4_FLOW_RANGE] == r.octets[frames, _V4_FLOW]).all(axis=1)
        good[four] = same & (buf[at] == IPV4_PLAIN)
    six = np.flatnonzero(v6 & (end >= ip + IPV6_DST + _V6_FLOW_LEN))
    if six.size:
        at, frames = ip[six], rows[six]
        if word is not None:
            flow = r.words[frames, _V6_FLOW_ROW_WORDS]
            same = (word[((at + IPV6_DST) >> 2)[:, None] + _V6_FLOW_WORDS] == flow).all(axis=1)
        else:
            same = (buf[(at + IPV6_DST)[:, None] + _V6_FLOW_RANGE] == r.octets[frames, _V6_FLOW]).all(axis=1)
        nh = buf[at + IPV6_NEXT_HEADER]
        good[six] = same & ((nh == IPPROTO_TCP) | (nh == IPPROTO_UDP))
    ok[rows] = good


def _switched(
    t: BlockTables,
    r: Gathered,
    buf: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    rows: np.ndarray,
    labels: np.ndarray,
    ok: np.ndarray,
    now: float,
    events: list[FastEvent],
    count: Count,
    report_rows: list[int] | None,
) -> BlockVerdict:
    """What both block variants do once the switched frames (``rows``) have their addresses rewritten: the TTL,
    the acknowledgment numbers, the counters, the reports for watched labels, the verdict."""
    taken = labels[rows]
    acks = np.zeros(len(starts), dtype=np.uint64)
    if len(rows):
        buf[starts[rows] + LSE_AT + LSE_TTL] -= 1  # the TTL octet of the label entry (checked > 1 above)
        watch = r.octets[rows, ROW_WATCH]
        v6 = r.octets[rows, ROW_V6] != 0
        acks[rows] = _block_acks(buf, starts[rows], lengths[rows], watch, v6)
        reported: list[int] = []
        watched = np.flatnonzero(watch)
        if len(watched):
            _block_reports(
                buf, starts, lengths, rows[watched], taken[watched], watch[watched], v6[watched], now, events,
                reported,
            )  # fmt: skip
            if report_rows is not None:
                report_rows.extend(reported)
        if count == "lead":
            lead = rows[rows < lead_of(np.flatnonzero(~ok), len(ok), reported)]
            if len(lead):
                _count(t, labels[lead], lengths[lead], now, acks[lead])
        elif count:
            _count(t, taken, lengths[rows], now, acks[rows])
    out_port = np.full(len(starts), -1, dtype=np.int32)
    out_port[rows] = r.signed[rows, ROW_OUT_PORT]
    return BlockVerdict(out_port, labels, ok, acks, r.signed[:, ROW_GENERATION])


def lead_of(unswitched: np.ndarray, n: int, report_rows: list[int]) -> int:
    """A block's lead: how many of its ``n`` first frames are switched and not reported (``unswitched``, the
    indices of the frames not switched, and ``report_rows`` as :func:`switch_block` leaves them). Frame by frame,
    these are counted before any frame touches the session state, so the switch may count them itself
    (``count="lead"``)."""
    lead = int(unswitched[0]) if unswitched.size else n
    return min(lead, min(report_rows)) if report_rows else lead


def _block_acks(
    buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray, watch: np.ndarray, v6: np.ndarray
) -> np.ndarray:
    """Per switched frame, ``ACK_KNOWN | `` the acknowledgment number the one-frame path records for it, or 0: a
    TCP session's label, the TCP flags found where that path peeks (IPv4: protocol TCP, no fragment past the
    first), ACK set and RST clear. ``watch``, ``v6``: each frame's label's watch bits and IP version."""
    end = starts + lengths
    ip = starts + IP_AT
    last = end - 1
    v4_offset = (buf[np.minimum(ip, last)] & IPV4_IHL_MASK).astype(np.int64) * IPV4_IHL_UNIT
    flag_at = ip + np.where(v6, IPV6_HLEN, v4_offset) + TCP_FLAGS
    tcp = ((watch & WATCH_TCP_END) != 0) & (ip < end) & (flag_at < end)
    flags = buf[np.minimum(flag_at, last)]
    tcp &= (flags & (TCP_ACK | TCP_RST)) == TCP_ACK
    next_header = buf[np.minimum(ip + IPV6_NEXT_HEADER, last)]
    frag = (buf[np.minimum(ip + IPV4_FRAG_AT, last)].astype(np.int64) << 8) | buf[
        np.minimum(ip + IPV4_FRAG_AT + 1, last)
    ]
    proto = buf[np.minimum(ip + IPV4_PROTO, last)]
    tcp &= np.where(v6, next_header == IPPROTO_TCP, (proto == IPPROTO_TCP) & ((frag & FRAG_OFFSET_MASK) == 0))
    out = np.zeros(len(starts), dtype=np.uint64)
    rows = np.flatnonzero(tcp)
    if rows.size:
        at = flag_at[rows] - (TCP_FLAGS - TCP_ACK_AT)
        ack = np.zeros(rows.size, dtype=np.uint64)
        for k in range(4):
            ack = (ack << np.uint64(8)) | buf[at + k].astype(np.uint64)
        out[rows] = ack | np.uint64(ACK_KNOWN)
    return out


def _count(t: BlockTables, taken: np.ndarray, lengths: np.ndarray, now: float, acks: np.ndarray | None = None) -> None:
    """Per-label packets, bytes and last-seen for the switched frames (``taken``: their labels, in frame order), and
    their acknowledgment numbers (0: none; the last of each label wins).

    A fancy-index add counts a label that repeats within the block once, and ``np.add.at`` is slow (about 100 ns
    an element), so the frames are sorted by label and each label's run is summed first (its last acknowledgment
    number is the one of its latest frame that has one); the rows are then written once per label, in ascending
    order, which also touches memory in order.
    """
    order = np.argsort(taken)
    ordered = taken[order]
    first = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    labels = ordered[first]
    t.packets[labels] += np.diff(np.append(first, len(ordered))).astype(np.uint64)
    t.bytes[labels] += np.add.reduceat(lengths[order].astype(np.uint64), first)
    t.last_seen[labels] = now
    if acks is not None:
        last = np.maximum.reduceat(np.where(acks[order] != 0, order, -1), first)  # the frame, or -1: none
        has = last >= 0
        t.acks[labels[has]] = acks[last[has]]


def _block_reports(
    buf: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    rows: np.ndarray,
    labels: np.ndarray,
    watch: np.ndarray,
    v6: np.ndarray,
    now: float,
    events: list[FastEvent],
    report_rows: list[int] | None = None,
) -> None:
    """The one-frame path's reports for the watched frames of a block: peek at the TCP flags, report FIN/RST and
    every frame of labels whose response time is being measured."""
    begin = starts[rows]
    end = begin + lengths[rows]
    ip = begin + IP_AT
    v4_offset = (buf[np.minimum(ip, end - 1)] & IPV4_IHL_MASK).astype(np.int64) * IPV4_IHL_UNIT
    flag_at = ip + np.where(v6, IPV6_HLEN, v4_offset) + TCP_FLAGS
    tcp_end = (watch & WATCH_TCP_END) != 0
    next_at = ip + IPV6_NEXT_HEADER
    unknown = tcp_end & v6 & (next_at < end) & (buf[np.minimum(next_at, end - 1)] != IPPROTO_TCP)
    peek = tcp_end & ~unknown & (flag_at < end) & (ip < end)
    flags = np.where(peek, buf[np.where(peek, flag_at, 0)], 0).astype(np.int64)
    flags[unknown] = TCP_FLAGS_UNKNOWN
    report = ((watch & WATCH_ALL) != 0) | ((flags & (TCP_END | TCP_FLAGS_UNKNOWN)) != 0)
    for k in np.flatnonzero(report):
        b, e = int(begin[k]), int(end[k])
        events.append(FastEvent(int(labels[k]), buf[b:e].tobytes(), IP_AT, int(flags[k]), now))
        if report_rows is not None:
            report_rows.append(int(rows[k]))


#: The most frames :func:`count_switched_py` counts one by one between two frames of a block that touch the session
#: state (more are counted in bulk by :func:`count_rows_np`, whose fixed cost, a sort and reductions, is some 20
#: µs: a block paying it for each frame between two reports would pay it per frame).
COUNT_FEW = 16


def switched_counter(
    table: LabelSwitchingTable, switched: np.ndarray, labels: np.ndarray, lengths: np.ndarray, acks: np.ndarray
) -> Callable[[int, int, float], None]:
    """A counter of a block's switched frames (``switched``, ``labels``, ``lengths`` and ``acks`` as
    :class:`BlockVerdict` has them, contiguous; ``switched`` may change between calls): called with ``begin``,
    ``end`` and ``now``, it counts the switched frames among ``begin`` to ``end - 1``, in order, as
    :func:`count_rows` counts frames: in C with the native build, by :func:`count_switched_py`, the reference,
    otherwise."""
    native = scalar.native
    if native is None:
        return functools.partial(count_switched_py, table, switched, labels, lengths, acks)
    return functools.partial(native.count_switched, table.rows, switched, labels, lengths, acks)


def count_switched_py(
    table: LabelSwitchingTable,
    switched: np.ndarray,
    labels: np.ndarray,
    lengths: np.ndarray,
    acks: np.ndarray,
    begin: int,
    end: int,
    now: float,
) -> None:
    """The count of :func:`switched_counter` in Python: up to :data:`COUNT_FEW` frames one by one, more in bulk."""
    if end - begin > COUNT_FEW:
        rows = np.flatnonzero(switched[begin:end]) + begin
        if rows.size:
            count_rows_np(table, labels[rows], lengths[rows], now, acks[rows])
        return
    t = block_tables(table)
    packets, octets, last_seen, last_ack = t.packets, t.bytes, t.last_seen, t.acks
    for j in range(begin, end):
        if not switched[j]:
            continue
        label = int(labels[j])
        packets[label] += 1
        octets[label] += int(lengths[j])
        last_seen[label] = now
        ack = int(acks[j])
        if ack:
            last_ack[label] = ack


def count_rows(
    table: LabelSwitchingTable, labels: np.ndarray, lengths: np.ndarray, now: float, acks: np.ndarray | None = None
) -> None:
    """Count switched frames (their ``labels`` and ``lengths``) in the table: packets, bytes, last seen, and record
    their acknowledgment numbers (``acks``, :attr:`BlockVerdict.acks`): in C, frame by frame, with the native
    build; by :func:`count_rows_np`, the reference, otherwise."""
    native = scalar.native
    if native is None:
        count_rows_np(table, labels, lengths, now, acks)
    elif len(labels):
        native.count_rows(
            table.rows,
            np.ascontiguousarray(labels, dtype=np.int64),
            np.ascontiguousarray(lengths, dtype=np.int64),
            None if acks is None else np.ascontiguousarray(acks, dtype=np.uint64),
            now,
        )


def count_rows_np(
    table: LabelSwitchingTable, labels: np.ndarray, lengths: np.ndarray, now: float, acks: np.ndarray | None = None
) -> None:
    """:func:`count_rows` with numpy: the labels sorted, each label's run summed and written once (:func:`_count`)."""
    if len(labels):
        labels = labels.astype(np.int64, copy=False)
        _count(block_tables(table), labels, lengths.astype(np.int64, copy=False), now, acks)
