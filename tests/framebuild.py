"""Helpers for the balancer tests: a small standard balancer layout and builders of whole Ethernet frames.

Every builder returns ``bytes`` with correct checksums unless asked otherwise, so a test can break exactly one
field of an otherwise valid frame.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence

from mplslb.balancer import Balancer
from mplslb.balancing.admission import RefuseWith
from mplslb.balancing.servers import ServerConfig
from mplslb.config import BalancerConfig, PortConfig, VirtualService
from mplslb.wire.checksum import internet_checksum
from mplslb.wire.ethernet import ETH_P_IP, ETH_P_IPV6, ETH_P_MPLS_UC, build_ethernet
from mplslb.wire.ip import IPPROTO_TCP, IPPROTO_UDP
from mplslb.wire.ipv4 import IP_DF, build_ipv4
from mplslb.wire.ipv6 import build_ipv6
from mplslb.wire.mpls import pack_entry
from mplslb.wire.tcp import TCPFlag, build_tcp
from mplslb.wire.udp import build_udp

FIN, SYN, RST, PSH, ACK = (int(f) for f in (TCPFlag.FIN, TCPFlag.SYN, TCPFlag.RST, TCPFlag.PSH, TCPFlag.ACK))


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def mac(kind: int, index: int) -> bytes:
    return bytes((0x02, kind, 0, 0, 0, index))


# -- the standard layout: 2 client ports (line card 0), 2 server ports (line card 1), 3 servers, 2 VIPs -----------
CLIENT_PORTS = (0, 1)
SERVER_PORTS = (2, 3)
PORT_MAC = {p: mac(0xB0, p) for p in (*CLIENT_PORTS, *SERVER_PORTS)}
VIP4 = ip("10.0.0.100")
VIP6 = ip("fd00::100")
OTHER4 = ip("10.0.0.200")  # not a virtual IP
OTHER6 = ip("fd00::200")
HTTP, DNS = 80, 53
SERVERS = (
    ServerConfig("s1", ip("10.2.0.11"), mac(0x5E, 1), port_id=2),
    ServerConfig("s2", ip("10.2.0.12"), mac(0x5E, 2), port_id=3),
    ServerConfig("s3", ip("10.2.0.13"), mac(0x5E, 3), port_id=2),
)
SERVER_BY_MAC = {s.mac: s for s in SERVERS}


def client_mac(i: int = 0) -> bytes:
    return mac(0xC0, i)


def client4(i: int = 0) -> bytes:
    return ip(f"10.1.0.{i + 1}")


def client6(i: int = 0) -> bytes:
    return ip(f"fd00:1::{i + 1:x}")


def standard_config(**overrides: object) -> BalancerConfig:
    ports = tuple(PortConfig(p, 0, p, PORT_MAC[p], "client", f"lc0/p{p}") for p in CLIENT_PORTS) + tuple(
        PortConfig(p, 1, p - 2, PORT_MAC[p], "server", f"lc1/p{p - 2}") for p in SERVER_PORTS
    )
    vips = (VirtualService(VIP4, (HTTP,), (DNS,)), VirtualService(VIP6, (HTTP,), (DNS,)))
    values: dict[str, object] = {"ports": ports, "vips": vips, "servers": SERVERS, "refuse_with": RefuseWith.RST}
    values.update(overrides)
    return BalancerConfig(**values)  # type: ignore[arg-type]


def standard_balancer(**overrides: object) -> Balancer:
    return Balancer(standard_config(**overrides))


# -- L3/L4 ----------------------------------------------------------------------------------------------------
def tcp(
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    flags: int,
    payload: bytes = b"",
    *,
    seq: int = 1000,
    ack: int = 0,
    options: bytes = b"",
) -> bytes:
    return build_tcp(src, dst, sport, dport, seq=seq, ack=ack, flags=flags, options=options, payload=payload)


def udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes = b"") -> bytes:
    return build_udp(src, dst, sport, dport, payload)


def icmp4(icmp_type: int, code: int, rest: int = 0, body: bytes = b"") -> bytes:
    message = bytearray(struct.pack("!BBHI", icmp_type, code, 0, rest) + body)
    struct.pack_into("!H", message, 2, internet_checksum(message))
    return bytes(message)


def icmp6(icmp_type: int, code: int, rest: int = 0, body: bytes = b"") -> bytes:
    # The checksum is not verified by the balancer; a plain zero keeps the helper simple.
    return struct.pack("!BBHI", icmp_type, code, 0, rest) + body


def ipv4(
    src: bytes,
    dst: bytes,
    proto: int,
    payload: bytes,
    *,
    ttl: int = 64,
    options: bytes = b"",
    flags: int = IP_DF,
    frag_offset: int = 0,
    tos: int = 0,
) -> bytes:
    header = build_ipv4(
        src, dst, proto, len(payload), ttl=ttl, options=options, flags=flags, frag_offset=frag_offset, tos=tos
    )
    return header + payload


def ipv6(src: bytes, dst: bytes, proto: int, payload: bytes, *, hop_limit: int = 64, ext: bytes = b"") -> bytes:
    """``ext`` are raw extension headers put before ``payload``; ``proto`` is then the first one's number."""
    return build_ipv6(src, dst, proto, len(ext) + len(payload), hop_limit=hop_limit) + ext + payload


def ip_packet(src: bytes, dst: bytes, proto: int, payload: bytes) -> bytes:
    return ipv6(src, dst, proto, payload) if len(src) == 16 else ipv4(src, dst, proto, payload)


def fix_ipv4_checksum(packet: bytes | bytearray, offset: int = 0) -> bytes:
    """Recompute the IPv4 header checksum of the header at ``offset`` (after a field was broken on purpose)."""
    buf = bytearray(packet)
    ihl = (buf[offset] & 0x0F) * 4
    struct.pack_into("!H", buf, offset + 10, 0)
    struct.pack_into("!H", buf, offset + 10, internet_checksum(buf[offset : offset + max(ihl, 20)]))
    return bytes(buf)


# -- L2 -------------------------------------------------------------------------------------------------------
def ether(dst: bytes, src: bytes, packet: bytes, *, vlans: Sequence[int] = ()) -> bytes:
    """An unlabelled frame; the ethertype follows the IP version nibble."""
    ethertype = ETH_P_IPV6 if packet and packet[0] >> 4 == 6 else ETH_P_IP
    return build_ethernet(dst, src, ethertype, vlans) + packet


def labelled(
    dst: bytes,
    src: bytes,
    label: int,
    packet: bytes,
    *,
    ttl: int = 64,
    s: bool = True,
    tc: int = 0,
    below: Sequence[bytes] = (),
    vlans: Sequence[int] = (),
) -> bytes:
    """A frame with ``label`` on top (``s`` its bottom-of-stack bit), then the raw ``below`` entries, then the
    packet."""
    return build_ethernet(dst, src, ETH_P_MPLS_UC, vlans) + pack_entry(label, tc, s, ttl) + b"".join(below) + packet


# -- client and server traffic in the standard layout ---------------------------------------------------------
def client_tcp(
    flags: int,
    payload: bytes = b"",
    *,
    client: int = 0,
    v6: bool = False,
    sport: int = 40000,
    dport: int = HTTP,
    vip: bytes | None = None,
    port: int = 0,
    src_mac: bytes | None = None,
    seq: int = 1000,
) -> bytes:
    src = client6(client) if v6 else client4(client)
    dst = vip if vip is not None else (VIP6 if v6 else VIP4)
    segment = tcp(src, dst, sport, dport, flags, payload, seq=seq)
    return ether(PORT_MAC[port], src_mac or client_mac(client), ip_packet(src, dst, IPPROTO_TCP, segment))


def client_udp(
    payload: bytes = b"query",
    *,
    client: int = 0,
    v6: bool = False,
    sport: int = 40000,
    dport: int = DNS,
    port: int = 0,
) -> bytes:
    src = client6(client) if v6 else client4(client)
    dst = VIP6 if v6 else VIP4
    return ether(
        PORT_MAC[port], client_mac(client), ip_packet(src, dst, IPPROTO_UDP, udp(src, dst, sport, dport, payload))
    )


def reply_tcp_packet(
    flags: int, payload: bytes = b"", *, client: int = 0, v6: bool = False, sport: int = 40000
) -> bytes:
    """The IP packet a server sends back from the VIP to a client's TCP session."""
    src, dst = (VIP6, client6(client)) if v6 else (VIP4, client4(client))
    return ip_packet(src, dst, IPPROTO_TCP, tcp(src, dst, HTTP, sport, flags, payload, seq=5000))


def reply_udp_packet(payload: bytes = b"answer", *, client: int = 0, v6: bool = False, sport: int = 40000) -> bytes:
    src, dst = (VIP6, client6(client)) if v6 else (VIP4, client4(client))
    return ip_packet(src, dst, IPPROTO_UDP, udp(src, dst, DNS, sport, payload))
