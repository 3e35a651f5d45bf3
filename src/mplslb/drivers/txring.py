"""A TPACKET_V2 transmit ring (``PACKET_TX_RING``) on its own AF_PACKET socket: :class:`TxRing`.

Theory of operation
-------------------
The ring is a run of fixed-size slots shared with the kernel, each a ``struct tpacket2_hdr`` (status, length) and
the frame after it. The socket is bound to the interface for no protocol, so it receives nothing. Frames are copied
into free slots (``queue``; ``queue_block`` copies a whole block's frames with a few numpy operations) and marked
``TP_STATUS_SEND_REQUEST``; one ``send()`` with ``MSG_DONTWAIT`` (``flush``) makes the kernel transmit every
requested slot, and it hands each slot back (``TP_STATUS_AVAILABLE``) once the frame's buffer is freed.
TPACKET_V2 rather than V3: TX rings with V3 need Linux 4.11 and gain nothing for fixed-size slots.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import mmap
import socket
import struct
from typing import Self

import numpy as np

from mplslb.drivers.netns import entered
from mplslb.wire.ethernet import ETH_ALEN, ETH_HLEN, VLAN_ETHERTYPES, VLAN_TAG_LEN

# <linux/if_packet.h>, <asm-generic/socket.h>, <linux/sockios.h>
SOL_PACKET = 263
PACKET_VERSION = 10
PACKET_TX_RING = 13
PACKET_LOSS = 14
PACKET_QDISC_BYPASS = 20
TPACKET_V2 = 1
TPACKET_ALIGNMENT = 16
SO_SNDBUFFORCE = 32
SIOCGIFMTU = 0x8921

# TX ring slot states (tp_status of struct tpacket2_hdr)
TP_STATUS_AVAILABLE = 0
TP_STATUS_SEND_REQUEST = 1 << 0

# struct tpacket_req, and struct tpacket2_hdr's first words: tp_status, tp_len, tp_snaplen. Without
# PACKET_TX_HAS_OFF the kernel reads the frame at TPACKET2_HDRLEN - sizeof(struct sockaddr_ll) = 32.
_REQ = struct.Struct("=IIII")
_TX_HDR = struct.Struct("=III")
_U32 = struct.Struct("=I")
_WORD = _U32.size  # the slot headers are read and written as uint32 words of the ring
_TP_LEN_WORD, _TP_SNAPLEN_WORD = 1, 2  # word indexes in a slot (tp_status is word 0)
TPACKET2_DATA = 32
DEFAULT_TX_FRAMES = 4096
DEFAULT_TX_FRAME_SIZE = 2048  # a 1500-byte MTU frame (and a VLAN tag) fits after the 32-byte header
_SKB_OVERHEAD = 512  # kernel memory a frame in flight costs beyond its bytes (sk_buff, shared info), roughly
_TX_COPY_ROUND = 64  # frames of a block are copied in windows of their length rounded up to this
_FLUSH_TRIES = 4  # send() calls per flush while each takes some but not all of the requested slots
_IFREQ_MTU = struct.Struct("16si12x")
_ETHERTYPE = slice(2 * ETH_ALEN, 2 * ETH_ALEN + 2)
_VLAN_TPIDS = frozenset(t.to_bytes(2, "big") for t in VLAN_ETHERTYPES)  # a tagged frame may exceed the MTU by a tag


def interface_mtu(sock: socket.socket, ifname: str) -> int:
    """The MTU of ``ifname`` (in the namespace ``sock`` belongs to)."""
    raw = fcntl.ioctl(sock.fileno(), SIOCGIFMTU, _IFREQ_MTU.pack(ifname.encode(), 0))
    return int(_IFREQ_MTU.unpack(raw)[1])


class TxRing:
    """A PACKET_TX_RING (TPACKET_V2) on its own AF_PACKET socket bound to ``ifname``: queue, then flush.

    ``frame_nr`` slots of ``frame_size`` bytes; a frame longer than ``frame_size - 32`` bytes or than the
    interface's MTU plus its Ethernet header (4 more with a VLAN tag) cannot be queued (ValueError). ``queue``
    copies a frame into the next slot and marks it ``TP_STATUS_SEND_REQUEST``; when that slot is still the
    kernel's it returns False (the ring is full: flush, then queue again). ``flush`` is one ``send()`` with
    ``MSG_DONTWAIT``: the kernel transmits every requested slot in order and returns; it gives a slot back
    (``TP_STATUS_AVAILABLE``) once the frame's buffer is freed. A slot the kernel could not take then (socket send
    buffer full) stays requested and goes with the next flush. ``PACKET_LOSS`` is set, so a frame the kernel finds
    malformed is skipped rather than stopping the ring (the length checks above keep those out).

    Counters: ``queued`` (frames copied in), ``sent`` (frames the kernel took, seen after each flush), ``flushes``,
    ``full`` (queue refusals for want of a slot), ``errors`` (flush failures by errno name).
    """

    def __init__(
        self,
        ifname: str,
        *,
        netns: str | None = None,
        frame_size: int = DEFAULT_TX_FRAME_SIZE,
        frame_nr: int = DEFAULT_TX_FRAMES,
        qdisc_bypass: bool = False,
        sndbuf: int | None = None,
    ) -> None:
        if frame_size < TPACKET2_DATA + ETH_HLEN or frame_size % TPACKET_ALIGNMENT:
            raise ValueError(f"frame_size must be a multiple of {TPACKET_ALIGNMENT} above {TPACKET2_DATA + ETH_HLEN}")
        if frame_nr <= 0:
            raise ValueError("frame_nr must be positive")
        # Blocks of whole frames, a page multiple: one block of page size for small frames, else frame_size pages.
        block_size = math.lcm(frame_size, mmap.PAGESIZE)
        per_block = block_size // frame_size
        frame_nr = -(-frame_nr // per_block) * per_block
        self.ifname = ifname
        self.frame_size, self.frame_nr = frame_size, frame_nr
        self._ring: mmap.mmap | None = None
        self._slots: np.ndarray | None = None  # (frame_nr, frame_size) uint8 view of the ring
        self._words: np.ndarray | None = None  # the ring as uint32, for the slot headers
        self._head = 0  # the next slot to fill
        self._kernel = 0  # the first slot requested and not yet taken by the kernel
        self.pending = 0  # slots requested and not yet taken
        self.queued = self.sent = self.flushes = self.full = 0
        self.errors: dict[str, int] = {}
        with entered(netns):
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            try:
                sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
                sock.setsockopt(SOL_PACKET, PACKET_LOSS, 1)
                if qdisc_bypass:
                    sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
                room = sndbuf if sndbuf is not None else frame_nr * (frame_size + _SKB_OVERHEAD)
                try:  # room for the whole ring in flight; root may go past net.core.wmem_max
                    sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, room)
                except PermissionError:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, room)
                sock.setsockopt(SOL_PACKET, PACKET_TX_RING, _REQ.pack(block_size, frame_nr // per_block, frame_size,
                                                                      frame_nr))  # fmt: skip
                ring = mmap.mmap(
                    sock.fileno(), frame_size * frame_nr, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
                )
                self._ring = ring
                self._slots = np.frombuffer(ring, dtype=np.uint8).reshape(frame_nr, frame_size)
                self._words = self._slots.reshape(-1).view(np.uint32)
                sock.bind((ifname, 0))  # protocol 0: the socket receives nothing
                self.mtu = interface_mtu(sock, ifname)
            except BaseException:
                self._unmap()
                sock.close()
                raise
        self._sock = sock
        self.max_frame = min(frame_size - TPACKET2_DATA, self.mtu + ETH_HLEN + VLAN_TAG_LEN)

    def fileno(self) -> int:
        return self._sock.fileno()

    def _live_words(self) -> np.ndarray:
        if self._words is None:
            raise ValueError("the TX ring is closed")
        return self._words

    def _fits(self, frame: bytes | memoryview | np.ndarray) -> int:
        n = len(frame)
        if n < ETH_HLEN or n > self.max_frame:
            raise ValueError(f"a frame of {n} bytes cannot be sent on {self.ifname} (at most {self.max_frame})")
        if n > self.mtu + ETH_HLEN and bytes(frame[_ETHERTYPE]) not in _VLAN_TPIDS:
            raise ValueError(f"a frame of {n} bytes exceeds the MTU of {self.ifname} ({self.mtu})")
        return n

    def queue(self, frame: bytes | memoryview | np.ndarray) -> bool:
        """Copy ``frame`` (bytes, a byte memoryview or a contiguous uint8 array) into the next slot; False when that
        slot is not free (flush, then try again). ValueError when the frame can never be sent here."""
        ring = self._ring
        if ring is None:
            raise ValueError("the TX ring is closed")
        n = self._fits(frame)
        at = self._head * self.frame_size
        if _U32.unpack_from(ring, at)[0] != TP_STATUS_AVAILABLE:
            self.full += 1
            return False
        ring[at + TPACKET2_DATA : at + TPACKET2_DATA + n] = frame.data if isinstance(frame, np.ndarray) else frame
        _TX_HDR.pack_into(ring, at, TP_STATUS_SEND_REQUEST, n, n)
        self._head = (self._head + 1) % self.frame_nr
        self.pending += 1
        self.queued += 1
        return True

    def queue_block(self, buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> int:
        """Queue frames ``buf[starts[i] : starts[i] + lengths[i]]`` in order, as many as there are free slots in a
        row; returns how many (from the first). ``buf`` is a 1-D uint8 array; the copy is a few numpy operations
        whatever the number of frames. ValueError (nothing queued) when a frame can never be sent here."""
        slots, words = self._slots, self._words
        if slots is None or words is None:
            raise ValueError("the TX ring is closed")
        n = len(starts)
        if n == 0:
            return 0
        starts = np.asarray(starts, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.min()) < ETH_HLEN or int(lengths.max()) > self.mtu + ETH_HLEN:
            for s, length in zip(starts.tolist(), lengths.tolist(), strict=True):  # the slow check, per frame
                self._fits(buf[s : s + length])
        nr, stride = self.frame_nr, self.frame_size // _WORD
        n = min(n, nr)
        index = np.arange(self._head, self._head + n, dtype=np.int64)
        index[index >= nr] -= nr
        free = words[index * stride] == TP_STATUS_AVAILABLE
        if not free[0]:
            self.full += 1
            return 0
        if not free.all():
            n = int(np.argmin(free))
            index, self.full = index[:n], self.full + 1
        starts, lengths = starts[:n], lengths[:n]
        self._copy(slots, buf, index, starts, lengths)
        head = index * stride
        words[head + _TP_LEN_WORD] = lengths
        words[head + _TP_SNAPLEN_WORD] = lengths
        words[head] = TP_STATUS_SEND_REQUEST
        self._head = (self._head + n) % nr
        self.pending += n
        self.queued += n
        return n

    def _copy(
        self, slots: np.ndarray, buf: np.ndarray, index: np.ndarray, starts: np.ndarray, lengths: np.ndarray
    ) -> None:
        """Copy each frame into its slot: frames are grouped by their length rounded up to 64 bytes and each group
        is one gather (a window of that width at each start, row by row) and one scatter into the slots. Bytes past
        a frame's end ride along harmlessly (the slot's tp_len says where the frame ends); a frame whose window
        would run past the end of ``buf`` is copied alone."""
        width = np.minimum((lengths + (_TX_COPY_ROUND - 1)) // _TX_COPY_ROUND * _TX_COPY_ROUND,
                           self.frame_size - TPACKET2_DATA)  # fmt: skip
        inside = starts + width <= len(buf)
        if not inside.all():
            for k in np.flatnonzero(~inside).tolist():
                s, length = int(starts[k]), int(lengths[k])
                slots[index[k], TPACKET2_DATA : TPACKET2_DATA + length] = buf[s : s + length]
            index, starts, width = index[inside], starts[inside], width[inside]
        if not len(index):
            return
        if not buf.flags.c_contiguous:
            buf = np.ascontiguousarray(buf)
        first = int(width[0])
        groups = [first] if bool((width == first).all()) else np.unique(width).tolist()
        for w in groups:
            rows = slice(None) if len(groups) == 1 else width == w
            # every window of w bytes of buf (what sliding_window_view gives, without its overhead), gathered by row
            windows = np.ndarray((len(buf) - w + 1, w), dtype=np.uint8, buffer=buf, strides=(1, 1))
            slots[index[rows], TPACKET2_DATA : TPACKET2_DATA + w] = windows[starts[rows]]

    def flush(self, errors: dict[str, int] | None = None) -> int:
        """Have the kernel send every queued frame (one ``send()``; a few more while a call takes some but not
        all); returns how many it took. Failures are counted in ``self.errors`` (and ``errors`` when given) by
        errno name, never raised."""
        if self.pending == 0:
            return 0
        words = self._live_words()
        stride, nr, taken = self.frame_size // _WORD, self.frame_nr, 0
        for _ in range(_FLUSH_TRIES):
            self.flushes += 1
            try:
                self._sock.send(b"", socket.MSG_DONTWAIT)
            except OSError as exc:
                name = errno.errorcode.get(exc.errno or 0, "error").lower()
                self.errors[name] = self.errors.get(name, 0) + 1
                if errors is not None:
                    errors[name] = errors.get(name, 0) + 1
            index = np.arange(self._kernel, self._kernel + self.pending, dtype=np.int64)
            index[index >= nr] -= nr
            still = words[index * stride] == TP_STATUS_SEND_REQUEST
            now = int(np.argmax(still)) if still.any() else self.pending
            self._kernel = (self._kernel + now) % nr
            self.pending -= now
            taken += now
            if not self.pending or not now:
                break
        self.sent += taken
        return taken

    def _unmap(self) -> None:
        self._slots = self._words = None
        if self._ring is not None:
            with contextlib.suppress(BufferError):  # a view of the ring is alive: unmapped when the last one goes
                self._ring.close()
            self._ring = None

    def close(self) -> None:
        """Close the socket (frames not yet flushed are lost) and unmap the ring."""
        self._unmap()
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
