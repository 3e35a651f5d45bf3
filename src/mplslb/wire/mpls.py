"""MPLS label stack entries (RFC 3032 section 2.1) and MPLS-in-UDP's port (RFC 7510).

One entry is 32 bits, big endian: label (20) | traffic class (3) | bottom of stack S (1) | TTL (8).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from enum import IntEnum
from typing import NamedTuple

from mplslb.wire.errors import WireError
from mplslb.wire.ip import ip_version

MPLS_UDP_PORT = 6635
MPLS_ENTRY_LEN = 4
MAX_STACK_DEPTH = 16

LABEL_BITS = 20
LABEL_SPACE = 1 << LABEL_BITS  # number of values of the label field
LABEL_MAX = LABEL_SPACE - 1
TC_MAX = 7
TTL_MAX = 255
RESERVED_LABEL_MAX = 15

LABEL_SHIFT = 12
TC_SHIFT = 9
S_BIT = 1 << 8
TC_MASK = 0x7
TTL_MASK = 0xFF

ENTRY = struct.Struct("!I")  # one label stack entry, big endian


class MplsError(WireError):
    """A label stack that does not decode."""


class ReservedLabel(IntEnum):
    """Special-purpose label values 0-15 (RFC 3032, RFC 7274)."""

    IPV4_EXPLICIT_NULL = 0
    ROUTER_ALERT = 1
    IPV6_EXPLICIT_NULL = 2
    IMPLICIT_NULL = 3
    ENTROPY_LABEL_INDICATOR = 7
    GAL = 13
    OAM_ALERT = 14
    EXTENSION = 15


def is_reserved(label: int) -> bool:
    """Whether ``label`` is one of the special-purpose values 0-15 (assigned or not)."""
    return 0 <= label <= RESERVED_LABEL_MAX


class LabelEntry(NamedTuple):
    label: int
    tc: int
    s: bool
    ttl: int


def encode_entry(label: int, tc: int = 0, s: bool = True, ttl: int = 64) -> int:
    """The 32-bit value of one label stack entry; ValueError when a field is out of range."""
    if not 0 <= label <= LABEL_MAX:
        raise ValueError(f"label {label} out of range 0..{LABEL_MAX}")
    if not 0 <= tc <= TC_MAX:
        raise ValueError(f"traffic class {tc} out of range 0..{TC_MAX}")
    if not 0 <= ttl <= TTL_MAX:
        raise ValueError(f"TTL {ttl} out of range 0..{TTL_MAX}")
    return (label << LABEL_SHIFT) | (tc << TC_SHIFT) | (S_BIT if s else 0) | ttl


def pack_entry(label: int, tc: int = 0, s: bool = True, ttl: int = 64) -> bytes:
    """One label stack entry as 4 bytes, big endian."""
    return ENTRY.pack(encode_entry(label, tc, s, ttl))


def pack_stack(entries: Sequence[LabelEntry]) -> bytes:
    """The entries as given, S bits included (not checked)."""
    return b"".join(pack_entry(e.label, e.tc, e.s, e.ttl) for e in entries)


def stack_of(labels: Sequence[int], ttl: int = 64, tc: int = 0) -> bytes:
    """A stack of ``labels`` (top first) with S set on the last entry only."""
    last = len(labels) - 1
    return b"".join(pack_entry(label, tc, i == last, ttl) for i, label in enumerate(labels))


def _decode(value: int) -> LabelEntry:
    return LabelEntry(value >> LABEL_SHIFT, (value >> TC_SHIFT) & TC_MASK, bool(value & S_BIT), value & TTL_MASK)


def parse_entry(buf: bytes | memoryview, offset: int = 0) -> LabelEntry:
    """Decode the label stack entry at ``offset``."""
    if offset < 0 or len(buf) - offset < MPLS_ENTRY_LEN:
        raise MplsError("mpls_truncated", f"no full label stack entry at offset {offset}")
    (value,) = ENTRY.unpack_from(buf, offset)
    return _decode(value)


def parse_stack(
    buf: bytes | memoryview, offset: int = 0, max_depth: int = MAX_STACK_DEPTH
) -> tuple[tuple[LabelEntry, ...], int]:
    """Decode the stack at ``offset`` down to the entry with S=1.

    Returns the entries (top first) and the offset just after the bottom entry. Raises ``mpls_truncated`` when
    the buffer ends inside an entry (or has none), ``mpls_no_bottom`` when it ends between entries before one
    with S=1, and ``mpls_too_deep`` when there are more than ``max_depth`` entries.
    """
    if offset < 0 or len(buf) - offset < MPLS_ENTRY_LEN:
        raise MplsError("mpls_truncated", f"no label stack entry at offset {offset}")
    entries: list[LabelEntry] = []
    pos = offset
    while True:
        if len(entries) == max_depth:
            raise MplsError("mpls_too_deep", f"no bottom of stack within {max_depth} entries")
        remaining = len(buf) - pos
        if remaining == 0:
            raise MplsError("mpls_no_bottom", f"frame ends after {len(entries)} entries without S=1")
        if remaining < MPLS_ENTRY_LEN:
            raise MplsError("mpls_truncated", f"label stack entry cut short at offset {pos}")
        (value,) = ENTRY.unpack_from(buf, pos)
        entry = _decode(value)
        entries.append(entry)
        pos += MPLS_ENTRY_LEN
        if entry.s:
            return tuple(entries), pos


def payload_version(buf: bytes | memoryview, offset: int) -> int:
    """The IP version (4 or 6) of the payload starting at ``offset``, just after the bottom of the stack.

    ``offset`` is the second value :func:`parse_stack` returns. 0 when the payload is empty or its first
    nibble is neither 4 nor 6 (e.g. a pseudowire control word). Never raises.
    """
    return ip_version(buf, offset)
