"""Capture files: read classic pcap, pcapng and gzip-compressed either; write classic pcap.

Formats: pcap (https://www.tcpdump.org/manpages/pcap-savefile.5.html, both byte orders, micro- and
nanosecond magics) and pcapng (draft-ietf-opsawg-pcapng: SHB in either byte order, IDB with ``if_tsresol`` and
``if_tsoffset``, EPB, SPB and the obsolete PB; other blocks skipped).
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zlib
from collections.abc import Iterator
from types import TracebackType
from typing import BinaryIO, NamedTuple

from mplslb.wire.errors import WireError

LINKTYPE_ETHERNET = 1
LINKTYPE_PPP = 9
LINKTYPE_RAW = 101
LINKTYPE_C_HDLC = 104
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_MASK = 0xFFFF  # the upper bits of a pcap header's link type field carry FCS information

GZIP_MAGIC = b"\x1f\x8b"
PCAP_MAGIC_USEC = 0xA1B2C3D4
PCAP_MAGIC_NSEC = 0xA1B23C4D
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BYTE_ORDER_MAGIC = 0x1A2B3C4D
PCAPNG_IDB = 0x00000001
PCAPNG_PB = 0x00000002  # obsolete Packet Block
PCAPNG_SPB = 0x00000003
PCAPNG_EPB = 0x00000006
OPT_END = 0
OPT_IF_TSRESOL = 9
OPT_IF_TSOFFSET = 14
TSRESOL_BASE2 = 0x80
DEFAULT_TSRESOL = 6  # microseconds
MAX_RECORD = 1 << 28  # a record claiming more than this is taken as corruption, not read into memory
PCAP_VERSION = (2, 4)
USEC = 1_000_000

MAGIC_LEN = 4
_U32 = {"<": struct.Struct("<I"), ">": struct.Struct(">I")}
_PCAP_HEADER_REST = {o: struct.Struct(o + "HHiIII") for o in "<>"}  # after the magic
_PCAP_RECORD = {o: struct.Struct(o + "IIII") for o in "<>"}
_BLOCK_HEAD = {o: struct.Struct(o + "II") for o in "<>"}  # type, total length
_IDB = {o: struct.Struct(o + "HHI") for o in "<>"}  # link type, reserved, snap length
_EPB = {o: struct.Struct(o + "IIIII") for o in "<>"}  # interface, ts high, ts low, captured, original
_PB = {o: struct.Struct(o + "HHIIII") for o in "<>"}  # interface, drops, ts high, ts low, captured, original
_OPTION = {o: struct.Struct(o + "HH") for o in "<>"}
_TSOFFSET = {o: struct.Struct(o + "q") for o in "<>"}
_BLOCK_TRAILER_LEN = 4
_BLOCK_MIN_LEN = 12
_BLOCK_ALIGN = 4
_WRITE_HEADER = struct.Struct("<IHHiIII")
_WRITE_RECORD = _PCAP_RECORD["<"]


class PcapError(WireError):
    """A capture file that does not decode."""


class PcapRecord(NamedTuple):
    timestamp: float  # seconds since the epoch
    linktype: int
    data: bytes
    orig_len: int  # the length on the wire; more than len(data) when the capture cut the frame


def _read(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise PcapError("pcap_truncated", f"{what}: {len(data)} of {n} bytes")
    return data


def read_pcap(source: str | os.PathLike[str] | BinaryIO) -> Iterator[PcapRecord]:
    """Yield every packet of a pcap or pcapng file (gzip-compressed or not), in file order."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            yield from _read_stream(f)
    else:
        yield from _read_stream(source)


def _read_stream(f: BinaryIO, *, compressed: bool = False) -> Iterator[PcapRecord]:
    magic = f.read(MAGIC_LEN)
    if magic[: len(GZIP_MAGIC)] == GZIP_MAGIC and not compressed:
        raw = io.BytesIO(magic + f.read())
        try:
            decompressed = gzip.GzipFile(fileobj=raw, mode="rb")
            yield from _read_stream(decompressed, compressed=True)  # type: ignore[arg-type]
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise PcapError("pcap_bad_gzip", str(exc)) from exc
        return
    if len(magic) < MAGIC_LEN:
        raise PcapError("pcap_truncated", "file shorter than a magic number")
    for order in "<>":
        (value,) = _U32[order].unpack(magic)
        if value in (PCAP_MAGIC_USEC, PCAP_MAGIC_NSEC):
            yield from _read_classic(f, order, 1e-9 if value == PCAP_MAGIC_NSEC else 1e-6)
            return
    if _U32["<"].unpack(magic)[0] == PCAPNG_SHB:
        yield from _read_pcapng(f, magic)
        return
    raise PcapError("pcap_bad_magic", f"magic {magic.hex()}")


def _read_classic(f: BinaryIO, order: str, tick: float) -> Iterator[PcapRecord]:
    header = _read(f, _PCAP_HEADER_REST[order].size, "file header")
    linktype = _PCAP_HEADER_REST[order].unpack(header)[5] & LINKTYPE_MASK
    record = _PCAP_RECORD[order]
    while True:
        head = f.read(record.size)
        if not head:
            return
        if len(head) != record.size:
            raise PcapError("pcap_truncated", f"record header: {len(head)} of {record.size} bytes")
        seconds, fraction, captured, original = record.unpack(head)
        if captured > MAX_RECORD:
            raise PcapError("pcap_truncated", f"record claims {captured} bytes")
        data = _read(f, captured, "record data")
        yield PcapRecord(seconds + fraction * tick, linktype, data, original)


class _Interface(NamedTuple):
    linktype: int
    tick: float  # seconds per timestamp unit
    offset: int  # if_tsoffset, seconds
    snaplen: int


def _read_pcapng(f: BinaryIO, magic: bytes) -> Iterator[PcapRecord]:
    """Read blocks; each SHB (the first included) sets the byte order and clears the interfaces."""
    order = "<"
    interfaces: list[_Interface] = []
    first = True
    while True:
        head = magic if first else f.read(MAGIC_LEN)
        first = False
        if not head:
            return
        if len(head) != MAGIC_LEN:
            raise PcapError("pcap_truncated", "block header")
        if _U32["<"].unpack(head)[0] == PCAPNG_SHB:
            length_bytes = _read(f, MAGIC_LEN, "section header")
            bom = _read(f, MAGIC_LEN, "section header")
            for candidate in "<>":
                if _U32[candidate].unpack(bom)[0] == PCAPNG_BYTE_ORDER_MAGIC:
                    order = candidate
                    break
            else:
                raise PcapError("pcap_bad_magic", f"pcapng byte-order magic {bom.hex()}")
            interfaces = []
            (total,) = _U32[order].unpack(length_bytes)
            _body(f, total, order, already=MAGIC_LEN * 3)
            continue
        block_type = _U32[order].unpack(head)[0]
        (total,) = _U32[order].unpack(_read(f, MAGIC_LEN, "block header"))
        body = _body(f, total, order, already=MAGIC_LEN * 2)
        if block_type == PCAPNG_IDB:
            interfaces.append(_interface(body, order))
        elif block_type in (PCAPNG_EPB, PCAPNG_PB, PCAPNG_SPB):
            yield _packet(block_type, body, order, interfaces)


def _body(f: BinaryIO, total: int, order: str, *, already: int) -> bytes:
    """The rest of a block's body after ``already`` bytes of it were read; checks the trailing length."""
    if total < _BLOCK_MIN_LEN or total % _BLOCK_ALIGN or total > MAX_RECORD or total < already + MAGIC_LEN:
        raise PcapError("pcap_truncated", f"bad block length {total}")
    rest = _read(f, total - already, "block")
    if _U32[order].unpack_from(rest, len(rest) - _BLOCK_TRAILER_LEN)[0] != total:
        raise PcapError("pcap_truncated", "block trailer does not repeat the block length")
    return rest[:-_BLOCK_TRAILER_LEN]


def _interface(body: bytes, order: str) -> _Interface:
    fixed = _IDB[order]
    if len(body) < fixed.size:
        raise PcapError("pcap_truncated", "interface description block")
    linktype, _, snaplen = fixed.unpack_from(body)
    tick, offset = 10.0**-DEFAULT_TSRESOL, 0
    option = _OPTION[order]
    pos = fixed.size
    while len(body) - pos >= option.size:
        code, length = option.unpack_from(body, pos)
        value = body[pos + option.size : pos + option.size + length]
        if code == OPT_END:
            break
        if len(value) != length:
            raise PcapError("pcap_truncated", "interface option")
        if code == OPT_IF_TSRESOL and length >= 1:
            resol = value[0]
            tick = 2.0 ** -(resol & ~TSRESOL_BASE2) if resol & TSRESOL_BASE2 else 10.0**-resol
        elif code == OPT_IF_TSOFFSET and length == _TSOFFSET[order].size:
            (offset,) = _TSOFFSET[order].unpack(value)
        pos += option.size + length + (-length % _BLOCK_ALIGN)
    return _Interface(linktype, tick, offset, snaplen)


def _packet(block_type: int, body: bytes, order: str, interfaces: list[_Interface]) -> PcapRecord:
    if block_type == PCAPNG_SPB:
        if not interfaces or len(body) < MAGIC_LEN:
            raise PcapError("pcap_truncated", "simple packet block without interface or length")
        iface = interfaces[0]
        (original,) = _U32[order].unpack_from(body)
        captured = min(original, len(body) - MAGIC_LEN, iface.snaplen or original)
        return PcapRecord(0.0, iface.linktype, body[MAGIC_LEN : MAGIC_LEN + captured], original)
    fixed = _EPB[order] if block_type == PCAPNG_EPB else _PB[order]
    if len(body) < fixed.size:
        raise PcapError("pcap_truncated", "packet block")
    if block_type == PCAPNG_EPB:
        index, high, low, captured, original = fixed.unpack_from(body)
    else:
        index, _, high, low, captured, original = fixed.unpack_from(body)
    if index >= len(interfaces):
        raise PcapError("pcap_truncated", f"packet on undeclared interface {index}")
    if fixed.size + captured > len(body):
        raise PcapError("pcap_truncated", "packet data beyond its block")
    iface = interfaces[index]
    timestamp = ((high << 32) | low) * iface.tick + iface.offset
    return PcapRecord(timestamp, iface.linktype, body[fixed.size : fixed.size + captured], original)


class PcapWriter:
    """Write a little-endian, microsecond classic pcap file.

    A path is opened (and closed) here; a stream given is written to and flushed on close, not closed.
    """

    def __init__(
        self,
        target: str | os.PathLike[str] | BinaryIO,
        linktype: int = LINKTYPE_ETHERNET,
        snaplen: int = 262144,
    ) -> None:
        self._owned = isinstance(target, (str, os.PathLike))
        self._f: BinaryIO = open(target, "wb") if isinstance(target, (str, os.PathLike)) else target  # noqa: SIM115
        self._snaplen = snaplen
        self._f.write(_WRITE_HEADER.pack(PCAP_MAGIC_USEC, *PCAP_VERSION, 0, 0, snaplen, linktype))

    def write(self, data: bytes, timestamp: float) -> None:
        """Append one frame, cut to the snap length, with ``timestamp`` in seconds since the epoch."""
        if timestamp < 0:
            raise ValueError(f"timestamp {timestamp} is before the epoch")
        micros = round(timestamp * USEC)
        captured = data[: self._snaplen]
        self._f.write(_WRITE_RECORD.pack(micros // USEC, micros % USEC, len(captured), len(data)))
        self._f.write(captured)

    def close(self) -> None:
        """Close the file we opened, or flush the stream we were given."""
        if self._owned:
            self._f.close()
        else:
            self._f.flush()

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
