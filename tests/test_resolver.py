"""The neighbour resolver: servers configured by IP address alone get their MAC by ARP / neighbour discovery.

Sans-I/O: frames are carried by hand, checked against scapy, and time is passed in.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2 import IPRoute
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6NDOptDstLLAddr, ICMPv6NDOptSrcLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

from helpers import (
    PORT_MAC,
    SERVER_PORTS,
    SYN,
    VIP,
    VIP6,
    Net,
    client_addr,
    handshake,
    ip,
    label_of,
    mac,
    make_config,
    tcp,
    wait_until_ready,
)
from mplslb.balancer import Balancer
from mplslb.balancing.servers import DownReason
from mplslb.config import ConfigError, PortConfig
from mplslb.control.metrics import SnapshotCollector
from mplslb.control.tables import snapshot, status_tables
from mplslb.daemon import load_daemon_config, server_side_ethertypes
from mplslb.drivers.afpacket import PacketPort
from mplslb.drivers.netns import entered
from mplslb.neighbors import announcement, heard, link_local, neighbor_solicitation
from mplslb.resolver import MacChange, NeighborState, Resolver, ResolverTimers
from mplslb.wire.ethernet import ETH_P_ARP, ETH_P_IPV6, ETH_P_MPLS_UC

PORT = 2
PMAC = PORT_MAC[PORT]
SERVER4 = ip("10.2.0.1")
SERVER6 = ip("fd02::1")
SMAC = mac(0x5E, 1)
NEW_MAC = mac(0x5E, 0x99)


def arp_reply(sender_mac: bytes, sender_ip: bytes, to_mac: bytes = PMAC) -> bytes:
    return bytes(Ether(dst=to_mac.hex(":"), src=sender_mac.hex(":")) / ARP(
        op=2, hwsrc=sender_mac.hex(":"), psrc=_text(sender_ip), hwdst=to_mac.hex(":"), pdst="0.0.0.0"))  # fmt: skip


def garp(sender_mac: bytes, sender_ip: bytes) -> bytes:
    return bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src=sender_mac.hex(":")) / ARP(
        op=1, hwsrc=sender_mac.hex(":"), psrc=_text(sender_ip), pdst=_text(sender_ip)))  # fmt: skip


def na(sender_mac: bytes, target: bytes, *, override: bool = True) -> bytes:
    frame = Ether(dst=PMAC.hex(":"), src=sender_mac.hex(":")) / IPv6(src=_text(target), dst="fe80::1", hlim=255)
    frame = frame / ICMPv6ND_NA(tgt=_text(target), S=1, O=int(override))
    return bytes(frame / ICMPv6NDOptDstLLAddr(lladdr=sender_mac.hex(":")))


def _text(address: bytes) -> str:
    import ipaddress

    return str(ipaddress.ip_address(address))


def resolver(**timers: float) -> Resolver:
    return Resolver({PORT: (PMAC, b""), 3: (PORT_MAC[3], ip("10.2.0.254"))}, ResolverTimers(**timers))  # type: ignore[arg-type]


# -- frames ----------------------------------------------------------------------------------------------------
def test_an_ipv4_server_is_probed_by_broadcast_arp_and_learned_from_the_reply() -> None:
    r = resolver()
    n = r.add("s1", SERVER4, PORT, now=10.0)
    assert r.next_deadline() == 10.0 and n.status == "resolving"
    frames, changes = r.on_timer(10.0)
    assert changes == [] and len(frames) == 1 and frames[0][0] == PORT
    probe = Ether(frames[0][1])
    assert probe.dst == "ff:ff:ff:ff:ff:ff" and probe.src == PMAC.hex(":")
    assert probe[ARP].op == 1 and probe[ARP].pdst == "10.2.0.1" and probe[ARP].psrc == "0.0.0.0"
    assert probe[ARP].hwsrc == PMAC.hex(":")
    assert r.receive(PORT, arp_reply(SMAC, SERVER4), 10.1) == [MacChange("s1", b"", SMAC)]
    assert n.state is NeighborState.REACHABLE and n.mac == SMAC
    assert r.next_deadline() == 10.1 + r.timers.reachable


def test_the_ports_own_ipv4_address_is_the_probes_sender() -> None:
    r = resolver()
    r.add("s2", ip("10.2.0.2"), 3, now=0.0)
    (port, frame), = r.on_timer(0.0)[0]  # fmt: skip
    assert port == 3 and Ether(frame)[ARP].psrc == "10.2.0.254"


def test_an_ipv6_server_is_solicited_on_its_solicited_node_group() -> None:
    r = resolver()
    r.add("s6", SERVER6, PORT, now=0.0)
    (port, frame), = r.on_timer(0.0)[0]  # fmt: skip
    assert port == PORT
    ns = Ether(frame)
    assert ns.dst == "33:33:ff:00:00:01" and ns[IPv6].dst == "ff02::1:ff00:1" and ns[IPv6].hlim == 255
    assert ns[IPv6].src == _text(link_local(PMAC)) and ns[IPv6].src.startswith("fe80::")
    assert ns[ICMPv6ND_NS].tgt == "fd02::1" and ns[ICMPv6NDOptSrcLLAddr].lladdr == PMAC.hex(":")
    rebuilt = Ether(frame)
    del rebuilt[ICMPv6ND_NS].cksum
    assert Ether(bytes(rebuilt))[ICMPv6ND_NS].cksum == ns[ICMPv6ND_NS].cksum  # scapy agrees with our checksum
    assert r.receive(PORT, na(SMAC, SERVER6), 0.2) == [MacChange("s6", b"", SMAC)]


def test_heard_reads_solicitations_and_rejects_bad_checksums() -> None:
    ns = neighbor_solicitation(SMAC, ip("fd02::9"))  # a server asking for someone: tells its own address
    assert heard(ns) == (link_local(SMAC), SMAC)
    broken = bytearray(ns)
    broken[-1] ^= 0xFF
    assert heard(bytes(broken)) is None
    assert heard(announcement(SMAC, SERVER6)) == (SERVER6, SMAC)
    assert heard(announcement(SMAC, SERVER4)) == (SERVER4, SMAC)


def test_a_probe_from_an_unspecified_address_tells_nothing() -> None:
    probe = bytes(Ether(src=SMAC.hex(":")) / ARP(op=1, hwsrc=SMAC.hex(":"), psrc="0.0.0.0", pdst="10.2.0.1"))
    assert heard(probe) is None


def test_announcements_are_what_scapy_reads() -> None:
    g = Ether(announcement(PMAC, VIP))
    assert g.dst == "ff:ff:ff:ff:ff:ff" and g[ARP].op == 1 and g[ARP].psrc == g[ARP].pdst == "10.0.0.100"
    u = Ether(announcement(PMAC, VIP6))
    assert u.dst == "33:33:00:00:00:01" and u[IPv6].dst == "ff02::1" and u[ICMPv6ND_NA].O == 1
    assert u[ICMPv6ND_NA].S == 0 and u[ICMPv6ND_NA].tgt == "fd00::100"
    assert u[ICMPv6NDOptDstLLAddr].lladdr == PMAC.hex(":")


# -- the state machine ------------------------------------------------------------------------------------------
def test_unanswered_probes_fail_then_retry_with_doubling_backoff() -> None:
    r = resolver(retrans=1.0, probes=3, retry_min=2.0, retry_max=5.0)
    n = r.add("s1", SERVER4, PORT, now=0.0)
    sent = []
    now = 0.0
    for _ in range(12):
        deadline = r.next_deadline()
        assert deadline is not None
        now = deadline
        frames, _ = r.on_timer(now)
        sent.append((now, len(frames), n.state))
    times = [t for t, count, _ in sent if count]
    assert times[:3] == [0.0, 1.0, 2.0]  # three probes a second apart
    assert sent[3] == (3.0, 0, NeighborState.FAILED) and n.status == "unresolved"
    gaps = [b - a for a, b in itertools.pairwise(times[3:])]
    assert times[3] == 5.0 and gaps[:3] == [4.0, 5.0, 5.0]  # 2, then doubled, capped at 5
    assert r.receive(PORT, arp_reply(SMAC, SERVER4), now) == [MacChange("s1", b"", SMAC)]
    assert n.state is NeighborState.REACHABLE


def test_reachable_entries_are_confirmed_again_and_dropped_when_silent() -> None:
    r = resolver(retrans=1.0, probes=2, reachable=30.0)
    n = r.add("s1", SERVER4, PORT, now=0.0)
    r.on_timer(0.0)
    r.receive(PORT, arp_reply(SMAC, SERVER4), 0.5)
    frames, changes = r.on_timer(30.5)  # reachable time over: stale, probed, MAC still used
    assert len(frames) == 1 and changes == [] and n.state is NeighborState.STALE and n.mac == SMAC
    assert n.status == "stale"
    r.receive(PORT, arp_reply(SMAC, SERVER4), 30.6)  # confirmed: no change reported
    assert n.state is NeighborState.REACHABLE
    r.on_timer(60.6)
    r.on_timer(61.6)
    frames, changes = r.on_timer(62.6)
    assert frames == [] and changes == [MacChange("s1", SMAC, b"")] and n.state is NeighborState.FAILED


def test_a_suspected_server_is_probed_at_once_and_a_new_mac_is_reported() -> None:
    r = resolver()
    n = r.add("s1", SERVER4, PORT, now=0.0)
    r.on_timer(0.0)
    r.receive(PORT, arp_reply(SMAC, SERVER4), 0.1)
    r.suspect("s1", 5.0)
    assert r.next_deadline() == 5.0 and n.state is NeighborState.STALE
    assert len(r.on_timer(5.0)[0]) == 1
    assert r.receive(PORT, arp_reply(NEW_MAC, SERVER4), 5.1) == [MacChange("s1", SMAC, NEW_MAC)]
    assert n.changes == 1


def test_a_gratuitous_arp_moves_a_reachable_server() -> None:
    r = resolver()
    n = r.add("s1", SERVER4, PORT, now=0.0)
    r.on_timer(0.0)
    r.receive(PORT, arp_reply(SMAC, SERVER4), 0.1)
    assert r.receive(PORT, garp(NEW_MAC, SERVER4), 1.0) == [MacChange("s1", SMAC, NEW_MAC)]
    assert n.mac == NEW_MAC


def test_frames_about_others_or_on_other_ports_are_left_to_the_balancer() -> None:
    r = resolver()
    r.add("s1", SERVER4, PORT, now=0.0)
    assert r.receive(PORT, arp_reply(SMAC, ip("10.2.0.77")), 0.0) is None
    assert r.receive(3, arp_reply(SMAC, SERVER4), 0.0) is None  # the same address behind another port
    assert r.replies == 0 and r.get("s1").mac == b""  # type: ignore[union-attr]
    assert r.receive(PORT, bytes(Ether() / IPv6() / (b"x" * 60)), 0.0) is None  # not neighbour discovery


@pytest.mark.parametrize(
    ("name", "address", "port", "why"),
    [
        ("s1", SERVER6, PORT, "already being resolved"),
        ("x", SERVER4, PORT, "another server has the address"),
        ("y", SERVER4, 9, "not a server port"),
        ("z", b"\x01", PORT, "4 or 16 bytes"),
    ],
    ids=["name-taken", "address-taken", "not-a-server-port", "bad-address"],
)
def test_add_refuses_what_it_cannot_resolve(name: str, address: bytes, port: int, why: str) -> None:
    r = resolver()
    r.add("s1", SERVER4, PORT, now=0.0)
    with pytest.raises(ValueError, match=why):
        r.add(name, address, port, now=0.0)
    assert set(r.neighbors) == {"s1"} and r.neighbors["s1"].address == SERVER4  # nothing changed


events = st.lists(
    st.one_of(
        st.tuples(st.just("time"), st.floats(0.0, 40.0)),
        st.tuples(st.just("reply"), st.sampled_from([SMAC, NEW_MAC, mac(0x5E, 7)])),
        st.tuples(st.just("suspect"), st.just(b"")),
        st.tuples(st.just("junk"), st.binary(max_size=80)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(events)
def test_any_sequence_of_events_keeps_the_entry_consistent(script: list[tuple[str, object]]) -> None:
    """Whatever happens, a known MAC goes with a usable state, every change is reported once and in order, the
    resolver always has a next deadline, and its heap stays bounded."""
    r = resolver(retrans=0.5, probes=2, reachable=10.0, retry_min=1.0, retry_max=8.0)
    n = r.add("s1", SERVER4, PORT, now=0.0)
    now = 0.0
    seen = b""
    for kind, value in script:
        changes: list[MacChange] = []
        if kind == "time":
            assert isinstance(value, float)
            now += value
            _, changes = r.on_timer(now)
        elif kind == "reply":
            assert isinstance(value, bytes)
            changes = r.receive(PORT, arp_reply(value, SERVER4), now) or []
        elif kind == "suspect":
            r.suspect("s1", now)
        else:
            assert isinstance(value, bytes)
            changes = r.receive(PORT, value, now) or []
        for change in changes:
            assert change.old == seen and change.new != seen
            seen = change.new
        assert seen == n.mac
        assert bool(n.mac) == (n.state in (NeighborState.REACHABLE, NeighborState.STALE))
        deadline = r.next_deadline()
        assert deadline is not None and (n.state is not NeighborState.REACHABLE or deadline > now)
        assert len(r._heap) <= 4 * 2 + 1


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([b"\x08\x06", b"\x86\xdd"]),
    st.binary(max_size=120),
    st.sampled_from([b"", b"\x60\x00\x00\x00\x00\x20\x3a\xff"]),
)
def test_malformed_neighbour_frames_never_raise(ethertype: bytes, body: bytes, ipv6_start: bytes) -> None:
    frame = PMAC + SMAC + ethertype + ipv6_start + body
    r = resolver()
    r.add("s1", SERVER4, PORT, now=0.0)
    changes = r.receive(PORT, frame, 0.0)
    assert changes is None or all(len(c.new) == 6 for c in changes)
    heard(frame)


# -- in the balancer -----------------------------------------------------------------------------------------------
def unresolved_net() -> Net:
    config = make_config(2)
    servers = tuple(replace(s, mac=b"") for s in config.servers)
    ports = tuple(replace(p, address=ip("10.2.0.254")) if p.port_id == SERVER_PORTS[1] else p for p in config.ports)
    net = Net(config)  # the server endpoints have their MACs; the balancer is told only the addresses
    net.config = replace(config, servers=servers, ports=ports)
    net.balancer = Balancer(net.config)
    return net


def answer_probes(net: Net, frames: list[tuple[int, bytes]], macs: dict[str, bytes]) -> None:
    """Each server answers the ARP request for its address with the MAC it has now."""
    by_address = {s.address: s for s in net.config.servers}
    for port, frame in frames:
        request = Ether(frame)[ARP]
        server = by_address[ip(request.pdst)]
        assert port == server.port_id
        assert net.balancer.receive(port, arp_reply(macs[server.name], server.address, PORT_MAC[port]), net.now) == []


def test_servers_by_address_take_sessions_only_once_resolved() -> None:
    net = unresolved_net()
    rows = {row.name: row for row in net.balancer.stats().servers}
    assert {row.neighbor for row in rows.values()} == {"resolving"} and rows["s1"].mac == ""
    out = net.from_client(0, tcp(client_addr(0), VIP, 40000, 80, SYN))
    assert len(out) == 1 and label_of(out[0][1]) is None  # no server yet: refused with an RST
    assert net.balancer.admission.refused
    probes = net.balancer.on_timer(net.now)
    assert len(probes) == 2 and {Ether(f)[ARP].psrc for _, f in probes} == {"0.0.0.0", "10.2.0.254"}
    answer_probes(net, probes, {"s1": mac(0x5E, 1), "s2": mac(0x5E, 2)})
    rows = {row.name: row for row in net.balancer.stats().servers}
    assert rows["s1"].mac == "02:5e:00:00:00:01" and rows["s1"].neighbor == "reachable"
    name, c2s = handshake(net, 0, sport=40001)  # the session's frames go to the learned MAC
    assert name in ("s1", "s2") and c2s


def test_a_session_follows_its_server_to_a_new_mac() -> None:
    net = unresolved_net()
    answer_probes(net, net.balancer.on_timer(0.0), {"s1": mac(0x5E, 1), "s2": mac(0x5E, 2)})
    name, c2s = handshake(net, 0)
    index = int(name[1]) - 1
    new = mac(0x5E, 0x40 + index)
    port = net.server_port[name]
    assert net.balancer.receive(port, garp(new, net.config.servers[index].address), net.now) == []
    entry = net.balancer.switching.entry(c2s)
    assert entry is not None and entry.next_hop == new and entry.packets == 2  # the SYN and the ACK: counters kept
    assert net.balancer.switching.entry(c2s + 1).peer == new  # type: ignore[union-attr]
    # The server's endpoint now has the new MAC: the session goes on, both ways, on its labels.
    net.servers[name].mac = new
    net.server_by_mac = {new if k == mac(0x5E, index + 1) else k: v for k, v in net.server_by_mac.items()}
    out = net.from_client(0, tcp(client_addr(0), VIP, 40000, 80, 0x10, seq=101, ack=501))
    assert out[0][1][:6] == new and label_of(out[0][1]) == c2s
    assert net.deliver_to_servers(out)
    back = net.from_server(name, tcp(VIP, client_addr(0), 80, 40000, 0x10, seq=501, ack=101))
    assert len(net.deliver_to_client(0, back)) == 1


def test_passive_health_failure_makes_the_resolver_probe_again() -> None:
    net = unresolved_net()
    answer_probes(net, net.balancer.on_timer(0.0), {"s1": mac(0x5E, 1), "s2": mac(0x5E, 2)})
    net.balancer.mark_down("s1", 1.0, DownReason.HEALTH_CHECK)
    probes = net.balancer.on_timer(1.0)
    assert [Ether(f)[ARP].pdst for _, f in probes] == ["10.2.0.1"]
    net.balancer.mark_down("s2", 1.0, DownReason.ADMIN)  # an operator's decision says nothing of its MAC
    assert net.balancer.on_timer(1.0) == []


def test_configured_macs_need_no_resolution_and_vips_are_announced() -> None:
    balancer = Balancer(make_config(2))
    assert balancer.resolver.neighbors == {} and balancer.on_timer(0.0) == []
    assert {row.neighbor for row in balancer.stats().servers} == {"static"}
    frames = balancer.announcements()
    assert len(frames) == 4  # 2 client ports x 2 VIPs
    assert {(port, heard(frame)) for port, frame in frames} == {
        (p, (vip, PORT_MAC[p])) for p in (0, 1) for vip in (VIP, VIP6)
    }


def test_servers_on_mpls_udp_ports_are_known_by_pseudo_mac() -> None:
    from mplslb.drivers.mplsudp import pseudo_mac

    config = make_config(2)
    ports = tuple(
        replace(p, kind="mpls_udp", address=ip("10.81.0.1")) if p.port_id == SERVER_PORTS[0] else p
        for p in config.ports
    )
    servers = tuple(replace(s, mac=b"") for s in config.servers)
    balancer = Balancer(replace(config, ports=ports, servers=servers))
    s1 = balancer.pool.get("s1")
    assert s1.mac == pseudo_mac(s1.config.address) and "s1" not in balancer.resolver.neighbors
    assert "s2" in balancer.resolver.neighbors  # its port is Ethernet
    assert isinstance(ports[0], PortConfig)


# -- configuration and status ------------------------------------------------------------------------------------
BASE_TOML = """
[[ports]]
id = 0
role = "client"
mac = "02:00:00:00:00:01"
interface = "c0"
[[ports]]
id = 1
role = "server"
mac = "02:00:00:00:00:02"
interface = "s0"
[[ports]]
id = 2
role = "server"
mac = "02:00:00:00:00:03"
kind = "mpls_udp"
address = "10.81.0.1"
[[vip]]
address = "10.0.0.100"
[[servers]]
name = "byip"
address = "10.2.0.1"
port = 1
[[servers]]
name = "routed"
address = "10.82.0.11"
port = 2
"""


def test_servers_without_mac_load_and_a_mac_on_an_mpls_udp_port_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lb.toml"
    path.write_text(BASE_TOML + "[neighbors]\nreachable = 5.0\nprobes = 2\n")
    config = load_daemon_config(path)
    assert [s.mac for s in config.balancer.servers] == [b"", b""]
    assert config.balancer.neighbors == ResolverTimers(reachable=5.0, probes=2)
    assert server_side_ethertypes(list(config.balancer.servers[:1])) == {ETH_P_MPLS_UC, ETH_P_ARP}
    six = [replace(config.balancer.servers[0], address=SERVER6)]
    assert server_side_ethertypes(six) == {ETH_P_MPLS_UC, ETH_P_IPV6}
    assert server_side_ethertypes([replace(six[0], mac=SMAC)]) == {ETH_P_MPLS_UC}  # nothing to resolve
    path.write_text(BASE_TOML + 'mac = "02:5e:00:00:00:09"\n')
    with pytest.raises(ConfigError, match=r"servers\[1\]\.mac: port 2 is an mpls_udp port"):
        load_daemon_config(path)
    path.write_text(BASE_TOML.replace('"10.82.0.11"', '"fd82::11"'))
    with pytest.raises(ConfigError, match=r"servers\[1\]\.address: port 2 sends MPLS-in-UDP from 10\.81\.0\.1"):
        load_daemon_config(path)
    path.write_text(BASE_TOML + "[neighbors]\nretry_min = 9.0\nretry_max = 2.0\n")
    with pytest.raises(ConfigError, match=r"neighbors\.retry_min: .*retry_min <= retry_max"):
        load_daemon_config(path)
    path.write_text(BASE_TOML + "[neighbors]\nprobes = 0\n")
    with pytest.raises(ConfigError, match=r"neighbors\.probes: must be >= 1"):
        load_daemon_config(path)


def test_status_shows_each_servers_mac_and_neighbour_state() -> None:
    net = unresolved_net()
    tables = status_tables(snapshot(net.balancer, now=0.0))
    text = "\n".join(_render(t) for t in tables)
    assert "- resolving" in text and "up resolving" in text
    answer_probes(net, net.balancer.on_timer(0.0), {"s1": mac(0x5E, 1), "s2": mac(0x5E, 2)})
    snap = snapshot(net.balancer, now=0.0)
    row = {r["name"]: r for r in snap["servers"]}["s1"]
    assert row["mac"] == "02:5e:00:00:00:01" and row["neighbor"] == "reachable"
    assert "02:5e:00:00:00:01 reachable" in "\n".join(_render(t) for t in status_tables(snap))
    for _ in range(8):  # nobody answers any more: the MAC is dropped
        net.balancer.on_timer(net.balancer.next_deadline() or 0.0)
    snap = snapshot(net.balancer, now=0.0)
    row = {r["name"]: r for r in snap["servers"]}["s1"]
    assert row["mac"] == "" and row["neighbor"] == "unresolved"
    assert not net.balancer.pool.get("s1").eligible
    known = {
        sample.labels["server"]: sample.value
        for metric in SnapshotCollector(lambda: snap).collect()
        if metric.name == "mplslb_server_mac_known"
        for sample in metric.samples
    }
    assert known == {"s1": 0.0, "s2": 0.0}


def _render(table: object) -> str:
    from rich.console import Console

    console = Console(width=250, record=True)
    console.print(table)
    return console.export_text()


# -- against the Linux kernel's own ARP and neighbour discovery (root) ---------------------------------------------
@pytest.fixture
def server_link() -> Iterator[tuple[str, str]]:
    """Two namespaces joined by a veth pair: ``lb0`` (ours, no address) and ``srv0`` holding 10.9.0.2/24 and
    fd09::2/64, whose MAC is :data:`SMAC`. Yields the two namespace names."""
    from pyroute2 import NetNS, netns

    ours, theirs = f"rk{os.getpid() % 100000}a", f"rk{os.getpid() % 100000}b"
    try:
        for name in (ours, theirs):
            netns.create(name)
        with NetNS(ours) as ns:
            ns.link("add", ifname="lb0", kind="veth", peer={"ifname": "srv0", "net_ns_fd": theirs})
            ns.link("set", index=ns.link_lookup(ifname="lb0")[0], address=PMAC.hex(":"), state="up")
        with NetNS(theirs) as ns:
            index = ns.link_lookup(ifname="srv0")[0]
            ns.link("set", index=index, address=SMAC.hex(":"), state="up")
            ns.addr("add", index=index, address="10.9.0.2", prefixlen=24)
            ns.addr("add", index=index, address="fd09::2", prefixlen=64, flags=0x02)  # IFA_F_NODAD
        for name, link in ((ours, "lb0"), (theirs, "srv0")):
            with entered(name), IPRoute() as ipr:
                wait_until_ready(ipr, (link,))
        yield ours, theirs
    finally:
        for name in (ours, theirs):
            if name in netns.listnetns():
                netns.remove(name)


def _exchange(r: Resolver, port: PacketPort, now: float, wanted: list[MacChange]) -> list[MacChange]:
    """Send the resolver's due probes and feed it what comes back until ``wanted`` were all reported (5 s at most)."""
    for _, frame in r.on_timer(now)[0]:
        port.send(frame)
    changes: list[MacChange] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(change in changes for change in wanted):
        for frame in port.recv_burst():
            changes += r.receive(0, frame, now) or []
        time.sleep(0.01)
    return changes


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, veth, packet sockets")
def test_the_kernel_answers_our_arp_probe_and_solicitation_and_its_gratuitous_arp_is_learned(
    server_link: tuple[str, str],
) -> None:
    from pyroute2 import NetNS

    ours, theirs = server_link
    r = Resolver({0: (PMAC, b"")})
    r.add("v4", ip("10.9.0.2"), 0, now=0.0)
    r.add("v6", ip("fd09::2"), 0, now=0.0)
    port = PacketPort("lb0", accept={ETH_P_ARP, ETH_P_IPV6}, netns=ours)
    try:
        wanted = [MacChange("v4", b"", SMAC), MacChange("v6", b"", SMAC)]
        assert sorted(_exchange(r, port, 0.0, wanted)) == wanted
        # The server's interface takes a new MAC and, with arp_notify, says so.
        with entered(theirs):
            Path("/proc/sys/net/ipv4/conf/srv0/arp_notify").write_text("1")
        with NetNS(theirs) as ns:
            ns.link("set", index=ns.link_lookup(ifname="srv0")[0], address=NEW_MAC.hex(":"))
        moved = MacChange("v4", SMAC, NEW_MAC)
        assert moved in _exchange(r, port, 1.0, [moved])  # nothing was due: the announcement alone
        r.suspect("v6", 2.0)  # and the next solicitation finds the IPv6 server at its new MAC too
        moved = MacChange("v6", SMAC, NEW_MAC)
        assert moved in _exchange(r, port, 2.0, [moved])
    finally:
        port.close()


def test_the_block_path_follows_a_moved_server_too() -> None:
    """The block path's copy of the table (a mirror) is told of the new next hop as of a reinstall."""
    import numpy as np

    net = unresolved_net()
    answer_probes(net, net.balancer.on_timer(0.0), {"s1": mac(0x5E, 1), "s2": mac(0x5E, 2)})
    name, c2s = handshake(net, 0)
    index = int(name[1]) - 1

    def through_block() -> bytes:
        frame = net.client(0).from_host(tcp(client_addr(0), VIP, 40000, 80, 0x10, seq=101, ack=501), net.now)
        assert frame is not None and label_of(frame) == c2s
        buf = np.frombuffer(bytearray(frame), dtype=np.uint8).copy()
        one = np.array([0], dtype=np.int64)
        result = net.balancer.receive_block(buf, one, np.array([len(frame)]), np.array([0]), net.now)
        assert int(result.out_port[0]) == net.server_port[name] and result.extra == []
        return buf.tobytes()

    assert through_block()[:6] == mac(0x5E, index + 1)
    new = mac(0x5E, 0x40 + index)
    net.balancer.receive(net.server_port[name], garp(new, net.config.servers[index].address), net.now)
    assert through_block()[:6] == new


def test_a_session_follows_its_server_found_again_at_another_mac_after_it_was_lost() -> None:
    net = unresolved_net()
    answer_probes(net, net.balancer.on_timer(0.0), {"s1": mac(0x5E, 1), "s2": mac(0x5E, 2)})
    name, c2s = handshake(net, 0)
    index = int(name[1]) - 1
    neighbor = net.balancer.resolver.get(name)
    assert neighbor is not None
    while neighbor.mac:  # nobody answers: the MAC is lost, the session keeps the last one known
        deadline = net.balancer.next_deadline()
        assert deadline is not None
        net.balancer.on_timer(deadline)
    assert net.balancer.switching.entry(c2s).next_hop == mac(0x5E, index + 1)  # type: ignore[union-attr]
    new = mac(0x5E, 0x50 + index)
    net.balancer.receive(net.server_port[name], garp(new, net.config.servers[index].address), net.now)
    assert net.balancer.switching.entry(c2s).next_hop == new  # type: ignore[union-attr]
    assert net.balancer.switching.entry(c2s + 1).peer == new  # type: ignore[union-attr]
