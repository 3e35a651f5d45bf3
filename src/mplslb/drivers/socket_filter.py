"""Classic BPF socket filters for packet sockets (``SO_ATTACH_FILTER``): a small compiler for the one program the
ports need, and the ``setsockopt`` that attaches it.

This is the kernel's classic BPF (``struct sock_filter``), run on every frame a socket would receive; it has nothing
to do with the eBPF programs and maps of :mod:`mplslb.offload.bpf`.

Theory of operation
-------------------
A program is a list of instructions ``(code, jt, jf, k)``. :func:`bpf_program` loads the packet type (an ancillary
load of ``skb->pkt_type``) and drops ``PACKET_OUTGOING`` (our own frames coming back to a packet socket); then, when
``accept`` names ethertypes, it keeps a frame whose ethertype, at offset 12 or at 16 after one VLAN tag still in the
frame, is one of them, and drops the rest. Given destinations (``to``) too, an IP frame is kept only if it goes
to one of them (an IPv6 one also if it carries ICMPv6: neighbour discovery): a client port takes its virtual IPs'
frames, not the host's own (an SSH session, an HAProxy beside the daemon, a flood at the host's address never reach
Python). :func:`host_only` inserts a second test on the packet type, so frames addressed to other hosts
(``PACKET_OTHERHOST``) are dropped too. :func:`length_cap` puts a test of the frame's whole length in front: with
the kernel offload's ``offload_gso`` a longer frame (a super-packet) is the tc program's, and the socket must not
take it (nor could it send it on).
"""

from __future__ import annotations

import ctypes
import socket
from collections.abc import Iterable

from mplslb.switching.layout import IPV4_DST, IPV6_DST, IPV6_NEXT_HEADER
from mplslb.wire.checksum import IPV4_ADDR_LEN, IPV6_ADDR_LEN
from mplslb.wire.ethernet import (
    ETH_ALEN,
    ETH_HLEN,
    ETH_P_8021AD,
    ETH_P_8021Q,
    ETH_P_IP,
    ETH_P_IPV6,
    ETHERTYPE_MAX,
    VLAN_TAG_LEN,
)
from mplslb.wire.ip import IPPROTO_ICMPV6

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

BPF_LD_B_ABS = 0x30  # A = the octet at k
#: Where the IP header starts, without a VLAN tag in the frame and with one.
IP_AT = ETH_HLEN
INNER_IP_AT = IP_AT + VLAN_TAG_LEN
_WORD = 4
_IPV6_WORDS = IPV6_ADDR_LEN // _WORD


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def bpf_program(accept: Iterable[int] | None, to: Iterable[bytes] | None = None) -> list[Instruction]:
    """A classic BPF program ``(code, jt, jf, k)``: drop outgoing frames, then keep those whose ethertype (at
    offset 12, or at 16 after a VLAN tag still in the frame) is in ``accept``; ``None`` keeps every ethertype. With
    ``to`` (IPv4 and IPv6 addresses, 4 and 16 octets), an IPv4 frame is kept only if its destination is one of the
    IPv4 ones (when there are any), an IPv6 frame only if it carries ICMPv6 right after its fixed header (neighbour
    discovery, to multicast addresses) or goes to one of the IPv6 ones (when there are any)."""
    types = sorted(set(accept)) if accept is not None else None
    if types is not None and (not types or any(not 0 <= t <= ETHERTYPE_MAX for t in types)):
        raise ValueError(f"accept must name at least one ethertype, each in 0..0x{ETHERTYPE_MAX:X}")
    addresses = list(to) if to is not None else []
    if to is not None and (not addresses or any(len(a) not in (IPV4_ADDR_LEN, IPV6_ADDR_LEN) for a in addresses)):
        raise ValueError(f"to takes at least one address, each of {IPV4_ADDR_LEN} or {IPV6_ADDR_LEN} octets")
    v4 = sorted({int.from_bytes(a, "big") for a in addresses if len(a) == IPV4_ADDR_LEN})
    v6 = sorted({a for a in addresses if len(a) == IPV6_ADDR_LEN})
    if (v4 and ETH_P_IP not in (types or ())) or (v6 and ETH_P_IPV6 not in (types or ())):
        raise ValueError("to needs accept to name the IP versions of its addresses")
    pkttype = (SKF_AD_OFF + SKF_AD_PKTTYPE) & _U32_MASK
    if types is None:
        # 0: A = pkttype; 1: outgoing -> 3 (drop) else 2 (accept)
        return [(BPF_LD_W_ABS, 0, 0, pkttype), (BPF_JEQ_K, 1, 0, PACKET_OUTGOING), (BPF_RET_K, 0, 0, BPF_ACCEPT),
                (BPF_RET_K, 0, 0, BPF_DROP)]  # fmt: skip
    n = len(types)
    v4_len = 1 + len(v4) if v4 else 0  # the destination's load, a test per address
    v6_len = 2 + 2 * _IPV6_WORDS * len(v6) if v6 else 0  # the next header's load and test, a load and test per word
    # absolute indexes of the targets: the tagged frame's tests, the destinations' (untagged, tagged), the ends
    vlan = 5 + n
    v4_at = vlan + n + 1
    v6_at = v4_at + 2 * v4_len
    drop = v6_at + 2 * v6_len
    keep = drop + 1
    if keep > BPF_MAX_JUMP:
        raise ValueError("too many ethertypes or addresses for one classic BPF filter")

    def jeq(at: int, k: int, true: int, false: int) -> Instruction:
        return (BPF_JEQ_K, true - at - 1, false - at - 1, k)

    def taken(t: int, tagged: bool) -> int:
        if t == ETH_P_IP and v4:
            return v4_at + (v4_len if tagged else 0)
        if t == ETH_P_IPV6 and v6:
            return v6_at + (v6_len if tagged else 0)
        return keep

    prog = [(BPF_LD_W_ABS, 0, 0, pkttype), jeq(1, PACKET_OUTGOING, drop, 2), (BPF_LD_H_ABS, 0, 0, ETHERTYPE_OFFSET)]
    prog += [jeq(3 + i, t, taken(t, False), 4 + i) for i, t in enumerate(types)]
    prog += [jeq(3 + n, ETH_P_8021Q, vlan, 4 + n), jeq(4 + n, ETH_P_8021AD, vlan, drop)]
    prog.append((BPF_LD_H_ABS, 0, 0, INNER_ETHERTYPE_OFFSET))
    prog += [jeq(vlan + 1 + i, t, taken(t, True), vlan + 2 + i if i < n - 1 else drop) for i, t in enumerate(types)]
    for ip in (IP_AT, INNER_IP_AT) if v4 else ():
        start = len(prog)
        prog.append((BPF_LD_W_ABS, 0, 0, ip + IPV4_DST))
        prog += [jeq(start + 1 + j, a, keep, start + 2 + j if j < len(v4) - 1 else drop) for j, a in enumerate(v4)]
    for ip in (IP_AT, INNER_IP_AT) if v6 else ():
        start = len(prog)
        prog += [(BPF_LD_B_ABS, 0, 0, ip + IPV6_NEXT_HEADER), jeq(start + 1, IPPROTO_ICMPV6, keep, start + 2)]
        for j, address in enumerate(v6):
            first = start + 2 + 2 * _IPV6_WORDS * j
            other = first + 2 * _IPV6_WORDS if j < len(v6) - 1 else drop  # the next address's tests
            for w in range(_IPV6_WORDS):
                at = first + 2 * w
                word = int.from_bytes(address[_WORD * w : _WORD * (w + 1)], "big")
                prog.append((BPF_LD_W_ABS, 0, 0, ip + IPV6_DST + _WORD * w))
                prog.append(jeq(at + 1, word, keep if w == _IPV6_WORDS - 1 else at + 2, other))
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
