"""The daemon's own CPU per ``Connection: close`` session when the kernel takes everything it can (the XDP offload
with ``offload_syn``): what is left of a session for Python, phase by phase.

A namespace of its own with the standard four ports on veths (root, clang). The daemon's wrapper
(:class:`~mplslb.offload.driver.OffloadedBalancer`) runs with tickets and L7 analysis, as the lab's balancer does.
Each round runs ``--batch`` whole sessions through the real XDP program with ``BPF_PROG_TEST_RUN`` (not timed: the
kernel's part): the SYN (taken under a ticket), the SYN-ACK, the client's ACK, a request, the response, both FINs
and the last ACK. The daemon then does what its loop does for them, each phase timed in thread CPU time:

* ``fold``: the taken tickets become sessions (:meth:`TicketDesk.fold`);
* ``poll``: the kernel's measurement records, FINs and counters reach the table (:meth:`XdpOffload.poll`);
* ``finish``: the timers once the sessions' close linger is over: each is closed and its labels withdrawn
  (:meth:`Balancer.on_timer`; the clock is moved past the linger, the kernel's times with it);
* ``sync``: the withdrawn labels leave the kernel and tickets are issued for the taken ones
  (:meth:`XdpOffload.sync`, :meth:`TicketDesk.refill`).

A batch (3,000 by default) is what one of the lab daemon's polls, once a second, finds under wrk. The figures are
medians over the rounds of CPU µs per session; the end-to-end run (``bench/e2e.py --close --variant
kernel+xdp+syn``) gives the same daemon's CPU per session under wrk, where its loop's other work (reading frames,
status) counts too.

Run ``PYTHONPATH=<checkout>/src python bench/close_session.py [--batch N] [--rounds R] [--json] [--profile]``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, netns

from common import Row, command_for, skipped
from frames import CLIENT_PORTS, SERVER_PORTS, VIP, make_config, port_mac, router_mac
from mplslb.balancer import Balancer
from mplslb.drivers.loop import Loop
from mplslb.drivers.netns import entered
from mplslb.offload import bpf
from mplslb.offload.driver import OffloadedBalancer
from mplslb.wire.ethernet import ETH_P_IP, ETH_P_MPLS_UC, build_ethernet
from mplslb.wire.ip import IPPROTO_TCP
from mplslb.wire.ipv4 import build_ipv4
from mplslb.wire.mpls import pack_entry
from mplslb.wire.tcp import build_tcp

PHASES = ("fold", "poll", "finish", "sync")
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: wrk\r\nConnection: close\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
#: Linux's SYN options: MSS, SACK permitted, timestamps, NOP, window scale.
SYN_OPTIONS = bytes([2, 4, 5, 0xB4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7])
PORTS = (*CLIENT_PORTS, *SERVER_PORTS)
#: Sessions between two polls: what the lab daemon's poll, once a second, finds at about 3,000 sessions a second.
BATCH = 3000
#: Sessions between two folds and syncs: what the daemon's 5 ms sync timer finds at about 3,000 sessions a second.
CHUNK = 16


@contextlib.contextmanager
def namespaces() -> Iterator[str]:
    """A namespace with the ports p0..p3 (the bench configuration's MACs), each a veth whose peer is in a second
    namespace; both removed on the way out. Yields the first's name."""
    tag = f"mlbcs{os.getpid() % 100000}"
    lb, peer = f"{tag}l", f"{tag}e"
    created: list[str] = []
    try:
        for name in (lb, peer):
            netns.create(name)
            created.append(name)
        with entered(lb), IPRoute() as ipr:
            for i in PORTS:
                ipr.link("add", ifname=f"p{i}", kind="veth", peer={"ifname": f"e{i}", "net_ns_fd": peer})
                mac = ":".join(f"{b:02x}" for b in port_mac(i))
                ipr.link("set", index=ipr.link_lookup(ifname=f"p{i}")[0], address=mac, state="up")
        with entered(peer), IPRoute() as ipr:
            for i in PORTS:
                ipr.link("set", index=ipr.link_lookup(ifname=f"e{i}")[0], state="up")
        yield lb
    finally:
        for name in reversed(created):
            if name in netns.listnetns():
                netns.remove(name)


class Bench:
    """One daemon wrapper with tickets, on a clock that the ``finish`` phase moves past the close linger."""

    def __init__(self, lb: str) -> None:
        config = make_config()
        config = replace(config, ports=tuple(replace(p, interface=f"p{p.port_id}") for p in config.ports))
        self.lb = lb
        self.skew = 0.0
        self.loop = Loop(clock=lambda: time.monotonic() + self.skew)
        self.balancer = Balancer(config)
        with entered(lb):
            self.core = OffloadedBalancer(self.balancer, self.loop, tickets=True)
        self.linger = self.balancer.sessions.timeouts.closed_linger
        self.flow = 0
        self.profiler: cProfile.Profile | None = None  # the timed phases only

    def close(self) -> None:
        self.core.close()

    def _run(self, frame: bytes, port: int) -> bpf.TestRun:
        return self.core.offload.run(frame, port)

    def session(self) -> bool:
        """One whole session through the program; False if its SYN was not taken (no ticket left)."""
        self.flow += 1
        n = self.flow
        client = bytes((10, 64, (n >> 8) & 0xFF, n & 0xFF))
        sport = 1024 + n % 60000
        port = CLIENT_PORTS[n % len(CLIENT_PORTS)]
        mac = router_mac(port)

        def from_client(flags: int, payload: bytes = b"", label: int = 0, options: bytes = b"") -> bytes:
            seq = 1000 + (1 if flags != SYN else 0) + (len(REQUEST) if flags & FIN else 0)
            segment = build_tcp(client, VIP, sport, 80, seq=seq, ack=5001 if flags != SYN else 0, flags=flags,
                                options=options, payload=payload)  # fmt: skip
            packet = build_ipv4(client, VIP, IPPROTO_TCP, len(segment)) + segment
            if not label:
                return build_ethernet(port_mac(port), mac, ETH_P_IP) + packet
            return build_ethernet(port_mac(port), mac, ETH_P_MPLS_UC) + pack_entry(label, 0, True, 64) + packet

        with entered(self.lb):
            syn = self._run(from_client(SYN, options=SYN_OPTIONS), port)
            if syn.retval != bpf.XDP_REDIRECT:
                return False
            c2s = int.from_bytes(syn.data[14:17], "big") >> 4
            server = self.core.desk.outstanding[c2s] if self.core.desk else None
            assert server is not None and server.mac
            out = server.config.port_id

            def from_server(flags: int, payload: bytes = b"") -> bytes:
                seq = 5000 + (1 if flags != SYN | ACK else 0) + (len(RESPONSE) if flags & FIN else 0)
                ack = 1001 + (len(REQUEST) if flags != SYN | ACK else 0) + (1 if flags & FIN else 0)
                segment = build_tcp(VIP, client, 80, sport, seq=seq, ack=ack, flags=flags, payload=payload)
                packet = build_ipv4(VIP, client, IPPROTO_TCP, len(segment)) + segment
                label = pack_entry(c2s + 1, 0, True, 64)
                return build_ethernet(port_mac(out), server.mac, ETH_P_MPLS_UC) + label + packet

            for frame, in_port in (
                (from_server(SYN | ACK), out),
                (from_client(ACK, label=c2s), port),
                (from_client(ACK | PSH, REQUEST, label=c2s), port),
                (from_server(ACK | PSH, RESPONSE), out),
                (from_server(FIN | ACK), out),
                (from_client(FIN | ACK, label=c2s), port),
                (from_server(ACK), out),
            ):
                self._run(frame, in_port)
        return True

    def round(self, batch: int) -> tuple[int, dict[str, float]]:
        """``batch`` sessions through the kernel and the daemon: (sessions run, CPU seconds per phase). The fold and
        the sync follow every :data:`CHUNK` sessions, as the daemon's sync timer does; one poll and one timer run
        follow the batch."""
        spent = dict.fromkeys(PHASES, 0.0)
        core = self.core
        ran = 0

        def timed(name: str, phase: Callable[[float], Any]) -> None:
            if self.profiler:
                self.profiler.enable()
            started = time.thread_time()
            phase(self.loop.clock())  # the maps and the program are reached by their descriptors: any namespace
            spent[name] += time.thread_time() - started
            if self.profiler:
                self.profiler.disable()

        for first in range(0, batch, CHUNK):
            ran += sum(self.session() for _ in range(min(CHUNK, batch - first)))
            timed("fold", core._fold_tickets)
            timed("sync", core._sync)
        timed("poll", core._poll)
        self.skew += self.linger + 0.01
        timed("finish", self.balancer.on_timer)
        timed("sync", core._sync)
        return ran, spent


def measure(batch: int, rounds: int, *, profile: Path | None = None) -> dict[str, Any]:
    """Medians over ``rounds`` of CPU µs per session in each phase and in all, after one warm-up round."""
    with namespaces() as lb:
        bench = Bench(lb)
        try:
            bench.round(batch)
            per_round: list[dict[str, float]] = []
            profiler = bench.profiler = cProfile.Profile() if profile else None
            for _ in range(rounds):
                ran, spent = bench.round(batch)
                per_round.append({k: v * 1e6 / max(ran, 1) for k, v in spent.items()} | {"sessions": ran})
            b = bench.balancer
            figures: dict[str, Any] = {
                k: round(statistics.median(r[k] for r in per_round), 1) for k in PHASES
            }  # fmt: skip
            figures["total"] = round(statistics.median(sum(r[k] for k in PHASES) for r in per_round), 1)
            figures |= {
                "batch": batch,
                "rounds": rounds,
                "sessions_taken": int(sum(r["sessions"] for r in per_round)),
                "ended": dict(b.sessions.ended),
                "live_after": len(b.sessions),
                "tickets": bench.core.desk.stats() if bench.core.desk else {},
            }
            if profiler and profile:
                profiler.dump_stats(str(profile))
            return figures
        finally:
            bench.close()


def rows(quick: bool = False) -> list[Row]:
    """The ``close_session`` section of ``make bench``."""
    cmd = command_for("close_session", quick)
    if os.geteuid() != 0 or (shutil.which("clang") is None and not os.environ.get("MPLSLB_CLANG")):
        return [skipped("close_session", "daemon CPU per Connection: close session", "needs root and clang",
                        command=cmd)]  # fmt: skip
    figures = measure(BATCH, 2 if quick else 5)
    return [
        Row("close_session", f"daemon CPU per session, {phase}", figures[phase], "µs", "-", None, target="-",
            note=f"offload_syn, L7, {BATCH:,} sessions a poll", command=cmd, extra=figures if phase == "total" else {})
        for phase in (*PHASES, "total")
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=BATCH, help=f"sessions per round (default {BATCH})")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", action="store_true", help="cProfile the timed rounds; the top functions")
    args = parser.parse_args()
    where = Path(tempfile.mkdtemp(prefix="mplslb-close-")) / "profile" if args.profile else None
    try:
        figures = measure(args.batch, args.rounds, profile=where)
        if args.json:
            print(json.dumps(figures))
        else:
            for key in (*PHASES, "total"):
                print(f"{key:8} {figures[key]:8.1f} µs per session")
            print({k: v for k, v in figures.items() if k not in (*PHASES, "total")})
        if where is not None:
            stats = pstats.Stats(str(where), stream=sys.stdout)
            stats.sort_stats("tottime").print_stats(int(os.environ.get("TOP", "40")))
    finally:
        if where is not None:
            shutil.rmtree(where.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
