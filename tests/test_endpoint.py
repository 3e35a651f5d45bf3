"""The endpoints: a server answers C2S label L with L + 1, a client answers S2C label M with M - 1, no signalling."""

from __future__ import annotations

import struct

import pytest

from helpers import (
    ACK,
    DNS,
    FIN,
    HTTP,
    PORT_MAC,
    PSH,
    SERVER_BY_MAC,
    SYN,
    VIP,
    VIP6,
    client_addr,
    client_mac,
    icmp4,
    icmp6,
    ip,
    ip_packet,
    labelled,
    mac,
    standard_balancer,
    tcp_segment,
    udp_datagram,
)
from mplslb.endpoint import ClientEndpoint, ServerEndpoint
from mplslb.flow import FlowKey
from mplslb.wire.ethernet import ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, ETH_P_MPLS_UC, build_ethernet
from mplslb.wire.ip import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP
from mplslb.wire.mpls import pack_entry

SERVER_MAC = mac(0x5E, 1)
BALANCER_MAC = mac(0xB1, 0)  # the balancer's server-side port
GATEWAY = PORT_MAC[0]  # the balancer's client-side port
C2S = 1001

VARIANTS = [(False, IPPROTO_TCP), (False, IPPROTO_UDP), (True, IPPROTO_TCP), (True, IPPROTO_UDP)]
VARIANT_IDS = ["ipv4-tcp", "ipv4-udp", "ipv6-tcp", "ipv6-udp"]


def addresses(v6: bool, client: int = 0) -> tuple[bytes, bytes]:
    return client_addr(client, v6), VIP6 if v6 else VIP


def request(
    v6: bool, proto: int, flags: int = SYN, payload: bytes = b"", *, client: int = 0, sport: int = 40000
) -> bytes:
    """An IP packet from a client to the VIP."""
    src, dst = addresses(v6, client)
    if proto == IPPROTO_TCP:
        return ip_packet(src, dst, proto, tcp_segment(src, dst, sport, HTTP, flags, payload))
    return ip_packet(src, dst, proto, udp_datagram(src, dst, sport, DNS, payload or b"query"))


def reply(v6: bool, proto: int, flags: int = SYN | ACK, payload: bytes = b"", *, src: bytes | None = None) -> bytes:
    """An IP packet from the VIP (or ``src``) back to the client."""
    client, vip = addresses(v6)
    vip = src or vip
    if proto == IPPROTO_TCP:
        return ip_packet(vip, client, proto, tcp_segment(vip, client, HTTP, 40000, flags, payload))
    return ip_packet(vip, client, proto, udp_datagram(vip, client, DNS, 40000, payload or b"answer"))


def addresses_key(v6: bool, proto: int) -> FlowKey:
    """The key of a session's replies, as the server sends them."""
    client_ip, vip = addresses(v6)
    vport = HTTP if proto == IPPROTO_TCP else DNS
    return FlowKey(proto, vip, vport, client_ip, 40000)


def stack_of(frame: bytes) -> tuple[bytes, bytes, int, int, bool, bytes]:
    """(dst, src, label, ttl, bottom, rest) of an untagged MPLS frame."""
    assert frame[12:14] == struct.pack("!H", ETH_P_MPLS_UC)
    (entry,) = struct.unpack_from("!I", frame, 14)
    return frame[:6], frame[6:12], entry >> 12, entry & 0xFF, bool(entry & 0x100), frame[18:]


def server() -> ServerEndpoint:
    return ServerEndpoint(mac=SERVER_MAC, vips=[VIP, VIP6], flow_timeout=10.0)


def client() -> ClientEndpoint:
    return ClientEndpoint(mac=client_mac(0), gateway_mac=GATEWAY, flow_timeout=10.0)


# -- the server side -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("v6", "proto"), VARIANTS, ids=VARIANT_IDS)
def test_server_answers_label_with_label_plus_one(v6: bool, proto: int) -> None:
    s = server()
    packet = request(v6, proto)
    assert s.from_wire(labelled(SERVER_MAC, BALANCER_MAC, C2S, packet), 1.0) == packet
    answer = reply(v6, proto)
    frame = s.from_host(answer, 1.5)
    assert frame is not None
    assert stack_of(frame) == (BALANCER_MAC, SERVER_MAC, C2S + 1, 64, True, answer)
    assert s.label_for(addresses_key(v6, proto)) == C2S + 1
    assert s.drops == {} and s.counters == {"from_wire": 1, "from_host": 1}


def test_server_learns_each_session_separately() -> None:
    s = server()
    for i, label in enumerate((21, 523)):
        s.from_wire(labelled(SERVER_MAC, BALANCER_MAC, label, request(False, IPPROTO_TCP, sport=50000 + i)), 0.0)
    for i, label in enumerate((22, 524)):
        src, dst = VIP, client_addr()
        frame = s.from_host(ip_packet(src, dst, IPPROTO_TCP, tcp_segment(src, dst, HTTP, 50000 + i, ACK)), 1.0)
        assert frame is not None and stack_of(frame)[2] == label


def test_server_refuses_replies_not_from_the_vip() -> None:
    s = server()
    s.from_wire(labelled(SERVER_MAC, BALANCER_MAC, C2S, request(False, IPPROTO_TCP)), 0.0)
    real = ip("10.2.0.11")  # the server's own address: claim 12 says never
    assert s.from_host(reply(False, IPPROTO_TCP, src=real), 1.0) is None
    assert s.from_host(reply(True, IPPROTO_UDP, src=ip("fd00::11")), 1.0) is None
    assert s.drops == {"not_from_vip": 2}


def test_server_without_a_learned_label_sends_nothing() -> None:
    s = server()
    assert s.from_host(reply(False, IPPROTO_TCP), 0.0) is None
    assert s.drops == {"no_session_label": 1}


@pytest.mark.parametrize("label", [18, 1002, 1048574])
def test_even_label_to_a_server_is_dropped(label: int) -> None:
    s = server()
    assert s.from_wire(labelled(SERVER_MAC, BALANCER_MAC, label, request(False, IPPROTO_TCP)), 0.0) is None
    assert s.drops == {"not_c2s_label": 1} and s.flows == {}


@pytest.mark.parametrize("label", [3, 15, 1048575])
def test_labels_outside_the_c2s_range_to_a_server_are_dropped(label: int) -> None:
    s = server()
    assert s.from_wire(labelled(SERVER_MAC, BALANCER_MAC, label, request(False, IPPROTO_TCP)), 0.0) is None
    assert s.drops == {"not_c2s_label": 1}


def test_server_drops_what_is_not_for_a_vip_or_not_labelled_or_broken() -> None:
    s = server()
    src, other = client_addr(), ip("10.0.0.200")
    to_other = ip_packet(src, other, IPPROTO_TCP, tcp_segment(src, other, 1, HTTP, SYN))
    assert s.from_wire(labelled(SERVER_MAC, BALANCER_MAC, C2S, to_other), 0.0) is None
    plain = build_ethernet(SERVER_MAC, BALANCER_MAC, ETH_P_IP) + request(False, IPPROTO_TCP)
    assert s.from_wire(plain, 0.0) is None
    assert s.from_wire(labelled(SERVER_MAC, BALANCER_MAC, C2S, b"")[:16], 0.0) is None
    assert s.from_wire(labelled(SERVER_MAC, BALANCER_MAC, C2S, b"\x45" + bytes(10)), 0.0) is None
    assert s.from_wire(b"\x00" * 5, 0.0) is None
    assert s.from_host(b"", 0.0) is None
    assert s.drops == {
        "not_for_vip": 1,
        "unlabelled": 1,
        "mpls_truncated": 1,
        "ipv4_truncated": 1,
        "ethernet_truncated": 1,
        "ip_truncated": 1,
    }
    assert s.flows == {}


def test_server_takes_the_packet_below_a_deeper_stack() -> None:
    s = server()
    packet = request(False, IPPROTO_UDP)
    frame = labelled(SERVER_MAC, BALANCER_MAC, C2S, packet, s=False, below=[pack_entry(77)])
    assert s.from_wire(frame, 0.0) == packet
    answer = s.from_host(reply(False, IPPROTO_UDP), 0.0)
    assert answer is not None and stack_of(answer)[2] == C2S + 1


@pytest.mark.parametrize("v6", [False, True], ids=["icmp", "icmpv6"])
def test_server_learns_from_an_icmp_error_about_its_datagram(v6: bool) -> None:
    """An error the client sent about the VIP's datagram arrives on C2S; the server's next datagram uses C2S + 1."""
    s = server()
    quoted = reply(v6, IPPROTO_UDP)
    client_ip, vip = addresses(v6)
    if v6:
        error = ip_packet(client_ip, vip, IPPROTO_ICMPV6, icmp6(1, 4, body=quoted))
    else:
        error = ip_packet(client_ip, vip, IPPROTO_ICMP, icmp4(3, 3, body=quoted))
    assert s.from_wire(labelled(SERVER_MAC, BALANCER_MAC, C2S, error), 0.0) == error
    frame = s.from_host(reply(v6, IPPROTO_UDP), 0.1)
    assert frame is not None and stack_of(frame)[2] == C2S + 1


# -- the client side -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("v6", "proto"), VARIANTS, ids=VARIANT_IDS)
def test_client_first_packet_unlabelled_then_label_minus_one(v6: bool, proto: int) -> None:
    c = client()
    first = request(v6, proto)
    frame = c.from_host(first, 0.0)
    assert frame == build_ethernet(GATEWAY, client_mac(0), ETH_P_IPV6 if v6 else ETH_P_IP) + first
    answer = reply(v6, proto)
    s2c = 2002
    assert c.from_wire(labelled(client_mac(0), GATEWAY, s2c, answer), 0.1) == answer
    second = request(v6, proto, ACK, b"GET / HTTP/1.1\r\n\r\n")
    frame = c.from_host(second, 0.2)
    assert frame is not None
    assert stack_of(frame) == (GATEWAY, client_mac(0), s2c - 1, 64, True, second)
    assert c.drops == {}
    assert c.counters == {"from_host_unlabelled": 1, "from_wire": 1, "from_host": 1}


def test_client_new_syn_on_a_reused_port_goes_unlabelled() -> None:
    c = client()
    c.from_host(request(False, IPPROTO_TCP), 0.0)
    c.from_wire(labelled(client_mac(0), GATEWAY, 2002, reply(False, IPPROTO_TCP)), 0.1)
    assert stack_of(c.from_host(request(False, IPPROTO_TCP, FIN | ACK), 0.2) or b"")[2] == 2001
    again = c.from_host(request(False, IPPROTO_TCP, SYN), 5.0)
    assert again is not None and again[12:14] == struct.pack("!H", ETH_P_IP)
    # The old label is forgotten: the rest of the new connection waits for the new session's label.
    follow = c.from_host(request(False, IPPROTO_TCP, ACK), 5.1)
    assert follow is not None and follow[12:14] == struct.pack("!H", ETH_P_IP)
    c.from_wire(labelled(client_mac(0), GATEWAY, 4002, reply(False, IPPROTO_TCP)), 5.2)
    assert stack_of(c.from_host(request(False, IPPROTO_TCP, ACK), 5.3) or b"")[2] == 4001


def test_client_syn_ack_and_other_flags_keep_the_label() -> None:
    c = client()
    c.from_wire(labelled(client_mac(0), GATEWAY, 2002, reply(False, IPPROTO_TCP)), 0.0)
    for flags in (SYN | ACK, ACK, PSH | ACK, FIN | ACK):
        frame = c.from_host(request(False, IPPROTO_TCP, flags), 0.1)
        assert frame is not None and stack_of(frame)[2] == 2001


@pytest.mark.parametrize("label", [17, 1001, 1048573])
def test_odd_label_to_a_client_is_dropped(label: int) -> None:
    c = client()
    assert c.from_wire(labelled(client_mac(0), GATEWAY, label, reply(False, IPPROTO_TCP)), 0.0) is None
    assert c.drops == {"not_s2c_label": 1} and c.flows == {}


def test_client_takes_unlabelled_refusals_and_drops_other_ethertypes() -> None:
    c = client()
    rst = reply(False, IPPROTO_TCP, flags=0x14)
    assert c.from_wire(build_ethernet(client_mac(0), GATEWAY, ETH_P_IP) + rst, 0.0) == rst
    assert c.from_wire(build_ethernet(client_mac(0), GATEWAY, ETH_P_ARP) + bytes(28), 0.0) is None
    assert c.from_wire(b"\x01\x02", 0.0) is None
    assert c.from_host(b"\x75" + bytes(30), 0.0) is None
    assert c.drops == {"unsupported_ethertype": 1, "ethernet_truncated": 1, "ip_bad_version": 1}
    assert c.counters == {"from_wire_unlabelled": 1}
    assert c.flows == {}


def test_endpoints_check_their_mac_addresses() -> None:
    with pytest.raises(ValueError, match="mac must be 6 bytes"):
        ServerEndpoint(mac=b"\x02" * 5, vips=[VIP])
    with pytest.raises(ValueError, match="gateway_mac must be 6 bytes"):
        ClientEndpoint(mac=client_mac(0), gateway_mac=b"")


# -- flow expiry -----------------------------------------------------------------------------------------------
def test_idle_flows_are_forgotten_on_timer() -> None:
    s = server()
    s.from_wire(labelled(SERVER_MAC, BALANCER_MAC, C2S, request(False, IPPROTO_UDP)), 0.0)
    key = addresses_key(False, IPPROTO_UDP)
    assert s.next_deadline() == 10.0
    assert s.on_timer(9.99) == 0 and s.label_for(key) == C2S + 1
    assert s.on_timer(10.0) == 1 and s.label_for(key) is None
    assert s.next_deadline() is None
    assert s.from_host(reply(False, IPPROTO_UDP), 10.5) is None
    assert s.drops == {"no_session_label": 1}


def test_used_flows_are_kept_and_rearmed() -> None:
    c = client()
    c.from_wire(labelled(client_mac(0), GATEWAY, 2002, reply(False, IPPROTO_UDP)), 0.0)
    key = FlowKey(IPPROTO_UDP, client_addr(), 40000, VIP, DNS)  # the client keys flows as it sends them
    assert c.label_for(key) == 2001
    c.from_host(request(False, IPPROTO_UDP), 6.0)  # used at 6: idle until 16
    assert c.on_timer(10.0) == 0 and c.label_for(key) == 2001
    assert c.next_deadline() == 16.0
    assert c.on_timer(15.9) == 0
    assert c.on_timer(16.0) == 1 and c.label_for(key) is None


def test_rearmed_flow_behind_a_later_flow_expires_on_time() -> None:
    s = server()
    a = request(False, IPPROTO_UDP, sport=40000)
    b = request(False, IPPROTO_UDP, sport=40001)
    s.from_wire(labelled(SERVER_MAC, BALANCER_MAC, C2S, a), 0.0)  # flow A, deadline 10
    s.from_host(reply(False, IPPROTO_UDP), 1.0)  # A used at 1: really idle from 11
    s.from_wire(labelled(SERVER_MAC, BALANCER_MAC, C2S + 2, b), 8.0)  # flow B, deadline 18
    assert s.on_timer(10.0) == 0  # A re-armed for 11
    assert s.next_deadline() == 11.0
    assert s.on_timer(11.0) == 1  # A idle for flow_timeout: forgotten


# -- both endpoints through the balancer -----------------------------------------------------------------------
@pytest.mark.parametrize(("v6", "proto"), VARIANTS, ids=VARIANT_IDS)
def test_a_session_through_the_balancer(v6: bool, proto: int) -> None:
    """Client -> balancer -> server -> balancer -> client -> balancer: labels L, L + 1, L again, no signalling."""
    b = standard_balancer()
    c = client()
    out = b.receive(0, c.from_host(request(v6, proto), 0.0) or b"", 0.0)
    [(server_port, to_server)] = out
    server_mac = to_server[:6]
    s = ServerEndpoint(mac=server_mac, vips=[VIP, VIP6])
    label = stack_of(to_server)[2]
    assert label % 2 == 1 and SERVER_BY_MAC[server_mac].port_id == server_port
    assert s.from_wire(to_server, 0.01) == request(v6, proto)
    answer = s.from_host(reply(v6, proto), 0.02)
    assert answer is not None and stack_of(answer)[2] == label + 1
    [(client_port, to_client)] = b.receive(server_port, answer, 0.02)
    assert client_port == 0 and stack_of(to_client)[:3] == (client_mac(0), GATEWAY, label + 1)
    assert c.from_wire(to_client, 0.03) == reply(v6, proto)
    follow = c.from_host(request(v6, proto, ACK, b"more"), 0.04)
    assert follow is not None and stack_of(follow)[2] == label
    [(port, again)] = b.receive(0, follow, 0.04)
    assert port == server_port and s.from_wire(again, 0.05) == request(v6, proto, ACK, b"more")
    assert b.stats().fast_path == 2 and b.stats().slow_path == 1
    assert s.drops == {} and c.drops == {}
