"""Frames for the engine benchmarks, built in bulk with numpy, and the balancer configuration they fit.

Flow ``i`` is one client session: source 10.64.0.0 + i (one client per session, as on the Internet), source port
1024 + i % 64000, to the virtual IP 10.0.0.100 port 80 (TCP) or 53 (UDP). It arrives on client port ``i % 2`` from
that port's router (one MAC per port, as behind a router). One template frame is made with the project's own
builders (``mplslb.wire``) and copied into an (n, size) array; the per-flow fields are patched in and the IPv4 and
TCP/UDP checksums recomputed over the whole rows, so every frame is a valid frame.

Sizes are Ethernet frame lengths without the FCS. A 64-byte unlabelled TCP SYN or ACK is padded like a real short
frame (the analyzer trims padding by the IP total length).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from mplslb.balancing.servers import ServerConfig
from mplslb.config import BalancerConfig, PortConfig, VirtualService
from mplslb.wire.ethernet import ETH_P_IP, ETH_P_MPLS_UC, build_ethernet
from mplslb.wire.ip import IPPROTO_TCP, IPPROTO_UDP
from mplslb.wire.ipv4 import build_ipv4
from mplslb.wire.mpls import pack_entry
from mplslb.wire.tcp import build_tcp
from mplslb.wire.udp import build_udp

VIP = bytes((10, 0, 0, 100))
CLIENT_PORTS = (0, 1)
SERVER_PORTS = (2, 3)
SYN, ACK, PSH = 0x02, 0x10, 0x08
FIRST_CLIENT = (10 << 24) | (64 << 16)
MAX_FLOWS = 1 << 22
#: Labels are handed out FIFO from 17 upward: the n-th session opened on a fresh balancer gets C2S 17 + 2n.
FIRST_C2S = 17


def mac(kind: int, index: int) -> bytes:
    return bytes((0x02, kind, 0, 0, 0, index))


def port_mac(port: int) -> bytes:
    return mac(0xB0, port)


def router_mac(port: int) -> bytes:
    return mac(0xC0, port)


def make_config(n_servers: int = 4, **overrides: object) -> BalancerConfig:
    """Two client ports (line card 0), two server ports (line card 1), ``n_servers`` servers, one VIP serving
    TCP 80 and UDP 53, no session limit."""
    ports = tuple(
        PortConfig(p, 0 if p in CLIENT_PORTS else 1, p % 2, port_mac(p), "client" if p in CLIENT_PORTS else "server")
        for p in (*CLIENT_PORTS, *SERVER_PORTS)
    )
    servers = tuple(
        ServerConfig(
            name=f"s{i + 1}",
            address=bytes((10, 2, 0, i + 1)),
            mac=mac(0x5E, i + 1),
            port_id=SERVER_PORTS[i % len(SERVER_PORTS)],
        )
        for i in range(n_servers)
    )
    config = BalancerConfig(ports=ports, vips=(VirtualService(VIP, (80,), (53,)),), servers=servers, max_sessions=0)
    return replace(config, **overrides)  # type: ignore[arg-type]


def c2s_of_flow(flow: int) -> int:
    return FIRST_C2S + 2 * flow


def client_ip(flow: int) -> bytes:
    return (FIRST_CLIENT + flow).to_bytes(4, "big")


def sport_of(flow: int) -> int:
    return 1024 + flow % 64000


def _fold(total: np.ndarray) -> np.ndarray:
    while True:
        high = total >> np.uint64(16)
        if not high.any():
            return total
        total = (total & np.uint64(0xFFFF)) + high


def _word_sum(block: np.ndarray) -> np.ndarray:
    """Sum of the big-endian 16-bit words of each row (rows of even length)."""
    return np.ascontiguousarray(block).view(">u2").astype(np.uint64).sum(axis=1)


def build(
    flows: np.ndarray | range,
    *,
    proto: int = IPPROTO_TCP,
    size: int = 64,
    flags: int = ACK | PSH,
    labelled: bool = False,
    payload: bytes | None = None,
    ttl: int = 64,
) -> list[tuple[int, bytes]]:
    """Frames ``(client port, frame)`` of the given flows, client to server.

    ``labelled``: the frame carries the flow's C2S label (as a client agent sends it once the session is set up).
    ``payload`` defaults to filler that brings the frame to ``size`` (none for a SYN); the frame is padded to
    ``size`` when shorter."""
    idx = np.asarray(flows, dtype=np.int64)
    if len(idx) == 0:
        return []
    if idx.max() >= MAX_FLOWS:
        raise ValueError("flow index too large")
    head = 14 + (4 if labelled else 0)
    l4_header = 20 if proto == IPPROTO_TCP else 8
    if payload is None:
        fill = size - head - 20 - l4_header
        payload = (
            b"" if flags & SYN and proto == IPPROTO_TCP else bytes((i * 7 + 65) % 256 for i in range(max(fill, 0)))
        )
    src0, sport0 = client_ip(0), sport_of(0)
    if proto == IPPROTO_TCP:
        segment = build_tcp(src0, VIP, sport0, 80, seq=1000, ack=1, flags=flags, payload=payload)
    else:
        segment = build_udp(src0, VIP, sport0, 53, payload)
    packet = build_ipv4(src0, VIP, proto, len(segment), ttl=ttl) + segment
    if labelled:
        eth = build_ethernet(port_mac(0), router_mac(0), ETH_P_MPLS_UC) + pack_entry(c2s_of_flow(0), 0, True, ttl)
    else:
        eth = build_ethernet(port_mac(0), router_mac(0), ETH_P_IP)
    template = eth + packet
    template += bytes(max(0, size - len(template)))
    n, length = len(idx), len(template)
    rows = np.empty((n, length), dtype=np.uint8)
    rows[:] = np.frombuffer(template, dtype=np.uint8)
    ports = (idx % 2).astype(np.uint8)
    rows[:, 5] = 0  # port_mac(p) and router_mac(p) differ from port 0's in their last byte only
    rows[:, 5] = ports
    rows[:, 11] = ports
    if labelled:
        entry = (c2s_of_flow(0) + 2 * idx) << 12 | (1 << 8) | ttl
        rows[:, 14:18] = entry.astype(">u4").view(np.uint8).reshape(n, 4)
    ip = head
    l4 = ip + 20
    end = ip + len(packet)
    src = (FIRST_CLIENT + idx).astype(">u4").view(np.uint8).reshape(n, 4)
    rows[:, ip + 12 : ip + 16] = src
    rows[:, l4 : l4 + 2] = (1024 + idx % 64000).astype(">u2").view(np.uint8).reshape(n, 2)
    # IPv4 header checksum
    rows[:, ip + 10 : ip + 12] = 0
    csum = (~_fold(_word_sum(rows[:, ip:l4])).astype(np.uint16)) & 0xFFFF
    rows[:, ip + 10 : ip + 12] = csum.astype(">u2").view(np.uint8).reshape(n, 2)
    # TCP / UDP checksum over the pseudo header
    at = l4 + (16 if proto == IPPROTO_TCP else 6)
    rows[:, at : at + 2] = 0
    seg = rows[:, l4:end]
    if seg.shape[1] % 2:
        seg = np.concatenate([seg, np.zeros((n, 1), dtype=np.uint8)], axis=1)
    pseudo = _word_sum(rows[:, ip + 12 : ip + 20]) + np.uint64(proto + (end - l4))
    csum = (~_fold(_word_sum(seg) + pseudo).astype(np.uint16)) & 0xFFFF
    if proto == IPPROTO_UDP:
        csum[csum == 0] = 0xFFFF
    rows[:, at : at + 2] = csum.astype(">u2").view(np.uint8).reshape(n, 2)
    blob = rows.tobytes()
    port_list = ports.tolist()
    return [(port_list[k], blob[k * length : (k + 1) * length]) for k in range(n)]


def frame_block(frames: list[tuple[int, bytes]]) -> np.ndarray:
    """Frames of one size as an (n, size) uint8 array (what a driver reading a packet ring would hold)."""
    return np.frombuffer(b"".join(f for _, f in frames), dtype=np.uint8).reshape(len(frames), -1)
