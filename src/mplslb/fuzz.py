"""The fuzz campaign: hostile frames through every path of the balancer, each path checked against the one-frame
path, every frame accounted for.

Theory of operation
-------------------
Four balancers start from one configuration and see the same frames at the same times:

* ``one``: :meth:`~mplslb.balancer.Balancer.receive`, frame by frame: the reference;
* ``batch``: :meth:`~mplslb.balancer.Balancer.receive_batch`, a chunk at a time;
* ``block``: :meth:`~mplslb.balancer.Balancer.receive_block`, the chunk laid in one buffer as a ring block holds
  it (:func:`pack`), its output listed in the one-frame path's order (:func:`listed`);
* ``kernel`` (when the XDP program can be loaded): each frame first through the XDP program
  (``BPF_PROG_TEST_RUN``, :meth:`~mplslb.offload.xdp.XdpOffload.run`), whose map follows the balancer's table;
  a redirected frame leaves by the port of its label's map entry as the program rewrote it, any other frame must
  be passed untouched and goes to the balancer's one-frame path. The map is synced after every frame userspace
  handled, so it always holds what the table holds; the kernel's counters are folded in at the end of each chunk.

Frames come in chunks of :data:`CHUNK`, all at one time ``now``; time moves :data:`STEP` per chunk and every
balancer's timers run at each chunk's end. The differential check: every path gives the same output frames, in
the same order, byte for byte, as ``one`` (the kernel path: frame by frame), and after every chunk the same
counters (``frames_in``, ``frames_out``, ``fast_path``, ``slow_path``, drops by reason, refusals, sessions,
labels; the kernel path's userspace figures plus what the program redirected; per-server traffic).

The accounting, checked for every path after every chunk (:func:`accounting_errors`), from
:meth:`~mplslb.balancer.Balancer.stats`: each frame in leaves at most once (checked frame by frame on ``one``),
and with ``refuse_with = "drop"`` (a refusal sends nothing) every frame in is exactly one of: sent (a switched
or analysed frame forwarded, an ARP or neighbour answer), dropped under a named reason, or refused::

    frames_in == frames_out + sum(drops.values()) + sum(refused.values())

and, by stage, every frame is either switched on its label, analysed, or dropped before analysis (by the
switching unit, or for an unknown port)::

    frames_in == fast_path + slow_path + sum(switching drops) + drops["unknown_port"]

The frames: every :data:`EPOCH` chunks a base set is built from the reference balancer's live sessions (labelled
frames each way with the session's real labels, MACs, ports and addresses, unlabelled frames of the session,
FIN and RST, ICMP errors), new sessions' SYNs and their servers' SYN-ACKs, ARP and neighbour solicitations, and
frames of real captures (``shared/data/pcap/{mpls,mpls-edge,plain}`` beside the checkout, when there). Each frame
of a chunk is a base frame sent clean or mutated: truncated, bits flipped, bytes set, its label replaced (a live
label, its pair, a neighbour, a reserved one), its MPLS TTL or bottom-of-stack bit changed, spliced with another,
sent on the wrong port, or replaced by random bytes (behind a real labelled header, or alone). Everything follows
from the seed: a failure names the seed, the chunk and the frame, and rerunning the seed replays it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mplslb.balancer import Balancer, BalancerStats, BlockResult, Frames
from mplslb.balancing.admission import RefuseWith
from mplslb.balancing.servers import ServerConfig
from mplslb.config import BalancerConfig, PortConfig, VirtualService
from mplslb.sessions import SessionState, Timeouts
from mplslb.wire.checksum import internet_checksum
from mplslb.wire.ethernet import ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, ETH_P_MPLS_UC, build_ethernet
from mplslb.wire.ip import IPPROTO_TCP, IPPROTO_UDP
from mplslb.wire.ipv4 import build_ipv4
from mplslb.wire.ipv6 import build_ipv6
from mplslb.wire.mpls import pack_entry
from mplslb.wire.pcap import LINKTYPE_ETHERNET, read_pcap
from mplslb.wire.tcp import TCPFlag, build_tcp
from mplslb.wire.udp import build_udp

CHUNK = 1024  # frames per chunk: one batch, one block
STEP = 1 / 32  # seconds of the balancers' clock per chunk (a binary fraction: timeouts fall on chunk times exactly)
EPOCH = 8  # chunks between two base sets
START = 1000.0
CAPTURE_DIRS = ("mpls", "mpls-edge", "plain")
MAX_FRAME = 1600  # what the XDP test run takes in one page, with room
#: Where the shared test data lies: ``shared/data`` beside the checkout (as the tests' ``shared_data`` fixture).
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"

if TYPE_CHECKING:
    from mplslb.offload.xdp import XdpOffload

SYN, ACK, FIN, RST, PSH = (int(f) for f in (TCPFlag.SYN, TCPFlag.ACK, TCPFlag.FIN, TCPFlag.RST, TCPFlag.PSH))


# == the frames' containers (shared with the tests) ====================================================================
def mutate(frame: bytes, mutations: Sequence[tuple[str, int, int]]) -> bytes:
    """Apply ``(kind, at, value)`` mutations: ``cut`` the frame at ``at``, ``flip`` bit ``value`` of byte ``at``,
    ``set`` byte ``at`` to ``value`` (positions taken modulo the length)."""
    buf = bytearray(frame)
    for kind, at, value in mutations:
        if not buf:
            break
        if kind == "cut":
            del buf[at % (len(buf) + 1) :]
        elif kind == "flip":
            buf[at % len(buf)] ^= 1 << (value % 8)
        else:
            buf[at % len(buf)] = value
    return bytes(buf)


def pack(
    frames: Sequence[tuple[int, bytes]], gap: int = 3, *, aligned: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lay frames in one buffer with a few bytes between them, as a ring block would; ``aligned`` puts each frame
    2 bytes past a 16-byte boundary, as TPACKET does (the block path's word-aligned variant)."""
    starts, lengths, ports, chunks, at = [], [], [], [], 0
    for port, frame in frames:
        if aligned:
            pad = (2 - at) % 16
            chunks.append(b"\xdd" * pad)
            at += pad
        starts.append(at)
        lengths.append(len(frame))
        ports.append(port)
        chunks.append(frame + b"\xee" * gap)
        at += len(frame) + gap
    raw = b"".join(chunks) or b"\0"
    raw += b"\0" * (-len(raw) % 4)
    buf = np.frombuffer(bytearray(raw), dtype=np.uint8).copy()
    return buf, np.array(starts, dtype=np.int64), np.array(lengths, dtype=np.int64), np.array(ports, dtype=np.int32)


def listed(result: BlockResult, buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> Frames:
    """The block path's output in the one-frame path's order: for each frame, the block's frame, then its extras."""
    extra: dict[int, list[tuple[int, bytes]]] = {}
    for i, port, frame in result.extra:
        extra.setdefault(i, []).append((port, frame))
    out: Frames = []
    for i in range(len(starts)):
        if result.out_port[i] >= 0:
            out.append((int(result.out_port[i]), buf[starts[i] : starts[i] + lengths[i]].tobytes()))
        out += extra.get(i, [])
    return out


# == the configuration: 2 client ports, 2 server ports, 3 servers, an IPv4 and an IPv6 virtual IP ======================
def _mac(kind: int, index: int) -> bytes:
    return bytes((0x02, kind, 0, 0, 0, index))


CLIENT_PORTS = (0, 1)
SERVER_PORTS = (2, 3)
UNKNOWN_PORT = 9
PORT_MAC = {p: _mac(0xB0, p) for p in (*CLIENT_PORTS, *SERVER_PORTS)}
VIP4 = bytes((10, 0, 0, 100))
VIP6 = bytes.fromhex("fd000000000000000000000000000100")
HTTP, DNS = 80, 53
CLIENTS = 16


def campaign_config() -> BalancerConfig:
    """The balancer every path runs: refusals send nothing (the accounting), room for a few thousand sessions."""
    ports = tuple(PortConfig(p, 0, p, PORT_MAC[p], "client", f"lc0/p{p}") for p in CLIENT_PORTS) + tuple(
        PortConfig(p, 1, p - 2, PORT_MAC[p], "server", f"lc1/p{p - 2}") for p in SERVER_PORTS
    )
    servers = tuple(
        ServerConfig(f"s{i + 1}", bytes((10, 2, 0, 11 + i)), _mac(0x5E, i + 1), port_id=SERVER_PORTS[i % 2])
        for i in range(3)
    )
    vips = (VirtualService(VIP4, (HTTP,), (DNS,)), VirtualService(VIP6, (HTTP,), (DNS,)))
    return BalancerConfig(
        ports=ports,
        vips=vips,
        servers=servers,
        refuse_with=RefuseWith.DROP,
        max_sessions=3000,
        label_quarantine=2.0,
        endpoint_flow_timeout=2.0,
        # Short lives, so a short campaign also sees sessions end (a close lingers before it is believed).
        timeouts=Timeouts(tcp_start=0.5, closed_linger=0.25),
    )


def client_mac(i: int) -> bytes:
    return _mac(0xC0, i)


def client_addr(i: int, v6: bool) -> bytes:
    if v6:
        return bytes.fromhex("fd000001000000000000000000000000")[:15] + bytes((i + 1,))
    return bytes((10, 1, 0, i + 1))


# == frames ============================================================================================================
def _ip(src: bytes, dst: bytes, proto: int, payload: bytes, ttl: int = 64) -> bytes:
    if len(src) == 16:
        return build_ipv6(src, dst, proto, len(payload), hop_limit=ttl) + payload
    return build_ipv4(src, dst, proto, len(payload), ttl=ttl) + payload


def _tcp(src: bytes, dst: bytes, sport: int, dport: int, flags: int, payload: bytes = b"", seq: int = 1) -> bytes:
    return _ip(src, dst, IPPROTO_TCP, build_tcp(src, dst, sport, dport, seq=seq, ack=1, flags=flags, payload=payload))


def _udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    return _ip(src, dst, IPPROTO_UDP, build_udp(src, dst, sport, dport, payload))


def _ether(dst: bytes, src: bytes, packet: bytes) -> bytes:
    return build_ethernet(dst, src, ETH_P_IPV6 if packet[0] >> 4 == 6 else ETH_P_IP) + packet


def _labelled(dst: bytes, src: bytes, label: int, packet: bytes) -> bytes:
    return build_ethernet(dst, src, ETH_P_MPLS_UC) + pack_entry(label, 0, True, 64) + packet


def _arp_request(port: int, i: int) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, 1, client_mac(i), client_addr(i, False), bytes(6), VIP4)
    return build_ethernet(b"\xff" * 6, client_mac(i), ETH_P_ARP) + body


def _neighbour_solicitation(i: int) -> bytes:
    src = client_addr(i, True)
    group = bytes.fromhex("ff0200000000000000000001ff000000")[:13] + VIP6[13:]
    message = bytearray(struct.pack("!BBHI", 135, 0, 0, 0) + VIP6 + b"\x01\x01" + client_mac(i))
    pseudo = src + group + struct.pack("!I", len(message)) + b"\x00\x00\x00\x3a"
    struct.pack_into("!H", message, 2, internet_checksum(pseudo + message))
    dst_mac = b"\x33\x33" + group[12:]
    return build_ethernet(dst_mac, client_mac(i), ETH_P_IPV6) + _ip(src, group, 58, bytes(message), ttl=255)


def _icmp_error(src: bytes, quoted: bytes) -> bytes:
    """An ICMPv4 destination unreachable from ``src`` quoting the head of a packet the virtual IP sent it."""
    message = bytearray(struct.pack("!BBHI", 3, 3, 0, 0) + quoted[:28])
    struct.pack_into("!H", message, 2, internet_checksum(message))
    return _ip(src, VIP4, 1, bytes(message))


def capture_frames(root: Path = SHARED_DATA, limit: int = 20_000) -> tuple[list[bytes], str]:
    """Up to ``limit`` Ethernet frames of the real captures (a spread over every file), and a line saying what was
    read or why nothing was."""
    pcaps = root / "pcap"
    if not pcaps.is_dir():
        return [], f"no captures: {pcaps} not found (shared/data is expected beside the checkout); running without"
    files = sorted(p for d in CAPTURE_DIRS if (pcaps / d).is_dir() for p in (pcaps / d).iterdir() if p.is_file())
    per_file: list[list[bytes]] = []
    for path in files:
        frames = [
            r.data
            for r in itertools.islice(read_pcap(path), 50_000)
            if r.linktype == LINKTYPE_ETHERNET and 0 < len(r.data) <= MAX_FRAME
        ]
        per_file.append(frames)
    share = max(1, limit // max(1, len(per_file)))
    out = [f for frames in per_file for f in frames[:: max(1, len(frames) // share)][:share]]
    return out, f"{len(out)} frames of {len(files)} captures under {pcaps}"


@dataclass
class Base:
    """The base set of one epoch: frames to send as they are or mutated, and the labels that are live."""

    frames: list[tuple[int, bytes]] = field(default_factory=list)
    labelled: list[tuple[int, bytes]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


def base_set(b: Balancer, rng: random.Random, *, sessions: int = 64, new: int = 24) -> Base:
    """Frames of (a sample of) ``b``'s live sessions with their real labels, and new sessions' first frames."""
    base = Base()
    live = [s for s in b.live_sessions() if s.state not in (SessionState.CLOSED, SessionState.INTERRUPTED)]
    for s in rng.sample(live, min(sessions, len(live))):
        key, server = s.key, s.server.config
        port, cmac, c2s = s.client_port, s.client_mac, s.c2s
        smac, sport = server.mac, server.port_id
        v6 = len(key.src) == 16
        if key.proto == IPPROTO_TCP:
            request = b"GET /x HTTP/1.1\r\nHost: fuzz%d\r\n\r\n" % rng.randrange(9)
            up = _tcp(key.src, key.dst, key.sport, key.dport, ACK | PSH, request, seq=2)
            down = _tcp(key.dst, key.src, key.dport, key.sport, ACK | PSH, b"HTTP/1.1 200 OK\r\n\r\nhi", seq=2)
            if s.state is SessionState.START:
                answer = _tcp(key.dst, key.src, key.dport, key.sport, SYN | ACK)
                base.frames.append((sport, _labelled(PORT_MAC[sport], smac, c2s + 1, answer)))
            ends = [
                (port, _labelled(PORT_MAC[port], cmac, c2s, _tcp(key.src, key.dst, key.sport, key.dport, FIN | ACK))),
                (sport, _labelled(PORT_MAC[sport], smac, c2s + 1, _tcp(key.dst, key.src, key.dport, key.sport, RST))),
                (port, _ether(PORT_MAC[port], cmac, _tcp(key.src, key.dst, key.sport, key.dport, RST))),
            ]
            base.frames.append(rng.choice(ends))
        else:
            up = _udp(key.src, key.dst, key.sport, key.dport, b"query")
            down = _udp(key.dst, key.src, key.dport, key.sport, b"answer")
        for frame in (
            (port, _labelled(PORT_MAC[port], cmac, c2s, up)),
            (sport, _labelled(PORT_MAC[sport], smac, c2s + 1, down)),
        ):
            base.frames.append(frame)
            base.labelled.append(frame)
        base.frames.append((port, _ether(PORT_MAC[port], cmac, up)))
        base.frames.append((sport, _ether(PORT_MAC[sport], smac, down)))
        if not v6:
            base.frames.append((port, _ether(PORT_MAC[port], cmac, _icmp_error(key.src, down))))
        base.labels += [c2s, c2s + 1]
    for _ in range(new):
        i, v6 = rng.randrange(CLIENTS), rng.random() < 0.3
        src, vip = client_addr(i, v6), VIP6 if v6 else VIP4
        port = CLIENT_PORTS[i % 2]
        if rng.random() < 0.8:
            packet = _tcp(src, vip, rng.randrange(1024, 65536), HTTP, SYN, seq=rng.randrange(1 << 32))
        else:
            packet = _udp(src, vip, rng.randrange(1024, 65536), DNS, b"query")
        base.frames.append((port, _ether(PORT_MAC[port], client_mac(i), packet)))
    i = rng.randrange(CLIENTS)
    base.frames.append((CLIENT_PORTS[i % 2], _arp_request(CLIENT_PORTS[i % 2], i)))
    base.frames.append((CLIENT_PORTS[i % 2], _neighbour_solicitation(i)))
    return base


class Mutator:
    """Hostile frames from a base set and the captures, deterministic from ``rng``."""

    KINDS = ("clean", "cut", "flip", "set", "label", "mpls", "splice", "port", "tail", "random")
    WEIGHTS = (12, 12, 20, 8, 14, 6, 6, 6, 10, 6)

    def __init__(self, rng: random.Random, captures: Sequence[bytes]) -> None:
        self.rng = rng
        self.captures = captures
        self.kinds: Counter[str] = Counter()

    def frames(self, base: Base, n: int) -> list[tuple[int, bytes]]:
        rng = self.rng
        kinds = rng.choices(self.KINDS, self.WEIGHTS, k=n)
        out = []
        for kind in kinds:
            if self.captures and rng.random() < 0.2:
                port, frame = rng.choice((0, 1, 2, 3)), rng.choice(self.captures)
            else:
                port, frame = rng.choice(base.frames)
            on_label = kind in ("label", "mpls", "tail") or (kind in ("clean", "flip") and rng.random() < 0.5)
            if base.labelled and on_label:
                port, frame = rng.choice(base.labelled)
            out.append(self._mutated(kind, port, frame, base))
            self.kinds[kind] += 1
        return out

    def _mutated(self, kind: str, port: int, frame: bytes, base: Base) -> tuple[int, bytes]:
        rng = self.rng
        n = len(frame)
        if kind == "clean" or n == 0:
            return port, frame
        if kind == "cut":
            return port, frame[: rng.randrange(n)]
        if kind == "flip":
            buf = bytearray(frame)
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(min(n, 80)) if rng.random() < 0.8 else rng.randrange(n)
                buf[at] ^= 1 << rng.randrange(8)
            return port, bytes(buf)
        if kind == "set":
            buf = bytearray(frame)
            for _ in range(rng.randint(1, 3)):
                buf[rng.randrange(min(n, 64))] = rng.choice((0, 0xFF, rng.randrange(256)))
            return port, bytes(buf)
        if kind == "label" and n >= 18:
            pick = rng.random()
            label = rng.choice(base.labels) if base.labels else 16
            if pick < 0.3:
                label ^= 1  # the session's other direction
            elif pick < 0.5:
                label += rng.choice((-2, 2, 4))
            elif pick < 0.6:
                label = rng.randrange(16)  # reserved
            elif pick < 0.8:
                label = rng.randrange(1 << 20)
            entry = struct.unpack_from("!I", frame, 14)[0]
            return port, frame[:14] + struct.pack("!I", (entry & 0xFFF) | (label % (1 << 20)) << 12) + frame[18:]
        if kind == "mpls" and n >= 18:
            entry = struct.unpack_from("!I", frame, 14)[0]
            entry = rng.choice((entry & ~0xFF | rng.choice((0, 1, 2, 255)), entry ^ 0x100, entry ^ (7 << 9)))
            return port, frame[:14] + struct.pack("!I", entry) + frame[18:]
        if kind == "splice":
            _, other = rng.choice(base.frames)
            return port, frame[: rng.randrange(n)] + other[rng.randrange(len(other) or 1) :]
        if kind == "port":
            return rng.choice((0, 1, 2, 3, 0, 2, UNKNOWN_PORT)), frame
        if kind == "tail" and n >= 18:
            return port, frame[: rng.randrange(18, max(19, min(n, 60)))] + rng.randbytes(rng.randrange(80))
        return rng.choice((0, 1, 2, 3)), rng.randbytes(rng.randrange(100))


# == the paths =========================================================================================================
class Mismatch(AssertionError):
    """A path disagreed with the one-frame path, raised, or a frame was not accounted for."""


def _counters(s: BalancerStats) -> dict[str, object]:
    return {
        "frames_in": s.frames_in,
        "frames_out": s.frames_out,
        "fast_path": s.fast_path,
        "slow_path": s.slow_path,
        "drops": {k: v for k, v in s.drops.items() if v},
        "refused": s.refused,
        "sessions_active": s.sessions_active,
        "sessions_started": s.sessions_started,
        "sessions_ended": s.sessions_ended,
        "labels": s.labels,
        "labels_installed": s.labels_installed,
        "neighbor_replies": s.neighbor_replies,
    }


def _traffic(s: BalancerStats) -> list[tuple[object, ...]]:
    return [(r.name, r.status, r.active, r.total, r.packets_in, r.packets_out, r.bytes_in, r.bytes_out)
            for r in s.servers]  # fmt: skip


def accounting_errors(b: Balancer, s: BalancerStats | None = None, redirected: int = 0) -> list[str]:
    """Where ``b``'s figures (``s``, its stats if already taken) fail to account for every frame (see the module's
    docstring); ``redirected`` frames were switched by the kernel and never reached ``b``."""
    s = s or b.stats()
    frames_in = s.frames_in + redirected
    errors = []
    sent = s.frames_out + redirected + sum(s.drops.values()) + sum(s.refused.values())
    if frames_in != sent:
        errors.append(f"frames_in {frames_in} != frames_out + drops + refused = {sent}")
    staged = s.fast_path + redirected + s.slow_path + sum(b.switching.drops.values()) + b.drops.get("unknown_port", 0)
    if frames_in != staged:
        errors.append(f"frames_in {frames_in} != fast_path + slow_path + switching drops + unknown_port = {staged}")
    return errors


@dataclass
class Kernel:
    """The XDP path: a balancer whose table the program's map follows."""

    balancer: Balancer
    offload: XdpOffload
    port_of: dict[int, int]  # ifindex -> port id
    redirected: int = 0
    short: int = 0  # frames not run in the kernel (shorter than an Ethernet header, or an unknown port)
    uncounted: int = 0  # redirected frames whose map counters were lost with their entry before a poll


@contextlib.contextmanager
def kernel_path(config: BalancerConfig, clock: Callable[[], float]) -> Iterator[Kernel | str]:
    """A throwaway namespace with one veth per port and the XDP program attached to them; yields the kernel path,
    or why it cannot run here. The namespace is deleted by name on the way out."""
    if os.geteuid() != 0:
        yield "needs root (bpf(2), a namespace, veth pairs)"
        return
    from pyroute2 import IPRoute, netns

    from mplslb.drivers.netns import entered
    from mplslb.offload.xdp import OffloadError, XdpOffload

    name = f"mlbfz{os.getpid() % 100000}"
    ports = [p.port_id for p in config.ports]
    balancer = Balancer(config)
    offload: XdpOffload | None = None
    try:
        netns.create(name)
        with entered(name):
            with IPRoute() as ipr:
                for p in ports:
                    ipr.link("add", ifname=f"p{p}", kind="veth", peer={"ifname": f"e{p}"})
                    for ifname in (f"p{p}", f"e{p}"):
                        ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")
            offload = XdpOffload(balancer.switching, {p: f"p{p}" for p in ports}, mode="generic", clock=clock)
            try:
                offload.open()
            except OffloadError as exc:
                offload = None
                yield f"the XDP program cannot be loaded: {exc}"
                return
            yield Kernel(balancer, offload, {index: p for p, index in offload.ifindex.items()})
    finally:
        if offload is not None:
            with entered(name):
                offload.close()
        if name in netns.listnetns():
            netns.remove(name)


class Paths:
    """The four balancers and the checks between them."""

    def __init__(self, config: BalancerConfig, kernel: Kernel | None) -> None:
        self.one = Balancer(config)
        self.batch = Balancer(config)
        self.block = Balancer(config)
        self.kernel = kernel
        self.chunks = 0
        self.aligned = False

    def balancers(self) -> list[Balancer]:
        return [self.one, self.batch, self.block] + ([self.kernel.balancer] if self.kernel else [])

    def run(self, frames: list[tuple[int, bytes]], now: float) -> None:
        """One chunk through every path, then the timers, then the checks."""
        where = f"chunk {self.chunks}"
        per_frame: list[Frames] = []
        for i, (port, frame) in enumerate(frames):
            try:
                out = self.one.receive(port, frame, now)
            except Exception as exc:
                raise Mismatch(f"{where} frame {i}: receive raised {exc!r} on port {port}: {frame.hex()}") from exc
            if len(out) > 1:
                raise Mismatch(f"{where} frame {i}: {len(out)} frames out of one: {frame.hex()}")
            per_frame.append(out)
        expected = [f for out in per_frame for f in out]
        try:
            got = self.batch.receive_batch(frames, now)
        except Exception as exc:
            raise Mismatch(f"{where}: receive_batch raised {exc!r}") from exc
        self._same("receive_batch", where, got, expected, per_frame, frames)
        self.aligned = not self.aligned
        buf, starts, lengths, ports = pack(frames, aligned=self.aligned)
        try:
            got = listed(self.block.receive_block(buf, starts, lengths, ports, now), buf, starts, lengths)
        except Exception as exc:
            raise Mismatch(f"{where}: receive_block raised {exc!r}") from exc
        self._same("receive_block", where, got, expected, per_frame, frames)
        if self.kernel is not None:
            self._kernel(frames, per_frame, now, where)
        for b in self.balancers():
            b.on_timer(now)
        if self.kernel is not None:
            self.kernel.offload.sync()
        self._check(where)
        self.chunks += 1

    def _kernel(self, frames: list[tuple[int, bytes]], per_frame: list[Frames], now: float, where: str) -> None:
        from mplslb.offload import bpf

        k = self.kernel
        assert k is not None
        offload = k.offload
        b = k.balancer
        redirected: list[int] = []
        for i, (port, frame) in enumerate(frames):
            offload.sync()
            run = None
            if port in offload.ifindex and len(frame) >= 14:
                try:
                    run = offload.run(frame, port)
                except OSError as exc:
                    raise Mismatch(f"{where} frame {i}: the test run failed ({exc}): {frame.hex()}") from exc
            else:
                k.short += 1
            if run is not None and run.retval == bpf.XDP_REDIRECT:
                label = struct.unpack_from("!I", frame, 18 if frame[12:14] == b"\x81\x00" else 14)[0] >> 12
                entry = offload.lookup(label)
                got = [(k.port_of.get(entry[0], -1) if entry else -1, run.data)]
                k.redirected += 1
                redirected.append(label)
            elif run is not None and run.retval != bpf.XDP_PASS:
                raise Mismatch(f"{where} frame {i}: XDP verdict {run.retval}, neither redirect nor pass: {frame.hex()}")
            else:
                if run is not None and run.data != frame:
                    raise Mismatch(f"{where} frame {i}: XDP passed a frame it changed: {frame.hex()}")
                try:
                    got = b.receive(port, frame, now)
                except Exception as exc:
                    raise Mismatch(f"{where} frame {i}: receive (kernel path) raised {exc!r}: {frame.hex()}") from exc
            if got != per_frame[i]:
                raise Mismatch(
                    f"{where} frame {i} on port {port}: kernel path sent {got!r}, one-frame path {per_frame[i]!r}: "
                    f"{frame.hex()}"
                )
        offload.poll()
        # The program stamps frames with the kernel's real clock, mapped to the table's clock at the poll; the
        # campaign's clock stands still through a chunk, so every frame of it was seen at ``now``, which the
        # other paths recorded (a slow chunk would otherwise age the kernel's frames by its real duration).
        if redirected:
            last_seen = b.switching.arrays().last_seen
            labels = np.array(redirected, dtype=np.intp)
            last_seen[labels] = np.maximum(last_seen[labels], now)

    @staticmethod
    def _same(
        path: str, where: str, got: Frames, expected: Frames, per_frame: list[Frames], frames: list[tuple[int, bytes]]
    ) -> None:
        if got == expected:
            return
        pairs = enumerate(zip(got, expected, strict=False))
        at = next((j for j, (a, e) in pairs if a != e), min(len(got), len(expected)))
        sent = list(itertools.accumulate(len(out) for out in per_frame))
        i = next((j for j, total in enumerate(sent) if total > at), len(frames) - 1)
        raise Mismatch(
            f"{where}: {path} sent {len(got)} frames, the one-frame path {len(expected)}; first difference at output "
            f"{at}, input frame {i} (port {frames[i][0]}): {frames[i][1].hex()}"
        )

    def _check(self, where: str) -> None:
        reference = self.one.stats()
        want, traffic = _counters(reference), _traffic(reference)
        checked = [("receive", self.one, reference, 0)]
        for name, b in (("receive_batch", self.batch), ("receive_block", self.block)):
            s = b.stats()
            got = _counters(s)
            if got != want:
                diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
                raise Mismatch(f"{where}: {name}'s counters differ from the one-frame path's (got, want): {diff}")
            if _traffic(s) != traffic:
                raise Mismatch(f"{where}: {name}'s per-server figures differ: {_traffic(s)}, one-frame path {traffic}")
            checked.append((name, b, s, 0))
        if self.kernel is not None:
            k = self.kernel
            s = k.balancer.stats()
            got = _counters(s)
            for key in ("frames_in", "frames_out", "fast_path"):
                got[key] = int(got[key]) + k.redirected  # type: ignore[call-overload]
            if got != want:
                diff = {key: (got[key], want[key]) for key in want if got[key] != want[key]}
                raise Mismatch(f"{where}: the kernel path's counters differ from the one-frame path's: {diff}")
            # The map's counters of a label are lost when its entry is deleted or rewritten before the next poll
            # (a session that ends between two polls): they may fall short of what the program redirected, never
            # exceed it; the per-server traffic likewise.
            kernel_packets = int(k.offload.stats()["kernel_packets"])
            if kernel_packets > k.redirected:
                raise Mismatch(f"{where}: the map counted {kernel_packets} frames, the program {k.redirected}")
            k.uncounted = k.redirected - kernel_packets
            for mine, theirs in zip(_traffic(s), traffic, strict=True):
                if mine[:4] != theirs[:4] or any(a > b for a, b in zip(mine[4:], theirs[4:], strict=True)):  # type: ignore[operator]
                    raise Mismatch(f"{where}: per-server figures differ: kernel {mine}, one-frame path {theirs}")
            checked.append(("kernel", k.balancer, s, k.redirected))
        for name, b, s, redirected in checked:
            errors = accounting_errors(b, s, redirected)
            if errors:
                raise Mismatch(f"{where}: {name}: frames not accounted for: {'; '.join(errors)}")


# == the campaign ======================================================================================================
@dataclass
class Report:
    seed: int
    frames: int
    seconds: float
    kernel: str  # "yes" or why not
    captures: str
    stats: BalancerStats
    kinds: dict[str, int]
    redirected: int
    uncounted: int
    not_run: int

    @property
    def rate(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        s = self.stats
        out = [
            f"seed {self.seed}: {self.frames:,} frames in {self.seconds:.1f} s = {self.rate:,.0f} frames/s "
            "(each through every path)",
            f"paths: receive, receive_batch, receive_block, XDP program: {self.kernel}",
            f"captures: {self.captures}",
            "mutations: " + ", ".join(f"{k} {v:,}" for k, v in sorted(self.kinds.items())),
            f"frames_in {s.frames_in:,} = frames_out {s.frames_out:,} + dropped {sum(s.drops.values()):,} + "
            f"refused {sum(s.refused.values()):,}",
            f"fast path {s.fast_path:,} (XDP redirected {self.redirected:,}), slow path {s.slow_path:,}, "
            f"ARP/ND answers {s.neighbor_replies:,}",
            f"XDP path: frames not run in the program (under 14 bytes, or an unknown port: userspace only) "
            f"{self.not_run:,}; redirected frames whose map counters went with their entry before a poll "
            f"{self.uncounted:,}",
            f"sessions started {s.sessions_started:,}, live {s.sessions_active:,}, ended "
            + ", ".join(f"{k} {v:,}" for k, v in sorted(s.sessions_ended.items())),
            "refused: " + (", ".join(f"{k} {v:,}" for k, v in sorted(s.refused.items())) or "none"),
            "drops by reason:",
        ]
        out += [f"  {reason:<28} {count:>12,}" for reason, count in sorted(s.drops.items(), key=lambda kv: -kv[1])]
        out.append("exceptions 0, differences 0, unaccounted frames 0")
        return out


def campaign(
    frames: int,
    seed: int,
    *,
    captures: Path | None = SHARED_DATA,
    kernel: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Send ``frames`` hostile frames through every path; raise :class:`Mismatch` at the first difference."""
    rng = random.Random(seed)
    capture, captures_note = capture_frames(captures) if captures is not None else ([], "not asked for")
    config = campaign_config()
    clock = [START]
    with contextlib.ExitStack() as stack:
        k: Kernel | str = "not asked for"
        if kernel:
            k = stack.enter_context(kernel_path(config, lambda: clock[0]))  # the thread is in its namespace
        paths = Paths(config, k if isinstance(k, Kernel) else None)
        mutator = Mutator(rng, capture)
        base = Base()
        started = time.perf_counter()
        done = 0
        last_report = started
        while done < frames:
            now = START + paths.chunks * STEP
            clock[0] = now
            if paths.chunks % EPOCH == 0 or not base.frames:
                base = base_set(paths.one, rng)
                for b in paths.balancers():  # the control plane brings back servers the frames took down
                    for server in b.pool:
                        if not server.in_service:
                            b.mark_up(server.config.name)
            n = min(CHUNK, frames - done)
            paths.run(mutator.frames(base, n), now)
            done += n
            if progress is not None and time.perf_counter() - last_report > 10:
                last_report = time.perf_counter()
                rate = done / (last_report - started)
                progress(f"{done:,} frames, {rate:,.0f} frames/s, live sessions {paths.one.live}")
        seconds = time.perf_counter() - started
        return Report(
            seed=seed,
            frames=done,
            seconds=seconds,
            kernel="yes" if isinstance(k, Kernel) else f"skipped: {k}",
            captures=captures_note,
            stats=paths.one.stats(),
            kinds=dict(mutator.kinds),
            redirected=k.redirected if isinstance(k, Kernel) else 0,
            uncounted=k.uncounted if isinstance(k, Kernel) else 0,
            not_run=k.short if isinstance(k, Kernel) else 0,
        )


__all__ = ["CHUNK", "SHARED_DATA", "Mismatch", "Report", "campaign", "listed", "mutate", "pack"]
