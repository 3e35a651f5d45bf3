"""The endpoints' kernel datapath held to the Python endpoint: one frame or packet through both, compared; and the
endpoints' fuzz campaign, hostile frames through both datapaths of both roles.

Theory of operation
-------------------
A :class:`Pair` is one role's two datapaths fed alike: a :class:`~mplslb.offload.endpoint.KernelEndpoint`, whose
programs run on each frame with ``BPF_PROG_TEST_RUN`` (maps and counters as on the wire), and a
:class:`~mplslb.endpoint.ServerEndpoint` or :class:`~mplslb.endpoint.ClientEndpoint`, the reference.

* **Ingress** (:func:`compare_ingress`): a frame from the wire. What the Python endpoint hands up, the kernel passes to
  the host's stack with the same IP packet after the same Ethernet addresses; what it drops under a reason, the
  kernel drops and counts under the same reason.
* **Egress** (:func:`compare_egress`): an IP packet from the host, as the host's stack frames it for the wire
  (:func:`host_frame`). What the Python endpoint sends, the kernel sends octet for octet; what it drops, the kernel
  drops under the same reason.

Where the kernel legitimately differs (docs/architecture.md lists it):

* frames that are not the datapath's pass untouched: unlabelled frames on ingress; on egress a server's packets not
  from a virtual IP and a client's not to one (the Python agent, which only sees what is labelled or routed into its
  TUN, counts them);
* checks the kernel leaves to the host's stack or makes under another name (:data:`NOT_IN_KERNEL`): the frame may
  pass, and the kernel may learn a flow from it that the Python endpoint does not; a :class:`Pair` then has the
  Python endpoint take what the kernel learnt, so the flows they learn keep comparing;
* the IPv6 extension header walk stops after ``IPV6_EXT_MAX`` headers (``ipv6_ext_too_many``).

The campaign (:func:`campaign`, ``make fuzz-endpoints``): from the seed, flows of both families and both transports
give base frames (a client's labelled packets as a server meets them, a server's as a client meets them, under one
label or a deeper stack, ICMP errors about them each way, the host packets of each side) and the real captures of
shared/data give more (as captured, and made the role's: to or from the virtual IP, under a label of the role). Each
frame sent is a base frame clean or mutated (:func:`mplslb.fuzz.mutate`: cut, bits flipped, octets set, anywhere or
where the datapaths read), on the ingress or egress of one role. Every :data:`EPOCH` frames both roles start afresh,
after checking that the two datapaths learnt the same flows, from a new base set whose frames each role first meets
once, clean, on ingress (its flows learnt, so that its hosts' packets meet known flows too). The first difference
raises :class:`~mplslb.fuzz.Mismatch` naming the seed, the frame number and the frame.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from mplslb.endpoint import ClientEndpoint, Flow, ServerEndpoint
from mplslb.flow import FlowKey
from mplslb.fuzz import SHARED_DATA, Mismatch, capture_frames, mutate
from mplslb.labels import C2S_MAX, C2S_MIN
from mplslb.offload import bpf
from mplslb.offload.endpoint import KernelEndpoint
from mplslb.switching.layout import ENDPOINT_TRAFFIC, IPV6_EXT_MAX
from mplslb.wire.checksum import internet_checksum
from mplslb.wire.errors import WireError
from mplslb.wire.ethernet import ETH_P_IP, ETH_P_IPV6, ETH_P_MPLS_UC, build_ethernet, parse_ethernet
from mplslb.wire.icmp import ICMP6_INFO_MIN, ICMP_HLEN, build_icmp_unreachable
from mplslb.wire.ip import IPPROTO_AH, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP
from mplslb.wire.ipv4 import IPV4_HLEN, build_ipv4
from mplslb.wire.ipv6 import (
    AH_LEN_BIAS,
    AH_UNIT,
    EXT_MIN_LEN,
    EXT_UNIT,
    EXTENSION_HEADERS,
    FRAG_OFFSET_SHIFT,
    FRAGMENT_HLEN,
    IPV6_HLEN,
    build_ipv6,
)
from mplslb.wire.mpls import MAX_STACK_DEPTH, pack_entry, parse_stack
from mplslb.wire.tcp import TCPFlag, build_tcp
from mplslb.wire.udp import build_udp

#: Reasons the Python endpoint drops under for checks the kernel leaves to the host's stack (TCP options) or makes
#: under another name (an IP version that does not fit).
NOT_IN_KERNEL = frozenset({"tcp_bad_option", "ipv4_bad_version", "ipv6_bad_version"})
#: Counters of frames that went through, not drops.
THROUGH = frozenset(ENDPOINT_TRAFFIC)
HOST = bytes.fromhex("020000000a01")  # the endpoint's own MAC
LB = bytes.fromhex("02000000bb01")  # the balancer's
GW = bytes.fromhex("02000000ee01")  # the neighbour the host's stack addresses a frame to before the egress program
VIP4 = bytes((10, 0, 0, 100))
VIP6 = bytes.fromhex("fd000000000000000000000000000100")
NOW = 100.0  # the Python endpoints' clock (the kernel's is its own: no flow ages within a campaign's epoch)
EPOCH = 2048  # frames between two fresh starts of both roles
_MPLS = ETH_P_MPLS_UC.to_bytes(2, "big")


def host_frame(packet: bytes) -> bytes:
    """An IP packet as the host's stack hands it to the wire interface, before the egress program."""
    return GW + HOST + (ETH_P_IPV6 if packet and packet[0] >> 4 == 6 else ETH_P_IP).to_bytes(2, "big") + packet


def keyed_on_vip(packet: bytes, serving: bool) -> bool:
    """Whether the address the egress program keys on (a server's: the source; a client's: the destination) is a
    virtual IP: only such packets are the datapath's."""
    version = packet[0] >> 4 if packet else 0
    if version == 4 and len(packet) >= IPV4_HLEN:
        return (packet[12:16] if serving else packet[16:20]) == VIP4
    if version == 6 and len(packet) >= IPV6_HLEN:
        return (packet[8:24] if serving else packet[24:40]) == VIP6
    return False


def _new_drops(k: KernelEndpoint, before: dict[str, int]) -> set[str]:
    return {name for name, n in k.counts().items() if n != before.get(name, 0) and name not in THROUGH}


def _reasons(ep: ServerEndpoint | ClientEndpoint, before: dict[str, int]) -> set[str]:
    return {r for r, n in ep.drops.items() if n != before.get(r, 0)}


class Outcome(NamedTuple):
    """What one frame or packet gave: what the Python endpoint passed on (None: it dropped it) and, where the two
    datapaths differed as documented, how: ``not_in_kernel`` (the Python endpoint dropped it under a reason of
    :data:`NOT_IN_KERNEL`), ``ipv6_ext_too_many`` (the kernel stopped at the
    extension header limit); empty when they agreed."""

    python: bytes | None
    difference: str = ""


def compare_ingress(k: KernelEndpoint, ep: ServerEndpoint | ClientEndpoint, frame: bytes) -> Outcome:
    """One frame from the wire through both datapaths; raises :class:`Mismatch` unless the outcome is the same or
    one of the documented differences."""
    before, counted = dict(ep.drops), k.counts()
    expected = ep.from_wire(frame, NOW)
    if len(frame) < 14:  # no device hands the kernel a frame shorter than an Ethernet header (nor does the test run)
        return Outcome(expected)
    got = k.run_ingress(frame)
    if int.from_bytes(frame[12:14], "big") != ETH_P_MPLS_UC:
        if got.retval != bpf.XDP_PASS or got.data != frame:
            raise Mismatch(f"ingress: an unlabelled frame not passed untouched (verdict {got.retval})")
        return Outcome(expected)
    handed = None  # the frame as the kernel hands the Python endpoint's packet to the stack
    if expected is not None:
        handed = frame[:12] + (ETH_P_IPV6 if expected[0] >> 4 == 6 else ETH_P_IP).to_bytes(2, "big") + expected
    return _judged("ingress", expected, _reasons(ep, before), _new_drops(k, counted), got, handed,
                   passed=bpf.XDP_PASS, dropped=bpf.XDP_DROP, packet=packet_of(frame))  # fmt: skip


def compare_egress(k: KernelEndpoint, ep: ServerEndpoint | ClientEndpoint, packet: bytes) -> Outcome:
    """One IP packet from the host through both datapaths; raises :class:`Mismatch` unless the outcome is the same
    or one of the documented differences."""
    before, counted = dict(ep.drops), k.counts()
    expected = ep.from_host(packet, NOW)
    frame = host_frame(packet)
    try:
        got = k.run_egress(frame)
    except bpf.BpfError:
        # the test run itself refuses a frame shorter than its ethertype's IP header (no device would send one)
        if len(packet) >= (IPV6_HLEN if packet and packet[0] >> 4 == 6 else IPV4_HLEN):
            raise
        return Outcome(expected)
    if not keyed_on_vip(packet, isinstance(ep, ServerEndpoint)):
        # Not the datapath's: the host's own traffic, or a packet whose addresses the kernel cannot read (the host's
        # stack never sends one); it passes.
        if got.retval != bpf.TC_ACT_OK or got.data != frame:
            raise Mismatch(f"egress: a packet not the datapath's not passed untouched (verdict {got.retval})")
        return Outcome(expected)
    return _judged("egress", expected, _reasons(ep, before), _new_drops(k, counted), got, expected,
                   passed=bpf.TC_ACT_OK, dropped=bpf.TC_ACT_SHOT, packet=packet)  # fmt: skip


def _judged(
    way: str, expected: bytes | None, reason: set[str], counted: set[str], got: bpf.TestRun, want: bytes | None, *,
    passed: int, dropped: int, packet: bytes | None,
) -> Outcome:  # fmt: skip
    """The judgement of both directions once the kernel ran: ``expected`` what the Python endpoint passed on and
    ``reason`` its drop reasons; ``counted`` the kernel's new drop counts, ``got`` its run and ``want`` the frame it
    must give when the Python endpoint passed the input on; ``passed`` and ``dropped`` the program's verdicts;
    ``packet`` the IP packet the input carries."""
    if (got.retval == dropped and counted == {"ipv6_ext_too_many"} and not reason & NOT_IN_KERNEL
            and packet is not None and beyond_ext_limit(packet)):  # fmt: skip
        return Outcome(expected, "ipv6_ext_too_many")
    if expected is not None:
        if got.retval != passed or got.data != want:
            shown = want.hex() if want is not None else ""
            raise Mismatch(f"{way}: the kernel gave verdict {got.retval}, {got.data.hex()}; Python {shown}")
        return Outcome(expected)
    if reason & NOT_IN_KERNEL:
        return Outcome(expected, "not_in_kernel")
    if got.retval != dropped or counted != reason:
        raise Mismatch(f"{way}: Python dropped it ({sorted(reason)}), the kernel gave {got.retval} {sorted(counted)}")
    return Outcome(expected)


class Pair:
    """One role's two datapaths fed alike and compared (the module docstring). ``serving``: the server's role."""

    def __init__(self, k: KernelEndpoint, serving: bool) -> None:
        self.k, self.serving = k, serving
        self.ep: ServerEndpoint | ClientEndpoint = self._python()
        self.delivered = self.labelled = self.adopted = 0
        self.dropped: Counter[str] = Counter()  # the Python endpoint's drops by reason, across fresh starts
        self.differences: Counter[str] = Counter()  # the documented differences met (Outcome.difference)
        self.k.clear_flows()

    def _python(self) -> ServerEndpoint | ClientEndpoint:
        if self.serving:
            return ServerEndpoint(mac=HOST, vips=[VIP4, VIP6])
        return ClientEndpoint(mac=HOST, gateway_mac=LB)

    def restart(self) -> None:
        """Both datapaths forget every flow."""
        self.k.clear_flows()
        self.ep = self._python()

    def _after(self, before: dict[str, int], outcome: Outcome) -> Outcome:
        self.dropped.update(_reasons(self.ep, before))
        if outcome.difference:  # the datapaths differed as documented: the Python side takes what the kernel learnt
            self.differences[outcome.difference] += 1
            kernel, python = self.flows()
            for key in python.keys() - kernel.keys():
                del self.ep.flows[key]
            for key, (label, peer) in kernel.items():
                if python.get(key) != (label, peer):
                    self.ep.flows[key] = Flow(label, peer, NOW)
                    self.adopted += 1
        return outcome

    def ingress(self, frame: bytes) -> Outcome:
        before = dict(self.ep.drops)
        outcome = compare_ingress(self.k, self.ep, frame)
        self.delivered += outcome.python is not None and not outcome.difference
        return self._after(before, outcome)

    def egress(self, packet: bytes) -> Outcome:
        before = dict(self.ep.drops)
        outcome = compare_egress(self.k, self.ep, packet)
        sent = outcome.python
        self.labelled += sent is not None and not outcome.difference and sent[12:14] == _MPLS
        return self._after(before, outcome)

    def flows(self) -> tuple[dict[FlowKey, tuple[int, bytes]], dict[FlowKey, tuple[int, bytes]]]:
        """The flows each datapath knows (kernel, Python): key -> (label, peer MAC)."""
        kernel = {key: (label, peer) for key, (label, peer, _) in self.k.flow_table().items()}
        return kernel, {key: (flow.label, flow.peer) for key, flow in self.ep.flows.items()}

    def same_flows(self) -> bool:
        kernel, python = self.flows()
        return kernel == python


def beyond_ext_limit(packet: bytes) -> bool:
    """Whether the kernel's walk of an IPv6 packet's extension headers (``walk_ext`` in mplslb_endpoint.c) stops at
    its bound: ``IPV6_EXT_MAX`` of them whole, and another after them; the datagram an ICMPv6 error quotes is
    walked too. (``mplslb.wire.ipv6.parse_ipv6`` walks on without a bound and checks every header it meets.)"""
    for _ in range(2):  # the packet, then the one its ICMPv6 error quotes
        if len(packet) < IPV6_HLEN or packet[0] >> 4 != 6:
            return False
        proto, pos = packet[6], IPV6_HLEN
        for _ in range(IPV6_EXT_MAX):
            if proto not in EXTENSION_HEADERS:
                break
            if len(packet) < pos + EXT_MIN_LEN:
                return False
            if proto == IPPROTO_FRAGMENT:
                if int.from_bytes(packet[pos + 2 : pos + 4], "big") >> FRAG_OFFSET_SHIFT:
                    return False  # a later fragment: the walk ends there
                proto, pos = packet[pos], pos + FRAGMENT_HLEN
                continue
            length = packet[pos + 1]
            size = (length + AH_LEN_BIAS) * AH_UNIT if proto == IPPROTO_AH else (length + 1) * EXT_UNIT
            if len(packet) - pos < size:
                return False
            proto, pos = packet[pos], pos + size
        if proto in EXTENSION_HEADERS:
            return True
        if proto != IPPROTO_ICMPV6 or len(packet) < pos + ICMP_HLEN or packet[pos] >= ICMP6_INFO_MIN:
            return False
        packet = packet[pos + ICMP_HLEN :]  # the quote
    return False


# -- packets made the role's ---------------------------------------------------------------------------------------
def packet_of(frame: bytes) -> bytes | None:
    """The IP packet a frame carries after its Ethernet header, 802.1Q tags and label stack; None when it carries
    none (another ethertype, or a header or stack that does not decode)."""
    try:
        eth = parse_ethernet(frame)
        at = eth.payload_offset
        if eth.ethertype == ETH_P_MPLS_UC:
            _, at = parse_stack(frame, at)
        elif eth.ethertype not in (ETH_P_IP, ETH_P_IPV6):
            return None
    except WireError:
        return None
    return frame[at:] if len(frame) > at and frame[at] >> 4 in (4, 6) else None


def _ipv4_checked(buf: bytearray) -> bytes:
    """An IPv4 header with rewritten fields, its checksum made right again (when its length is readable)."""
    ihl = (buf[0] & 0x0F) * 4
    if IPV4_HLEN <= ihl <= len(buf):
        buf[10:12] = bytes(2)
        buf[10:12] = internet_checksum(bytes(buf[:ihl])).to_bytes(2, "big")
    return bytes(buf)


def readdressed(packet: bytes, *, serving: bool) -> bytes:
    """``packet`` as the datapath of a role meets it: to the virtual IP of its family (a server's), or from it (a
    client's); a packet a capture cut short given the length it has; the IPv4 header checksum made right again. A
    packet too short for its addresses is left as it is."""
    buf = bytearray(packet)
    if packet and packet[0] >> 4 == 4 and len(packet) >= IPV4_HLEN:
        buf[(16 if serving else 12) : (20 if serving else 16)] = VIP4
        if int.from_bytes(packet[2:4], "big") > len(packet):
            buf[2:4] = len(packet).to_bytes(2, "big")
        return _ipv4_checked(buf)
    if packet and packet[0] >> 4 == 6 and len(packet) >= IPV6_HLEN:
        buf[(24 if serving else 8) : (40 if serving else 24)] = VIP6
        if int.from_bytes(packet[4:6], "big") > len(packet) - IPV6_HLEN:
            buf[4:6] = (len(packet) - IPV6_HLEN).to_bytes(2, "big")
    return bytes(buf)


def reversed_packet(packet: bytes) -> bytes | None:
    """The other side's packet of the same flow: addresses and ports swapped (their checksums stay right), for an
    IPv4 first fragment or an IPv6 packet without extension headers, of TCP or UDP; None for any other."""
    buf = bytearray(packet)
    version = packet[0] >> 4 if packet else 0
    if version == 4 and len(packet) >= IPV4_HLEN:
        l4 = (packet[0] & 0x0F) * 4
        later = int.from_bytes(packet[6:8], "big") & 0x1FFF
        if packet[9] not in (IPPROTO_TCP, IPPROTO_UDP) or later or l4 < IPV4_HLEN or len(packet) < l4 + 4:
            return None
        buf[12:16], buf[16:20] = packet[16:20], packet[12:16]
    elif version == 6 and len(packet) >= IPV6_HLEN + 4 and packet[6] in (IPPROTO_TCP, IPPROTO_UDP):
        l4 = IPV6_HLEN
        buf[8:24], buf[24:40] = packet[24:40], packet[8:24]
    else:
        return None
    buf[l4 : l4 + 2], buf[l4 + 2 : l4 + 4] = packet[l4 + 2 : l4 + 4], packet[l4 : l4 + 2]
    return _ipv4_checked(buf) if version == 4 else bytes(buf)


# -- the campaign ----------------------------------------------------------------------------------------------------
@dataclass
class Base:
    """What one epoch's frames are made from, for each role (server, client): frames from the wire, packets from
    the host."""

    ingress: dict[bool, list[bytes]] = field(default_factory=lambda: {True: [], False: []})
    egress: dict[bool, list[bytes]] = field(default_factory=lambda: {True: [], False: []})


def _client(rng: random.Random, v6: bool) -> bytes:
    if v6:
        return bytes.fromhex("fd000000000000000000000000640000")[:14] + rng.randbytes(2)
    return bytes((10, 64, rng.randrange(256), rng.randrange(1, 255)))


def _c2s(rng: random.Random) -> int:
    return C2S_MIN + 2 * rng.randrange((C2S_MAX - C2S_MIN) // 2 + 1)


def _stack(rng: random.Random, label: int) -> bytes:
    """A label stack with ``label`` on top: alone most of the time, else with entries below it (a service or entropy
    label), now and then one entry more than the stack may have, without a bottom."""
    pick = rng.random()
    if pick < 0.85:
        return pack_entry(label, 0, True, 64)
    depth = rng.randint(2, 4) if pick < 0.97 else MAX_STACK_DEPTH + 1
    below = [pack_entry(rng.randrange(16, 1 << 20), rng.randrange(8), i == depth - 2 and depth <= MAX_STACK_DEPTH)
             for i in range(depth - 1)]  # fmt: skip
    return pack_entry(label, 0, False, 64) + b"".join(below)


def _flow_packet(rng: random.Random, v6: bool, proto: int, src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    """A packet of a flow: TCP (with MSS and timestamp options at times) or UDP; IPv4 with options at times, IPv6
    with extension headers at times."""
    payload = rng.choice((b"", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", rng.randbytes(rng.randrange(1, 1200))))
    if proto == IPPROTO_TCP:
        flags = rng.choice((TCPFlag.SYN, TCPFlag.ACK, TCPFlag.ACK | TCPFlag.PSH, TCPFlag.FIN | TCPFlag.ACK,
                            TCPFlag.RST))  # fmt: skip
        options = rng.choice((b"", b"", bytes.fromhex("020405b4"), bytes.fromhex("0101080a0000000100000002")))
        l4 = build_tcp(src, dst, sport, dport, seq=rng.randrange(1 << 32), ack=rng.randrange(1 << 32),
                       flags=int(flags), options=options, payload=payload)  # fmt: skip
    else:
        l4 = build_udp(src, dst, sport, dport, payload)
    if v6:
        ext = b""
        for _ in range(rng.choice((0, 0, 0, 1, 2, IPV6_EXT_MAX + 1))):  # destination options, then the next header
            ext = bytes((IPPROTO_DSTOPTS, 0)) + bytes(6) + ext
        if ext:
            ext = ext[:-8] + bytes((proto,)) + ext[-7:]
        first = IPPROTO_DSTOPTS if ext else proto
        return build_ipv6(src, dst, first, len(ext) + len(l4), hop_limit=rng.randrange(1, 256)) + ext + l4
    options = rng.choice((b"", b"", bytes((1, 1, 1, 0)), bytes([1] * 39 + [0])))
    return build_ipv4(src, dst, proto, len(l4), ttl=rng.randrange(1, 256), options=options) + l4


def base_set(rng: random.Random, captures: Sequence[bytes], *, flows: int = 48) -> Base:
    """The frames and packets one epoch is made from (the module docstring)."""
    base = Base()
    for _ in range(flows):
        v6 = rng.random() < 0.4
        proto = rng.choice((IPPROTO_TCP, IPPROTO_UDP))
        client, vip = _client(rng, v6), VIP6 if v6 else VIP4
        sport, dport = rng.randrange(1024, 65536), rng.choice((80, 443, 53, rng.randrange(1, 65536)))
        c2s = _c2s(rng)
        to_server = _flow_packet(rng, v6, proto, client, vip, sport, dport)
        to_client = _flow_packet(rng, v6, proto, vip, client, dport, sport)
        base.ingress[True].append(build_ethernet(HOST, LB, ETH_P_MPLS_UC) + _stack(rng, c2s) + to_server)
        base.ingress[False].append(build_ethernet(HOST, LB, ETH_P_MPLS_UC) + _stack(rng, c2s + 1)
                                   + to_client)  # fmt: skip
        base.egress[True].append(to_client)  # the server's host answers
        base.egress[False].append(to_server)  # the client's host sends
        if rng.random() < 0.25:  # ICMP errors about the flow: a router's on the client's side, the other host's
            router = _client(rng, v6)
            error = build_icmp_unreachable(router, vip, to_client[: rng.randrange(28, 120)], code=4 if not v6 else 0)
            base.ingress[True].append(build_ethernet(HOST, LB, ETH_P_MPLS_UC) + _stack(rng, c2s) + error)
            base.egress[True].append(build_icmp_unreachable(vip, client, to_server[:120], code=3))
            base.egress[False].append(build_icmp_unreachable(client, vip, to_client[:120], code=3))
    for frame in rng.sample(list(captures), min(len(captures), 64)):
        packet = packet_of(frame)
        for serving in (True, False):
            base.ingress[serving].append(frame)
            if packet is not None:
                mine = readdressed(packet, serving=serving)
                label = _c2s(rng) + (0 if serving else 1)
                base.ingress[serving].append(build_ethernet(HOST, LB, ETH_P_MPLS_UC) + _stack(rng, label)
                                             + mine)  # fmt: skip
                back = reversed_packet(mine)
                if back is not None:
                    base.egress[serving].append(back)
    return base


def _mutations(rng: random.Random, length: int) -> list[tuple[str, int, int]]:
    """One to three mutations, most where the datapaths read (the label entry, the IP header, the first octets of
    TCP or UDP), the others anywhere."""
    out = []
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(14, 14 + 4 + 60 + 16) if rng.random() < 0.8 else rng.randrange(max(length, 1))
        out.append((rng.choice(("flip", "flip", "set", "cut")), at, rng.randrange(256)))
    return out


@dataclass
class Report:
    seed: int
    frames: int
    seconds: float
    captures: str
    delivered: dict[str, int]
    labelled: dict[str, int]
    drops: dict[str, dict[str, int]]
    adopted: int
    documented: dict[str, int]
    epochs: int

    @property
    def rate(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        out = [
            f"seed {self.seed}: {self.frames:,} frames in {self.seconds:.1f} s = {self.rate:,.0f} frames/s "
            "(each through the kernel's program and the Python endpoint)",
            f"captures: {self.captures}",
            f"epochs {self.epochs:,}; documented differences: "
            + (", ".join(f"{k} {v:,}" for k, v in sorted(self.documented.items())) or "none")
            + f" (flows the kernel learnt or kept there, taken into the Python endpoint: {self.adopted:,})",
        ]
        for role in ("server", "client"):
            out.append(f"{role}: handed up {self.delivered[role]:,}, sent labelled {self.labelled[role]:,}; drops:")
            drops = sorted(self.drops[role].items(), key=lambda kv: -kv[1])
            out += [f"  {reason:<28} {count:>12,}" for reason, count in drops]
        out.append("other differences 0")
        return out


def campaign(
    frames: int,
    seed: int,
    *,
    captures: Path | None = SHARED_DATA,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Send ``frames`` hostile frames and packets through both datapaths of both roles; raise
    :class:`~mplslb.fuzz.Mismatch` at the first difference (root, clang: the programs are loaded)."""
    rng = random.Random(seed)
    capture, captures_note = capture_frames(captures, limit=4_000) if captures is not None else ([], "not asked for")
    with contextlib.ExitStack() as stack:
        kernels = [stack.enter_context(KernelEndpoint(role, mac=HOST, gateway_mac=LB, vips=[VIP4, VIP6]))
                   for role in ("server", "client")]  # fmt: skip
        pairs = {True: Pair(kernels[0], True), False: Pair(kernels[1], False)}
        epochs = 0
        started = last_report = time.perf_counter()
        schedule: list[tuple[bool, str, bytes]] = []  # what is sent next: (serving, way, frame or packet)
        for n in range(frames):
            if n % EPOCH == 0:
                for pair in pairs.values():
                    kernel, python = pair.flows()
                    if kernel != python:
                        raise Mismatch(f"seed {seed}, frame {n}: the {'server' if pair.serving else 'client'} "
                                       f"datapaths learnt different flows: {kernel} / {python}")  # fmt: skip
                    pair.restart()
                base, epochs = base_set(rng, capture), epochs + 1
                # the epoch's flows learnt first (each role's base frames from the wire, clean), so that its hosts'
                # packets, clean or mutated, meet known flows too
                schedule = [(serving, "ingress", frame) for serving in (True, False) for frame in base.ingress[serving]]
                schedule.reverse()
            if schedule:
                serving, way, data = schedule.pop()
            else:
                serving = rng.random() < 0.5
                way = "ingress" if rng.random() < 0.6 else "egress"
                original = rng.choice(base.ingress[serving] if way == "ingress" else base.egress[serving])
                data = original if rng.random() < 0.15 else mutate(original, _mutations(rng, len(original)))
            pair = pairs[serving]
            try:
                if way == "ingress":
                    pair.ingress(data)
                else:
                    pair.egress(data)
            except Mismatch as exc:
                role = "server" if serving else "client"
                raise Mismatch(f"seed {seed}, frame {n}, {role} {way}: {exc}; the frame: {data.hex()}") from None
            if progress is not None and time.perf_counter() - last_report > 10:
                last_report = time.perf_counter()
                progress(f"{n + 1:,} frames, {(n + 1) / (last_report - started):,.0f} frames/s")
        return Report(
            seed=seed,
            frames=frames,
            seconds=time.perf_counter() - started,
            captures=captures_note,
            delivered={"server": pairs[True].delivered, "client": pairs[False].delivered},
            labelled={"server": pairs[True].labelled, "client": pairs[False].labelled},
            drops={"server": dict(pairs[True].dropped), "client": dict(pairs[False].dropped)},
            adopted=pairs[True].adopted + pairs[False].adopted,
            documented=dict(pairs[True].differences + pairs[False].differences),
            epochs=epochs,
        )
