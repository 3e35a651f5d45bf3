"""A SYN flood through real ports: the balancer daemon's CPU per new session with receive rings (``ring = true``, the
block path, which opens a block's runs of SYNs at once) against plain packet sockets (the default, one frame at a
time through the slow path), in the same run, in turns.

A namespace of its own (root) holds two veth pairs: the client side and the server side. The daemon's loop
(:class:`~mplslb.drivers.loop.BalancerDriver` on :class:`~mplslb.drivers.afpacket.RingPort` or
:class:`~mplslb.drivers.afpacket.PacketPort`) serves a balancer with one virtual service and two servers behind the
server-side veth; a packet socket on the client-side peer sends TCP SYNs of distinct flows in bursts of ``--burst``,
as a flood from many sources would arrive, and after each burst the loop runs until every SYN of it has opened its
session and left towards its server. Only the loop's own CPU time is counted (``time.thread_time`` around each turn:
reading the frames, the balancer's work, writing the labelled SYNs); the sender's is not.

Run ``PYTHONPATH=<checkout>/src python bench/syn_flood.py [--sessions N] [--burst B] [--rounds R] [--json]``; it is
``make bench``'s ``syn_flood`` section. A packet socket's receive buffer holds about 256 such SYNs here: bursts
larger than that lose SYNs with packet sockets (the rings keep them), and the sessions opened say so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pyroute2 import IPRoute, netns

from common import Row, command_for, skipped
from mplslb.balancer import Balancer
from mplslb.balancing.servers import ServerConfig
from mplslb.config import BalancerConfig, PortConfig, VirtualService
from mplslb.drivers.afpacket import PacketPort, RingPort
from mplslb.drivers.loop import BalancerDriver, Loop
from mplslb.drivers.netns import entered
from mplslb.sessions import Timeouts
from mplslb.wire.ethernet import ETH_P_IP, build_ethernet
from mplslb.wire.ip import IPPROTO_TCP
from mplslb.wire.ipv4 import build_ipv4
from mplslb.wire.tcp import TCPFlag, build_tcp

VIP = bytes((10, 0, 0, 100))
CLIENT_MAC = bytes.fromhex("02c000000001")
QUIET_S = 0.5  # a burst is over once no frame came for this long


@contextmanager
def testbed() -> Iterator[tuple[str, tuple[str, str], tuple[str, str]]]:
    """A namespace with two veth pairs, up, IPv6 off (the kernel sends nothing of its own); removed afterwards."""
    pid = os.getpid()
    name = f"mlbsf{pid}"
    client, server = (f"msf{pid}ca", f"msf{pid}cb"), (f"msf{pid}sa", f"msf{pid}sb")
    netns.create(name)
    try:
        with entered(name):
            for conf in ("all", "default"):
                Path(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6").write_text("1")
            with IPRoute() as ipr:
                for a, b in (client, server):
                    ipr.link("add", ifname=a, kind="veth", peer=b)
                    for ifname in (a, b):
                        ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")
        time.sleep(0.2)  # the links come up
        yield name, client, server
    finally:
        netns.remove(name)


def syns(n: int, port_mac: bytes) -> list[bytes]:
    """``n`` SYNs of distinct flows to the virtual service: 250 client addresses, source ports from 1024."""
    head = build_ethernet(port_mac, CLIENT_MAC, ETH_P_IP)
    frames = []
    for i in range(n):
        src, sport = bytes((10, 1, 0, i % 250 + 1)), 1024 + i // 250
        segment = build_tcp(src, VIP, sport, 80, seq=i, flags=int(TCPFlag.SYN), window=64240)
        frames.append(head + build_ipv4(src, VIP, IPPROTO_TCP, len(segment)) + segment)
    return frames


def one_flood(name: str, client: tuple[str, str], server: tuple[str, str], ring: bool, n: int, burst: int) -> dict:
    """One balancer on fresh ports, ``n`` SYNs in bursts: the loop's CPU µs per session opened."""
    kind = RingPort if ring else PacketPort
    ports = [kind(client[0], netns=name), kind(server[0], netns=name)]
    sender, sink = PacketPort(client[1], netns=name), PacketPort(server[1], netns=name)
    opened = [*ports, sender, sink]
    try:
        config = BalancerConfig(
            ports=(PortConfig(0, 0, 0, ports[0].mac, "client"), PortConfig(2, 1, 0, ports[1].mac, "server")),
            vips=(VirtualService(VIP, (80,), ()),),
            servers=tuple(
                ServerConfig(f"s{i}", bytes((10, 2, 0, i)), bytes((2, 0x5E, 0, 0, 0, i)), port_id=2) for i in (1, 2)
            ),
            timeouts=Timeouts(tcp_start=600.0),
        )
        balancer = Balancer(config)
        loop = Loop()
        driver = BalancerDriver(balancer, {0: ports[0], 2: ports[1]}, loop, block=ring)
        frames = syns(n, ports[0].mac)
        cpu = 0.0
        try:
            for start in range(0, n, burst):
                for frame in frames[start : start + burst]:
                    sender.send(frame)
                want = min(start + burst, n)
                # Until every SYN sent has opened its session, or nothing more comes (SYNs the kernel dropped:
                # counted as sent and not opened).
                seen, quiet_until = balancer.frames_in, time.monotonic() + QUIET_S
                while balancer.sessions.started < want and time.monotonic() < quiet_until:
                    t0 = time.thread_time()
                    loop.run_once(0.01)
                    cpu += time.thread_time() - t0
                    if balancer.frames_in != seen:
                        seen, quiet_until = balancer.frames_in, time.monotonic() + QUIET_S
                while sink.recv_burst(1024):  # the labelled SYNs, read off so nothing backs up
                    pass
            opened_sessions = balancer.sessions.started
        finally:
            driver.close()
            loop.close()
        return {"sessions": opened_sessions, "cpu_us_per_session": cpu / max(opened_sessions, 1) * 1e6, "sent": n}
    finally:
        for port in reversed(opened):
            port.close()


def measure(n: int, burst: int, rounds: int) -> dict:
    runs: dict[str, list[dict]] = {"ring": [], "packet": []}
    with testbed() as (name, client, server):
        for _ in range(rounds):
            for mode in ("ring", "packet"):
                runs[mode].append(one_flood(name, client, server, mode == "ring", n, burst))
    figures = {}
    for mode, results in runs.items():
        cpu = [r["cpu_us_per_session"] for r in results]
        figures[mode] = {
            "cpu_us_per_session": statistics.median(cpu),
            "runs": cpu,
            "sessions": [r["sessions"] for r in results],
        }
    figures["ring_over_packet"] = figures["ring"]["cpu_us_per_session"] / figures["packet"]["cpu_us_per_session"]
    return {"sessions": n, "burst": burst, "rounds": rounds, **figures}


def rows(quick: bool = False) -> list[Row]:
    """The table's row (bench/run.py's "syn_flood" section): the loop's CPU per new session with receive rings,
    against plain packet sockets in the same run."""
    command = command_for("syn_flood", quick)
    if os.geteuid() != 0:
        return [skipped("syn_flood", "SYN flood, ring", "needs root (a namespace, veth pairs)", command=command)]
    sessions, burst, rounds = (4_000, 200, 2) if quick else (20_000, 200, 3)
    found = measure(sessions, burst, rounds)
    opened = found["ring"]["sessions"] + found["packet"]["sessions"]
    note = (f"{sessions:,} TCP SYNs of distinct flows in bursts of {burst} on a veth, CPU of the daemon's loop, "
            f"median of {rounds} rounds in turns; sessions opened per round {opened}")  # fmt: skip
    return [
        Row("syn_flood", "SYN flood: CPU per new session, receive rings (block path)",
            found["ring"]["cpu_us_per_session"], "µs CPU", "plain packet sockets (one frame a call)",
            found["packet"]["cpu_us_per_session"], note=note, command=command,
            extra={"ring_runs": found["ring"]["runs"], "packet_runs": found["packet"]["runs"]})
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=20_000)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("syn_flood: needs root (a namespace, veth pairs, packet sockets)")
    figures = measure(args.sessions, args.burst, args.rounds)
    if args.json:
        print(json.dumps(figures, indent=1))
        return
    for mode in ("ring", "packet"):
        f = figures[mode]
        runs = ", ".join(f"{x:.1f}" for x in f["runs"])
        print(f"{mode:6}: {f['cpu_us_per_session']:.1f} µs of the loop's CPU per new session (runs {runs}); "
              f"sessions opened {f['sessions']} of {figures['sessions']} SYNs sent")  # fmt: skip
    print(f"ring / packet sockets: {figures['ring_over_packet']:.2f}")


if __name__ == "__main__":
    main()
