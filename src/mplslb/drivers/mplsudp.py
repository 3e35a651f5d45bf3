"""MPLS-in-UDP (RFC 7510): label stacks carried over routed IP to UDP port 6635, shown to the core as an Ethernet
port.

Theory of operation
-------------------
The core switches Ethernet frames and binds labels to (port, peer MAC). Here the peer is an outer IP address, so
each peer gets a stable pseudo-MAC derived from its address (:func:`pseudo_mac`: 0x02, then 5 bytes of a hash), and
a datagram becomes the frame ``port MAC | peer pseudo-MAC | 0x8847 | label stack + packet``. On the way back the
frame's destination pseudo-MAC names the peer; the frame's label stack and packet are sent to ``(peer, 6635)``.

A session's first packet carries no session label yet. Across routed IP it travels with a single IPv4 or IPv6
Explicit NULL entry (label 0 or 2, S=1), and is shown to the core as the unlabelled IP frame it stands for; an
unlabelled IP frame from the core is sent the same way.

The UDP source port carries flow entropy (RFC 7510 section 3), per session rather than per label direction: frames
leave from a pool of sockets bound to the pool's canonical ports ``ENTROPY_PORT_BASE + i`` (above Linux's ephemeral
range, inside RFC 7510's 49152-65535), socket ``i`` picked by a symmetric hash of the inner packet's flow (the
protocol and the two address/port ends in sorted order, under whatever labels; :func:`flow_hash`). A session's
client-to-VIP frames and its server-to-client frames, labelled or not, are one flow read in two directions, so every
sender (client agent, server agent, balancer) with the canonical pool sends them from the same UDP source port; a
router hashing only on ports and protocol then sends both directions of a session to one balancer node while its
ECMP set is stable. A canonical port already taken falls back to a random one in the range (:attr:`symmetric`
says whether the pool is canonical). A payload with no IP packet under its labels is hashed by its top label.

Malformed datagrams and frames that cannot be sent are counted in ``drops`` under a named reason, never raised.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import ipaddress
import random
import socket
import sys
import zlib
from collections.abc import Iterable
from typing import Self

from mplslb.drivers.afpacket import set_receive_buffer
from mplslb.drivers.netns import entered
from mplslb.wire.errors import WireError
from mplslb.wire.ethernet import ETH_ALEN, ETH_P_IP, ETH_P_IPV6, ETH_P_MPLS_UC, parse_ethernet
from mplslb.wire.ipv4 import IPV4_HLEN
from mplslb.wire.ipv6 import IPV6_HLEN
from mplslb.wire.mpls import (
    ENTRY,
    LABEL_SHIFT,
    MAX_STACK_DEPTH,
    MPLS_ENTRY_LEN,
    MPLS_UDP_PORT,
    S_BIT,
    ReservedLabel,
    pack_entry,
    parse_stack,
    payload_version,
)
from mplslb.wire.udp import UDP_HLEN

ENTROPY_PORT_MIN = 49152  # RFC 7510 section 3: the dynamic/private range
ENTROPY_PORT_MAX = 65535
#: The pool's canonical source ports start here: above Linux's default ephemeral range (32768-60999), so every
#: sender's socket ``i`` has the same port and a flow leaves every sender from the same port.
ENTROPY_PORT_BASE = 61440
DEFAULT_POOL_SIZE = 16
DEFAULT_TTL = 64
DEFAULT_MAX_PEERS = 65536
PSEUDO_MAC_FIRST = 0x02  # locally administered, unicast
_PSEUDO_MAC_PERSON = b"mplslb-pseudomac"
_BIND_ATTEMPTS = 64  # per pool socket
_POOL_RCVBUF = 4096  # nothing is expected on the pool's sockets
MAX_DATAGRAM = 1 << 16
#: With SO_RXQ_OVFL each datagram read carries the socket's count of datagrams the kernel dropped because the
#: receive buffer was full (``asm-generic/socket.h``; the socket module does not name it).
SO_RXQ_OVFL = 40
_OVFL_ANCILLARY = socket.CMSG_SPACE(4)
_HASH_MULTIPLIER = 0x9E3779B1  # Fibonacci hashing spreads consecutive labels over the pool
_ETHERTYPE = {4: ETH_P_IP.to_bytes(2, "big"), 6: ETH_P_IPV6.to_bytes(2, "big")}
_MPLS_ETHERTYPE = ETH_P_MPLS_UC.to_bytes(2, "big")
_NULL_FOR_VERSION = {4: ReservedLabel.IPV4_EXPLICIT_NULL, 6: ReservedLabel.IPV6_EXPLICIT_NULL}
_VERSION_FOR_NULL = {int(v): k for k, v in _NULL_FOR_VERSION.items()}
_NULL_FOR_ETHERTYPE = {ETH_P_IP: ReservedLabel.IPV4_EXPLICIT_NULL, ETH_P_IPV6: ReservedLabel.IPV6_EXPLICIT_NULL}
_PORTED = frozenset({6, 17, 132, 136})  # TCP, UDP, SCTP, UDP-Lite: the two ports lead their header
_V4_MAPPED = bytes(10) + b"\xff\xff"


@functools.lru_cache(maxsize=4096)
def pseudo_mac(addr: bytes) -> bytes:
    """The stable pseudo-MAC that stands for the peer at outer IP ``addr`` (4 or 16 bytes)."""
    if len(addr) not in (4, 16):
        raise ValueError(f"an IP address is 4 or 16 bytes, got {len(addr)}")
    digest = hashlib.blake2b(addr, digest_size=ETH_ALEN - 1, person=_PSEUDO_MAC_PERSON).digest()
    return bytes((PSEUDO_MAC_FIRST,)) + digest


def overhead(address: str) -> int:
    """Bytes the encapsulation adds to an IP packet sent from local ``address``: the outer IP header (IPv4 or IPv6,
    as ``address`` is, like the sockets), the UDP header and one label entry. A packet longer than the path MTU less
    this leaves as IP fragments, and a router that balances by ports (ECMP) sends the fragments, which have none, to
    another node than the session's."""
    outer = IPV6_HLEN if ipaddress.ip_address(address).version == 6 else IPV4_HLEN
    return outer + UDP_HLEN + MPLS_ENTRY_LEN


def encapsulate(frame: bytes | memoryview, ttl: int = DEFAULT_TTL) -> bytes | None:
    """The UDP payload for an Ethernet frame from the core: the label stack and packet of an MPLS frame, or an
    unlabelled IP packet under an Explicit NULL entry (S=1, ``ttl``). None for anything else."""
    try:
        eth = parse_ethernet(frame)
    except WireError:
        return None
    payload = bytes(frame[eth.payload_offset :])
    if eth.ethertype == ETH_P_MPLS_UC:
        return payload if len(payload) >= MPLS_ENTRY_LEN else None
    null = _NULL_FOR_ETHERTYPE.get(eth.ethertype)
    if null is None or not payload:
        return None
    return pack_entry(null, 0, True, ttl) + payload


def decapsulate(
    payload: bytes | memoryview, peer_addr: bytes, port_mac: bytes, drops: dict[str, int] | None = None
) -> bytes | None:
    """The Ethernet frame for the core from a datagram ``payload`` sent by ``peer_addr`` to the port whose MAC is
    ``port_mac``; None when the payload is malformed, with the reason counted in ``drops`` if given."""
    return _decapsulate(payload, pseudo_mac(peer_addr), port_mac, drops)


def _decapsulate(
    payload: bytes | memoryview, peer_mac: bytes, port_mac: bytes, drops: dict[str, int] | None
) -> bytes | None:
    reason = None
    if not payload:
        reason = "udp_empty"
    else:
        try:
            entries, end = parse_stack(payload)
        except WireError as exc:
            reason = exc.reason
        else:
            if len(entries) == 1 and entries[0].label in _VERSION_FOR_NULL:
                version = _VERSION_FOR_NULL[entries[0].label]
                if payload_version(payload, end) == version:
                    return port_mac + peer_mac + _ETHERTYPE[version] + bytes(payload[end:])
                reason = "udp_null_not_ip"
            else:
                return port_mac + peer_mac + _MPLS_ETHERTYPE + bytes(payload)
    if drops is not None:
        drops[reason] = drops.get(reason, 0) + 1
    return None


def flow_hash(payload: bytes | memoryview) -> int | None:
    """A symmetric 32-bit hash of the flow of the IP packet under ``payload``'s label stack: the protocol and the two
    (address, port) ends in sorted order (the addresses only for a fragment or a protocol without ports), so a flow
    and its reverse hash alike. None when no IPv4 or IPv6 packet sits under the stack."""
    end = 0
    n = len(payload)
    for _ in range(MAX_STACK_DEPTH):
        if end + MPLS_ENTRY_LEN > n:
            return None
        entry = ENTRY.unpack_from(payload, end)[0]
        end += MPLS_ENTRY_LEN
        if entry & S_BIT:
            break
    else:
        return None
    if end >= n:
        return None
    version = payload[end] >> 4
    if version == 4 and n >= end + 20:
        header = (payload[end] & 0x0F) * 4
        proto = payload[end + 9]
        src, dst = bytes(payload[end + 12 : end + 16]), bytes(payload[end + 16 : end + 20])
        fragment = int.from_bytes(payload[end + 6 : end + 8], "big") & 0x3FFF
        ports_at = end + header if not fragment and header >= 20 else -1
    elif version == 6 and n >= end + 40:
        proto = payload[end + 6]
        src, dst = bytes(payload[end + 8 : end + 24]), bytes(payload[end + 24 : end + 40])
        ports_at = end + 40
    else:
        return None
    if proto in _PORTED and ports_at >= 0 and n >= ports_at + 4:
        src += bytes(payload[ports_at : ports_at + 2])
        dst += bytes(payload[ports_at + 2 : ports_at + 4])
    low, high = (src, dst) if src <= dst else (dst, src)
    return zlib.crc32(high, zlib.crc32(low + bytes((proto,))))


def entropy_index(payload: bytes | memoryview, pool_size: int) -> int:
    """Which of ``pool_size`` source sockets carries ``payload``: by the symmetric hash of its inner flow
    (:func:`flow_hash`), or by its top label when it carries no IP packet, so a session keeps one UDP source port
    in both directions."""
    key = flow_hash(payload)
    if key is None:
        key = ENTRY.unpack_from(payload)[0] >> LABEL_SHIFT
    return ((key * _HASH_MULTIPLIER) & 0xFFFFFFFF) * pool_size >> 32


def _packed(addr: str | bytes) -> bytes:
    """An address as 4 or 16 bytes; an IPv4-mapped IPv6 address becomes its IPv4 address."""
    packed = addr if isinstance(addr, bytes) else ipaddress.ip_address(addr).packed
    if len(packed) not in (4, 16):
        raise ValueError(f"an IP address is 4 or 16 bytes, got {len(packed)}")
    return packed[len(_V4_MAPPED) :] if len(packed) == 16 and packed.startswith(_V4_MAPPED) else packed


class MplsUdpPort:
    """An Ethernet port for the core whose wire is MPLS-in-UDP.

    Datagrams are received on ``(address, port)``; ``address`` ``"::"`` takes IPv4 and IPv6 on one socket. Peers
    are learned from the datagrams that arrive (at most ``max_peers``), or, with ``learn=False``, only the
    configured ``peers`` are heard. Frames go to ``(peer, remote_port)`` from one of ``pool_size`` sockets bound to
    source ports in ``entropy_ports``. ``rcvbuf``: the receiving socket's buffer in bytes (None: the system's
    default, about 200 datagrams of a veth's small frames); what does not fit is counted as
    ``udp_receive_buffer_full``.
    """

    def __init__(
        self,
        mac: bytes,
        *,
        address: str = "0.0.0.0",
        port: int = MPLS_UDP_PORT,
        remote_port: int = MPLS_UDP_PORT,
        peers: Iterable[str | bytes] = (),
        learn: bool = True,
        pool_size: int = DEFAULT_POOL_SIZE,
        entropy_ports: tuple[int, int] = (ENTROPY_PORT_MIN, ENTROPY_PORT_MAX),
        ttl: int = DEFAULT_TTL,
        max_peers: int = DEFAULT_MAX_PEERS,
        netns: str | None = None,
        rcvbuf: int | None = None,
    ) -> None:
        if len(mac) != ETH_ALEN:
            raise ValueError("mac must be 6 bytes")
        low, high = entropy_ports
        if not 0 < low <= high <= ENTROPY_PORT_MAX or high - low + 1 < pool_size or pool_size < 1:
            raise ValueError(f"entropy_ports {entropy_ports} must hold pool_size ({pool_size}) ports")
        self.mac = bytes(mac)
        self.remote_port = remote_port
        self.learn = learn
        self.ttl = ttl
        self.max_peers = max_peers
        self.drops: dict[str, int] = {}
        self._by_mac: dict[bytes, bytes] = {}  # pseudo-MAC -> peer address (4 or 16 bytes)
        self._by_host: dict[str, tuple[bytes, bytes]] = {}  # address as recvfrom gives it -> (address, pseudo-MAC)
        self._dest: dict[bytes, str | None] = {}  # pseudo-MAC -> host to sendto, None if our family cannot reach it
        self._family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
        self._sockets: list[socket.socket] = []
        for peer in peers:
            self.add_peer(peer)
        try:
            with entered(netns):
                self._sock = self._socket((address, port), dual_stack=address == "::")
                self._pool = [self._pool_socket(address, ENTROPY_PORT_BASE + i, low, high) for i in range(pool_size)]
        except BaseException:
            self.close()
            raise
        self.port: int = self._sock.getsockname()[1]
        self._sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        if rcvbuf is not None:
            set_receive_buffer(self._sock, rcvbuf)
        self._kernel_dropped = 0  # the receive socket's overflow count last read
        self._buf = bytearray(MAX_DATAGRAM)
        self._view = memoryview(self._buf)

    def _socket(self, where: tuple[str, int], *, dual_stack: bool = False) -> socket.socket:
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        self._sockets.append(sock)
        if self._family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        sock.bind(where)
        sock.setblocking(False)
        return sock

    def _pool_socket(self, address: str, canonical: int, low: int, high: int) -> socket.socket:
        """Pool socket bound to its ``canonical`` port, or to a random port in ``low..high`` if that one is taken."""
        rng = random.Random()
        for attempt in range(_BIND_ATTEMPTS):
            port = canonical if attempt == 0 and low <= canonical <= high else rng.randint(low, high)
            try:
                sock = self._socket((address, port), dual_stack=address == "::")
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _POOL_RCVBUF)
            return sock
        raise OSError(errno.EADDRINUSE, f"no free UDP source port in {low}-{high} after {_BIND_ATTEMPTS} tries")

    @property
    def symmetric(self) -> bool:
        """Whether every pool socket has its canonical port, so a flow leaves here from the port every other
        canonical sender uses for it."""
        return self.source_ports == [ENTROPY_PORT_BASE + i for i in range(len(self._pool))]

    @property
    def source_ports(self) -> list[int]:
        """The UDP source ports of the sending pool, in pool order."""
        return [s.getsockname()[1] for s in self._pool]

    @property
    def peers(self) -> dict[bytes, bytes]:
        """Pseudo-MAC -> peer address (4 or 16 bytes), configured and learned."""
        return dict(self._by_mac)

    def add_peer(self, addr: str | bytes) -> bytes:
        """Register the peer at outer address ``addr``; returns its pseudo-MAC (the MAC the core knows it by)."""
        packed = _packed(addr)
        mac = pseudo_mac(packed)
        known = self._by_mac.get(mac)
        if known is not None and known != packed:
            raise ValueError(f"peers {known.hex()} and {packed.hex()} share the pseudo-MAC {mac.hex(':')}")
        self._register(packed, mac)
        return mac

    def _register(self, packed: bytes, mac: bytes) -> None:
        self._by_mac[mac] = packed
        host = socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)
        if self._family == socket.AF_INET6 and len(packed) == 4:
            host = "::ffff:" + host  # the dual-stack socket reaches IPv4 peers by their mapped address
        self._dest[mac] = None if self._family == socket.AF_INET and len(packed) == 16 else host

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv_burst(self, max_frames: int = 64) -> list[bytes]:
        """Up to ``max_frames`` datagrams already queued, as Ethernet frames for the core; never blocks."""
        frames: list[bytes] = []
        recvmsg_into, view, drops, bufs = self._sock.recvmsg_into, self._view, self.drops, [self._buf]
        for _ in range(max_frames):
            try:
                n, ancillary, _flags, source = recvmsg_into(bufs, _OVFL_ANCILLARY)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._drop(f"recv_{errno.errorcode.get(exc.errno or 0, 'error').lower()}")
                break
            if ancillary:
                self._overflowed(ancillary)
            peer = self._by_host.get(source[0]) or self._learn(source[0])
            if peer is None:
                continue
            frame = _decapsulate(view[:n], peer[1], self.mac, drops)
            if frame is not None:
                frames.append(frame)
        return frames

    def _overflowed(self, ancillary: list[tuple[int, int, bytes]]) -> None:
        """Count under ``udp_receive_buffer_full`` the datagrams the kernel dropped since the last one read."""
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL and len(data) >= 4:
                total = int.from_bytes(data[:4], sys.byteorder)
                lost = (total - self._kernel_dropped) & 0xFFFFFFFF
                self._kernel_dropped = total
                if lost:
                    self.drops["udp_receive_buffer_full"] = self.drops.get("udp_receive_buffer_full", 0) + lost

    def _learn(self, host: str) -> tuple[bytes, bytes] | None:
        packed = _packed(host.partition("%")[0])
        mac = pseudo_mac(packed)
        known = self._by_mac.get(mac)
        if known is None and not self.learn:
            self._drop("udp_unknown_source")
            return None
        if known is not None and known != packed:
            self._drop("udp_pseudo_mac_collision")
            return None
        if known is None and len(self._by_mac) >= self.max_peers:
            self._drop("udp_too_many_peers")
            return None
        if known is None:
            self._register(packed, mac)
        if len(self._by_host) < self.max_peers:
            self._by_host[host] = (packed, mac)
        return packed, mac

    def send(self, frame: bytes | memoryview) -> int:
        """Send a frame from the core to the peer its destination pseudo-MAC names. Unknown peers and frames that
        are neither MPLS nor IP are counted and dropped (0 is returned); OSError from the socket is the caller's."""
        mac = bytes(frame[:ETH_ALEN])
        if mac not in self._dest:
            self._drop("udp_unknown_peer")
            return 0
        host = self._dest[mac]
        if host is None:
            self._drop("udp_family_mismatch")
            return 0
        payload = encapsulate(frame, self.ttl)
        if payload is None:
            self._drop("udp_unsupported_frame")
            return 0
        pool = self._pool
        return pool[entropy_index(payload, len(pool))].sendto(payload, (host, self.remote_port))

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MplsUdpEndpointLink(MplsUdpPort):
    """An endpoint agent's wire: MPLS-in-UDP to and from one balancer at ``balancer`` (``ip`` or ``(ip, port)``).

    Only the balancer is heard. Give the endpoint :attr:`balancer_mac` as its gateway MAC: every frame the
    endpoint sends goes to the balancer, and every frame it receives comes from that MAC.
    """

    def __init__(
        self,
        mac: bytes,
        balancer: str | tuple[str, int],
        *,
        address: str = "0.0.0.0",
        port: int = MPLS_UDP_PORT,
        pool_size: int = DEFAULT_POOL_SIZE,
        ttl: int = DEFAULT_TTL,
        netns: str | None = None,
    ) -> None:
        host, remote_port = (balancer, MPLS_UDP_PORT) if isinstance(balancer, str) else balancer
        super().__init__(
            mac,
            address=address,
            port=port,
            remote_port=remote_port,
            peers=[host],
            learn=False,
            pool_size=pool_size,
            ttl=ttl,
            netns=netns,
        )
        self.balancer_mac = pseudo_mac(_packed(host))
