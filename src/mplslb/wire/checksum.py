"""The Internet checksum (RFC 1071) and the TCP/UDP/ICMPv6 pseudo-header sum (RFC 793, RFC 8200 section 8.1).

The one's-complement sum of 16-bit big-endian words equals the buffer read as one big-endian integer modulo
0xFFFF (since 2**16 is 1 modulo 0xFFFF), so the whole sum is two C-speed operations instead of a Python loop.
"""

from __future__ import annotations

_FOLD = 0xFFFF
IPV4_ADDR_LEN = 4
IPV6_ADDR_LEN = 16


def _fold(total: int) -> int:
    """Reduce a non-negative sum of 16-bit words to its one's-complement 16-bit value."""
    folded = total % _FOLD
    # In one's complement, a non-zero sum that is a multiple of 0xFFFF is "negative zero", 0xFFFF.
    return _FOLD if folded == 0 and total != 0 else folded


def ones_complement_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The folded (not complemented) 16-bit one's-complement sum of ``data`` plus ``initial``."""
    raw = bytes(data)
    if len(raw) % 2:
        raw += b"\x00"
    return _fold(int.from_bytes(raw, "big") + initial)


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The checksum to put in a header: the complement of the one's-complement sum of ``data``.

    ``initial`` is a partial sum to add, e.g. :func:`pseudo_header_sum`. Over data that already holds a
    correct checksum the result is 0.
    """
    return ~ones_complement_sum(data, initial) & _FOLD


def pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """The folded sum of the IPv4 or IPv6 pseudo header (chosen by the address length).

    Every field of either pseudo header starts on a 16-bit boundary, so its sum is the sum of the fields'
    values.
    """
    if len(src) != len(dst) or len(src) not in (IPV4_ADDR_LEN, IPV6_ADDR_LEN):
        raise ValueError(f"addresses must both be 4 or 16 bytes, got {len(src)} and {len(dst)}")
    return _fold(int.from_bytes(src, "big") + int.from_bytes(dst, "big") + proto + length)
