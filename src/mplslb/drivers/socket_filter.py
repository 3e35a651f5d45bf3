"""Classic BPF socket filters for packet sockets (``SO_ATTACH_FILTER``): a small compiler for the one program the
ports need, and the ``setsockopt`` that attaches it.

This is the kernel's classic BPF (``struct sock_filter``), run on every frame a socket would receive; it has nothing
to do with the eBPF programs and maps of :mod:`mplslb.offload.bpf`.

Theory of operation
-------------------
A program is a list of instructions ``(code, jt, jf, k)``. :func:`bpf_program` loads the packet type (an ancillary
load of ``skb->pkt_type``) and drops ``PACKET_OUTGOING`` (our own frames coming back to a packet socket); then, when
``accept`` names ethertypes, it keeps a frame whose ethertype, at offset 12 or at 16 after one VLAN tag still in the
frame, is one of them, and drops the rest. Given ``ipv4_to`` too, an IPv4 frame is kept only if its destination
is one of those addresses: a client port takes its virtual IPs' frames, not the host's own (an SSH session, an
HAProxy beside the daemon, a flood at the host's address never reach Python). :func:`host_only` inserts a second
test on the packet type, so frames addressed to other hosts (``PACKET_OTHERHOST``) are dropped too.
:func:`length_cap` puts a test of the frame's whole length in front: with the kernel offload's ``offload_gso`` a
longer frame (a super-packet) is the tc program's, and the socket must not take it (nor could it send it on).
"""

from __future__ import annotations

import ctypes
import socket
from collections.abc import Iterable

from mplslb.wire.ethernet import ETH_ALEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETHERTYPE_MAX, VLAN_TAG_LEN

Instruction = tuple[int, int, int, int]  # (code, jt, jf, k) of struct sock_filter

# <linux/if_packet.h> packet types, <asm-generic/socket.h>
PACKET_OTHERHOST = 3
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26

# Classic BPF opcodes and the ancillary offset that loads skb->pkt_type (<linux/filter.h>).
BPF_LD_W_ABS = 0x20
BPF_LD_H_ABS = 0x28
BPF_LD_W_LEN = 0x80  # A = the frame's length (skb->len, from the link-layer header on)
BPF_JGT_K = 0x25
BPF_JEQ_K = 0x15
BPF_RET_K = 0x06
SKF_AD_OFF = -0x1000
SKF_AD_PKTTYPE = 4
BPF_ACCEPT = 0xFFFFFFFF  # keep the whole frame
BPF_DROP = 0
BPF_MAX_JUMP = 0xFF  # jt and jf are one byte each
_U32_MASK = 0xFFFFFFFF  # k is unsigned: a negative offset is written in two's complement
ETHERTYPE_OFFSET = 2 * ETH_ALEN
INNER_ETHERTYPE_OFFSET = ETHERTYPE_OFFSET + VLAN_TAG_LEN  # after one VLAN tag still in the frame

# Length of the program with an accept list, which bounds its longest jump: the pkttype load and test, the
# ethertype load, a test per ethertype, the two VLAN tests, the inner load, a test per ethertype again, drop, keep;
# with IPv4 destinations, a load and a test per address, once without a VLAN tag and once with.
_FIXED_INSNS = 8
_INSNS_PER_TYPE = 2
_INSNS_PER_ADDRESS = 2
#: Where an IPv4 packet's destination address is, without a VLAN tag in the frame and with one.
IPV4_DST_OFFSET = ETHERTYPE_OFFSET + 2 + 16
INNER_IPV4_DST_OFFSET = IPV4_DST_OFFSET + VLAN_TAG_LEN
IPV4_LEN = 4


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def bpf_program(accept: Iterable[int] | None, ipv4_to: Iterable[bytes] | None = None) -> list[Instruction]:
    """A classic BPF program ``(code, jt, jf, k)``: drop outgoing frames, then keep those whose ethertype (at
    offset 12, or at 16 after a VLAN tag still in the frame) is in ``accept``; ``None`` keeps every ethertype. With
    ``ipv4_to`` (4-octet addresses; ``accept`` must name IPv4), an IPv4 frame is kept only if its destination is
    one of them."""
    types = sorted(set(accept)) if accept is not None else None
    if types is not None and (not types or any(not 0 <= t <= ETHERTYPE_MAX for t in types)):
        raise ValueError(f"accept must name at least one ethertype, each in 0..0x{ETHERTYPE_MAX:X}")
    to = sorted({int.from_bytes(a, "big") for a in ipv4_to}) if ipv4_to is not None else []
    if ipv4_to is not None and (types is None or ETH_P_IP not in types or not to):
        raise ValueError("ipv4_to needs accept to name IPv4, and at least one address")
    if ipv4_to is not None and any(len(a) != IPV4_LEN for a in ipv4_to):
        raise ValueError(f"ipv4_to takes {IPV4_LEN}-octet IPv4 addresses")
    if types is not None and (
        _INSNS_PER_TYPE * len(types) + _INSNS_PER_ADDRESS * (len(to) + 1) + _FIXED_INSNS > BPF_MAX_JUMP
    ):
        raise ValueError("too many ethertypes or addresses for one classic BPF filter")
    pkttype = (SKF_AD_OFF + SKF_AD_PKTTYPE) & _U32_MASK
    if types is None:
        # 0: A = pkttype; 1: outgoing -> 3 (drop) else 2 (accept)
        return [(BPF_LD_W_ABS, 0, 0, pkttype), (BPF_JEQ_K, 1, 0, PACKET_OUTGOING), (BPF_RET_K, 0, 0, BPF_ACCEPT),
                (BPF_RET_K, 0, 0, BPF_DROP)]  # fmt: skip
    n, m = len(types), len(to)
    # absolute indexes of the targets: the tagged frame's tests, the IPv4 destination's (untagged, tagged), the ends
    vlan = 5 + n
    v4 = vlan + n + 1
    v4_tagged = v4 + (1 + m if m else 0)
    drop = v4_tagged + (1 + m if m else 0)
    keep = drop + 1

    def jeq(at: int, k: int, true: int, false: int) -> Instruction:
        return (BPF_JEQ_K, true - at - 1, false - at - 1, k)

    def taken(t: int, tagged: bool) -> int:
        return (v4_tagged if tagged else v4) if m and t == ETH_P_IP else keep

    prog = [(BPF_LD_W_ABS, 0, 0, pkttype), jeq(1, PACKET_OUTGOING, drop, 2), (BPF_LD_H_ABS, 0, 0, ETHERTYPE_OFFSET)]
    prog += [jeq(3 + i, t, taken(t, False), 4 + i) for i, t in enumerate(types)]
    prog += [jeq(3 + n, ETH_P_8021Q, vlan, 4 + n), jeq(4 + n, ETH_P_8021AD, vlan, drop)]
    prog.append((BPF_LD_H_ABS, 0, 0, INNER_ETHERTYPE_OFFSET))
    prog += [jeq(vlan + 1 + i, t, taken(t, True), vlan + 2 + i if i < n - 1 else drop) for i, t in enumerate(types)]
    for start, offset in ((v4, IPV4_DST_OFFSET), (v4_tagged, INNER_IPV4_DST_OFFSET)) if m else ():
        prog.append((BPF_LD_W_ABS, 0, 0, offset))
        prog += [jeq(start + 1 + j, a, keep, start + 2 + j if j < m - 1 else drop) for j, a in enumerate(to)]
    prog += [(BPF_RET_K, 0, 0, BPF_DROP), (BPF_RET_K, 0, 0, BPF_ACCEPT)]
    assert len(prog) == keep + 1
    return prog


def host_only(program: list[Instruction]) -> list[Instruction]:
    """``program`` (from :func:`bpf_program`) that also drops frames addressed to other hosts (PACKET_OTHERHOST:
    flooded unicast a bridge or a promiscuous port lets through), so a port takes only what is sent to it."""
    code, jt, jf, k = program[1]  # jeq PACKET_OUTGOING: jt is the drop, jf the next instruction
    drop = 2 + jt  # absolute index of the drop before the insertion
    check_other = (BPF_JEQ_K, (drop + 1) - 2 - 1, 0, PACKET_OTHERHOST)  # A still holds the packet type
    return [program[0], (code, jt + 1, jf, k), check_other, *program[2:]]


def length_cap(program: list[Instruction], max_len: int) -> list[Instruction]:
    """``program`` preceded by a test that drops frames longer than ``max_len`` octets (their whole length, not
    what is in the skb's linear part). Every jump of ``program`` is relative, so nothing in it moves."""
    if not 0 < max_len <= _U32_MASK:
        raise ValueError(f"max_len must be within 1..{_U32_MASK}, got {max_len}")
    return [(BPF_LD_W_LEN, 0, 0, 0), (BPF_JGT_K, 0, 1, max_len), (BPF_RET_K, 0, 0, BPF_DROP), *program]


def attach_filter(sock: socket.socket, program: list[Instruction]) -> None:
    """Attach a classic BPF program to ``sock`` (SO_ATTACH_FILTER)."""
    insns = (_SockFilter * len(program))(*(_SockFilter(*insn) for insn in program))
    fprog = _SockFprog(len(program), ctypes.cast(insns, ctypes.POINTER(_SockFilter)))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))  # the kernel copies insns during the call
