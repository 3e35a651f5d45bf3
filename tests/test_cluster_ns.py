"""Two real balancer daemons in two namespaces, syncing their sessions over a veth: a session opened on one is
switched by the other, a forged label is dropped there, and a node killed and started again is synced back."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import NetNS, netns

from helpers import ACK, SYN, tcp
from mplslb.control.client import ControlError, request
from mplslb.drivers.netns import entered
from mplslb.wire.mpls import pack_entry, parse_stack

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root")

TAG = f"mlcs{os.getpid() % 100000}"
SYNC = {1: "10.77.0.1", 2: "10.77.0.2"}  # the sync veth
CLIENT_PORT = {1: "10.78.0.1", 2: "10.78.0.2"}  # each node's mpls_udp client port (on lo)
SERVER_PORT = {1: "10.79.0.1", 2: "10.79.0.2"}  # and server port
SERVER = "10.90.0.1"  # the one server: a UDP socket in node 1's namespace
CLIENT = SYNC[1]  # the client's outer address: the same whichever node ECMP picks
CLIENT_IP, VIP = bytes([10, 5, 0, 1]), bytes([10, 0, 0, 100])


def ns_name(n: int) -> str:
    return f"{TAG}n{n}"


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def node_toml(n: int, tmp: Path) -> str:
    other = 2 if n == 1 else 1
    return f"""
[[ports]]
id = 0
role = "client"
kind = "mpls_udp"
address = "{CLIENT_PORT[n]}"
mac = "02:4c:00:00:00:0{n}"

[[ports]]
id = 1
role = "server"
kind = "mpls_udp"
address = "{SERVER_PORT[n]}"
mac = "02:4c:00:00:01:0{n}"

[[vip]]
address = "10.0.0.100"
tcp = [80]

[[servers]]
name = "web1"
address = "{SERVER}"
port = 1

[control]
socket = "{tmp}/n{n}.sock"

[cluster]
node = {n}
nodes = 2
peers = ["{SYNC[other]}:6640"]
sync_address = "{SYNC[n]}"
key_file = "{tmp}/key"
keepalive = 0.2
peer_timeout = 1.0
join_timeout = 1.5
"""


class Node:
    def __init__(self, n: int, tmp: Path) -> None:
        self.n, self.tmp = n, tmp
        self.config = tmp / f"n{n}.toml"
        self.config.write_text(node_toml(n, tmp))
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready = tmp / f"n{n}.ready"

    def spawn(self) -> None:
        self.ready = self.tmp / f"n{self.n}.ready"
        self.ready.unlink(missing_ok=True)
        log = open(self.tmp / f"n{self.n}.log", "ab")  # noqa: SIM115 - the child keeps it
        argv = [sys.executable, "-m", "mplslb", "balancer", "--config", str(self.config), "--netns", ns_name(self.n)]
        self.proc = subprocess.Popen([*argv, "--ready-file", str(self.ready)], stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def wait_ready(self) -> None:
        proc = self.proc
        assert proc is not None
        wait_for(lambda: self.ready.exists() or proc.poll() is not None, 30, f"node {self.n} ready")
        assert proc.poll() is None, self.log()

    def start(self) -> None:
        self.spawn()
        self.wait_ready()

    def log(self) -> str:
        return (self.tmp / f"n{self.n}.log").read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        try:
            return request(str(self.tmp / f"n{self.n}.sock"), {"cmd": "status"})["status"]  # type: ignore[no-any-return]
        except (ControlError, OSError):
            return {}

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def _setup_network() -> None:
    for n in (1, 2):
        netns.create(ns_name(n))
        with NetNS(ns_name(n)) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
    with NetNS(ns_name(1)) as ns:
        ns.link("add", ifname="sync0", kind="veth", peer={"ifname": "sync0", "net_ns_fd": ns_name(2)})
    for n in (1, 2):
        with NetNS(ns_name(n)) as ns:
            index = ns.link_lookup(ifname="sync0")[0]
            ns.link("set", index=index, state="up")
            ns.addr("add", index=index, address=SYNC[n], prefixlen=24)
            lo = ns.link_lookup(ifname="lo")[0]
            for address in (CLIENT_PORT[n], SERVER_PORT[n], *([SERVER] if n == 1 else [])):
                ns.addr("add", index=lo, address=address, prefixlen=32)
            other = 2 if n == 1 else 1
            for address in (CLIENT_PORT[other], SERVER_PORT[other], *([SERVER] if n == 2 else [])):
                ns.route("add", dst=f"{address}/32", gateway=SYNC[other])


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[dict[int, Node]]:
    (tmp_path / "key").write_bytes(os.urandom(32).hex().encode())
    started: dict[int, Node] = {}
    try:
        _setup_network()
        for n in (1, 2):
            started[n] = Node(n, tmp_path)
        yield started
    finally:
        for node in started.values():
            node.stop()
        for n in (1, 2):
            if ns_name(n) in netns.listnetns():
                netns.remove(ns_name(n))


def udp_socket(ns: str, address: str, port: int) -> socket.socket:
    with entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((address, port))
    sock.settimeout(5.0)
    return sock


def test_two_daemons_carry_each_others_sessions(nodes: dict[int, Node]) -> None:
    for node in nodes.values():  # both at once
        node.spawn()
    for node in nodes.values():
        node.wait_ready()
    for node in nodes.values():
        wait_for(lambda node=node: node.status().get("cluster", {}).get("synced"), 10, f"node {node.n} synced")
        cluster = wait_for(
            lambda node=node: (c := node.status()["cluster"])["peers"][0]["alive"] and c, 10, "peer heard"
        )
        assert cluster["authenticated"] and cluster["drops"] == {}
    client = udp_socket(ns_name(1), CLIENT, 6635)
    server = udp_socket(ns_name(1), SERVER, 6635)
    try:
        # The handshake through node 1 (the client's first packet under Explicit NULL, then labels).
        client.sendto(pack_entry(0, 0, True, 64) + tcp(CLIENT_IP, VIP, 40000, 80, SYN, seq=100), (CLIENT_PORT[1], 6635))
        data, _ = server.recvfrom(65535)
        (entry,), _ = parse_stack(data, 0)
        c2s = entry.label
        reply = tcp(VIP, CLIENT_IP, 80, 40000, SYN | ACK, seq=500, ack=101)
        server.sendto(pack_entry(c2s + 1, 0, True, 64) + reply, (SERVER_PORT[1], 6635))
        data, _ = client.recvfrom(65535)
        assert parse_stack(data, 0)[0][0].label == c2s + 1
        ack = tcp(CLIENT_IP, VIP, 40000, 80, ACK, seq=101, ack=501)
        client.sendto(pack_entry(c2s, 0, True, 64) + ack, (CLIENT_PORT[1], 6635))
        server.recvfrom(65535)
        replica = wait_for(lambda: nodes[2].status()["cluster"]["replicas"] == 1, 5, "the replica on node 2")
        assert replica
        # ECMP moves the flow to node 2: it switches the session's frames both ways with its own ports.
        request_ = tcp(CLIENT_IP, VIP, 40000, 80, ACK, seq=101, ack=501, payload=b"GET / HTTP/1.1\r\n\r\n")
        client.sendto(pack_entry(c2s, 0, True, 64) + request_, (CLIENT_PORT[2], 6635))
        data, source = server.recvfrom(65535)
        assert source[0] == SERVER_PORT[2] and parse_stack(data, 0)[0][0].label == c2s
        answer = tcp(VIP, CLIENT_IP, 80, 40000, ACK, seq=501, ack=119, payload=b"HTTP/1.1 200 OK\r\n")
        server.sendto(pack_entry(c2s + 1, 0, True, 64) + answer, (SERVER_PORT[2], 6635))
        data, source = client.recvfrom(65535)
        assert source[0] == CLIENT_PORT[2] and parse_stack(data, 0)[0][0].label == c2s + 1
        # A forged label on node 2 is dropped there, as on the single node.
        client.sendto(pack_entry(c2s + 2, 0, True, 64) + request_, (CLIENT_PORT[2], 6635))
        drops = wait_for(lambda: nodes[2].status()["drops"].get("label_unknown"), 5, "the forged label counted")
        assert drops == 1
        # Node 1 killed: node 2 sees it silent and keeps the session; node 1 started again is synced from node 2
        # and takes its own label back.
        nodes[1].stop(signal.SIGKILL)
        wait_for(lambda: not nodes[2].status()["cluster"]["peers"][0]["alive"], 5, "node 1 silent")
        client.sendto(pack_entry(c2s, 0, True, 64) + request_, (CLIENT_PORT[2], 6635))
        assert parse_stack(server.recvfrom(65535)[0], 0)[0][0].label == c2s
        nodes[1].start()
        cluster = wait_for(
            lambda: (c := nodes[1].status().get("cluster", {})).get("synced") and c, 10, "node 1 synced again"
        )
        assert cluster["applied"]["claimed"] == 1 and cluster["peers"][0]["dump_done"]
        assert nodes[2].status()["cluster"]["peers"][0]["restarts"] == 1
    finally:
        client.close()
        server.close()
