"""Ethernet II header with up to two 802.1Q / 802.1ad VLAN tags."""

from __future__ import annotations

import string
import struct
from collections.abc import Sequence
from typing import NamedTuple

from mplslb.wire.errors import WireError

ETH_ALEN = 6
ETH_HLEN = 14
VLAN_TAG_LEN = 4
MAX_VLAN_TAGS = 2

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
ETH_P_MPLS_UC = 0x8847
ETH_P_MPLS_MC = 0x8848
VLAN_ETHERTYPES = frozenset({ETH_P_8021Q, ETH_P_8021AD})

TCI_MAX = 0xFFFF
ETHERTYPE_MAX = 0xFFFF

_HEX_DIGITS = frozenset(string.hexdigits)
_HEADER = struct.Struct("!6s6sH")
_TAG = struct.Struct("!HH")  # TCI, then the next ethertype


class EthernetError(WireError):
    """An Ethernet header that does not decode."""


class Ethernet(NamedTuple):
    dst: bytes
    src: bytes
    vlans: tuple[int, ...]  # TCI of each VLAN tag, outermost first
    ethertype: int  # the ethertype after the VLAN tags
    payload_offset: int


def parse_ethernet(buf: bytes | memoryview, offset: int = 0) -> Ethernet:
    """Decode the Ethernet header at ``offset``; up to :data:`MAX_VLAN_TAGS` VLAN tags are walked.

    A third tag is not walked: the frame is reported with ethertype 0x8100 (or 0x88A8), i.e. as non-IP.
    """
    if offset < 0 or len(buf) - offset < ETH_HLEN:
        raise EthernetError("ethernet_truncated", f"{len(buf) - offset} bytes at offset {offset}")
    dst, src, ethertype = _HEADER.unpack_from(buf, offset)
    pos = offset + ETH_HLEN
    vlans: list[int] = []
    while ethertype in VLAN_ETHERTYPES and len(vlans) < MAX_VLAN_TAGS:
        if len(buf) - pos < VLAN_TAG_LEN:
            raise EthernetError("ethernet_truncated", "VLAN tag cut short")
        tci, ethertype = _TAG.unpack_from(buf, pos)
        vlans.append(tci)
        pos += VLAN_TAG_LEN
    return Ethernet(bytes(dst), bytes(src), tuple(vlans), ethertype, pos)


def build_ethernet(dst: bytes, src: bytes, ethertype: int, vlans: Sequence[int] = ()) -> bytes:
    """An Ethernet header (no payload). The outermost tag is 802.1ad when there are two, as for Q-in-Q."""
    if len(dst) != ETH_ALEN or len(src) != ETH_ALEN:
        raise ValueError("MAC addresses must be 6 bytes")
    if not 0 <= ethertype <= ETHERTYPE_MAX or any(not 0 <= tci <= TCI_MAX for tci in vlans):
        raise ValueError("ethertype and VLAN TCIs must fit in 16 bits")
    if len(vlans) > MAX_VLAN_TAGS:
        raise ValueError(f"at most {MAX_VLAN_TAGS} VLAN tags")
    tpids = [ETH_P_8021AD, ETH_P_8021Q] if len(vlans) == MAX_VLAN_TAGS else [ETH_P_8021Q]
    parts = [dst, src]
    for tpid, tci in zip(tpids, vlans, strict=False):
        parts.append(_TAG.pack(tpid, tci))
    parts.append(ethertype.to_bytes(2, "big"))
    return b"".join(parts)


def mac_to_str(b: bytes) -> str:
    """``aa:bb:cc:dd:ee:ff`` (lower case)."""
    if len(b) != ETH_ALEN:
        raise ValueError(f"a MAC address is 6 bytes, got {len(b)}")
    return b.hex(":")


def mac_from_str(s: str) -> bytes:
    """Parse ``aa:bb:cc:dd:ee:ff`` (or with ``-`` separators); ValueError on anything else."""
    parts = s.replace("-", ":").split(":")
    if len(parts) != ETH_ALEN or any(len(p) != 2 or not set(p) <= _HEX_DIGITS for p in parts):
        raise ValueError(f"not a MAC address: {s!r}")
    return bytes.fromhex("".join(parts))
