"""Ethernet ports over AF_PACKET: a plain non-blocking socket (:class:`PacketPort`) or a TPACKET_V3 receive ring
(:class:`RingPort`), each bound to one interface for every protocol.

Theory of operation
-------------------
The socket is created listening to nothing (protocol 0), configured (classic BPF filter, ignore-outgoing, auxiliary
data, ring, promiscuous membership) and only then bound to the interface for ETH_P_ALL, so no frame slips in before
the filter. The filter (:mod:`mplslb.drivers.socket_filter`) drops what the host itself sends on the interface
(pkttype ``PACKET_OUTGOING``, which is how our own frames come back to a packet socket) and, when ``accept`` names
ethertypes, every frame whose ethertype (looked at after one VLAN tag) is not one of them. ``PACKET_IGNORE_OUTGOING``
spares the kernel the clone of our own frames in the first place; the filter stays as the check for kernels without
it.

The kernel moves a received frame's outermost VLAN tag into metadata before the packet taps see it
(``skb_vlan_untag`` in the receive path). Both ports put the tag back (:func:`restore_vlan_tag`, from the auxiliary
data or the ring's frame header), so the core gets the frame as it was on the wire.

:class:`RingPort` trades latency for fewer system calls: with TPACKET_V3 the kernel hands over whole blocks, when a
block is full or when its retire timer (``retire_ms``) fires. Frames are copied out of the ring and each block goes
back to the kernel (``block_status = TP_STATUS_KERNEL``) once all its frames are copied. :class:`PacketPort` reads
a burst with one ``recvmmsg`` and both ports send a burst (``send_many``) with one ``sendmmsg`` on the same socket,
unless they have a TX ring (below); ``send()`` is one frame's ``send()``.

The ring holds ``block_nr`` blocks however full the timer retires them, so the timer sets how many frames the ring
can hold, not only the latency: with 1 ms, frames arriving in bursts (nothing for half a second, then 20-30k frames:
50k frames/s on average, as trafgen's ``--rate`` sends them) were retired in blocks of 200-300 frames, the 64 blocks
held about 16k frames of the 110k the ring's memory has room for, and the kernel dropped half of them while the
daemon sat idle between bursts; with 8 ms
(``DEFAULT_RETIRE_MS``) they held a median of 1,200 (1,724 when full), at most 35 blocks were in use and nothing
was lost (docs/benchmarks.md, "Wire paths at equal paced loads"). Fewer, fuller blocks also cost the block path
less per frame (each block costs a fixed amount: a wake-up, numpy calls, a TX flush). A longer timer delays the
frames of a block that does not fill by up to that long.

The zero-copy block path
------------------------
:meth:`RingPort.recv_block` hands out a block the kernel has filled as it lies in the ring: a uint8 numpy view of the
block and the offsets and lengths of its frames, which ``Balancer.receive_block`` rewrites in place. TPACKET_V3
places each frame's network header on a 16-byte boundary, so an Ethernet frame starts 2 bytes past a 4-byte
boundary, which is what the core's word-aligned variant needs. The block stays the caller's until every view of it
is released (``RxBlock.release``); meanwhile the kernel fills the other blocks, and when all are held it drops.

A port opened with ``tx_ring=True`` also has a :class:`~mplslb.drivers.txring.TxRing` on a second socket and sends
through it with :meth:`send_many`, :meth:`send_block` and :meth:`flush`: frames are queued into the ring, and one
``send()`` per flush has the kernel transmit them all. ``send()`` stays the plain socket's.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import select
import socket
import struct
from collections.abc import Callable, Iterable
from typing import NamedTuple, Self, cast

import numpy as np

from mplslb.drivers import socket_filter
from mplslb.drivers.netns import entered
from mplslb.drivers.socket_filter import PACKET_OUTGOING
from mplslb.drivers.txring import PACKET_VERSION, SOL_PACKET, TPACKET_ALIGNMENT, TxRing
from mplslb.wire.checksum import IPV4_ADDR_LEN, IPV6_ADDR_LEN
from mplslb.wire.ethernet import ETH_ALEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6
from mplslb.wire.frame import complete_l4_checksum

# <linux/if_ether.h>, <linux/if_packet.h>, <asm-generic/socket.h>
ETH_P_ALL = 0x0003
PACKET_ADD_MEMBERSHIP = 1
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_AUXDATA = 8
PACKET_IGNORE_OUTGOING = 23
PACKET_MR_PROMISC = 1
TPACKET_V3 = 2
SO_RCVBUFFORCE = 33

TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1 << 0
TP_STATUS_CSUMNOTREADY = 1 << 3  # a partial checksum: the sender's stack left the sum to an offload
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6

DEFAULT_BUFSIZE = 1 << 16  # a whole GSO frame from veth fits; larger ones are counted as truncated
# struct mmsghdr on LP64: msghdr (name, namelen, iov, iovlen, control, controllen, flags) and msg_len, 64 bytes;
# struct iovec: base, len.
_MMSGHDR, _IOVEC = struct.Struct("=QI4xQQQQi4xI4x"), struct.Struct("=QQ")
_MSG_TRUNC = int(socket.MSG_TRUNC)  # a plain int: testing an IntFlag costs microseconds
_VECTOR_MIN = 16  # frames of a recvmmsg from which its write-backs are checked with numpy rather than one by one
MMSG_BATCH = 64  # frames a plain socket takes in one recvmmsg (each with its own DEFAULT_BUFSIZE slot)
_AUXDATA = struct.Struct("=IIIHHHH")  # struct tpacket_auxdata: status, len, snaplen, mac, net, vlan_tci, vlan_tpid
_VLAN_TAG = struct.Struct("!HH")  # TPID, TCI
_VLAN_AT = 2 * ETH_ALEN  # a tag goes right after the MAC addresses
_STATS = struct.Struct("=II")  # tp_packets, tp_drops (tpacket_stats_v3 adds tp_freeze_q_cnt)
_STATS_V3_LEN = 12
_PACKET_MREQ = struct.Struct("=iHH8s")
_ADDR_PKTTYPE, _ADDR_MAC = 2, 4  # in a packet socket's address: (ifname, protocol, pkttype, hatype, MAC address)

# TPACKET_V3 ring layout: struct tpacket_req3, struct tpacket_block_desc, struct tpacket3_hdr, struct sockaddr_ll.
DEFAULT_BLOCK_SIZE = 1 << 18
DEFAULT_BLOCK_NR = 64
DEFAULT_FRAME_SIZE = 2048
DEFAULT_RETIRE_MS = 8  # see the module's notes: the timer also sets how many frames the ring holds
MAX_RETIRE_MS = 1000
#: A plain packet socket's receive buffer as the daemon opens its ports (bytes; the kernel doubles it for its own
#: accounting): on a veth each small frame costs about 4 KiB of it, so this holds about 4,000 frames, some 80 ms at
#: 50k frames/s (the system's default, 208 KiB, about a millisecond). Memory only taken while frames wait.
DEFAULT_SOCKET_RCVBUF = 8 << 20
MIN_SOCKET_RCVBUF, MAX_SOCKET_RCVBUF = 64 << 10, 1 << 30
_REQ3 = struct.Struct("=IIIIIII")
_U32 = struct.Struct("=I")
BLOCK_STATUS = 8  # tpacket_block_desc: version, offset_to_priv, then hdr.bh1: block_status, num_pkts, ...
BLOCK_NUM_PKTS = 12
BLOCK_FIRST_PKT = 16
# struct tpacket3_hdr: next_offset, sec, nsec, snaplen, len, status, mac, net, then rxhash, vlan_tci, vlan_tpid
TP_SNAPLEN = 12
TP_LEN = 16
TP_STATUS = 20
TP_MAC = 24
_SNAPLEN_WORD, _LEN_WORD, _STATUS_WORD = TP_SNAPLEN // _U32.size, TP_LEN // _U32.size, TP_STATUS // _U32.size
TPACKET3_HDRLEN = 48  # TPACKET_ALIGN(sizeof(struct tpacket3_hdr)); sockaddr_ll follows
SLL_PKTTYPE = TPACKET3_HDRLEN + 10
# One unpack per frame: next_offset, snaplen, len, status, mac, vlan_tci, vlan_tpid, and the sockaddr_ll's pkttype.
_PKT_WALK = struct.Struct("=I8xIIIH6xIH20xB")
assert _PKT_WALK.size == SLL_PKTTYPE + 1
_RUN_MIN = 16  # frames at one stride read with numpy rather than one by one (see RingPort._walk)
_NO_LIMIT = 1 << 62  # recv_block's max_frames when the caller sets none


def set_receive_buffer(sock: socket.socket, size: int) -> None:
    """Give ``sock`` a receive buffer of ``size`` bytes (the kernel counts twice that); root may go past
    ``net.core.rmem_max`` (``SO_RCVBUFFORCE``), others get what that allows."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def restore_vlan_tag(frame: bytes | memoryview, status: int, tci: int, tpid: int) -> bytes:
    """``frame`` as it was on the wire: the VLAN tag the kernel took into metadata (``status``, ``tci`` and ``tpid``
    of the auxiliary data or of the ring's frame header, ``status`` having ``TP_STATUS_VLAN_VALID``) put back after
    the MAC addresses. The TPID is 802.1Q when the kernel did not record one."""
    if not status & TP_STATUS_VLAN_TPID_VALID:
        tpid = ETH_P_8021Q
    return bytes(frame[:_VLAN_AT]) + _VLAN_TAG.pack(tpid, tci) + bytes(frame[_VLAN_AT:])


class RxBlock(NamedTuple):
    """A block of a TPACKET_V3 receive ring, lent zero-copy by :meth:`RingPort.recv_block`.

    Frame i is ``buf[starts[i] : starts[i] + lengths[i]]``; ``buf`` is a uint8 view of the block inside the ring
    (4-byte aligned, its length a multiple of 4, frames starting 2 bytes past a 4-byte boundary), which the caller
    may rewrite in place. ``tagged`` holds copies of the frames whose VLAN tag the kernel had taken into metadata,
    with the tag put back (they cannot be restored in place); they are not in ``starts``, and come in arrival order
    among themselves. Call ``release()`` once everything taken from the block is sent (copied out): the kernel may
    then refill it, so neither ``buf`` nor anything sliced from it may be used afterwards. Releasing twice is
    harmless.
    """

    buf: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    release: Callable[[], None]
    tagged: list[bytes]


def _count_into(errors: dict[str, int] | None, name: str, n: int = 1) -> None:
    if errors is not None and n:
        errors[name] = errors.get(name, 0) + n


class _PacketSocket:
    """What both ports share: the configured socket, the interface MAC, sending, statistics and closing."""

    def __init__(
        self,
        ifname: str,
        *,
        accept: Iterable[int] | None,
        promisc: bool,
        netns: str | None,
        ring: bool,
        tx_ring: bool = False,
        host_only: bool = False,
        max_len: int | None = None,
        destinations: Iterable[bytes] | None = None,
    ) -> None:
        self.ifname = ifname
        self.accept = frozenset(accept) if accept is not None else None
        self.host_only = host_only
        self.destinations = frozenset(destinations) if destinations is not None else None
        self.max_len = max_len
        self.drops: dict[str, int] = {}
        self.tx: TxRing | None = None  # the transmit ring when opened with tx_ring
        with entered(netns):  # the socket, the interface name and its index all belong to that namespace
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            try:
                self._configure(sock, ifname, promisc=promisc, ring=ring)
            except BaseException:
                self._teardown()
                sock.close()
                raise
        self._sock = sock
        self._sender = _SendBatch(MMSG_BATCH, DEFAULT_BUFSIZE)
        self.mac: bytes = bytes(sock.getsockname()[_ADDR_MAC][:ETH_ALEN])
        if tx_ring:
            try:
                self.tx = TxRing(ifname, netns=netns)
            except BaseException:
                self.close()
                raise

    def _configure(self, sock: socket.socket, ifname: str, *, promisc: bool, ring: bool) -> None:
        """Filter, options and ring, then the bind; nothing is received before the filter is on."""
        versions = {IPV4_ADDR_LEN: ETH_P_IP, IPV6_ADDR_LEN: ETH_P_IPV6}
        accept = self.accept or frozenset()
        to = [a for a in self.destinations or () if versions.get(len(a)) in accept]
        program = socket_filter.bpf_program(self.accept, to or None)
        if self.host_only:
            program = socket_filter.host_only(program)
        if self.max_len is not None:
            program = socket_filter.length_cap(program, self.max_len)
        socket_filter.attach_filter(sock, program)
        try:
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        except OSError as exc:  # before Linux 4.20: the filter alone drops our own frames
            if exc.errno != errno.ENOPROTOOPT:
                raise
        if ring:
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        else:
            sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        self._setup(sock)
        sock.bind((ifname, ETH_P_ALL))
        self.ifindex = socket.if_nametoindex(ifname)
        if promisc:
            mreq = _PACKET_MREQ.pack(self.ifindex, PACKET_MR_PROMISC, 0, b"")
            sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)  # dropped by the kernel on close
        sock.setblocking(False)

    def _setup(self, sock: socket.socket) -> None:
        """Configuration between the filter and the bind (the ring)."""

    def _teardown(self) -> None:
        """Undo :meth:`_setup` (unmap the ring)."""

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, frame: bytes | memoryview) -> int:
        """Send one whole Ethernet frame; OSError (EAGAIN, ENOBUFS, ENETDOWN, ...) is the caller's to count."""
        return self._sock.send(frame)

    def send_many(
        self,
        frames: Iterable[bytes | memoryview | np.ndarray],
        errors: dict[str, int] | None = None,
        *,
        flush: bool = True,
    ) -> int:
        """Send ``frames`` in order; returns how many went (with a TX ring: were queued). Failures are
        counted into ``errors`` by name, never raised: an errno name for ``send()``; with the ring
        ``tx_ring_full`` (no free slot even after a flush) and ``emsgsize`` (a frame that can never be sent).
        With the TX ring, ``flush=False`` leaves the frames queued for a later :meth:`flush`; without it every
        frame is one message of a ``sendmmsg()`` (:class:`_SendBatch`) and ``flush`` does not matter."""
        sent = 0
        tx = self.tx
        if tx is None:
            return self._sender.send(self._sock, frames, errors)
        queue = tx.queue
        for frame in frames:
            try:
                if not queue(frame):
                    tx.flush(errors)
                    if not queue(frame):
                        _count_into(errors, "tx_ring_full")
                        continue
            except ValueError:
                _count_into(errors, "emsgsize")
                continue
            sent += 1
        if flush:
            tx.flush(errors)
        return sent

    def send_block(
        self,
        buf: np.ndarray,
        starts: np.ndarray,
        lengths: np.ndarray,
        errors: dict[str, int] | None = None,
        *,
        flush: bool = True,
    ) -> int:
        """Send frames ``buf[starts[i] : starts[i] + lengths[i]]`` of a 1-D uint8 array in order (as
        :meth:`send_many`); with the TX ring they are copied in bulk (:meth:`TxRing.queue_block`)."""
        tx = self.tx
        if tx is None:
            view = buf.data
            return self.send_many(
                (view[s : s + n] for s, n in zip(starts.tolist(), lengths.tolist(), strict=True)), errors
            )
        done, total = 0, len(starts)
        for _ in range(total + 1):  # each turn queues some frames or ends
            if done >= total:
                break
            try:
                k = tx.queue_block(buf, starts[done:], lengths[done:])
                if k == 0:
                    tx.flush(errors)
                    k = tx.queue_block(buf, starts[done:], lengths[done:])
            except ValueError:  # some frame can never be sent: frame by frame, which counts it
                rest = zip(starts[done:].tolist(), lengths[done:].tolist(), strict=True)
                done += self.send_many((buf[s : s + n] for s, n in rest), errors, flush=False)
                total = done
                break
            if k == 0:
                _count_into(errors, "tx_ring_full", total - done)
                total = done
                break
            done += k
        if flush:
            tx.flush(errors)
        return done

    def flush(self, errors: dict[str, int] | None = None) -> int:
        """Have the kernel send what the TX ring holds (:meth:`TxRing.flush`); 0 without a TX ring."""
        return 0 if self.tx is None else self.tx.flush(errors)

    def stats(self) -> tuple[int, int]:
        """(frames, drops) the kernel counted for this socket since the last call (reading resets them)."""
        raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS_V3_LEN)
        packets, drops = _STATS.unpack_from(raw)
        return packets, drops

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def close(self) -> None:
        if self.tx is not None:
            self.tx.close()
            self.tx = None
        self._teardown()
        self._sock.close()
        self._sender.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PacketPort(_PacketSocket):
    """One interface through a plain AF_PACKET socket, read with ``recvmmsg`` (up to :data:`MMSG_BATCH` frames a
    call), non-blocking.

    Frames wait in the socket's receive buffer (``rcvbuf`` bytes of kernel memory, each frame costing its
    ``truesize``, e.g. about 800 bytes for a 64-byte frame); what does not fit is dropped by the kernel and shows
    in :meth:`stats`.

    ``lane`` names ethertypes (a part of ``accept``) taken through a second socket of their own and read first:
    when more arrives than the reader keeps up with, the kernel drops from the other socket's buffer, not from the
    lane's. The balancer's client ports put labelled frames (established sessions, cheap to switch) in the lane, so
    a flood of new-session SYNs (dear, and unlabelled) loses its own frames first. Each burst of four frames or more
    still gives the other socket a quarter of it at least, so a flood of labelled frames cannot starve new sessions
    either. The port's :meth:`fileno` is then an epoll descriptor over both sockets; :attr:`lane_counts` counts the
    lane's frames."""

    def __init__(
        self,
        ifname: str,
        *,
        accept: Iterable[int] | None = None,
        promisc: bool = False,
        netns: str | None = None,
        bufsize: int = DEFAULT_BUFSIZE,
        rcvbuf: int | None = None,
        tx_ring: bool = False,
        host_only: bool = False,
        max_len: int | None = None,
        lane: Iterable[int] | None = None,
        destinations: Iterable[bytes] | None = None,
    ) -> None:
        first = frozenset(lane) if lane is not None else frozenset()
        if first and (accept is None or not first < frozenset(accept)):
            raise ValueError("lane must be a part of accept, leaving some ethertype to the other socket")
        super().__init__(
            ifname, accept=frozenset(accept) - first if first and accept is not None else accept, promisc=promisc,
            netns=netns, ring=False, tx_ring=tx_ring, host_only=host_only, max_len=max_len, destinations=destinations,
        )  # fmt: skip
        self._fd = self._sock.fileno()
        self._batch = _MessageBatch(MMSG_BATCH, bufsize)
        if rcvbuf is not None:
            set_receive_buffer(self._sock, rcvbuf)
        self.lane: PacketPort | None = None
        #: The lane's frames and the ones the kernel dropped for want of room, as far as :meth:`stats` has read.
        self.lane_counts = {"received": 0, "dropped": 0}
        self._poll: select.epoll | None = None
        if first:
            try:
                self.lane = PacketPort(ifname, accept=first, netns=netns, bufsize=bufsize, rcvbuf=rcvbuf,
                                       host_only=host_only, max_len=max_len, destinations=destinations)  # fmt: skip
                self.lane.drops = self.drops  # one tally of the frames the port refused
                self._poll = select.epoll()
                for fd in (self._fd, self.lane.fileno()):
                    self._poll.register(fd, select.EPOLLIN)
            except BaseException:
                self.close()
                raise

    def fileno(self) -> int:
        return self._fd if self._poll is None else self._poll.fileno()

    def stats(self) -> tuple[int, int]:
        """(frames, drops) the kernel counted for the port's sockets, the lane's too, since the last call; the
        lane's part is added to :attr:`lane_counts` as well."""
        packets, drops = super().stats()
        if self.lane is not None:
            lane_packets, lane_drops = self.lane.stats()
            self.lane_counts["received"] += lane_packets
            self.lane_counts["dropped"] += lane_drops
            packets, drops = packets + lane_packets, drops + lane_drops
        return packets, drops

    def close(self) -> None:
        if self.lane is not None:
            self.lane.close()
            self.lane = None
        if self._poll is not None:
            self._poll.close()
            self._poll = None
        super().close()
        self._batch.close()

    def recv_burst(self, max_frames: int = 64) -> list[bytes]:
        """Up to ``max_frames`` frames already queued, oldest first (the lane's first); never blocks."""
        if self.lane is None:
            return self._recv(max_frames)
        frames = self.lane._recv(max_frames - max_frames // 4)
        return frames + self._recv(max_frames - len(frames))

    def _recv(self, max_frames: int) -> list[bytes]:
        frames: list[bytes] = []
        batch = self._batch
        while len(frames) < max_frames:
            want = min(max_frames - len(frames), batch.capacity)
            try:
                n = batch.take(self._fd, want, frames, self._drop)
            except OSError as exc:  # e.g. ENETDOWN, reported once when the link goes down
                self._drop(f"recv_{errno.errorcode.get(exc.errno or 0, 'error').lower()}")
                break
            if n < want:
                break
        return frames


def _mmsg_call(name: str) -> Callable[..., int]:
    """libc's ``recvmmsg`` or ``sendmmsg`` (fd, struct mmsghdr *, count, flags[, timeout]), errno kept."""
    call = getattr(ctypes.CDLL(None, use_errno=True), name)
    call.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int] + (
        [ctypes.c_void_p] if name == "recvmmsg" else []
    )
    call.restype = ctypes.c_int
    return cast(Callable[..., int], call)


def _address(buffer: bytearray | mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


class _SendBatch:
    """Preallocated ``struct mmsghdr`` array for ``sendmmsg(2)``: the frames of one :meth:`send` are copied into
    slots of one anonymous mapping and go in one system call per ``capacity`` frames, each a datagram of its own
    (no address: the socket is bound to its interface). A frame that fails (``ENOBUFS``, ``ENETDOWN``...) is
    counted under its errno's name and the rest still go, as with one ``send()`` each; a frame longer than a slot
    goes alone through ``send()``."""

    _HDR, _IOV = _MMSGHDR, _IOVEC
    _sendmmsg: Callable[..., int] | None = None

    def __init__(self, capacity: int, slot: int) -> None:
        if _SendBatch._sendmmsg is None:
            _SendBatch._sendmmsg = _mmsg_call("sendmmsg")
        self.capacity, self.slot = capacity, slot
        self._slots = mmap.mmap(-1, capacity * slot)
        self._meta = bytearray(capacity * (self._HDR.size + self._IOV.size))
        base, slots, iovs = _address(self._meta), _address(self._slots), capacity * self._HDR.size
        self._iov_len_at = iovs // 8 + 1  # the i-th iovec's length: 8-byte word iovs / 8 + 2 * i + 1
        for i in range(capacity):
            self._IOV.pack_into(self._meta, iovs + i * self._IOV.size, slots + i * slot, 0)
            self._HDR.pack_into(self._meta, i * self._HDR.size, 0, 0, base + iovs + i * self._IOV.size, 1, 0, 0, 0, 0)
        self._address = base
        self._u64 = memoryview(self._meta).cast("Q")
        self._view = memoryview(self._slots)

    def send(
        self, sock: socket.socket, frames: Iterable[bytes | memoryview | np.ndarray], errors: dict[str, int] | None
    ) -> int:
        """Send ``frames`` in order on ``sock``; how many went."""
        sent = n = 0
        view, u64, slot, lengths = self._view, self._u64, self.slot, self._iov_len_at
        fd = sock.fileno()
        for frame in frames:
            data = frame.data if isinstance(frame, np.ndarray) else frame
            size = len(data)
            if size > slot:  # more than a slot holds: after what is queued, alone
                sent += self._flush(fd, n, errors)
                n = 0
                try:
                    sock.send(data)
                except OSError as exc:
                    _count_into(errors, errno.errorcode.get(exc.errno or 0, "error").lower())
                else:
                    sent += 1
                continue
            at = n * slot
            view[at : at + size] = data
            u64[lengths + 2 * n] = size
            n += 1
            if n == self.capacity:
                sent += self._flush(fd, n, errors)
                n = 0
        return sent + self._flush(fd, n, errors)

    def _flush(self, fd: int, n: int, errors: dict[str, int] | None) -> int:
        """Send the first ``n`` queued frames; a frame the kernel refuses is counted and skipped."""
        call = self._sendmmsg
        assert call is not None
        sent = done = 0
        while done < n:
            k = call(fd, self._address + done * self._HDR.size, n - done, 0)
            if k < 0:  # the frame at ``done`` failed: counted, and the ones after it are tried
                _count_into(errors, errno.errorcode.get(ctypes.get_errno(), "error").lower())
                done += 1
            else:
                sent += k
                done += k
        return sent

    def close(self) -> None:
        self._u64.release()
        self._view.release()
        self._slots.close()


class _MessageBatch:
    """Preallocated ``struct mmsghdr`` array for ``recvmmsg(2)``: one system call takes up to ``capacity`` frames
    with their addresses and auxiliary data, each into its own ``bufsize`` slot of one anonymous mapping (pages the
    kernel never writes stay untouched).

    A frame read with ``recvmsg`` cost about 9.6 µs of CPU (the call, its address tuple, its ancillary data list and
    their parsing); read here in bursts of 64, about 3 µs (``bench/sockets.py``; docs/benchmarks.md, "Plain packet
    sockets read and written in batches"). The fields the kernel writes back are read through ``memoryview`` casts,
    which cost less than numpy for the few frames of a light load, and checked with numpy from :data:`_VECTOR_MIN`
    frames on."""

    _HDR, _IOV = _MMSGHDR, _IOVEC
    _NAME = 20  # struct sockaddr_ll
    _NAME_PKTTYPE = 10
    _CTRL = socket.CMSG_SPACE(_AUXDATA.size)
    _CMSG_HDR = 16  # struct cmsghdr on LP64: len (size_t), level, type
    # Where the kernel writes back in the i-th mmsghdr: 4-byte words (namelen, flags, msg_len) at i * 16 + k, the
    # 8-byte controllen at i * 8 + 5.
    _W_NAMELEN, _W_FLAGS, _W_LEN, _Q_CONTROLLEN = 2, 12, 14, 5
    _recvmmsg: Callable[..., int] | None = None

    def __init__(self, capacity: int, bufsize: int) -> None:
        if _MessageBatch._recvmmsg is None:
            _MessageBatch._recvmmsg = _mmsg_call("recvmmsg")
        self.capacity, self.bufsize = capacity, bufsize
        hdr, iov = self._HDR, self._IOV
        self._slots = mmap.mmap(-1, capacity * bufsize)
        self._meta = bytearray(capacity * (hdr.size + iov.size + self._NAME + self._CTRL))
        base, slots = _address(self._meta), _address(self._slots)
        iovs, names = capacity * hdr.size, capacity * (hdr.size + iov.size)
        ctrls = names + capacity * self._NAME
        self._name_at, self._ctrl_at = names, ctrls
        for i in range(capacity):
            iov.pack_into(self._meta, iovs + i * iov.size, slots + i * bufsize, bufsize)
            name, vec, ctrl = base + names + i * self._NAME, base + iovs + i * iov.size, base + ctrls + i * self._CTRL
            hdr.pack_into(self._meta, i * hdr.size, name, self._NAME, vec, 1, ctrl, self._CTRL, 0, 0)
        self._address = base
        meta = memoryview(self._meta)
        self._u8, self._u32, self._u64 = meta, meta.cast("I"), meta.cast("Q")
        self._view = memoryview(self._slots)
        self._dirty = 0  # entries whose value-result fields the kernel has written since they were reset
        # The same fields as strided numpy views, for bursts of _VECTOR_MIN frames or more.
        w32, w64 = np.frombuffer(self._meta, np.uint32), np.frombuffer(self._meta, np.uint64)
        self._np_namelen, self._np_flags = (
            w32[self._W_NAMELEN : capacity * 16 : 16],
            w32[self._W_FLAGS : capacity * 16 : 16],
        )
        self._np_len, self._np_controllen = (
            w32[self._W_LEN : capacity * 16 : 16],
            w64[self._Q_CONTROLLEN : capacity * 8 : 8],
        )
        pkttype = names + self._NAME_PKTTYPE
        self._np_pkttype = np.frombuffer(self._meta, np.uint8)[pkttype : pkttype + capacity * self._NAME : self._NAME]
        status = (ctrls + self._CMSG_HDR) // 4  # tpacket_auxdata's first word
        self._np_status = w32[status : status + capacity * self._CTRL // 4 : self._CTRL // 4]

    def receive(self, fd: int, want: int) -> int:
        """How many frames one ``recvmmsg`` took (at most ``want``); 0 when none was waiting."""
        dirty = self._dirty  # the kernel wrote back the lengths it filled
        if dirty >= _VECTOR_MIN:
            self._np_namelen[:dirty] = self._NAME
            self._np_controllen[:dirty] = self._CTRL
        else:
            u32, u64 = self._u32, self._u64
            for i in range(dirty):
                u32[i * 16 + self._W_NAMELEN] = self._NAME
                u64[i * 8 + self._Q_CONTROLLEN] = self._CTRL
        self._dirty = 0
        call = self._recvmmsg
        assert call is not None
        n = call(fd, self._address, want, 0, None)
        if n < 0:
            code = ctypes.get_errno()
            if code in (errno.EAGAIN, errno.EINTR):
                return 0
            raise OSError(code, os.strerror(code))
        self._dirty = n
        return n

    def take(self, fd: int, want: int, frames: list[bytes], drop: Callable[[str], None]) -> int:
        """One ``recvmmsg`` of at most ``want`` frames: each appended to ``frames`` as it was on the wire (its VLAN
        tag put back, a partial checksum finished) or given to ``drop`` with the reason; how many were taken."""
        n = self.receive(fd, want)
        view, bufsize = self._view, self.bufsize
        if n >= _VECTOR_MIN and not (
            (self._np_flags[:n] & _MSG_TRUNC).any()
            or (self._np_pkttype[:n] == PACKET_OUTGOING).any()
            or (self._np_status[:n] & (TP_STATUS_VLAN_VALID | TP_STATUS_CSUMNOTREADY)).any()
        ):  # none truncated, none of ours, none tagged or with a partial checksum: each frame as it lies
            sizes = self._np_len[:n].tolist()
            frames += [
                view[at : at + size].tobytes() for at, size in zip(range(0, n * bufsize, bufsize), sizes, strict=True)
            ]
            return n
        u8, u32, u64 = self._u8, self._u32, self._u64
        name_at, ctrl_words, ctrl_size = self._name_at + self._NAME_PKTTYPE, self._ctrl_at // 4, self._CTRL
        aux_len = self._CMSG_HDR + _AUXDATA.size
        for i in range(n):
            words = i * 16
            if u32[words + self._W_FLAGS] & _MSG_TRUNC:
                drop("truncated")
                continue
            if u8[name_at + i * self._NAME] == PACKET_OUTGOING:
                drop("outgoing")
                continue
            at = i * bufsize
            frame = view[at : at + u32[words + self._W_LEN]].tobytes()
            cmsg = ctrl_words + i * ctrl_size // 4  # the auxiliary data's cmsghdr: len, level, type, then the data
            if (
                u64[i * 8 + self._Q_CONTROLLEN] >= aux_len
                and u32[cmsg + 2] == SOL_PACKET
                and u32[cmsg + 3] == PACKET_AUXDATA
                and u32[cmsg + 4] & (TP_STATUS_VLAN_VALID | TP_STATUS_CSUMNOTREADY)
            ):
                status, _, _, _, _, tci, tpid = _AUXDATA.unpack_from(self._meta, 4 * cmsg + self._CMSG_HDR)
                if status & TP_STATUS_VLAN_VALID:
                    frame = restore_vlan_tag(frame, status, tci, tpid)
                if status & TP_STATUS_CSUMNOTREADY:
                    # its sender left the checksum to an offload: finished here, as it must leave
                    completed = complete_l4_checksum(frame)
                    if completed is None:
                        drop("csum_partial_unreadable")
                        continue
                    frame = completed
            frames.append(frame)
        return n

    def close(self) -> None:
        self._u8.release()
        self._u32.release()
        self._u64.release()
        self._view.release()
        self._slots.close()


class RingPort(_PacketSocket):
    """One interface through a TPACKET_V3 receive ring (mmap); sends with plain ``send()``, or through a TX ring
    with :meth:`send_many` / :meth:`send_block` when opened with ``tx_ring``.

    The ring holds ``block_nr`` blocks of ``block_size`` bytes (a multiple of the page size); a frame larger than a
    block is cut by the kernel and counted here as truncated.

    Frames come out copied (:meth:`recv_burst`) or lent in place, a block at a time (:meth:`recv_block`). The two
    may be mixed, even inside a block: a block goes back to the kernel once it has been walked to its end and every
    :class:`RxBlock` lent from it is released. A block still lent when the ring comes round to it again is not
    read (both methods return nothing) until it is released.

    Counters: ``drops`` (frames skipped, by reason) and ``bulk_frames`` (frames :meth:`recv_block` found lying at
    one stride and read with numpy rather than one by one: how well the block walk suits the traffic).
    """

    def __init__(
        self,
        ifname: str,
        *,
        accept: Iterable[int] | None = None,
        promisc: bool = False,
        netns: str | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        block_nr: int = DEFAULT_BLOCK_NR,
        frame_size: int = DEFAULT_FRAME_SIZE,
        retire_ms: int = DEFAULT_RETIRE_MS,
        tx_ring: bool = False,
        host_only: bool = False,
        destinations: Iterable[bytes] | None = None,
    ) -> None:
        if block_size <= 0 or block_size % mmap.PAGESIZE:
            raise ValueError(f"block_size must be a positive multiple of the page size ({mmap.PAGESIZE})")
        if block_nr <= 0 or retire_ms <= 0:
            raise ValueError("block_nr and retire_ms must be positive")
        if frame_size < TPACKET3_HDRLEN or frame_size % TPACKET_ALIGNMENT or block_size % frame_size:
            raise ValueError(f"frame_size must divide block_size and be a multiple of {TPACKET_ALIGNMENT}")
        self._geometry = (block_size, block_nr, frame_size, retire_ms)
        self.retire_ms = retire_ms
        self._block_size, self._block_nr = block_size, block_nr
        self._ring: mmap.mmap | None = None
        self._block = 0  # the next block to look at
        self._left = 0  # frames of the current block not yet copied out
        self._at = 0  # ring offset of the next frame's tpacket3_hdr
        self._lent = [0] * block_nr  # per block: RxBlock views not yet released
        self._walked = [False] * block_nr  # per block: walked to its end, waiting for its views' release
        self._array: np.ndarray | None = None  # the whole ring as uint8, sliced into RxBlock views
        self._u16 = self._u32 = self._ramp = np.zeros(0, dtype=np.int64)  # set with _array (see _map_arrays)
        self.bulk_frames = 0
        super().__init__(
            ifname, accept=accept, promisc=promisc, netns=netns, ring=True, tx_ring=tx_ring, host_only=host_only,
            destinations=destinations,
        )  # fmt: skip

    def _setup(self, sock: socket.socket) -> None:
        block_size, block_nr, frame_size, retire_ms = self._geometry
        frame_nr = block_size // frame_size * block_nr
        req = _REQ3.pack(block_size, block_nr, frame_size, frame_nr, retire_ms, 0, 0)  # no private area, no features
        sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
        self._ring = mmap.mmap(sock.fileno(), block_size * block_nr, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def _teardown(self) -> None:
        self._array = None
        self._u16 = self._u32 = self._ramp = np.zeros(0, dtype=np.int64)
        if self._ring is not None:
            with contextlib.suppress(BufferError):  # an RxBlock is still held: unmapped when the last view goes
                self._ring.close()
            self._ring = None

    def recv_burst(self, max_frames: int = 64) -> list[bytes]:
        """Up to ``max_frames`` frames from the blocks the kernel has handed over, oldest first; never blocks.

        A block is given back as soon as its last frame is copied, so a burst may end inside a block."""
        ring = self._ring
        if ring is None:
            raise ValueError("the port is closed")
        frames: list[bytes] = []
        block_size, unpack_u32, unpack_hdr = self._block_size, _U32.unpack_from, _PKT_WALK.unpack_from
        restore = restore_vlan_tag
        for _ in range(max_frames + self._block_nr):  # each turn copies a frame or gives back an empty block
            if len(frames) >= max_frames:
                break
            base = self._block * block_size
            if self._left == 0:
                if self._lent[self._block] or not unpack_u32(ring, base + BLOCK_STATUS)[0] & TP_STATUS_USER:
                    break
                self._left = unpack_u32(ring, base + BLOCK_NUM_PKTS)[0]
                self._at = base + unpack_u32(ring, base + BLOCK_FIRST_PKT)[0]
                if self._left == 0:
                    self._release(ring, base)
                    continue
            at = self._at
            next_offset, snaplen, length, status, mac, tci, tpid, pkttype = unpack_hdr(ring, at)
            if snaplen < length:
                self._drop("truncated")
            elif pkttype == PACKET_OUTGOING:
                self._drop("outgoing")
            else:
                frame = ring[at + mac : at + mac + snaplen]
                if status & TP_STATUS_VLAN_VALID:
                    frame = restore(frame, status, tci, tpid)
                frames.append(frame)
            self._left -= 1
            self._at = at + next_offset
            if self._left == 0:
                self._release(ring, base)
        return frames

    def recv_block(self, max_frames: int | None = None) -> RxBlock | None:
        """The frames of the next block the kernel has handed over, lent in place (see :class:`RxBlock`), or None
        when there is none; never blocks.

        At most ``max_frames`` frames (all of the block's when None): the rest of a block comes with the next calls,
        each an :class:`RxBlock` of its own over the same block, each to be released. Frames the kernel cut short
        or that are our own outgoing ones are skipped and counted in ``drops`` as :meth:`recv_burst` does; frames
        whose VLAN tag was taken into metadata come as copies in ``RxBlock.tagged``. A block that yields nothing is
        given back at once and the next one looked at."""
        ring = self._ring
        if ring is None:
            raise ValueError("the port is closed")
        if max_frames is not None and max_frames < 1:
            raise ValueError("max_frames must be at least 1")
        limit = max_frames if max_frames is not None else _NO_LIMIT
        array = self._array
        if array is None:
            array = self._map_arrays(ring)
        block_size, unpack_u32 = self._block_size, _U32.unpack_from
        for _ in range(2 * self._block_nr + 2):  # each turn lends a view, or walks frames or an empty block away
            index = self._block
            base = index * block_size
            if self._left == 0:
                if self._lent[index] or not unpack_u32(ring, base + BLOCK_STATUS)[0] & TP_STATUS_USER:
                    return None
                self._left = unpack_u32(ring, base + BLOCK_NUM_PKTS)[0]
                self._at = base + unpack_u32(ring, base + BLOCK_FIRST_PKT)[0]
                if self._left == 0:
                    self._release(ring, base)
                    continue
            take = min(self._left, limit)
            starts, lengths, tagged = self._walk(ring, base, take)
            self._left -= take
            lent = bool(len(starts) or tagged)
            if lent:
                self._lent[index] += 1
            if self._left == 0:
                self._release(ring, base)
            if lent:
                return RxBlock(array[base : base + block_size], starts, lengths, _Lender(self, index), tagged)
        return None

    def _map_arrays(self, ring: mmap.mmap) -> np.ndarray:
        """The numpy views of the ring the block walk uses: as bytes (lent to callers), half words and words."""
        array = self._array = np.frombuffer(ring, dtype=np.uint8)
        self._u16 = array.view(np.uint16)
        self._u32 = array.view(np.uint32)
        self._ramp = np.arange(self._block_size // TPACKET_ALIGNMENT + 1, dtype=np.int64)
        return array

    def _walk(self, ring: mmap.mmap, base: int, take: int) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
        """Walk ``take`` frames of the block at ``base`` from ``self._at``: the offsets (from ``base``) and lengths of
        the frames to lend, and copies of the tagged ones.

        The headers form a chain (each gives the offset of the next), so in general this is one unpack per frame.
        But frames of about the same length lie at a fixed stride: a stretch of at least ``_RUN_MIN`` of them is
        checked and read with a few numpy gathers (:meth:`_uniform_run`). Where that fails, a stretch of frames is
        walked one by one, twice as long after each failure in a row, so mixed sizes cost few failed tries."""
        at = self._at
        end = base + self._block_size
        starts_parts: list[np.ndarray] = []
        lengths_parts: list[np.ndarray] = []
        tagged: list[bytes] = []
        walk, restore = _PKT_WALK.unpack_from, restore_vlan_tag
        left, stretch = take, 2 * _RUN_MIN
        while left:
            if left >= _RUN_MIN:
                run = self._uniform_run(at, left, end, base)
                if run is not None:
                    n, run_starts, run_lengths, at = run
                    starts_parts.append(run_starts)
                    lengths_parts.append(run_lengths)
                    left -= n
                    self.bulk_frames += n
                    stretch = 2 * _RUN_MIN
                    continue
            # One by one for a stretch that doubles while the frames keep differing, then try numpy again.
            chunk = min(left, stretch)
            left -= chunk
            stretch *= 2
            starts: list[int] = []
            lengths: list[int] = []
            add_start, add_length = starts.append, lengths.append
            for _ in range(chunk):
                next_offset, snaplen, length, status, mac, tci, tpid, pkttype = walk(ring, at)
                if snaplen == length and pkttype != PACKET_OUTGOING and not status & TP_STATUS_VLAN_VALID:
                    add_start(at + mac - base)
                    add_length(snaplen)
                elif snaplen < length:
                    self._drop("truncated")
                elif pkttype == PACKET_OUTGOING:
                    self._drop("outgoing")
                else:
                    tagged.append(restore(ring[at + mac : at + mac + snaplen], status, tci, tpid))
                at += next_offset
            starts_parts.append(np.array(starts, dtype=np.int64))
            lengths_parts.append(np.array(lengths, dtype=np.int64))
        self._at = at
        if len(starts_parts) == 1:
            return starts_parts[0], lengths_parts[0], tagged
        return np.concatenate(starts_parts), np.concatenate(lengths_parts), tagged

    def _uniform_run(self, at: int, left: int, end: int, base: int) -> tuple[int, np.ndarray, np.ndarray, int] | None:
        """The frames from ``at`` that lie at the first one's stride, if at least ``_RUN_MIN`` do and all of them
        are plain (whole, not outgoing, not tagged): (count, starts, lengths, offset of the next frame)."""
        u32, u16, u8 = self._u32, self._u16, self._array
        assert u8 is not None
        step = int(u32[at >> 2])  # the first frame's tp_next_offset
        if step < TPACKET3_HDRLEN:
            return None
        count = min(left, (end - at - _PKT_WALK.size) // step + 1)  # candidates whose header lies in the block
        if count < _RUN_MIN:
            return None
        ramp = self._ramp
        if bool((u32[(at + step * ramp[: _RUN_MIN - 1]) >> 2] != step).any()):  # a cheap look at the first ones
            return None
        offs = at + step * ramp[:count]
        nexts = u32[offs >> 2]
        off_stride = nexts[:-1] != step
        if off_stride.any():  # frame j + 1 is not where the stride says: frames 0..j are
            count = int(np.argmax(off_stride)) + 1
            if count < _RUN_MIN:
                return None
            offs = offs[:count]
        words = offs >> 2
        snaplen = u32[words + _SNAPLEN_WORD]
        plain = (snaplen == u32[words + _LEN_WORD]) & ((u32[words + _STATUS_WORD] & TP_STATUS_VLAN_VALID) == 0)
        plain &= u8[offs + SLL_PKTTYPE] != PACKET_OUTGOING
        if not plain.all():
            return None
        starts = offs + u16[(offs + TP_MAC) >> 1] - base
        return count, starts, snaplen.astype(np.int64), int(offs[-1]) + int(nexts[count - 1])

    def _give_back(self, index: int) -> None:
        """One view of block ``index`` is released: the block goes back once walked and no longer lent."""
        self._lent[index] -= 1
        ring = self._ring
        if self._lent[index] == 0 and self._walked[index] and ring is not None:
            self._walked[index] = False
            _U32.pack_into(ring, index * self._block_size + BLOCK_STATUS, TP_STATUS_KERNEL)

    def _release(self, ring: mmap.mmap, base: int) -> None:
        """The current block is walked to its end: give it back (or once its views are released), go to the next."""
        index = self._block
        if self._lent[index]:
            self._walked[index] = True
        else:
            _U32.pack_into(ring, base + BLOCK_STATUS, TP_STATUS_KERNEL)
        self._block = (index + 1) % self._block_nr
        self._left = 0


class _Lender:
    """``RxBlock.release``: gives one view of a block back to its port, once."""

    __slots__ = ("index", "port")

    def __init__(self, port: RingPort, index: int) -> None:
        self.port: RingPort | None = port
        self.index = index

    def __call__(self) -> None:
        port, self.port = self.port, None
        if port is not None:
            port._give_back(self.index)


def open_port(
    ifname: str,
    *,
    ring: bool = False,
    accept: Iterable[int] | None = None,
    promisc: bool = False,
    netns: str | None = None,
    tx_ring: bool = False,
    host_only: bool = False,
    max_len: int | None = None,
    retire_ms: int = DEFAULT_RETIRE_MS,
    rcvbuf: int | None = None,
    lane: Iterable[int] | None = None,
    destinations: Iterable[bytes] | None = None,
) -> PacketPort | RingPort:
    """An Ethernet port on ``ifname``: a TPACKET_V3 ring when ``ring``, else a plain packet socket; ``tx_ring``
    adds a TPACKET_V2 transmit ring for :meth:`send_many` and :meth:`send_block`; ``host_only`` leaves out frames
    addressed to other hosts (see :func:`~mplslb.drivers.socket_filter.host_only`); ``max_len`` (plain sockets
    only) leaves out frames longer than that (see :func:`~mplslb.drivers.socket_filter.length_cap`); ``retire_ms``
    (rings only) is the receive ring's block retire timer (see :class:`RingPort`); ``rcvbuf`` (plain sockets only)
    the socket's receive buffer in bytes (see :class:`PacketPort`; None: the system's default); ``lane`` (plain
    sockets only; a ring takes it as None) the ethertypes read first, through a socket of their own (see
    :class:`PacketPort`); ``destinations`` the IP destinations taken in (see
    :func:`~mplslb.drivers.socket_filter.bpf_program`; None: every one)."""
    if ring:
        if max_len is not None:
            raise ValueError("max_len is for plain packet sockets (a ring reads partial checksums unfinished)")
        if rcvbuf is not None:
            raise ValueError("rcvbuf is for plain packet sockets (a ring holds its frames in its blocks)")
        return RingPort(ifname, accept=accept, promisc=promisc, netns=netns, tx_ring=tx_ring, host_only=host_only,
                        retire_ms=retire_ms, destinations=destinations)  # fmt: skip
    return PacketPort(ifname, accept=accept, promisc=promisc, netns=netns, tx_ring=tx_ring, host_only=host_only,
                      max_len=max_len, rcvbuf=rcvbuf, lane=lane, destinations=destinations)  # fmt: skip
