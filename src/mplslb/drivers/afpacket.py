"""Ethernet ports over AF_PACKET: a plain non-blocking socket (:class:`PacketPort`) or a TPACKET_V3 receive ring
(:class:`RingPort`), each bound to one interface for every protocol.

Theory of operation
-------------------
The socket is created listening to nothing (protocol 0), configured (classic BPF filter, ignore-outgoing, auxiliary
data, ring, promiscuous membership) and only then bound to the interface for ETH_P_ALL, so no frame slips in before
the filter. The filter drops what the host itself sends on the interface (pkttype ``PACKET_OUTGOING``, which is how
our own frames come back to a packet socket) and, when ``accept`` names ethertypes, every frame whose ethertype
(looked at after one VLAN tag) is not one of them. ``PACKET_IGNORE_OUTGOING`` spares the kernel the clone of our own
frames in the first place; the filter stays as the check for kernels without it.

The kernel moves a received frame's outermost VLAN tag into metadata before the packet taps see it
(``skb_vlan_untag`` in the receive path). Both ports put the tag back from the auxiliary data, so the core gets the
frame as it was on the wire.

:class:`RingPort` trades latency for fewer system calls: with TPACKET_V3 the kernel hands over whole blocks, when a
block is full or when its retire timer (``retire_ms``, rounded up to a jiffy) fires. Frames are copied out of the
ring and each block goes back to the kernel (``block_status = TP_STATUS_KERNEL``) once all its frames are copied.
Sending uses plain ``send()`` on the same socket for both ports.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import socket
import struct
from collections.abc import Iterable
from typing import Self

from mplslb.drivers.netns import entered
from mplslb.wire.ethernet import ETH_ALEN, ETH_P_8021AD, ETH_P_8021Q

# <linux/if_ether.h>, <linux/if_packet.h>, <asm-generic/socket.h>, <linux/filter.h>
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_AUXDATA = 8
PACKET_VERSION = 10
PACKET_IGNORE_OUTGOING = 23
PACKET_MR_PROMISC = 1
PACKET_OUTGOING = 4
TPACKET_V3 = 2
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33

TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1 << 0
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6

# Classic BPF opcodes and the ancillary offset that loads skb->pkt_type.
BPF_LD_W_ABS = 0x20
BPF_LD_H_ABS = 0x28
BPF_JEQ_K = 0x15
BPF_RET_K = 0x06
SKF_AD_OFF = -0x1000
SKF_AD_PKTTYPE = 4
BPF_ACCEPT = 0xFFFFFFFF  # keep the whole frame
BPF_DROP = 0
BPF_MAX_JUMP = 0xFF
ETHERTYPE_OFFSET = 12
INNER_ETHERTYPE_OFFSET = 16  # after one VLAN tag still in the frame

DEFAULT_BUFSIZE = 1 << 16  # a whole GSO frame from veth fits; larger ones are counted as truncated
_AUXDATA = struct.Struct("=IIIHHHH")  # struct tpacket_auxdata
_AUX_SPACE = socket.CMSG_SPACE(_AUXDATA.size)
_VLAN_TAG = struct.Struct("!HH")
_STATS = struct.Struct("=II")  # tp_packets, tp_drops (tpacket_stats_v3 adds tp_freeze_q_cnt)
_STATS_V3_LEN = 12
_PACKET_MREQ = struct.Struct("=iHH8s")

# TPACKET_V3 ring layout: struct tpacket_req3, struct tpacket_block_desc, struct tpacket3_hdr, struct sockaddr_ll.
_REQ3 = struct.Struct("=IIIIIII")
_U32 = struct.Struct("=I")
BLOCK_STATUS = 8  # tpacket_block_desc: version, offset_to_priv, then hdr.bh1: block_status, num_pkts, ...
BLOCK_NUM_PKTS = 12
BLOCK_FIRST_PKT = 16
_PKT_HDR = struct.Struct("=IIIIIIHHII")  # next_offset, sec, nsec, snaplen, len, status, mac, net, rxhash, vlan_tci
_PKT_VLAN_TPID = struct.Struct("=H")
PKT_VLAN_TPID = 36
TPACKET3_HDRLEN = 48  # TPACKET_ALIGN(sizeof(struct tpacket3_hdr)); sockaddr_ll follows
SLL_PKTTYPE = TPACKET3_HDRLEN + 10
TPACKET_ALIGNMENT = 16


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def bpf_program(accept: Iterable[int] | None) -> list[tuple[int, int, int, int]]:
    """A classic BPF program ``(code, jt, jf, k)``: drop outgoing frames, then keep those whose ethertype (at
    offset 12, or at 16 after a VLAN tag still in the frame) is in ``accept``; ``None`` keeps every ethertype."""
    types = sorted(set(accept)) if accept is not None else None
    if types is not None and (not types or any(not 0 <= t <= 0xFFFF for t in types)):
        raise ValueError("accept must name at least one ethertype, each in 0..0xFFFF")
    if types is not None and 2 * len(types) + 8 > BPF_MAX_JUMP:
        raise ValueError("too many ethertypes for one classic BPF filter")
    pkttype = (SKF_AD_OFF + SKF_AD_PKTTYPE) & 0xFFFFFFFF
    if types is None:
        # 0: A = pkttype; 1: outgoing -> 3 (drop) else 2 (accept)
        return [(BPF_LD_W_ABS, 0, 0, pkttype), (BPF_JEQ_K, 1, 0, PACKET_OUTGOING), (BPF_RET_K, 0, 0, BPF_ACCEPT),
                (BPF_RET_K, 0, 0, BPF_DROP)]  # fmt: skip
    n = len(types)
    vlan, drop, keep = 5 + n, 6 + 2 * n, 7 + 2 * n  # absolute indexes of the targets

    def jeq(at: int, k: int, true: int, false: int) -> tuple[int, int, int, int]:
        return (BPF_JEQ_K, true - at - 1, false - at - 1, k)

    prog = [(BPF_LD_W_ABS, 0, 0, pkttype), jeq(1, PACKET_OUTGOING, drop, 2), (BPF_LD_H_ABS, 0, 0, ETHERTYPE_OFFSET)]
    prog += [jeq(3 + i, t, keep, 4 + i) for i, t in enumerate(types)]
    prog += [jeq(3 + n, ETH_P_8021Q, vlan, 4 + n), jeq(4 + n, ETH_P_8021AD, vlan, drop)]
    prog.append((BPF_LD_H_ABS, 0, 0, INNER_ETHERTYPE_OFFSET))
    prog += [jeq(vlan + 1 + i, t, keep, vlan + 2 + i) for i, t in enumerate(types)]
    prog += [(BPF_RET_K, 0, 0, BPF_DROP), (BPF_RET_K, 0, 0, BPF_ACCEPT)]
    return prog


def attach_filter(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    """Attach a classic BPF program to ``sock`` (SO_ATTACH_FILTER)."""
    insns = (_SockFilter * len(program))(*(_SockFilter(*insn) for insn in program))
    fprog = _SockFprog(len(program), ctypes.cast(insns, ctypes.POINTER(_SockFilter)))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))  # the kernel copies insns during the call


def with_vlan_tag(frame: bytes | memoryview, tci: int, tpid: int) -> bytes:
    """``frame`` with the tag the kernel took into metadata put back after the MAC addresses."""
    return bytes(frame[: 2 * ETH_ALEN]) + _VLAN_TAG.pack(tpid, tci) + bytes(frame[2 * ETH_ALEN :])


class _PacketSocket:
    """What both ports share: the configured socket, the interface MAC, sending, statistics and closing."""

    def __init__(
        self, ifname: str, *, accept: Iterable[int] | None, promisc: bool, netns: str | None, ring: bool
    ) -> None:
        self.ifname = ifname
        self.accept = frozenset(accept) if accept is not None else None
        self.drops: dict[str, int] = {}
        with entered(netns):  # the socket, the interface name and its index all belong to that namespace
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            try:
                self._configure(sock, ifname, promisc=promisc, ring=ring)
            except BaseException:
                self._teardown()
                sock.close()
                raise
        self._sock = sock
        self.mac: bytes = bytes(sock.getsockname()[4][:ETH_ALEN])

    def _configure(self, sock: socket.socket, ifname: str, *, promisc: bool, ring: bool) -> None:
        """Filter, options and ring, then the bind; nothing is received before the filter is on."""
        attach_filter(sock, bpf_program(self.accept))
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

    def stats(self) -> tuple[int, int]:
        """(frames, drops) the kernel counted for this socket since the last call (reading resets them)."""
        raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS_V3_LEN)
        packets, drops = _STATS.unpack_from(raw)
        return packets, drops

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def close(self) -> None:
        self._teardown()
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PacketPort(_PacketSocket):
    """One interface through a plain AF_PACKET socket: one ``recvmsg`` per frame, non-blocking.

    Frames wait in the socket's receive buffer (``rcvbuf`` bytes of kernel memory, each frame costing its
    ``truesize``, e.g. about 800 bytes for a 64-byte frame); what does not fit is dropped by the kernel and shows
    in :meth:`stats`."""

    def __init__(
        self,
        ifname: str,
        *,
        accept: Iterable[int] | None = None,
        promisc: bool = False,
        netns: str | None = None,
        bufsize: int = DEFAULT_BUFSIZE,
        rcvbuf: int | None = None,
    ) -> None:
        super().__init__(ifname, accept=accept, promisc=promisc, netns=netns, ring=False)
        if rcvbuf is not None:
            try:  # root may go past net.core.rmem_max
                self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self._buf = bytearray(bufsize)
        self._view = memoryview(self._buf)

    def recv_burst(self, max_frames: int = 64) -> list[bytes]:
        """Up to ``max_frames`` frames already queued, oldest first; never blocks."""
        frames: list[bytes] = []
        recvmsg_into, view, buffers = self._sock.recvmsg_into, self._view, [self._buf]
        for _ in range(max_frames):
            try:
                n, ancdata, flags, address = recvmsg_into(buffers, _AUX_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. ENETDOWN, reported once when the link goes down
                self._drop(f"recv_{errno.errorcode.get(exc.errno or 0, 'error').lower()}")
                break
            if flags & socket.MSG_TRUNC:
                self._drop("truncated")
                continue
            if address[2] == PACKET_OUTGOING:
                self._drop("outgoing")
                continue
            frame = bytes(view[:n])
            for level, kind, data in ancdata:
                if level == SOL_PACKET and kind == PACKET_AUXDATA and len(data) >= _AUXDATA.size:
                    status, _, _, _, _, tci, tpid = _AUXDATA.unpack_from(data)
                    if status & TP_STATUS_VLAN_VALID:
                        frame = with_vlan_tag(frame, tci, tpid if status & TP_STATUS_VLAN_TPID_VALID else ETH_P_8021Q)
            frames.append(frame)
        return frames


class RingPort(_PacketSocket):
    """One interface through a TPACKET_V3 receive ring (mmap); sends with plain ``send()``.

    The ring holds ``block_nr`` blocks of ``block_size`` bytes (a multiple of the page size); a frame larger than a
    block is cut by the kernel and counted here as truncated.
    """

    def __init__(
        self,
        ifname: str,
        *,
        accept: Iterable[int] | None = None,
        promisc: bool = False,
        netns: str | None = None,
        block_size: int = 1 << 18,
        block_nr: int = 64,
        frame_size: int = 2048,
        retire_ms: int = 1,
    ) -> None:
        if block_size <= 0 or block_size % mmap.PAGESIZE:
            raise ValueError(f"block_size must be a positive multiple of the page size ({mmap.PAGESIZE})")
        if block_nr <= 0 or retire_ms <= 0:
            raise ValueError("block_nr and retire_ms must be positive")
        if frame_size < TPACKET3_HDRLEN or frame_size % TPACKET_ALIGNMENT or block_size % frame_size:
            raise ValueError(f"frame_size must divide block_size and be a multiple of {TPACKET_ALIGNMENT}")
        self._geometry = (block_size, block_nr, frame_size, retire_ms)
        self._block_size, self._block_nr = block_size, block_nr
        self._ring: mmap.mmap | None = None
        self._block = 0  # the next block to look at
        self._left = 0  # frames of the current block not yet copied out
        self._at = 0  # ring offset of the next frame's tpacket3_hdr
        super().__init__(ifname, accept=accept, promisc=promisc, netns=netns, ring=True)

    def _setup(self, sock: socket.socket) -> None:
        block_size, block_nr, frame_size, retire_ms = self._geometry
        req = _REQ3.pack(block_size, block_nr, frame_size, block_size // frame_size * block_nr, retire_ms, 0, 0)
        sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
        self._ring = mmap.mmap(sock.fileno(), block_size * block_nr, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def _teardown(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def recv_burst(self, max_frames: int = 64) -> list[bytes]:
        """Up to ``max_frames`` frames from the blocks the kernel has handed over, oldest first; never blocks.

        A block is given back as soon as its last frame is copied, so a burst may end inside a block."""
        ring = self._ring
        if ring is None:
            raise ValueError("the port is closed")
        frames: list[bytes] = []
        block_size, unpack_u32, unpack_hdr = self._block_size, _U32.unpack_from, _PKT_HDR.unpack_from
        for _ in range(max_frames + self._block_nr):  # each turn copies a frame or gives back an empty block
            if len(frames) >= max_frames:
                break
            base = self._block * block_size
            if self._left == 0:
                if not unpack_u32(ring, base + BLOCK_STATUS)[0] & TP_STATUS_USER:
                    break
                self._left = unpack_u32(ring, base + BLOCK_NUM_PKTS)[0]
                self._at = base + unpack_u32(ring, base + BLOCK_FIRST_PKT)[0]
                if self._left == 0:
                    self._release(ring, base)
                    continue
            at = self._at
            next_offset, _, _, snaplen, length, status, mac, _, _, tci = unpack_hdr(ring, at)
            if snaplen < length:
                self._drop("truncated")
            elif ring[at + SLL_PKTTYPE] == PACKET_OUTGOING:
                self._drop("outgoing")
            else:
                frame = ring[at + mac : at + mac + snaplen]
                if status & TP_STATUS_VLAN_VALID:
                    tpid = _PKT_VLAN_TPID.unpack_from(ring, at + PKT_VLAN_TPID)[0]
                    frame = with_vlan_tag(frame, tci, tpid if status & TP_STATUS_VLAN_TPID_VALID else ETH_P_8021Q)
                frames.append(frame)
            self._left -= 1
            self._at = at + next_offset
            if self._left == 0:
                self._release(ring, base)
        return frames

    def _release(self, ring: mmap.mmap, base: int) -> None:
        _U32.pack_into(ring, base + BLOCK_STATUS, TP_STATUS_KERNEL)
        self._block = (self._block + 1) % self._block_nr
        self._left = 0


def open_port(
    ifname: str,
    *,
    ring: bool = False,
    accept: Iterable[int] | None = None,
    promisc: bool = False,
    netns: str | None = None,
) -> PacketPort | RingPort:
    """An Ethernet port on ``ifname``: a TPACKET_V3 ring when ``ring``, else a plain packet socket."""
    if ring:
        return RingPort(ifname, accept=accept, promisc=promisc, netns=netns)
    return PacketPort(ifname, accept=accept, promisc=promisc, netns=netns)
