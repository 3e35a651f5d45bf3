"""The TUN driver in a throwaway namespace (root): packets written into the device reach the namespace's stack, and
the kernel's answers are read back out of it."""

from __future__ import annotations

import ipaddress
import itertools
import os
import select
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from pyroute2 import IPRoute, netns

from helpers import icmp4, ip_packet, udp_datagram
from mplslb.drivers.netns import entered
from mplslb.drivers.tun import TunDevice
from mplslb.wire.ip import IPPROTO_ICMP, IPPROTO_UDP
from mplslb.wire.ipv4 import parse_ipv4
from mplslb.wire.udp import parse_udp

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network namespaces and TUN devices"),
]

LOCAL = ipaddress.ip_address("10.99.0.1").packed  # the namespace's address on the TUN
REMOTE = ipaddress.ip_address("10.99.0.2").packed  # a host "behind" the TUN: the test plays it
WAIT = 5.0
ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0
_serial = itertools.count()


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"mlbt{os.getpid()}t{next(_serial)}"
    try:
        netns.create(name)
        yield name
    finally:
        if name in netns.listnetns():
            netns.remove(name)


@pytest.fixture
def tun(namespace: str) -> Iterator[TunDevice]:
    """A TUN device in the namespace, up, MTU 1400, with 10.99.0.1/24."""
    device = TunDevice(f"mlbt{os.getpid()}t", netns=namespace)
    try:
        device.configure(up=True, mtu=1400, addresses=[("10.99.0.1", 24)])
        yield device
    finally:
        device.close()


def read_matching(device: TunDevice, match: Callable[[bytes], bool]) -> bytes:
    """The first packet out of the device that ``match`` accepts (IPv6 chatter and the like are passed over)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        select.select([device], [], [], 0.05)
        for packet in device.recv_burst():
            if match(packet):
                return packet
    raise AssertionError("no matching packet came out of the TUN device")


def ipv4_proto(packet: bytes, proto: int) -> bool:
    return len(packet) >= 20 and packet[0] >> 4 == 4 and packet[9] == proto


def link_of(namespace: str, name: str) -> dict[str, object] | None:
    with entered(namespace), IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return None
        link = ipr.get_links(found[0])[0]
        return {"mtu": link.get("IFLA_MTU"), "state": link.get("IFLA_OPERSTATE"), "flags": link["flags"]}


def test_device_is_created_in_the_namespace_and_configured(tun, namespace):
    assert tun.name == f"mlbt{os.getpid()}t"
    link = link_of(namespace, tun.name)
    assert link is not None and link["mtu"] == 1400 and int(link["flags"]) & 1  # IFF_UP
    assert socket.if_nametoindex("lo") and tun.name not in {n for _, n in socket.if_nameindex()}  # not out here


def test_kernel_chooses_a_name_and_close_removes_the_device(namespace):
    device = TunDevice(netns=namespace)
    try:
        assert device.name.startswith("tun")
        assert link_of(namespace, device.name) is not None
    finally:
        device.close()
    assert link_of(namespace, device.name) is None
    device.close()  # twice is harmless


def test_nothing_to_read_returns_at_once(namespace):
    with TunDevice(netns=namespace) as quiet:  # down: the kernel sends nothing into it
        start = time.monotonic()
        assert quiet.recv_burst() == []
        assert time.monotonic() - start < 0.5
        assert quiet.drops == {}


def test_echo_request_written_in_is_answered_by_the_kernel(tun):
    request = ip_packet(REMOTE, LOCAL, IPPROTO_ICMP, icmp4(ICMP_ECHO_REQUEST, 0, (0x1234 << 16) | 7, b"mplslb" * 8))
    assert tun.send(request) == len(request)
    reply = read_matching(tun, lambda p: ipv4_proto(p, IPPROTO_ICMP))
    header = parse_ipv4(reply)
    assert (header.src, header.dst) == (LOCAL, REMOTE)
    icmp = reply[header.payload_offset : header.end]
    assert icmp[0] == ICMP_ECHO_REPLY and icmp[4:] == request[24:]  # same identifier, sequence and data


def test_udp_datagram_written_in_reaches_a_socket_and_its_answer_comes_out(tun, namespace):
    with entered(namespace):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("10.99.0.1", 7777))
        sock.settimeout(WAIT)
        datagram = udp_datagram(REMOTE, LOCAL, 5555, 7777, b"hello through the tun")
        tun.send(ip_packet(REMOTE, LOCAL, IPPROTO_UDP, datagram))
        data, source = sock.recvfrom(2048)
        assert (data, source) == (b"hello through the tun", ("10.99.0.2", 5555))
        sock.sendto(b"and back", source)
        packet = read_matching(tun, lambda p: ipv4_proto(p, IPPROTO_UDP))
    finally:
        sock.close()
    header = parse_ipv4(packet)
    assert (header.src, header.dst) == (LOCAL, REMOTE)
    u = parse_udp(packet, header.payload_offset, header.end)
    assert (u.sport, u.dport, packet[u.payload_offset : u.end]) == (7777, 5555, b"and back")


def test_a_burst_of_answers_is_read_in_one_call(tun):
    requests = [
        ip_packet(REMOTE, LOCAL, IPPROTO_ICMP, icmp4(ICMP_ECHO_REQUEST, 0, (0x4242 << 16) | seq, b"x" * 32))
        for seq in range(20)
    ]
    for request in requests:
        tun.send(request)
    replies: list[bytes] = []
    deadline = time.monotonic() + WAIT
    while len(replies) < len(requests) and time.monotonic() < deadline:
        select.select([tun], [], [], 0.05)
        replies += [p for p in tun.recv_burst(64) if ipv4_proto(p, IPPROTO_ICMP)]
    assert [int.from_bytes(p[26:28], "big") for p in replies] == list(range(20))  # in order


def test_writing_a_non_ip_packet_raises(tun):
    with pytest.raises(OSError):
        tun.send(b"\x00" * 40)


def test_bad_names_are_refused():
    with pytest.raises(ValueError):
        TunDevice("x" * 16)
