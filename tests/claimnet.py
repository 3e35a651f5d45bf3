"""A tiny labelled network for tracing the claims step by step: one Balancer, endpoint objects for clients and
servers, and helpers that carry frames between them (in the manner of aioquic's ``transfer``)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from mplslb.balancer import Balancer
from mplslb.balancing.servers import ServerConfig
from mplslb.config import BalancerConfig, PortConfig, VirtualService
from mplslb.endpoint import ClientEndpoint, ServerEndpoint
from mplslb.wire.ip import IPPROTO_TCP, IPPROTO_UDP
from mplslb.wire.ipv4 import build_ipv4
from mplslb.wire.ipv6 import build_ipv6
from mplslb.wire.tcp import build_tcp
from mplslb.wire.udp import build_udp

VIP = ipaddress.ip_address("10.0.0.100").packed
VIP6 = ipaddress.ip_address("fd00::100").packed
CLIENT_PORTS = (0, 1)
SERVER_PORTS = (2, 3)


def mac(kind: int, index: int) -> bytes:
    return bytes((0x02, kind, 0, 0, 0, index))


def client_addr(i: int, v6: bool = False) -> bytes:
    return ipaddress.ip_address(f"fd00:1::{i + 1:x}" if v6 else f"10.1.0.{i + 1}").packed


def tcp(src: bytes, dst: bytes, sport: int, dport: int, flags: int, *, seq: int = 1000, ack: int = 0,
        payload: bytes = b"", ttl: int = 64, tos: int = 0) -> bytes:  # fmt: skip
    segment = build_tcp(src, dst, sport, dport, seq=seq, ack=ack, flags=flags, payload=payload)
    if len(src) == 16:
        return build_ipv6(src, dst, IPPROTO_TCP, len(segment), hop_limit=ttl, traffic_class=tos) + segment
    return build_ipv4(src, dst, IPPROTO_TCP, len(segment), ttl=ttl, tos=tos) + segment


def udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes = b"q") -> bytes:
    datagram = build_udp(src, dst, sport, dport, payload)
    if len(src) == 16:
        return build_ipv6(src, dst, IPPROTO_UDP, len(datagram)) + datagram
    return build_ipv4(src, dst, IPPROTO_UDP, len(datagram)) + datagram


def port_mac(port_id: int) -> bytes:
    return mac(0xB0, port_id)


def make_config(n_servers: int = 3, **overrides: Any) -> BalancerConfig:
    ports = tuple(
        PortConfig(p, 0 if p in CLIENT_PORTS else 1, p % 2, port_mac(p), "client" if p in CLIENT_PORTS else "server")
        for p in (*CLIENT_PORTS, *SERVER_PORTS)
    )
    servers = tuple(
        ServerConfig(
            name=f"s{i + 1}",
            address=ipaddress.ip_address(f"10.2.0.{i + 1}").packed,
            mac=mac(0x5E, i + 1),
            port_id=SERVER_PORTS[i % len(SERVER_PORTS)],
        )
        for i in range(n_servers)
    )
    vips = (VirtualService(VIP, (80,), (53,)), VirtualService(VIP6, (80,), (53,)))
    return replace(BalancerConfig(ports=ports, vips=vips, servers=servers), **overrides)


@dataclass
class Net:
    """Clients and servers around one balancer; frames are carried by hand, each step visible."""

    config: BalancerConfig = field(default_factory=make_config)
    now: float = 0.0

    def __post_init__(self) -> None:
        self.balancer = Balancer(self.config)
        self.servers = {s.name: ServerEndpoint(mac=s.mac, vips=[VIP, VIP6]) for s in self.config.servers}
        self.server_by_mac = {s.mac: s.name for s in self.config.servers}
        self.server_port = {s.name: s.port_id for s in self.config.servers}
        self.clients: dict[int, ClientEndpoint] = {}

    def client(self, i: int) -> ClientEndpoint:
        if i not in self.clients:
            self.clients[i] = ClientEndpoint(mac=mac(0xC0, i), gateway_mac=port_mac(CLIENT_PORTS[i % 2]))
        return self.clients[i]

    def client_port(self, i: int) -> int:
        return CLIENT_PORTS[i % 2]

    # client -> balancer -> servers
    def from_client(self, i: int, packet: bytes) -> list[tuple[int, bytes]]:
        frame = self.client(i).from_host(packet, self.now)
        assert frame is not None
        return self.balancer.receive(self.client_port(i), frame, self.now)

    def deliver_to_servers(self, frames: Sequence[tuple[int, bytes]]) -> list[tuple[str, bytes]]:
        got = []
        for port, frame in frames:
            name = self.server_by_mac.get(frame[0:6])
            assert name is not None and self.server_port[name] == port, "frame left by the wrong port"
            packet = self.servers[name].from_wire(frame, self.now)
            if packet is not None:
                got.append((name, packet))
        return got

    # server -> balancer -> clients
    def from_server(self, name: str, packet: bytes) -> list[tuple[int, bytes]]:
        frame = self.servers[name].from_host(packet, self.now)
        assert frame is not None, f"server {name} could not label its reply: {self.servers[name].drops}"
        return self.balancer.receive(self.server_port[name], frame, self.now)

    def deliver_to_client(self, i: int, frames: Sequence[tuple[int, bytes]]) -> list[bytes]:
        got = []
        for port, frame in frames:
            assert port == self.client_port(i), "frame left by the wrong port"
            assert frame[0:6] == mac(0xC0, i), "frame sent to the wrong next hop"
            packet = self.client(i).from_wire(frame, self.now)
            if packet is not None:
                got.append(packet)
        return got
