"""ARP and IPv6 neighbour discovery for the virtual IPs, answered on client-side ports; checked against scapy."""

from __future__ import annotations

from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6NDOptDstLLAddr, ICMPv6NDOptSrcLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

from helpers import PORT_MAC, VIP, VIP6, Net
from mplslb.neighbors import answer

CLIENT_MAC = "02:c0:00:00:00:07"


def test_arp_request_for_the_vip_is_answered_with_the_ports_mac() -> None:
    net = Net()
    request = bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src=CLIENT_MAC) / ARP(op=1, hwsrc=CLIENT_MAC, psrc="10.1.0.7",
                                                                        pdst="10.0.0.100"))  # fmt: skip
    out = net.balancer.receive(1, request, 0.0)
    assert len(out) == 1 and out[0][0] == 1
    reply = Ether(out[0][1])
    assert reply[ARP].op == 2 and reply[ARP].hwsrc == PORT_MAC[1].hex(":") and reply[ARP].psrc == "10.0.0.100"
    assert reply[ARP].pdst == "10.1.0.7" and reply.dst == CLIENT_MAC
    assert net.balancer.neighbor_replies == 1


def test_arp_for_other_addresses_and_on_server_ports_is_not_answered() -> None:
    net = Net()
    other = bytes(Ether(src=CLIENT_MAC) / ARP(op=1, hwsrc=CLIENT_MAC, psrc="10.1.0.7", pdst="10.0.0.99"))
    assert net.balancer.receive(0, other, 0.0) == []
    for_vip = bytes(Ether(src=CLIENT_MAC) / ARP(op=1, hwsrc=CLIENT_MAC, psrc="10.1.0.7", pdst="10.0.0.100"))
    assert net.balancer.receive(2, for_vip, 0.0) == []  # a server-side port never answers for the VIP
    assert answer(for_vip[:20], {VIP}, PORT_MAC[0]) is None


def test_neighbour_solicitation_for_the_vip6_gets_a_valid_advertisement() -> None:
    net = Net()
    ns = Ether(dst="33:33:ff:00:01:00", src=CLIENT_MAC) / IPv6(src="fd00:1::7", dst="ff02::1:ff00:100", hlim=255)
    ns = ns / ICMPv6ND_NS(tgt="fd00::100") / ICMPv6NDOptSrcLLAddr(lladdr=CLIENT_MAC)
    out = net.balancer.receive(0, bytes(ns), 0.0)
    assert len(out) == 1
    na = Ether(out[0][1])
    assert na[IPv6].hlim == 255 and na[IPv6].src == "fd00::100" and na[IPv6].dst == "fd00:1::7"
    assert na[ICMPv6ND_NA].tgt == "fd00::100" and na[ICMPv6ND_NA].S == 1 and na[ICMPv6ND_NA].O == 1
    assert na[ICMPv6NDOptDstLLAddr].lladdr == PORT_MAC[0].hex(":")
    # scapy recomputes the checksum: ours must equal it.
    rebuilt = Ether(bytes(na))
    del rebuilt[ICMPv6ND_NA].cksum
    assert Ether(bytes(rebuilt))[ICMPv6ND_NA].cksum == na[ICMPv6ND_NA].cksum
    assert answer(bytes(ns), {VIP}, PORT_MAC[0]) is None and VIP6 in net.balancer.vips
