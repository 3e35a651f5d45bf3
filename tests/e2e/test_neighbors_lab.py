"""Servers found on their own, for real: the balancer is given the servers' IP addresses only and resolves their MACs
with ARP, follows a server to a new MAC, and announces its VIPs when it starts; and servers behind a router,
reached as MPLS-in-UDP (RFC 7510). Namespaces, veth, the daemon, the agents, stock nginx and curl (root).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mplslb.drivers.afpacket import PacketPort
from mplslb.drivers.mplsudp import pseudo_mac
from mplslb.lab import VIP4, VIP6, Lab, LabSpec, split
from mplslb.neighbors import heard
from mplslb.wire.ethernet import ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, mac_from_str
from mplslb.wire.mpls import MPLS_UDP_PORT

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces, veth, TUN and packet sockets"),
    pytest.mark.skipif(
        any(shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists() for t in ("nginx", "curl", "nsenter")),
        reason="nginx, curl and nsenter are needed (make test installs them)",
    ),
]

ROOT = Path("/run/mplslb-test-labs")
LB_CLIENT_MAC = "02:4c:00:00:00:00"


def lab_name(tag: str) -> str:
    return f"{tag}{os.getpid() % 100000}"


def wait_for(predicate: Any, timeout: float, what: str, step: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def servers(lab: Lab) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in lab.status()["status"]["servers"]}


def fresh_servers(lab: Lab) -> dict[str, dict[str, Any]]:
    time.sleep(1.1)  # the daemon refreshes its snapshot every second
    return servers(lab)


def bring_up(spec: LabSpec) -> Iterator[Lab]:
    from pyroute2 import netns

    the_lab = Lab(spec, root=ROOT)
    pids: dict[str, int] = {}
    try:
        the_lab.up()
        pids = dict(the_lab.state.pids)
        yield the_lab
    finally:
        pids.update(the_lab.state.pids)
        problems = the_lab.down()
        assert problems == []
        prefix = spec.name + "-"
        assert [ns for ns in netns.listnetns() if ns.startswith(prefix)] == []
        assert not the_lab.dir.exists()
        for pid in pids.values():
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


@pytest.fixture(scope="module")
def by_ip() -> Iterator[Lab]:
    # The agents run the tun datapath: a frame to a server's old MAC is then refused by its host, as a replaced
    # interface would refuse it.
    yield from bring_up(LabSpec(name=lab_name("nb"), clients=1, servers=2, servers_by_ip=True, datapath="tun"))


def reachable_at(lab: Lab, name: str, mac: str) -> bool:
    row = servers(lab)[name]
    return bool(row["mac"] == mac and row["neighbor"] in ("reachable", "stale") and row["status"] == "up")


def test_servers_named_by_address_are_resolved_and_serve_through_labels(by_ip: Lab) -> None:
    assert "mac =" not in (by_ip.dir / "lb.toml").read_text().split("[[servers]]", 1)[1].split("[limits]")[0]
    for j in range(2):
        wait_for(lambda j=j: reachable_at(by_ip, by_ip.server_name(j), by_ip.server_mac(j)), 15, f"s{j + 1} resolved")
    bodies = by_ip.curl(0, 40)
    assert all(bodies), f"{bodies.count('')} failed"
    assert split(bodies) == {"s1": 20, "s2": 20}
    rows = fresh_servers(by_ip)
    assert all(row["packets_in"] > 0 and row["packets_out"] > 0 for row in rows.values())


def test_vips_are_announced_when_the_balancer_starts(by_ip: Lab) -> None:
    """A packet socket on a client's interface sees the gratuitous ARP for the IPv4 VIP and the unsolicited
    advertisement for the IPv6 VIP, from the balancer's client port, when the daemon starts."""
    port = PacketPort("eth0", accept={ETH_P_ARP, ETH_P_IPV6}, netns=by_ip.client_ns(0))
    try:
        while port.recv_burst():
            pass
        by_ip.restart_balancer()
        wanted = {(socket.inet_pton(socket.AF_INET, VIP4), mac_from_str(LB_CLIENT_MAC)),
                  (socket.inet_pton(socket.AF_INET6, VIP6), mac_from_str(LB_CLIENT_MAC))}  # fmt: skip
        seen: set[tuple[bytes, bytes]] = set()
        deadline = time.monotonic() + 10
        while not wanted <= seen and time.monotonic() < deadline:
            for frame in port.recv_burst():
                told = heard(frame)
                if told is not None and frame[6:12] == mac_from_str(LB_CLIENT_MAC):
                    seen.add(told)
            time.sleep(0.05)
        assert wanted <= seen, seen
    finally:
        port.close()
    for j in range(2):  # the new daemon resolves the servers again and serves
        wait_for(lambda j=j: reachable_at(by_ip, by_ip.server_name(j), by_ip.server_mac(j)), 15, f"s{j + 1} resolved")
    assert all(by_ip.curl(0, 10))


def test_a_server_on_a_new_mac_is_relearned_from_its_gratuitous_arp(by_ip: Lab) -> None:
    new = "02:5e:00:00:01:01"
    by_ip.move_server(0, new, announce=True)
    wait_for(lambda: reachable_at(by_ip, "s1", new), 10, "s1 at its new MAC")
    # Straight from the old MAC to the new one: the announcement, not a failed resolution.
    assert f"event=server_mac_moved server=s1 old={by_ip.server_mac(0)} new={new}" in by_ip.log("balancer")
    bodies = by_ip.curl(0, 20)
    assert all(bodies) and split(bodies) == {"s1": 10, "s2": 10}


def test_a_server_moved_silently_is_relearned_by_resolution(by_ip: Lab) -> None:
    """No announcement: the balancer's SYNs to the old MAC go unanswered, passive health suspects the server, and
    the next probe finds its new MAC; the sessions go on there."""
    new = "02:5e:00:00:02:02"
    by_ip.move_server(1, new, announce=False)
    deadline = time.monotonic() + 30
    while not reachable_at(by_ip, "s2", new) and time.monotonic() < deadline:
        by_ip.curl(0, 2, timeout=30)  # sessions to s2's old MAC: unanswered SYNs
    assert reachable_at(by_ip, "s2", new)
    assert f"server=s2 old={by_ip.server_mac(1)} new={new}" in by_ip.log("balancer")  # moved, by a probe's answer
    wait_for(lambda: servers(by_ip)["s2"]["status"] == "up", 15, "s2 up")
    bodies = by_ip.curl(0, 20)
    assert all(bodies) and set(split(bodies)) == {"s1", "s2"}


# -- MPLS-in-UDP to servers behind a router -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def routed() -> Iterator[Lab]:
    yield from bring_up(LabSpec(name=lab_name("nr"), clients=1, servers=2, server_transport="udp"))


def test_servers_behind_a_router_serve_through_labels_in_udp(routed: Lab) -> None:
    rows = servers(routed)
    for j in range(2):
        name = routed.server_name(j)
        assert rows[name]["address"] == routed.server_addr(j)
        assert rows[name]["mac"] == pseudo_mac(socket.inet_aton(routed.server_addr(j))).hex(":")
    wait_for(lambda: all(r["status"] == "up" for r in servers(routed).values()), 15, "servers up")
    # What crosses the router: MPLS-in-UDP datagrams to UDP port 6635, toward the servers (arriving on its eth0)
    # and back toward the balancer (arriving on its eth1).
    ports = {side: PacketPort(side, accept={ETH_P_IP}, netns=routed.ns("rs")) for side in ("eth0", "eth1")}
    try:
        for port in ports.values():
            while port.recv_burst():
                pass
        bodies = routed.curl(0, 40)
        seen = {side: mpls_udp_datagrams(port) for side, port in ports.items()}
    finally:
        for port in ports.values():
            port.close()
    assert all(bodies), f"{bodies.count('')} failed"
    assert split(bodies) == {"s1": 20, "s2": 20}
    balancer = socket.inet_aton("10.81.0.1")
    assert seen["eth0"] and all(dst != balancer for dst in seen["eth0"])
    assert seen["eth1"] and set(seen["eth1"]) == {balancer}
    rows = fresh_servers(routed)
    assert all(r["packets_in"] > 0 and r["packets_out"] > 0 for r in rows.values())


def mpls_udp_datagrams(port: PacketPort) -> list[bytes]:
    """The destination address of each IPv4 UDP datagram to port 6635 queued on ``port``."""
    found = []
    for _ in range(1000):
        frames = port.recv_burst()
        if not frames:
            break
        for frame in frames:
            header = 14 + (frame[14] & 0x0F) * 4
            if frame[23] == socket.IPPROTO_UDP and int.from_bytes(frame[header + 2 : header + 4]) == MPLS_UDP_PORT:
                found.append(bytes(frame[30:34]))
    return found
