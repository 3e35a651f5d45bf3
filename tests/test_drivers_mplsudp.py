"""MPLS-in-UDP (RFC 7510): the pure mapping functions, then real sockets on loopback (no root needed)."""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import VIP, VIP6, client_addr, ether, ip_packet, labelled, tcp_segment, udp_datagram
from mplslb.balancer import Balancer
from mplslb.balancing.servers import ServerConfig
from mplslb.config import BalancerConfig, PortConfig, VirtualService
from mplslb.drivers.loop import BalancerDriver, Loop
from mplslb.drivers.mplsudp import (
    ENTROPY_PORT_MAX,
    ENTROPY_PORT_MIN,
    MplsUdpEndpointLink,
    MplsUdpPort,
    decapsulate,
    encapsulate,
    entropy_index,
    flow_hash,
    overhead,
    pseudo_mac,
)
from mplslb.endpoint import ClientEndpoint, ServerEndpoint
from mplslb.wire.ethernet import ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, ETH_P_MPLS_UC, build_ethernet
from mplslb.wire.ip import IPPROTO_TCP, IPPROTO_UDP
from mplslb.wire.mpls import pack_entry, stack_of

PORT_MAC = bytes.fromhex("02b000000000")
HOST_MAC = bytes.fromhex("02c000000001")
PEER = ipaddress.ip_address("192.0.2.7").packed
PEER6 = ipaddress.ip_address("2001:db8::7").packed
WAIT = 5.0  # seconds any loopback exchange may take, at most


def query(v6: bool = False, payload: bytes = b"query") -> bytes:
    src, dst = (client_addr(v6=True), VIP6) if v6 else (client_addr(), VIP)
    return ip_packet(src, dst, IPPROTO_UDP, udp_datagram(src, dst, 40000, 53, payload))


def eth_type(frame: bytes) -> int:
    return int.from_bytes(frame[12:14], "big")


# -- the pure functions ---------------------------------------------------------------------------------------
def test_pseudo_mac_is_stable_local_unicast_and_distinct():
    mac = pseudo_mac(PEER)
    assert mac == pseudo_mac(bytes(PEER)) and len(mac) == 6
    assert mac[0] == 0x02  # locally administered, unicast
    assert len({pseudo_mac(ipaddress.ip_address(f"10.0.{i >> 8}.{i & 255}").packed) for i in range(1000)}) == 1000
    assert pseudo_mac(PEER6) != mac
    with pytest.raises(ValueError):
        pseudo_mac(b"\x01\x02\x03")


def test_encapsulate_sends_the_label_stack_and_packet_of_an_mpls_frame():
    frame = labelled(PORT_MAC, HOST_MAC, 1001, query())
    assert encapsulate(frame) == frame[14:]


def test_encapsulate_skips_a_vlan_tag():
    frame = build_ethernet(PORT_MAC, HOST_MAC, ETH_P_MPLS_UC, [5]) + stack_of([1001]) + query()
    assert encapsulate(frame) == stack_of([1001]) + query()


@pytest.mark.parametrize(("v6", "null"), [(False, 0), (True, 2)], ids=["ipv4-null-0", "ipv6-null-2"])
def test_encapsulate_puts_an_unlabelled_packet_under_explicit_null(v6, null):
    frame = ether(PORT_MAC, HOST_MAC, query(v6))
    assert encapsulate(frame) == pack_entry(null, 0, True, 64) + query(v6)
    assert encapsulate(frame, ttl=9) == pack_entry(null, 0, True, 9) + query(v6)


@pytest.mark.parametrize(
    "frame",
    [
        build_ethernet(PORT_MAC, HOST_MAC, ETH_P_ARP) + bytes(28),
        build_ethernet(PORT_MAC, HOST_MAC, ETH_P_MPLS_UC) + b"\x00\x01",  # not even one label entry
        build_ethernet(PORT_MAC, HOST_MAC, ETH_P_IP),  # no packet
        b"\x02\x00",  # not an Ethernet header
    ],
    ids=["arp", "short-mpls", "empty-ip", "runt"],
)
def test_encapsulate_refuses_what_cannot_cross(frame):
    assert encapsulate(frame) is None


def test_decapsulate_presents_a_labelled_datagram_as_an_mpls_frame():
    payload = stack_of([1002]) + query()
    frame = decapsulate(payload, PEER, PORT_MAC)
    assert frame == PORT_MAC + pseudo_mac(PEER) + b"\x88\x47" + payload


@pytest.mark.parametrize(("v6", "null", "ethertype"), [(False, 0, ETH_P_IP), (True, 2, ETH_P_IPV6)])
def test_decapsulate_presents_explicit_null_as_an_unlabelled_frame(v6, null, ethertype):
    frame = decapsulate(pack_entry(null, 0, True, 64) + query(v6), PEER6, PORT_MAC)
    assert frame == PORT_MAC + pseudo_mac(PEER6) + ethertype.to_bytes(2, "big") + query(v6)


@pytest.mark.parametrize("v6", [False, True])
def test_unlabelled_frame_round_trips_through_udp(v6):
    sent = ether(pseudo_mac(PEER), PORT_MAC, query(v6))
    payload = encapsulate(sent)
    assert payload is not None
    got = decapsulate(payload, PEER, HOST_MAC)
    assert got is not None and got[12:] == sent[12:]


def test_explicit_null_over_more_labels_stays_labelled():
    payload = pack_entry(0, 0, False, 64) + pack_entry(1001, 0, True, 64) + query()
    frame = decapsulate(payload, PEER, PORT_MAC)
    assert frame is not None and eth_type(frame) == ETH_P_MPLS_UC and frame[14:] == payload


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "udp_empty"),
        (b"\x00\x01\x1f", "mpls_truncated"),
        (pack_entry(1001, 0, False, 64), "mpls_no_bottom"),
        (pack_entry(1001, 0, False, 64) + b"\x00\x01", "mpls_truncated"),
        (pack_entry(1001, 0, False, 64) * 17, "mpls_too_deep"),
        (pack_entry(0, 0, True, 64) + query(v6=True), "udp_null_not_ip"),  # IPv4 null over an IPv6 packet
        (pack_entry(2, 0, True, 64), "udp_null_not_ip"),  # nothing under the null
    ],
    ids=["empty", "partial-entry", "no-bottom", "cut-after-entry", "too-deep", "null-wrong-version", "null-alone"],
)
def test_decapsulate_counts_malformed_payloads(payload, reason):
    drops: dict[str, int] = {}
    assert decapsulate(payload, PEER, PORT_MAC, drops) is None
    assert drops == {reason: 1}


@given(st.binary(max_size=80))
def test_decapsulate_never_raises(payload):
    drops: dict[str, int] = {}
    frame = decapsulate(payload, PEER, PORT_MAC, drops)
    assert (frame is None) == (sum(drops.values()) == 1)


def flow(sport: int, *, reverse: bool = False, v6: bool = False) -> bytes:
    """A TCP segment of the flow client:sport <-> VIP:80, in either direction."""
    client, vip = (client_addr(v6=True), VIP6) if v6 else (client_addr(), VIP)
    if reverse:
        return ip_packet(vip, client, IPPROTO_TCP, tcp_segment(vip, client, 80, sport, 0x12))
    return ip_packet(client, vip, IPPROTO_TCP, tcp_segment(client, vip, sport, 80, 0x02))


@pytest.mark.parametrize("v6", [False, True])
def test_entropy_is_per_session_alike_in_both_directions_under_any_labels(v6):
    for sport in range(40000, 40064):
        out = entropy_index(pack_entry(2 if v6 else 0, 0, True, 64) + flow(sport, v6=v6), 16)
        assert entropy_index(stack_of([1001]) + flow(sport, v6=v6), 16) == out
        assert entropy_index(stack_of([2002]) + flow(sport, reverse=True, v6=v6), 16) == out
        assert entropy_index(stack_of([3003, 17]) + flow(sport, reverse=True, v6=v6), 16) == out
        assert flow_hash(stack_of([5]) + flow(sport, v6=v6)) == flow_hash(
            stack_of([6]) + flow(sport, reverse=True, v6=v6)
        )
    spread = {entropy_index(stack_of([1001]) + flow(sport, v6=v6), 16) for sport in range(40000, 40064)}
    assert len(spread) >= 12  # sessions spread over the pool


def test_entropy_without_an_ip_packet_follows_the_top_label():
    picks = {label: entropy_index(stack_of([label]) + b"other", 16) for label in range(17, 17 + 128, 2)}
    assert all(entropy_index(stack_of([label]) + b"\x00junk", 16) == i for label, i in picks.items())
    assert all(0 <= i < 16 for i in picks.values())
    assert len(set(picks.values())) >= 12
    assert flow_hash(stack_of([17]) + b"other") is None and flow_hash(pack_entry(17, 0, False, 64)) is None


def test_entropy_of_a_fragment_or_icmp_follows_the_addresses():
    a = pack_entry(0, 0, True, 64) + query(payload=b"one")
    b = pack_entry(0, 0, True, 64) + query(payload=b"two")
    assert entropy_index(a, 16) == entropy_index(b, 16)
    fragment = bytearray(query())
    fragment[6] = 0x20  # more fragments: the ports are not hashed
    other_port = bytearray(ip_packet(client_addr(), VIP, IPPROTO_UDP, udp_datagram(client_addr(), VIP, 41, 53)))
    other_port[6] = 0x20
    assert flow_hash(stack_of([9]) + bytes(fragment)) == flow_hash(stack_of([9]) + bytes(other_port))


@given(st.binary(max_size=80))
def test_entropy_never_raises(payload):
    payload = pack_entry(1001, 0, True, 64) + payload
    assert 0 <= entropy_index(payload, 16) < 16


def test_overhead_is_the_outer_ip_and_udp_headers_and_a_label():
    assert overhead("10.80.0.1") == 20 + 8 + 4
    assert overhead("0.0.0.0") == 32
    assert overhead("2001:db8::1") == 40 + 8 + 4


def test_an_agent_over_mpls_in_udp_leaves_its_tun_room_for_the_encapsulation():
    from mplslb.agents import AgentConfig

    common = {"role": "client", "interface": "eth0", "vips": ("10.0.0.100",)}
    assert AgentConfig(**common, gateway_mac=HOST_MAC).tun_mtu() == 1500 - 4
    assert AgentConfig(**common, balancer="10.80.0.1").tun_mtu() == 1500 - 32
    assert AgentConfig(**common, balancer="fd80::1", udp_local="fd79::2").tun_mtu() == 1500 - 52
    assert AgentConfig(**common, balancer="10.80.0.1", mtu=1400).tun_mtu() == 1400


# -- real sockets on loopback ---------------------------------------------------------------------------------
def udp_socket(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, 0))
    sock.settimeout(WAIT)
    return sock


def wait_frames(port: MplsUdpPort, n: int = 1) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + WAIT
    while len(got) < n and time.monotonic() < deadline:
        got += port.recv_burst()
        if len(got) < n:
            time.sleep(0.001)
    return got


@pytest.fixture
def pair() -> Iterator[tuple[MplsUdpPort, MplsUdpEndpointLink]]:
    """A balancer-side port on 127.0.0.1 and an agent's link on 127.0.0.2, on kernel-chosen ports."""
    port = MplsUdpPort(PORT_MAC, address="127.0.0.1", port=0)
    try:
        link = MplsUdpEndpointLink(HOST_MAC, ("127.0.0.1", port.port), address="127.0.0.2", port=0)
        try:
            port.remote_port = link.port
            yield port, link
        finally:
            link.close()
    finally:
        port.close()


def test_first_packet_crosses_as_explicit_null_and_arrives_unlabelled(pair):
    port, link = pair
    client = ClientEndpoint(mac=HOST_MAC, gateway_mac=link.balancer_mac)
    frame = client.from_host(query(), 0.0)
    assert frame is not None and eth_type(frame) == ETH_P_IP
    link.send(frame)
    (got,) = wait_frames(port)
    assert got == PORT_MAC + pseudo_mac(ipaddress.ip_address("127.0.0.2").packed) + b"\x08\x00" + query()
    assert port.peers == {pseudo_mac(b"\x7f\x00\x00\x02"): b"\x7f\x00\x00\x02"}


def test_labelled_frame_reaches_the_agent_with_the_balancer_as_source(pair):
    port, link = pair
    link.send(ether(link.balancer_mac, HOST_MAC, query()))
    (first,) = wait_frames(port)
    answer = labelled(first[6:12], PORT_MAC, 1002, query(payload=b"answer"))
    port.send(answer)
    (got,) = wait_frames(link)
    assert got == HOST_MAC + link.balancer_mac + b"\x88\x47" + answer[14:]
    assert link.balancer_mac == pseudo_mac(b"\x7f\x00\x00\x01")


def test_unknown_peer_and_unsupported_frames_are_counted(pair):
    port, _ = pair
    assert port.send(labelled(bytes.fromhex("02ffffffffff"), PORT_MAC, 1002, query())) == 0
    port.add_peer("127.0.0.9")
    assert port.send(build_ethernet(pseudo_mac(b"\x7f\x00\x00\x09"), PORT_MAC, ETH_P_ARP) + bytes(28)) == 0
    assert port.drops == {"udp_unknown_peer": 1, "udp_unsupported_frame": 1}


def test_malformed_datagrams_are_counted_not_raised(pair):
    port, _ = pair
    with udp_socket("127.0.0.3") as raw:
        for junk in (b"", b"\x00\x01", pack_entry(1001, 0, False, 64), pack_entry(1001, 0, True, 64) + query()):
            raw.sendto(junk, ("127.0.0.1", port.port))
        (good,) = wait_frames(port)
    assert good[14:] == pack_entry(1001, 0, True, 64) + query()
    assert port.drops == {"udp_empty": 1, "mpls_truncated": 1, "mpls_no_bottom": 1}


def test_datagrams_the_full_receive_buffer_lost_are_counted(pair):
    port, _ = pair
    port._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a few datagrams at most
    sent = 200
    datagram = pack_entry(1001, 0, True, 64) + query(payload=bytes(1000))
    with udp_socket("127.0.0.3") as raw:
        for _ in range(sent):
            raw.sendto(datagram, ("127.0.0.1", port.port))
        got = len(port.recv_burst(sent))
        raw.sendto(datagram, ("127.0.0.1", port.port))  # queued after the losses: it carries their count
        got += len(wait_frames(port))
    assert got < sent
    assert port.drops == {"udp_receive_buffer_full": sent + 1 - got}


def test_a_port_takes_the_receive_buffer_it_is_given_and_keeps_what_would_overflow_the_default():
    """``rcvbuf`` sizes the receiving socket (the kernel counts twice the value): a burst the system's default
    buffer loses part of fits in it whole."""
    sent = 600
    datagram = pack_entry(1001, 0, True, 64) + query(payload=bytes(1000))
    got = {}
    for rcvbuf in (None, 8 << 20):
        with MplsUdpPort(PORT_MAC, address="127.0.0.1", port=0, rcvbuf=rcvbuf) as port:
            if rcvbuf is not None:
                assert port._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * rcvbuf
            with udp_socket("127.0.0.3") as raw:
                for _ in range(sent):
                    raw.sendto(datagram, ("127.0.0.1", port.port))
                frames = port.recv_burst(2 * sent)
                raw.sendto(datagram, ("127.0.0.1", port.port))  # carries the count of what was lost before it
                frames += wait_frames(port)
            got[rcvbuf] = (len(frames), port.drops.get("udp_receive_buffer_full", 0))
    assert got[8 << 20] == (sent + 1, 0)
    assert got[None][1] > 0 and sum(got[None]) == sent + 1, "the default buffer held the burst: the test is void"


def test_agent_link_hears_only_its_balancer(pair):
    _, link = pair
    with udp_socket("127.0.0.3") as raw:
        raw.sendto(stack_of([1002]) + query(), ("127.0.0.2", link.port))
        deadline = time.monotonic() + 0.2
        while not link.drops and time.monotonic() < deadline:
            assert link.recv_burst() == []
            time.sleep(0.001)
    assert link.drops == {"udp_unknown_source": 1}


def test_source_port_is_canonical_and_alike_for_both_directions_of_a_session():
    with (
        udp_socket("127.0.0.3") as sink,
        MplsUdpPort(PORT_MAC, address="127.0.0.1", port=0) as port,
        MplsUdpPort(HOST_MAC, address="127.0.0.2", port=0) as other,
    ):
        port.remote_port = other.remote_port = sink.getsockname()[1]
        peer_mac, other_peer = port.add_peer("127.0.0.3"), other.add_peer("127.0.0.3")
        for sender in (port, other):
            assert all(ENTROPY_PORT_MIN <= p <= ENTROPY_PORT_MAX for p in sender.source_ports)
            assert len(set(sender.source_ports)) == 16
        both = port.symmetric and other.symmetric  # a canonical port may be held by another process here
        sports = range(40000, 40032)
        for sport in sports:
            port.send(labelled(peer_mac, PORT_MAC, 1001 + sport, flow(sport)))
            other.send(labelled(other_peer, HOST_MAC, 7001 + sport, flow(sport, reverse=True)))
        ports_of: dict[int, set[int]] = {}
        for _ in range(2 * len(sports)):
            data, (_, source_port) = sink.recvfrom(2048)
            inner = data[4:]
            client_port = int.from_bytes(inner[20:22] if inner[12:16] == client_addr() else inner[22:24], "big")
            ports_of.setdefault(client_port, set()).add(source_port)
    assert set(ports_of) == set(sports)
    if both:
        assert all(len(p) == 1 for p in ports_of.values())  # one session, one source port, both directions
    assert len(set().union(*ports_of.values())) >= 8  # sessions spread over the pool


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback (::1) here")
def test_dual_stack_port_hears_ipv4_and_ipv6_peers():
    with (
        MplsUdpPort(PORT_MAC, address="::", port=0) as port,
        udp_socket("127.0.0.1") as v4,
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as v6,
    ):
        v4.sendto(stack_of([1001]) + query(), ("127.0.0.1", port.port))
        v6.sendto(stack_of([1003]) + query(), ("::1", port.port))
        frames = wait_frames(port, 2)
        assert sorted(f[6:12] for f in frames) == sorted(
            [pseudo_mac(b"\x7f\x00\x00\x01"), pseudo_mac(ipaddress.ip_address("::1").packed)]
        )
        # Back to the IPv4 peer through the dual-stack sockets (as an IPv4-mapped address).
        port.remote_port = v4.getsockname()[1]
        port.send(labelled(pseudo_mac(b"\x7f\x00\x00\x01"), PORT_MAC, 1002, query()))
        data, _ = v4.recvfrom(2048)
    assert data == stack_of([1002]) + query()


# -- a whole session through a Balancer driven by the Loop, over MPLS-in-UDP on loopback ----------------------
def test_session_through_balancer_over_mpls_in_udp():
    client_ip, server_ip = "127.0.0.2", "127.0.0.5"
    pm_client, pm_server = bytes.fromhex("02b000000000"), bytes.fromhex("02b000000002")
    server_mac = pseudo_mac(ipaddress.ip_address(server_ip).packed)
    config = BalancerConfig(
        ports=(PortConfig(0, 0, 0, pm_client, "client"), PortConfig(2, 1, 0, pm_server, "server")),
        vips=(VirtualService(VIP, (80,), (53,)),),
        servers=(ServerConfig("s1", ipaddress.ip_address(server_ip).packed, server_mac, port_id=2),),
    )
    balancer = Balancer(config)
    loop = Loop()
    with (
        MplsUdpPort(pm_client, address="127.0.0.1", port=0) as front,
        MplsUdpPort(pm_server, address="127.0.0.4", port=0, peers=[server_ip], learn=False) as back,
        MplsUdpEndpointLink(
            bytes.fromhex("02c000000001"), ("127.0.0.1", front.port), address=client_ip, port=0
        ) as client_link,
        MplsUdpEndpointLink(
            bytes.fromhex("025e00000001"), ("127.0.0.4", back.port), address=server_ip, port=0
        ) as server_link,
    ):
        front.remote_port, back.remote_port = client_link.port, server_link.port
        driver = BalancerDriver(balancer, {0: front, 2: back}, loop)
        client = ClientEndpoint(mac=client_link.mac, gateway_mac=client_link.balancer_mac)
        server = ServerEndpoint(mac=server_link.mac, vips=[VIP])

        def exchange(sender: MplsUdpEndpointLink, frame: bytes | None, receiver: MplsUdpEndpointLink) -> bytes:
            assert frame is not None
            sender.send(frame)
            for _ in range(200):
                loop.run_once(0.02)
                got = receiver.recv_burst()
                if got:
                    assert len(got) == 1
                    return got[0]
            raise AssertionError(f"nothing arrived; balancer drops {balancer.stats().drops}")

        ask = query(payload=b"first")
        at_server = exchange(client_link, client.from_host(ask, 0.0), server_link)
        assert eth_type(at_server) == ETH_P_MPLS_UC  # the balancer attached the session's C2S label
        assert server.from_wire(at_server, 0.0) == ask
        reply = ip_packet(VIP, client_addr(), IPPROTO_UDP, udp_datagram(VIP, client_addr(), 53, 40000, b"answer"))
        at_client = exchange(server_link, server.from_host(reply, 0.0), client_link)
        assert client.from_wire(at_client, 0.0) == reply
        again = query(payload=b"second")
        second = client.from_host(again, 0.0)
        assert second is not None and eth_type(second) == ETH_P_MPLS_UC  # the client now labels: no analysis
        assert server.from_wire(exchange(client_link, second, server_link), 0.0) == again
        driver.close()
    loop.close()
    stats = balancer.stats()
    assert (stats.slow_path, stats.fast_path, stats.sessions_started) == (1, 2, 1)
    assert driver.frames_read == {0: 2, 2: 1} and driver.frames_written == {0: 1, 2: 2}
    assert not driver.send_errors and not front.drops and not back.drops
