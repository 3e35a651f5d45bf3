"""Helpers shared by the tests (``from helpers import ...``; ``tests`` is on the path).

- Frames and addresses: the standard layout (ports, VIPs, servers, MACs, ``standard_balancer``) and builders of
  segments, IP packets and whole Ethernet frames, with correct checksums unless asked otherwise.
- The claim network ``Net``: one balancer with client and server endpoints, frames carried by hand
  (``make_config``, ``handshake``, ``label_of``).
- Recordings and mutations: the balancer's calls in a short simulated run (``recording``), ``mutate``, ``pack``
  and ``listed`` (from :mod:`mplslb.fuzz`, which the fuzz campaign shares).
- Namespaces and sockets: ``wait_until_ready``, ``frames_of``.
- Clocks: ``FakeClock``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import ipaddress
import random
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypothesis import strategies as st

from mplslb.balancer import Balancer, Frames
from mplslb.balancing.admission import RefuseWith
from mplslb.balancing.servers import ServerConfig
from mplslb.config import BalancerConfig, PortConfig, VirtualService
from mplslb.endpoint import ClientEndpoint, ServerEndpoint
from mplslb.fuzz import listed, mutate, pack  # noqa: F401 - the tests take them from here
from mplslb.labels import C2S_MIN, s2c_of
from mplslb.sessions import Timeouts
from mplslb.sim.scenario import SimConfig, SimEvent, Workload, balancer_config_for, run
from mplslb.wire.checksum import internet_checksum
from mplslb.wire.ethernet import ETH_P_IP, ETH_P_IPV6, ETH_P_MPLS_UC, build_ethernet, parse_ethernet
from mplslb.wire.ip import IPPROTO_TCP, IPPROTO_UDP
from mplslb.wire.ipv4 import IP_DF, build_ipv4
from mplslb.wire.ipv6 import build_ipv6
from mplslb.wire.mpls import pack_entry, parse_stack
from mplslb.wire.pcap import read_pcap
from mplslb.wire.tcp import TCPFlag, build_tcp
from mplslb.wire.udp import build_udp

if TYPE_CHECKING:
    from pyroute2 import IPRoute

    from mplslb.lab import Lab, LabSpec


# == frames and addresses ==============================================================================================
FIN, SYN, RST, PSH, ACK = (int(f) for f in (TCPFlag.FIN, TCPFlag.SYN, TCPFlag.RST, TCPFlag.PSH, TCPFlag.ACK))


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def mac(kind: int, index: int) -> bytes:
    return bytes((0x02, kind, 0, 0, 0, index))


# -- the standard layout: 2 client ports (line card 0), 2 server ports (line card 1), 3 servers, 2 VIPs -----------
CLIENT_PORTS = (0, 1)
SERVER_PORTS = (2, 3)
PORT_MAC = {p: mac(0xB0, p) for p in (*CLIENT_PORTS, *SERVER_PORTS)}
VIP = ip("10.0.0.100")
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


def client_addr(i: int = 0, v6: bool = False) -> bytes:
    return ip(f"fd00:1::{i + 1:x}" if v6 else f"10.1.0.{i + 1}")


def standard_config(**overrides: object) -> BalancerConfig:
    ports = tuple(PortConfig(p, 0, p, PORT_MAC[p], "client", f"lc0/p{p}") for p in CLIENT_PORTS) + tuple(
        PortConfig(p, 1, p - 2, PORT_MAC[p], "server", f"lc1/p{p - 2}") for p in SERVER_PORTS
    )
    vips = (VirtualService(VIP, (HTTP,), (DNS,)), VirtualService(VIP6, (HTTP,), (DNS,)))
    values: dict[str, object] = {"ports": ports, "vips": vips, "servers": SERVERS, "refuse_with": RefuseWith.RST}
    values.update(overrides)
    return BalancerConfig(**values)  # type: ignore[arg-type]


def standard_balancer(**overrides: object) -> Balancer:
    return Balancer(standard_config(**overrides))


# -- L3/L4 ----------------------------------------------------------------------------------------------------
def tcp_segment(
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


def udp_datagram(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes = b"") -> bytes:
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


# Whole IP packets around a TCP or UDP header, the IP version following the address length (``tcp_segment`` and
# ``udp_datagram`` build the L4 part alone).
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
    src = client_addr(client, v6)
    dst = vip if vip is not None else (VIP6 if v6 else VIP)
    segment = tcp_segment(src, dst, sport, dport, flags, payload, seq=seq)
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
    src = client_addr(client, v6)
    dst = VIP6 if v6 else VIP
    return ether(
        PORT_MAC[port],
        client_mac(client),
        ip_packet(src, dst, IPPROTO_UDP, udp_datagram(src, dst, sport, dport, payload)),
    )


def reply_tcp_packet(
    flags: int, payload: bytes = b"", *, client: int = 0, v6: bool = False, sport: int = 40000
) -> bytes:
    """The IP packet a server sends back from the VIP to a client's TCP session."""
    src, dst = VIP6 if v6 else VIP, client_addr(client, v6)
    return ip_packet(src, dst, IPPROTO_TCP, tcp_segment(src, dst, HTTP, sport, flags, payload, seq=5000))


def reply_udp_packet(payload: bytes = b"answer", *, client: int = 0, v6: bool = False, sport: int = 40000) -> bytes:
    src, dst = VIP6 if v6 else VIP, client_addr(client, v6)
    return ip_packet(src, dst, IPPROTO_UDP, udp_datagram(src, dst, DNS, sport, payload))


# == the claim network =================================================================================================
def make_config(n_servers: int = 3, **overrides: Any) -> BalancerConfig:
    ports = tuple(
        PortConfig(p, 0 if p in CLIENT_PORTS else 1, p % 2, PORT_MAC[p], "client" if p in CLIENT_PORTS else "server")
        for p in (*CLIENT_PORTS, *SERVER_PORTS)
    )
    servers = tuple(
        ServerConfig(
            name=f"s{i + 1}",
            address=ip(f"10.2.0.{i + 1}"),
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
            self.clients[i] = ClientEndpoint(mac=client_mac(i), gateway_mac=PORT_MAC[CLIENT_PORTS[i % 2]])
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
            assert frame[0:6] == client_mac(i), "frame sent to the wrong next hop"
            packet = self.client(i).from_wire(frame, self.now)
            if packet is not None:
                got.append(packet)
        return got


def label_of(frame: bytes) -> int | None:
    """The top label of an MPLS frame; None for an unlabelled one."""
    eth = parse_ethernet(frame)
    if eth.ethertype != ETH_P_MPLS_UC:
        return None
    entries, _ = parse_stack(frame, eth.payload_offset)
    return entries[0].label


def handshake(net: Net, i: int = 0, *, sport: int = 40000, v6: bool = False) -> tuple[str, int]:
    """Open a TCP session from client ``i`` through the claim 8 steps; returns (server, C2S label)."""
    vip = VIP6 if v6 else VIP
    src = client_addr(i, v6)
    out = net.from_client(i, tcp(src, vip, sport, 80, SYN, seq=100))
    ((name, _),) = net.deliver_to_servers(out)
    c2s = label_of(out[0][1])
    assert c2s is not None
    replies = net.from_server(name, tcp(vip, src, 80, sport, SYN | ACK, seq=500, ack=101))
    assert len(net.deliver_to_client(i, replies)) == 1
    acked = net.from_client(i, tcp(src, vip, sport, 80, ACK, seq=101, ack=501))  # labelled now: completes it
    assert [n for n, _ in net.deliver_to_servers(acked)] == [name] and label_of(acked[0][1]) == c2s
    return name, c2s


@dataclass(frozen=True)
class ReusedPair:
    """Two UDP sessions to the same server on the same label pair, the first expired at the balancer while the
    server agent still remembers its flow. Frames as ``(port, frame)``, not yet given to the balancer."""

    net: Net
    new_client: int
    c2s: int
    late: tuple[int, bytes]  # the server's late answer to the first session's client, under the S2C label
    reply: tuple[int, bytes]  # its answer to the new session's client
    request: tuple[int, bytes]  # the new client's next datagram, under the C2S label


def reused_label_pair(*, same_client: bool, v6: bool = False) -> ReusedPair:
    """The first session from client 0, port 5000; the second from client 1 (or client 0 again, ``same_client``),
    port 6000; one label pair and one server, so the second session gets the first one's pair."""
    config = make_config(  # no quarantine (the pair is reused at once), so no endpoint flow timeout to cover
        n_servers=1,
        label_quarantine=0.0,
        endpoint_flow_timeout=0.0,
        c2s_min=C2S_MIN,
        c2s_max=C2S_MIN,
        timeouts=Timeouts(udp=1.0),
    )
    net = Net(config)
    vip = VIP6 if v6 else VIP
    old = client_addr(0, v6)
    first = net.from_client(0, udp(old, vip, 5000, DNS))
    ((name, _),) = net.deliver_to_servers(first)
    c2s = label_of(first[0][1])
    assert c2s is not None
    assert len(net.deliver_to_client(0, net.from_server(name, udp(vip, old, DNS, 5000, b"a1")))) == 1
    net.now = 5.0
    net.balancer.on_timer(net.now)  # the first session's idle timeout: its labels are free at once
    assert net.balancer.live == 0
    new_client = 0 if same_client else 1
    new = client_addr(new_client, v6)
    second = net.from_client(new_client, udp(new, vip, 6000, DNS))
    assert label_of(second[0][1]) == c2s
    assert len(net.deliver_to_servers(second)) == 1
    server = net.servers[name]
    late = server.from_host(udp(vip, old, DNS, 5000, b"late"), net.now)
    reply = server.from_host(udp(vip, new, DNS, 6000, b"a2"), net.now)
    assert late is not None and reply is not None and label_of(late) == label_of(reply) == s2c_of(c2s)
    port = net.client_port(new_client)
    request = labelled(PORT_MAC[port], client_mac(new_client), c2s, udp(new, vip, 6000, DNS, b"q2"))
    return ReusedPair(
        net, new_client, c2s, (net.server_port[name], late), (net.server_port[name], reply), (port, request)
    )


# == recordings and mutations ==========================================================================================
@dataclass(frozen=True)
class Call:
    """One call the simulation made on the balancer: a frame received (port >= 0) or a timer (port -1)."""

    port: int
    frame: bytes
    now: float
    out: tuple[tuple[int, bytes], ...]


SIM = SimConfig(
    seed=11,
    workload=Workload(clients=8, sessions=70, rate=120.0, size_mean=2500.0, session_timeout=2.0),
    events=(SimEvent(0.15, "fail", "web3"), SimEvent(0.45, "recover", "web3")),
)


@functools.cache
def recording() -> tuple[BalancerConfig, tuple[Call, ...]]:
    calls: list[Call] = []
    receive, on_timer = Balancer.receive, Balancer.on_timer

    def recording_receive(self: Balancer, port: int, frame: bytes | memoryview, now: float) -> Frames:
        out = receive(self, port, frame, now)
        calls.append(Call(port, bytes(frame), now, tuple(out)))
        return out

    def recording_on_timer(self: Balancer, now: float) -> Frames:
        out = on_timer(self, now)
        calls.append(Call(-1, b"", now, tuple(out)))
        return out

    Balancer.receive = recording_receive  # type: ignore[method-assign]
    Balancer.on_timer = recording_on_timer  # type: ignore[method-assign]
    try:
        report = run(SIM)
    finally:
        Balancer.receive = receive  # type: ignore[method-assign]
        Balancer.on_timer = on_timer  # type: ignore[method-assign]
    assert report.stats.frames_in == sum(1 for c in calls if c.port >= 0)
    return balancer_config_for(SIM), tuple(calls)


def captured(shared_data: Path) -> Iterator[bytes]:
    """Every frame of the real captures of shared/data, capture by capture (MPLS, its edge cases, plain)."""
    for folder in ("pcap/mpls", "pcap/mpls-edge", "pcap/plain"):
        for path in sorted((shared_data / folder).glob("*.pcap*")):
            for record in read_pcap(path):
                yield record.data


def frames_only() -> list[Call]:
    return [c for c in recording()[1] if c.port >= 0]


#: The smallest daemon configuration with interfaces: one client port, one server port, one VIP (tests of
#: top-level keys and sections append or prepend theirs).
DAEMON_TOML = """
[[ports]]
id = 0
role = "client"
mac = "02:b0:00:00:00:00"
interface = "lc0p0"

[[ports]]
id = 1
role = "server"
mac = "02:b0:00:00:00:01"
interface = "lc1p0"

[[vip]]
address = "10.0.0.100"
"""


mutation = st.tuples(st.sampled_from(["flip", "cut", "set"]), st.integers(0, 1600), st.integers(0, 255))
#: Mutations aimed at what the fast paths read: the label entry, the IP header (options included) and the first
#: bytes of TCP or UDP (ports, TCP flags).
header_mutation = st.tuples(
    st.sampled_from(["flip", "set", "cut"]), st.integers(14, 14 + 4 + 60 + 16), st.integers(0, 255)
)


#: Mutated copies to insert into a recorded feed: (where, the mutations), for :func:`with_mutated`.
feed_mutations = st.lists(
    st.tuples(st.integers(0, 10_000), st.lists(st.one_of(mutation, header_mutation), min_size=1, max_size=3)),
    max_size=20,
)


def with_mutated(
    feed: list[tuple[int, bytes, float]], mutations: Sequence[tuple[int, Sequence[tuple[str, int, int]]]]
) -> list[tuple[int, bytes, float]]:
    """``feed`` (port, frame, time) with a mutated copy of a frame inserted before it for each of ``mutations``
    (where, modulo the feed's length; the frame's mutations), a timer's entry (port -1) never mutated."""
    feed = list(feed)
    for where, muts in mutations:
        port, frame, now = feed[where % len(feed)]
        if port >= 0:
            feed.insert(where % len(feed), (port, mutate(frame, muts), now))
    return feed


# == namespaces and sockets ============================================================================================
ETH_P_LOCAL_EXP = 0x88B5  # IEEE 802 local experimental ethertype: nothing in the kernel answers it
LINK_WAIT = 10.0  # seconds links may take to come up, at most


def wait_until_ready(ipr: IPRoute, names: tuple[str, ...]) -> None:
    """Wait for the links to be usable. Until linkwatch has run (asynchronously, after the link comes up) a device
    keeps the noop qdisc, which drops every frame sent while reporting success."""
    deadline = time.monotonic() + LINK_WAIT
    while time.monotonic() < deadline:
        links = [ipr.get_links(ipr.link_lookup(ifname=n)[0])[0] for n in names]
        if all(link.get("IFLA_OPERSTATE") == "UP" and link.get("IFLA_QDISC") != "noop" for link in links):
            return
        time.sleep(0.01)
    raise AssertionError(f"links {names} did not come up within {LINK_WAIT} s")


def frames_of(sizes: list[int], dst: bytes, src: bytes, ethertype: int = ETH_P_LOCAL_EXP) -> list[bytes]:
    rng = random.Random(7)
    header = build_ethernet(dst, src, ethertype)
    return [header + i.to_bytes(4, "big") + rng.randbytes(size - len(header) - 4) for i, size in enumerate(sizes)]


# == clocks ============================================================================================================
class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@contextlib.contextmanager
def running_lab(spec: LabSpec, root: Path) -> Iterator[Lab]:
    """A lab up for the ``with`` block, then down; raises if taking it down reported a problem or left any of its
    namespaces."""
    from pyroute2 import netns

    from mplslb.lab import Lab

    lab = Lab(spec, root=root)
    try:
        lab.up()
        yield lab
    finally:
        problems = lab.down()
        left = [ns for ns in netns.listnetns() if ns.startswith(spec.name + "-")]
        if problems or left:
            raise AssertionError(f"lab {spec.name} taken down with problems {problems}, namespaces left {left}")


class HeldDownload:
    """curl fetching ``url`` in namespace ``ns`` into a pipe the test reads, held to about ``rate`` bytes/s until
    :meth:`release` (curl, its socket and the connection's window wait on the test, as with ``--limit-rate``, so
    the connection carries data all the while and cannot end before), then read to its end at full speed; curl's
    ``--max-time`` bounds it."""

    CHUNK = 8192

    def __init__(self, ns: str, url: str, *, rate: int, size: int, max_time: float = 60.0,
                 curl_args: Sequence[str] = ()) -> None:  # fmt: skip
        argv = ["curl", "-s", "-S", "--max-time", f"{max_time:g}", *curl_args, "-o", "-", "-w", "%{stderr}%{http_code}",
                url]  # fmt: skip
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{ns}", "--", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.rate, self.size, self.max_time = rate, size, max_time
        self.received = 0
        self._sha = hashlib.sha256()
        self._released = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(self.CHUNK):
            self._sha.update(chunk)
            self.received += len(chunk)
            if not self._released.is_set():
                self._released.wait(len(chunk) / self.rate)

    def in_flight(self) -> bool:
        """curl still running and most of the file still to come: the server still sending."""
        return self.proc.poll() is None and self.received < self.size // 2

    def release(self) -> tuple[str, str]:
        """Read the rest: ("<curl's exit status> <HTTP status, or curl's error>", sha256 of what curl wrote)."""
        self._released.set()
        try:
            self._thread.join(self.max_time + 30)
            self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            self._thread.join(5)
        assert self.proc.stderr is not None
        code = self.proc.stderr.read().decode(errors="replace").strip()
        return f"{self.proc.returncode} {code}", self._sha.hexdigest()


class RecordingMirror:
    """A switching-table mirror that writes down what the table tells it, in order."""

    def __init__(self) -> None:
        self.told: list[tuple[str, int]] = []

    def installed(self, label: int) -> None:
        self.told.append(("installed", label))

    def withdrawn(self, label: int) -> None:
        self.told.append(("withdrawn", label))

    def watch_changed(self, label: int) -> None:
        self.told.append(("watch", label))
